"""SimNPO, RMU and IdK (issue 24, item 4): each loss on one batch matches a float64 reference written here
from its formula on a tiny model, one step moves it down, IdK's refusals are shipped and chosen
deterministically, RMU's block and coefficient are options, and the CLI runs all three."""

import copy
import json
import math

import pytest
import torch

from conftest import FACTS_FORGET, FACTS_RETAIN, make_model, save_model_dir, tokenizer_for
from unlearn_fast.cli import main
from unlearn_fast.errors import ModelError, UnlearnFastError
from unlearn_fast.eval.baseline_objectives import REFUSALS
from unlearn_fast.eval.baselines import (BASELINE_MANIFEST, BaselineConfig, build_objective,
                                         encode_for_baseline, idk_examples, rmu_block, run_baseline)
from unlearn_fast.io.artifacts import MANIFEST_FILE
from unlearn_fast.ops.loss_head import IGNORE_INDEX
from unlearn_fast.train.data import Example
from unlearn_fast.train.encoding import collate
from unlearn_fast.train.trainer import TrainConfig

FORGET = [Example(**row) for row in FACTS_FORGET]
RETAIN = [Example(**row) for row in FACTS_RETAIN]
PAD = 0
ALPHA, GAMMA = 0.7, 1.3


def encoded(model, tok, forget=FORGET):
    f = encode_for_baseline(forget, tok, "causal", model.config, forget=True)
    r = encode_for_baseline(RETAIN, tok, "causal", model.config, forget=False)
    return f, r, collate(r + f, PAD)


