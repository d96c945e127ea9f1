"""Every metric against a value computed by hand on a toy case, plus the chunked per-token statistics
against a plain full-vocabulary log-softmax and the per-example statistics of a tiny model."""

import math

import pytest
import torch

from conftest import make_model, tokenizer_for
from unlearn_fast.eval import metrics as M
from unlearn_fast.train.scoring import token_stats
from unlearn_fast.train.data import Example
from unlearn_fast.eval.evaluation import evaluate_model, example_stats, membership_inference

LN2 = math.log(2)


# ---- text similarity -------------------------------------------------------------------------

def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 tokens of 6 each
    r = M.rouge_l("The cat sat on the mat", "the cat is on the mat")
    assert r.precision == pytest.approx(5 / 6) and r.recall == pytest.approx(5 / 6)
    assert r.fmeasure == pytest.approx(5 / 6)
    # one common token: P = 1/1, R = 1/3, F = 2·(1/3)/(4/3) = 0.5
    r = M.rouge_l("Paris", "paris is big")
    assert (r.precision, r.recall, r.fmeasure) == pytest.approx((1.0, 1 / 3, 0.5))
    # order matters for a subsequence: "b a" vs "a b" share an LCS of 1
    assert M.rouge_l_f("b a", "a b") == pytest.approx(0.5)
    assert M.rouge_l("", "a b") == (0.0, 0.0, 0.0)
    assert M.rouge_l("x y", "a b").fmeasure == 0.0


