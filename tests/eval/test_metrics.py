"""Every metric on fixed inputs (hand-made rows of per-token log-probabilities, argmax hits and strings)
against the number open-unlearning's published formula gives, computed here from that formula
(``src/evals/metrics`` of github.com/locuslab/open-unlearning, TOFU's ``aggregate_eval_stat.py``) and
not from our code; plus the chunked per-token statistics against a plain full-vocabulary log-softmax
and the per-example statistics of a tiny model. The truth ratio's tests are in test_truth_ratio.py."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score

from conftest import make_model, tokenizer_for
from unlearn_fast.eval import metrics as M
from unlearn_fast.train.scoring import token_stats
from unlearn_fast.train.data import Example
from unlearn_fast.eval.per_example import evaluate_model, example_stats, membership_inference

LN2 = math.log(2)

# fixed per-token log-probabilities of three answers (one row per answer)
ROWS = [[-0.2, -1.1, -0.4], [-2.0, -0.7], [-0.05, -0.3, -3.2, -0.9]]


def avg_loss(row):
    """open-unlearning's ``avg_loss``: summed token NLL / number of target tokens."""
    return float(np.sum(-np.array(row)) / len(row))


# ---- text similarity -------------------------------------------------------------------------

def test_rouge_l_is_rouge_score_with_the_porter_stemmer():
    # rouge_score's tokens: lowercase, non-alphanumerics to spaces, Porter stem of tokens longer than 3:
    # "The cats were sitting." -> the cat were sit; "the cat sat" -> the cat sat: LCS = 2 ("the cat")
    r = M.rouge_l("The cats were sitting.", "the cat sat")
    assert (r.precision, r.recall) == pytest.approx((2 / 4, 2 / 3))
    assert r.fmeasure == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    # punctuation and case do not count: "Paris." is "paris"
    assert M.rouge_l("Paris.", "paris is big").recall == pytest.approx(1 / 3)
    assert M.rouge_l("", "a b") == (0.0, 0.0, 0.0)
    # open-unlearning's own call (eval_text_similarity): scorer.score(ground_truth, generation)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for gen, gt in [("He was born in 1952 in Paris, France.", "Born in Paris in 1952"),
                    ("The author writes fantasy novels", "She is known for writing fantasy novels.")]:
        want = scorer.score(gt, gen)["rougeL"]
        assert M.rouge_l(gen, gt) == pytest.approx((want.precision, want.recall, want.fmeasure))


def test_rouge_needs_no_nltk_data(monkeypatch):
    """The Porter stemmer is code, not data: scoring works with every nltk data look-up and download refused."""
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError("nltk data was looked up")

    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(nltk.data, "find", refuse)
    monkeypatch.setattr(nltk.data, "load", refuse)
    M._rouge_scorer.cache_clear()
    assert M.rouge_l("dogs running", "the dog runs").recall == pytest.approx(2 / 3)  # dog run


def test_exact_match_and_exact_memorization():
    assert M.exact_match("  Paris. ", "paris") == 1.0
    assert M.exact_match("Paris France", "Paris") == 0.0
    assert M.exact_memorization([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        M.exact_memorization([1], [1, 2])


def test_extraction_strength_published_formula():
    """ES = 1 − min{k : the argmax continuation from y_<k is y_≥k} / |y| (Wang et al. 2025), computed by
    brute force over every k ≤ n."""
    for hits in ([True, True, False, True, True], [True] * 4, [False, True], [True, False], [False], [True]):
        n = len(hits)
        k = min(k for k in range(n + 1) if all(hits[k:]))
        assert M.extraction_strength(hits) == pytest.approx(1 - k / n), hits
        # open-unlearning's loop stops at k = n − 1: the same number unless the last token is missed
        ou_k = next((k for k in range(n) if all(hits[k:])), n - 1)
        if hits[-1]:
            assert M.extraction_strength(hits) == pytest.approx(1 - ou_k / n)
    assert M.extraction_strength([True, True, False, True, True]) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        M.extraction_strength([])


# ---- probabilities, model utility ------------------------------------------------------------

def test_probability_length_normalised():
    # open-unlearning's evaluate_probability: prob = exp(-avg_loss); probability = mean over examples
    want = float(np.mean([np.exp(-avg_loss(r)) for r in ROWS]))
    got = sum(M.probability(M.mia_loss(r)) for r in ROWS) / len(ROWS)
    assert got == pytest.approx(want, rel=1e-12)
    assert M.probability(-sum([-0.2, -1.1, -0.4]) / 3) == pytest.approx(math.exp(-1.7 / 3))


def test_probability_w_options():
    # open-unlearning's probability_w_options: correct / (correct + sum(wrong) + 1e-10), per question
    correct, wrong = ROWS[0], ROWS[1:]
    p_c, p_w = np.exp(-avg_loss(correct)), np.array([np.exp(-avg_loss(w)) for w in wrong])
    want = p_c / (p_c + p_w.sum() + 1e-10)
    assert M.probability_w_options(avg_loss(correct), [avg_loss(w) for w in wrong]) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError):
        M.probability_w_options(1.0, [])


def test_model_utility_harmonic_mean():
    # TOFU: hmean of the retain-side figures; 3 / (1/a + 1/b + 1/c) by hand
    a, b, c = 0.9, 0.45, 0.6
    assert M.model_utility([a, b, c]) == pytest.approx(3 / (1 / a + 1 / b + 1 / c), rel=1e-12)
    assert M.model_utility([a, b, c]) == pytest.approx(0.6, rel=1e-12)
    assert M.model_utility([0.5, 0.0, 1.0]) == 0.0  # one figure at 0 sinks it
    with pytest.raises(ValueError):
        M.model_utility([])


# ---- forget quality, AUC, privleak -----------------------------------------------------------

def test_forget_quality_is_scipy_ks_2samp():
    # 3 vs 3 disjoint samples: D = 1 and 2 of the C(6, 3) = 20 orderings reach it: p = 0.1 exactly
    assert M.forget_quality([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]) == pytest.approx(0.1)
    assert M.ks_test([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]) == pytest.approx((1.0, 0.1))
    # TOFU's forget quality on truth ratios built from fixed log-prob rows, as get_forget_quality in
    # TOFU's aggregate_eval_stat.py: exp(mean perturbed avg loss − paraphrased avg loss), then ks_2samp
    g = np.random.default_rng(0)
    para = [[-g.uniform(0, 2, 4) for _ in range(12)] for _ in range(2)]
    pert = [[[-g.uniform(0, 3, 5) for _ in range(3)] for _ in range(12)] for _ in range(2)]
    ratios = []
    for model in range(2):
        para_loss = np.array([avg_loss(r) for r in para[model]])
        pert_loss = np.array([[avg_loss(r) for r in q] for q in pert[model]]).mean(-1)
        ratios.append(np.exp(para_loss - pert_loss))  # TOFU: 1/R; the KS p-value is the same for R
    want = scipy.stats.ks_2samp(ratios[0], ratios[1]).pvalue
    ours = [[M.truth_ratio(avg_loss(p), [avg_loss(r) for r in q]) for p, q in zip(para[m], pert[m])]
            for m in range(2)]
    assert M.forget_quality(ours[0], ours[1]) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError):
        M.ks_test([], [1.0])