def ce64(model, batch):
    """Per-position CE [B, T] in float64 from a float64 copy of the model (0 where there is no target)."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["targets"]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return ce * (targets != IGNORE_INDEX)


def masks(batch):
    has = batch["targets"] != IGNORE_INDEX
    forget = batch["forget"].unsqueeze(1).expand_as(has)
    return has & forget, has & ~forget


def test_simnpo_loss_matches_float64_formula_and_its_gradient():
    """L = γ·(−2/β)·mean_s log σ(β·(ℓ_s − δ)) + α·mean CE_retain, ℓ_s = mean CE of forget answer s."""
    beta, delta = 2.5, 0.5
    model, tok = make_model("llama"), tokenizer_for("llama")
    f, r, batch = encoded(model, tok)
    config = BaselineConfig(method="simnpo", alpha=ALPHA, gamma=GAMMA, beta=beta, simnpo_margin=delta)
    objective = build_objective(model, "causal", config, f, PAD)
    ce = ce64(model, batch)
    fpos, rpos = masks(batch)
    rows = batch["forget"].nonzero().flatten()
    nll = torch.stack([ce[i][fpos[i]].sum() / fpos[i].sum() for i in rows])
    expected = GAMMA * (-2 / beta) * torch.nn.functional.logsigmoid(beta * (nll - delta)).mean() \
        + ALPHA * ce[rpos].mean()
    for p in model.parameters():
        p.requires_grad_(True)
    loss, terms = objective(batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["simnpo"] == pytest.approx(float((-2 / beta) * torch.nn.functional.logsigmoid(beta * (nll - delta)).mean()),
                                            rel=1e-5)
    # the two-pass loss carries the formula's gradient (autograd through the float32 logits)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    t = batch["targets"]
    ce32 = torch.nn.functional.cross_entropy(logits.transpose(1, 2), t.clamp(min=0), reduction="none") * (t != IGNORE_INDEX)
    nll32 = torch.stack([ce32[i][fpos[i]].sum() / fpos[i].sum() for i in rows])
    direct = GAMMA * (-2 / beta) * torch.nn.functional.logsigmoid(beta * (nll32 - delta)).mean() + ALPHA * ce32[rpos].mean()
    direct.backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=2e-5, rtol=1e-3)


def block0_output64(model, batch):
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[1]  # the output of block 0 (the embeddings are hidden_states[0])


def test_rmu_loss_matches_float64_formula():
    """L = γ·mean_s mean_{t,d} (h − c·u)² over forget rows + α·mean_s mean_{t,d} (h − h⁰)² over retained rows,
    t over the answer tokens, u = normalised uniform [0, 1)^d from the seed, h⁰ the original model's."""
    coefficient, seed = 3.0, 5
    model, tok = make_model("llama"), tokenizer_for("llama")
    f, r, batch = encoded(model, tok)
    config = BaselineConfig(method="rmu", alpha=ALPHA, gamma=GAMMA, rmu_layer=0, rmu_coefficient=coefficient)
    objective = build_objective(model, "causal", config, f, PAD, r, seed=seed)
    h0 = block0_output64(model, batch)
    with torch.no_grad():  # move away from the original, so the retain term is not 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    h = block0_output64(model, batch)
    has = batch["targets"] != IGNORE_INDEX
    answer = torch.zeros_like(has)
    answer[:, 1:] = has[:, :-1]  # the answer tokens themselves (labels != -100 in open-unlearning)
    u = torch.rand(h.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    steer = coefficient * u / u.norm()
    forget = [((h[i][answer[i]] - steer) ** 2).mean() for i in range(len(batch["forget"])) if batch["forget"][i]]
    retain = [((h[i][answer[i]] - h0[i][answer[i]]) ** 2).mean()
              for i in range(len(batch["forget"])) if not batch["forget"][i]]
    expected = GAMMA * torch.stack(forget).mean() + ALPHA * torch.stack(retain).mean()
    loss, terms = objective(batch)
    assert float(torch.stack(retain).mean()) > 1e-6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["rmu_forget"] == pytest.approx(float(torch.stack(forget).mean()), rel=1e-5)
    assert terms["rmu_retain"] == pytest.approx(float(torch.stack(retain).mean()), rel=1e-5)


def test_rmu_layer_option():
    model = make_model("llama")  # two blocks: the middle one is block 1
    assert rmu_block(model)[0] == 1 and rmu_block(model, 0)[0] == 0
    with pytest.raises(UnlearnFastError):
        rmu_block(model, 2)
    with pytest.raises(UnlearnFastError):
        BaselineConfig(method="rmu", rmu_coefficient=0.0)
    with pytest.raises(ModelError):
        build_objective(make_model("t5"), "seq2seq", BaselineConfig(method="rmu"))


def test_idk_refusals_are_shipped_and_chosen_deterministically():
    assert len(REFUSALS) >= 20 and len(set(REFUSALS)) == len(REFUSALS)
    swapped = idk_examples(FORGET, seed=3)
    assert [e.prompt for e in swapped] == [e.prompt for e in FORGET]
    assert all(e.response in REFUSALS for e in swapped)
    assert idk_examples(FORGET, seed=3) == swapped
    assert idk_examples(FORGET[::-1], seed=3) == swapped[::-1]  # per prompt, not per position
    assert len({idk_examples([FORGET[0]], seed=s)[0].response for s in range(20)}) > 1
    with pytest.raises(UnlearnFastError):
        idk_examples([Example(text="just text")])


def test_idk_loss_matches_float64_formula():
    """L = γ·mean CE over the refusal tokens of the forget rows + α·mean CE over the retained targets."""
    model, tok = make_model("llama"), tokenizer_for("llama")
    f, r, batch = encoded(model, tok, idk_examples(FORGET, seed=0))
    objective = build_objective(model, "causal", BaselineConfig(method="idk", alpha=ALPHA, gamma=GAMMA), f, PAD)
    ce = ce64(model, batch)
    fpos, rpos = masks(batch)
    expected = GAMMA * ce[fpos].mean() + ALPHA * ce[rpos].mean()
    loss, terms = objective(batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["forget_lm_loss"] == pytest.approx(float(ce[fpos].mean()), rel=1e-5)


@pytest.mark.parametrize("method,params", [("simnpo", "full"), ("rmu", "full"), ("idk", "full"),
                                           ("simnpo", "layers"), ("rmu", "layers"), ("idk", "layers")])
def test_one_step_lowers_the_loss(method, params):
    model, tok = make_model("llama"), tokenizer_for("llama")
    forget = idk_examples(FORGET, seed=0) if method == "idk" else FORGET
    f, r, batch = encoded(model, tok, forget)
    config = BaselineConfig(method=method, params=params, rmu_coefficient=3.0)
    objective = build_objective(model, "causal", config, f, PAD, r, seed=0)
    with torch.no_grad():
        before = objective(batch)[0].item()
    result = run_baseline(model, tok, FORGET, RETAIN, config,
                          TrainConfig(max_steps=1, warmup_ratio=0.0, lr=1e-3, progress=False), log=lambda m: None)
    assert result.training.steps == 1 and math.isfinite(result.training.history[0]["loss"])
    with torch.no_grad():
        after = objective(batch)[0].item()
    assert after < before
    assert not any(p.requires_grad for p in model.parameters())


def test_cli_runs_simnpo_rmu_idk(tmp_path):
    model_dir = save_model_dir("llama", tmp_path / "model")
    for name, rows in (("forget", FORGET), ("retain", RETAIN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in rows))
    common = ["unlearn", "--model", str(model_dir), "--forget", str(tmp_path / "forget.jsonl"),
              "--retain", str(tmp_path / "retain.jsonl"), "--max-steps", "1", "--no-progress"]
    assert main(common + ["--method", "simnpo", "--beta", "2.5", "--simnpo-margin", "0.5",
                          "--out", str(tmp_path / "simnpo")]) == 0
    record = json.loads((tmp_path / "simnpo" / BASELINE_MANIFEST).read_text())
    assert record["method"] == "simnpo"
    assert record["baseline"]["beta"] == 2.5 and record["baseline"]["simnpo_margin"] == 0.5
    assert main(common + ["--method", "rmu", "--rmu-layer", "0", "--rmu-coefficient", "4",
                          "--out", str(tmp_path / "rmu")]) == 0
    record = json.loads((tmp_path / "rmu" / BASELINE_MANIFEST).read_text())
    assert record["method"] == "rmu"
    assert record["baseline"]["rmu_layer"] == 0 and record["baseline"]["rmu_coefficient"] == 4.0
    assert main(common + ["--method", "idk", "--train-params", "layers", "--rank", "4",
                          "--out", str(tmp_path / "idk")]) == 0
    assert json.loads((tmp_path / "idk" / MANIFEST_FILE).read_text())["method"] == "idk-layers"