def test_exact_match_and_exact_memorization():
    assert M.exact_match("  Paris. ", "paris") == 1.0
    assert M.exact_match("Paris France", "Paris") == 0.0
    assert M.exact_memorization([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        M.exact_memorization([1], [1, 2])


# ---- ranking ---------------------------------------------------------------------------------

def test_auc_known_scores_and_ties():
    # pairs (pos > neg): 0.9 beats both, 0.8 beats both, 0.4 beats 0.3 only: 5 of 6
    assert M.auc([0.9, 0.8, 0.4], [0.5, 0.3]) == pytest.approx(5 / 6)
    # ties count one half: (1 vs 1) twice = 1, (1 vs 0) twice = 2 -> 3/4
    assert M.auc([1, 1], [1, 0]) == pytest.approx(0.75)
    assert M.auc([0, 0], [1, 1]) == 0.0
    with pytest.raises(ValueError):
        M.auc([], [1.0])


def test_mia_auc_orientation_and_privleak():
    # loss-like scores: the forget set has low loss (memorised) -> AUC 1; swapped -> 0; equal -> 0.5
    assert M.mia_auc([0.1, 0.2], [1.0, 2.0]) == 1.0
    assert M.mia_auc([1.0, 2.0], [0.1, 0.2]) == 0.0
    assert M.mia_auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    # MUSE privleak: ((1-0.75) - (1-0.5)) / (1-0.5) * 100 = -50
    assert M.privleak(0.75, 0.5) == pytest.approx(-50.0)
    assert M.privleak(0.5, 0.5) == pytest.approx(0.0)
    assert M.rel_diff(1.5, 1.0) == pytest.approx(50.0)


# ---- Kolmogorov-Smirnov ----------------------------------------------------------------------

def test_ks_exact_equal_sizes_hand_computed():
    # disjoint samples of 3: D = 1 and only 2 of the C(6,3) = 20 orderings reach it
    r = M.ks_2samp([1, 2, 3], [4, 5, 6])
    assert (r.statistic, r.method) == (1.0, "exact") and r.pvalue == pytest.approx(2 / 20)
    # interleaved: D = 1/4 (h = 1): 2·(C(8,3) − C(8,2) + C(8,1) − C(8,0)) / C(8,4) = 2·35/70 = 1
    r = M.ks_2samp([1, 3, 5, 7], [2, 4, 6, 8])
    assert r.statistic == pytest.approx(0.25) and r.pvalue == pytest.approx(1.0)
    # D = 3/5 (at t = 3 and t = 7), n = 5, h = 3: 2·C(10,2)/C(10,5) = 90/252
    r = M.ks_2samp([1, 2, 3, 6, 7], [4, 5, 8, 9, 10])
    assert r.statistic == pytest.approx(0.6) and r.pvalue == pytest.approx(90 / 252)


def test_ks_exact_unequal_sizes_hand_computed():
    # m = 4, n = 3, disjoint: D = 1, p = 2 / C(7,3) = 2/35
    r = M.ks_2samp([1, 2, 3, 4], [5, 6, 7])
    assert r.statistic == 1.0 and r.pvalue == pytest.approx(2 / 35, rel=1e-12)
    # a tiny p-value goes through the direct complement recursion and keeps its relative precision
    # (1 − P(inside) would round to 0 here): m = 30, n = 40 disjoint: 2 / C(70,30) ≈ 3.6e-20
    r = M.ks_2samp(list(range(30)), list(range(100, 140)))
    assert r.pvalue == pytest.approx(2 / math.comb(70, 30), rel=1e-9, abs=0)
    # both lattice methods agree where both are accurate
    for m, n, bound in ((7, 13, 40), (12, 9, 30), (20, 30, 200)):
        assert M._exact_prob_inside(m, n, bound) == pytest.approx(M._exact_prob_outside(m, n, bound), abs=1e-12)


def test_ks_statistic_with_ties():
    # F_x jumps to 2/3 at 1 while F_y is at 1/3 there: D = 1/3 (ties evaluated at the shared value)
    assert M.ks_statistic([1, 1, 2], [1, 2, 2]) == pytest.approx(1 / 3)


def test_kolmogorov_distribution_known_values():
    assert M.kolmogorov_sf(1.3581) == pytest.approx(0.05, abs=1e-5)     # the 5 % critical value
    assert M.kolmogorov_sf(1.6276) == pytest.approx(0.01, abs=1e-5)     # the 1 % critical value
    assert M.kolmogorov_sf(1.0) == pytest.approx(1 - 0.7300003283, abs=1e-9)  # K(1) = 0.7300003
    assert M.kolmogorov_sf(0.0) == 1.0
    # the two series forms agree where they switch
    below = 1.0 - math.sqrt(2 * math.pi) / 1.18 * sum(math.exp(-((2 * k - 1) ** 2) * math.pi ** 2 / (8 * 1.18 ** 2))
                                                       for k in range(1, 8))
    assert M.kolmogorov_sf(1.18) == pytest.approx(below, abs=1e-12)


def test_ks_asymptotic_and_auto_switch():
    # asymptotic: Q(sqrt(3·3/6)·1) = 2(e^{-3} − e^{-12} + e^{-27} ...) = 0.0995622...
    r = M.ks_2samp([1, 2, 3], [4, 5, 6], method="asymp")
    assert r.method == "asymp"
    assert r.pvalue == pytest.approx(2 * (math.exp(-3) - math.exp(-12) + math.exp(-27)), rel=1e-9)
    big = M.ks_2samp([i / 10001 for i in range(10001)], [0.5, 0.6, 0.7])
    assert big.method == "asymp"  # scipy's auto rule: exact up to max(n, m) = 10 000
    assert M.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)


# ---- membership-inference scores -------------------------------------------------------------

def test_loss_zlib_min_k_hand_computed():
    lp = [-0.1, -5.0, -0.2, -3.0, -0.5]
    assert M.mia_loss(lp) == pytest.approx(8.8 / 5)
    assert M.zlib_length("") == 8  # zlib's header + checksum of an empty input
    assert M.mia_zlib([-1.0, -3.0], "") == pytest.approx(2.0 / 8)
    # k = 0.4 of 5 tokens -> the 2 lowest: (-5 - 3)/2 = -4 -> score 4
    assert M.mia_min_k(lp, 0.4) == pytest.approx(4.0)
    assert M.mia_min_k(lp, 0.2) == pytest.approx(5.0)
    assert M.mia_min_k(lp, 0.1) == pytest.approx(5.0)  # at least one token
    with pytest.raises(ValueError):
        M.mia_min_k([], 0.4)


def test_min_k_plus_plus_on_a_known_distribution():
    """p = (1/2, 1/4, 1/8, 1/8): μ = E[log p] = −1.75 ln 2, Var = 0.6875 (ln 2)², so the z-score of
    token 0 is 0.75/√0.6875 and of token 3 is −1.25/√0.6875."""
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    weight = torch.log(p).unsqueeze(1)  # [V=4, H=1]: logits = log p for hidden state [1]
    hidden = torch.ones(2, 1)
    stats = token_stats(hidden, weight, torch.tensor([0, 3]), vocab_chunk=3)  # 2 vocabulary tiles
    assert stats.mean_logprob.tolist() == pytest.approx([-1.75 * LN2] * 2, abs=1e-6)
    assert stats.var_logprob.tolist() == pytest.approx([0.6875 * LN2 ** 2] * 2, abs=1e-6)
    assert stats.logprob.tolist() == pytest.approx([-LN2, -3 * LN2], abs=1e-6)
    assert stats.argmax_hit.tolist() == [True, False]
    z = M.min_k_plus_plus_z(stats.logprob.tolist(), stats.mean_logprob.tolist(), stats.var_logprob.tolist())
    s = math.sqrt(0.6875)
    assert z == pytest.approx([0.75 / s, -1.25 / s], abs=1e-5)
    # k = 0.5 of 2 tokens -> the lowest z only
    assert M.mia_min_k_plus_plus(stats.logprob.tolist(), stats.mean_logprob.tolist(),
                                 stats.var_logprob.tolist(), k=0.5) == pytest.approx(1.25 / s, abs=1e-5)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_token_stats_match_a_full_log_softmax(softcap):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(41, 8, generator=g) * 2, torch.randn(301, 8, generator=g)
    bias, targets = torch.randn(301, generator=g), torch.randint(0, 301, (41,), generator=g)
    s = token_stats(hidden, weight, targets, bias=bias, logit_scale=0.5, logit_softcap=softcap,
                      row_chunk=16, vocab_chunk=64)
    z = (hidden @ weight.t() + bias) * 0.5
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z.double(), -1)
    mu = (lp.exp() * lp).sum(-1)
    var = (lp.exp() * lp * lp).sum(-1) - mu ** 2
    torch.testing.assert_close(s.logprob, lp.gather(1, targets[:, None]).squeeze(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.mean_logprob, mu, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.var_logprob, var, atol=1e-5, rtol=0)
    assert torch.equal(s.argmax_hit, z.argmax(-1) == targets)


# ---- per-example statistics of a model -------------------------------------------------------

FORGET = [Example(prompt="The capital of Zorbia is", response=" Quellton"),
          Example(prompt="Mirta Vasquez likes", response=" green tea")]
HELD_OUT = [Example(prompt="Hugo Bern eats", response=" apples"),
            Example(prompt="The capital of Norland is", response=" Vik"),
            Example(prompt="Ada plays", response=" chess")]


def test_example_stats_match_the_model_logits():
    model, tok = make_model("llama"), tokenizer_for("llama")
    stats = example_stats(model, tok, "causal", FORGET)
    for ex, st in zip(FORGET, stats):
        prompt = tok(ex.prompt)["input_ids"]
        answer = tok(ex.response, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        positions = range(len(prompt) - 1, len(prompt) + len(answer) - 1)
        token_lp = [logp[t, answer[i]].item() for i, t in enumerate(positions)]
        assert st["tokens"] == len(answer)
        assert st["loss"] == pytest.approx(-sum(token_lp) / len(answer), abs=1e-4)
        assert st["mia_loss"] == pytest.approx(st["loss"])
        assert st["mia_zlib"] == pytest.approx(st["loss"] / M.zlib_length(ex.response), abs=1e-5)
        assert st["mia_min_k"] == pytest.approx(M.mia_min_k(token_lp, 0.4), abs=1e-4)
        hits = [logp[t].argmax().item() == answer[i] for i, t in enumerate(positions)]
        assert st["exact_memorization"] == pytest.approx(sum(hits) / len(hits))


def test_membership_inference_and_evaluate_model():
    model, tok = make_model("llama"), tokenizer_for("llama")
    forget, held = example_stats(model, tok, "causal", FORGET), example_stats(model, tok, "causal", HELD_OUT)
    aucs = membership_inference(forget, held)
    assert set(aucs) == set(M.ATTACKS)
    assert aucs["mia_loss"] == M.mia_auc([s["mia_loss"] for s in forget], [s["mia_loss"] for s in held])
    result = evaluate_model(model, tok, "causal", {"forget": FORGET, "retain": HELD_OUT[:1], "test": HELD_OUT},
                            max_new_tokens=3)
    f = result["figures"]
    assert f["mia"] == pytest.approx(aucs)
    assert f["forget_lm_loss"] == f["forget_loss"] == pytest.approx(sum(s["loss"] for s in forget) / 2)
    for name in ("forget", "retain", "test"):
        for key in ("accuracy", "exact_match", "rougeL_recall", "rougeL_f1", "loss", "perplexity"):
            assert f"{name}_{key}" in f
    assert len(result["per_example"]["test"]) == 3


def test_evaluate_model_classification_accuracy_matches_predictions():
    """A classifier's accuracy comes from the per-example pass; it must equal argmax(logits) == label."""
    from unlearn_fast.eval.evaluation import classification_hits

    model, tok = make_model("bert"), tokenizer_for("bert")
    texts = ["a fine film", "dull and long", "ok", "the best of the year!", "no", "why?", "so-so plot"]
    examples = [Example(text=t) for t in texts]
    with torch.no_grad():
        enc = tok(texts, return_tensors="pt", padding=True)
        pred = model(**enc).logits.argmax(-1).tolist()
    labels = pred[:4] + [1 - p for p in pred[4:]]  # 4 of 7 right by construction
    result = evaluate_model(model, tok, "classification", {"forget": examples[:3], "test": examples},
                            {"forget": labels[:3], "test": labels})
    f = result["figures"]
    assert f["test_accuracy"] == pytest.approx(4 / 7)
    assert f["forget_accuracy"] == 1.0
    assert f["test_accuracy"] == pytest.approx(sum(classification_hits(model, tok, examples, labels)) / 7)
    assert set(f["mia"]) == set(M.ATTACKS) and len(result["per_example"]["test"]) == 7