def test_auc_agrees_with_sklearn():
    assert M.auc([0.9, 0.8, 0.4], [0.5, 0.3]) == pytest.approx(5 / 6)  # 5 of 6 pairs
    g = np.random.default_rng(1)
    for n_pos, n_neg in ((3, 2), (17, 40), (50, 50)):
        pos, neg = g.integers(0, 6, n_pos).tolist(), g.integers(0, 6, n_neg).tolist()  # many ties
        want = roc_auc_score([1] * n_pos + [0] * n_neg, pos + neg)
        assert M.auc(pos, neg) == pytest.approx(want, rel=1e-12)
        # open-unlearning's mia_auc: label 0 = forget, 1 = holdout
        assert M.mia_auc(pos, neg) == pytest.approx(roc_auc_score([0] * n_pos + [1] * n_neg, pos + neg), rel=1e-12)
    assert M.mia_auc([0.1, 0.2], [1.0, 2.0]) == 1.0 and M.mia_auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    with pytest.raises(ValueError):
        M.auc([], [1.0])


def test_privleak_open_unlearning_formula():
    # Min-K % scores (k = 0.4) of fixed rows for the unlearned and the retrained model, AUC as
    # open-unlearning's mia_auc, privleak = ((1 - auc) - (1 - ref)) / (1 - ref + 1e-10) * 100
    forget = [[-0.1, -0.2, -0.1, -0.3, -0.2], [-0.5, -0.1, -0.9], [-1.5, -0.2, -0.1, -0.1, -0.4]]
    holdout = [[-2.0, -0.4, -1.1], [-0.2, -3.3, -2.2, -0.9], [-1.0, -1.2], [-0.3, -0.2, -0.4]]
    retrained_forget = [[-1.1, -0.9, -2.0], [-0.4, -0.3, -0.6, -1.9], [-0.8, -0.2]]

    def min_k(row, k=0.4):  # open-unlearning's MinKProbAttack.compute_score
        lp = np.sort(np.array(row))
        return -np.mean(lp[:max(1, int(len(lp) * k))])

    def ou_auc(f, h):
        return roc_auc_score([0] * len(f) + [1] * len(h), [min_k(r) for r in f] + [min_k(r) for r in h])

    auc, ref = ou_auc(forget, holdout), ou_auc(retrained_forget, holdout)
    want = ((1 - auc) - (1 - ref)) / ((1 - ref) + 1e-10) * 100
    ours = [M.mia_auc([M.mia_min_k(r) for r in f], [M.mia_min_k(r) for r in holdout])
            for f in (forget, retrained_forget)]
    assert ours == pytest.approx([auc, ref], rel=1e-12)
    assert M.privleak(*ours) == pytest.approx(want, rel=1e-9)
    assert M.privleak(0.75, 0.5) == pytest.approx(-50.0) and M.privleak(0.5, 0.5) == pytest.approx(0.0)
    assert M.rel_diff(1.5, 1.0) == pytest.approx(50.0)


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
        k = min(k for k in range(len(hits) + 1) if all(hits[k:]))
        assert st["extraction_strength"] == pytest.approx(1 - k / len(hits))


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
        for key in ("accuracy", "exact_match", "Q_A_ROUGE", "rougeL_f1", "loss", "perplexity", "Q_A_Prob",
                    "extraction_strength"):
            assert f"{name}_{key}" in f
    stats = result["per_example"]
    assert f["forget_Q_A_Prob"] == pytest.approx(sum(math.exp(-s["loss"]) for s in forget) / 2)
    assert f["forget_extraction_strength"] == pytest.approx(sum(s["extraction_strength"] for s in forget) / 2)
    # no perturbed answers on the retain set: model utility is the harmonic mean of its Prob and ROUGE
    want = scipy.stats.hmean([f["retain_Q_A_Prob"], f["retain_Q_A_ROUGE"]])
    assert f["model_utility"] == pytest.approx(want) and len(stats["retain"]) == 1
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
