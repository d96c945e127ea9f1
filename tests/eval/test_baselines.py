"""Baselines: each loss has the documented value and sign (against a direct computation from the model's
logits), NPO's gradient is the gradient of its formula, one training step moves the forget loss the right
way, and the CLI runs them."""

import json
import math

import pytest
import torch

from conftest import FACTS_FORGET, FACTS_RETAIN, make_model, save_model_dir, tokenizer_for
from unlearn_fast.io.artifacts import MANIFEST_FILE, load_layers, model_fingerprint
from unlearn_fast.eval.baselines import (BASELINE_MANIFEST, BaselineConfig, build_objective,
                                    encode_for_baseline, run_baseline)
from unlearn_fast.cli import main
from unlearn_fast.train.data import Example
from unlearn_fast.train.encoding import collate
from unlearn_fast.errors import UnlearnFastError
from unlearn_fast.eval.evaluation import mean_loss
from unlearn_fast.model.layers import LayerConfig, sites
from unlearn_fast.ops.loss_head import IGNORE_INDEX
from unlearn_fast.train.trainer import TrainConfig

FORGET = [Example(**row) for row in FACTS_FORGET]
RETAIN = [Example(**row) for row in FACTS_RETAIN]
PAD = 0


def rows_and_batch(model, tok):
    f = encode_for_baseline(FORGET, tok, "causal", model.config, forget=True)
    r = encode_for_baseline(RETAIN, tok, "causal", model.config, forget=False)
    return f, r, collate(r + f, PAD)


def direct_ce(model, batch):
    """Per-position CE from the model's own logits [B, T] (0 where there is no target)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["targets"]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return ce * (targets != IGNORE_INDEX)


def part_means(ce, batch):
    has = batch["targets"] != IGNORE_INDEX
    forget = batch["forget"].unsqueeze(1).expand_as(has)
    return ce[has & ~forget].mean(), ce[has & forget].mean()


@pytest.mark.parametrize("method,alpha,gamma,sign", [
    ("finetune", 1.0, 0.0, +1),   # L = +CE_retain
    ("ga", 0.0, 1.0, -1),         # L = -CE_forget
    ("graddiff", 1.0, 1.0, None),  # L = CE_retain - CE_forget
])
def test_cross_entropy_baselines_value_and_sign(method, alpha, gamma, sign):
    model, tok = make_model("llama"), tokenizer_for("llama")
    f, r, batch = rows_and_batch(model, tok)
    objective = build_objective(model, "causal", BaselineConfig(method=method), f, PAD)
    loss, terms = objective(batch)
    with torch.no_grad():
        retain_ce, forget_ce = part_means(direct_ce(model, batch), batch)
    expected = alpha * retain_ce - gamma * forget_ce
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    if sign is not None:
        assert math.copysign(1, loss.item()) == sign
    assert {"retain_kl", "forget_kl", "task_loss", "forget_lm_loss"} <= set(terms)


def test_npo_value_and_gradient_match_its_formula():
    """L = (2/β)·mean_s softplus(β·(log π(y_s) − log π_ref(y_s))) + α·mean CE_retain, β = 0.1."""
    model, tok = make_model("llama"), tokenizer_for("llama")
    f, r, batch = rows_and_batch(model, tok)
    config = BaselineConfig(method="npo", params="full")
    objective = build_objective(model, "causal", config, f, PAD)
    # the reference is the model as it was: move the model away from it first, so the ratio is not 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for p in model.parameters():
        p.requires_grad_(True)
    ref_model = make_model("llama")
    with torch.no_grad():
        ref_seq = -(direct_ce(ref_model, batch) * batch["forget"].unsqueeze(1)).sum(1)[batch["forget"]]
    loss, terms = objective(batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ce = direct_ce(model, batch)
    seq = -(ce * batch["forget"].unsqueeze(1)).sum(1)[batch["forget"]]
    retain_ce, _ = part_means(ce, batch)
    expected = (2 / 0.1) * torch.nn.functional.softplus(0.1 * (seq - ref_seq)).mean() + retain_ce
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=2e-5, rtol=1e-3)


def test_npo_at_the_reference_is_two_over_beta_log_two():
    model, tok = make_model("llama"), tokenizer_for("llama")
    f, r, _ = rows_and_batch(model, tok)
    objective = build_objective(model, "causal", BaselineConfig(method="npo", alpha=0.0, beta=0.5), f, PAD)
    loss, terms = objective(collate(f, PAD))
    assert loss.item() == pytest.approx(2 / 0.5 * math.log(2), rel=1e-5)
    assert terms["npo"] == pytest.approx(2 / 0.5 * math.log(2), rel=1e-5)


def forget_retain_losses(model, tok):
    f = encode_for_baseline(FORGET, tok, "causal", model.config, forget=False)
    r = encode_for_baseline(RETAIN, tok, "causal", model.config, forget=False)
    return mean_loss(model, "causal", f, PAD), mean_loss(model, "causal", r, PAD)


@pytest.mark.parametrize("method,params", [("ga", "full"), ("graddiff", "full"), ("npo", "full"),
                                           ("ga", "layers"), ("npo", "layers")])
def test_one_step_raises_the_forget_loss(method, params):
    model, tok = make_model("llama"), tokenizer_for("llama")
    before_forget, _ = forget_retain_losses(model, tok)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = BaselineConfig(method=method, params=params, layers=LayerConfig(rank=4))
    result = run_baseline(model, tok, FORGET, RETAIN, config,
                          TrainConfig(max_steps=1, warmup_ratio=0.0, lr=1e-2, progress=False), log=lambda m: None)
    assert result.model is model and result.training.steps == 1
    after_forget, _ = forget_retain_losses(model, tok)
    assert after_forget > before_forget + 1e-3
    assert not any(p.requires_grad for p in model.parameters())
    if params == "layers":  # the adapter variant leaves the base weights alone
        assert len(sites(model)) == 2
        for name, value in base.items():
            key = name.replace(".mlp.", ".mlp.base.")
            assert torch.equal(model.state_dict()[key], value), name
    else:
        assert not sites(model)


def test_finetune_lowers_the_retain_loss_and_retrain_starts_fresh():
    model, tok = make_model("llama"), tokenizer_for("llama")
    _, before_retain = forget_retain_losses(model, tok)
    run_baseline(model, tok, FORGET, RETAIN, BaselineConfig(method="finetune"),
                 TrainConfig(max_steps=1, warmup_ratio=0.0, lr=1e-2, progress=False), log=lambda m: None)
    assert forget_retain_losses(model, tok)[1] < before_retain - 1e-3
    original = make_model("llama", seed=3)
    kept = {k: v.clone() for k, v in original.state_dict().items()}
    result = run_baseline(original, tok, FORGET, RETAIN, BaselineConfig(method="retrain"),
                          TrainConfig(max_steps=1, lr=1e-12, progress=False, seed=7), log=lambda m: None)
    assert result.model is not original
    assert all(torch.equal(original.state_dict()[k], v) for k, v in kept.items())  # untouched
    fresh = make_model("llama", seed=7)  # retrain re-initialises from the config with the training seed
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[k], v, atol=1e-9, rtol=0)
    assert not torch.allclose(fresh.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_config_is_checked():
    with pytest.raises(UnlearnFastError):
        BaselineConfig(method="eul")
    with pytest.raises(UnlearnFastError):
        BaselineConfig(method="retrain", params="layers")
    with pytest.raises(UnlearnFastError):
        BaselineConfig(method="npo", beta=0.0)
    assert BaselineConfig(method="npo", params="layers").label == "npo-layers"


def test_cli_runs_baselines(tmp_path, capsys):
    model_dir = save_model_dir("llama", tmp_path / "model")
    for name, rows in (("forget", FORGET), ("retain", RETAIN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in rows))
    common = ["unlearn", "--model", str(model_dir), "--forget", str(tmp_path / "forget.jsonl"),
              "--retain", str(tmp_path / "retain.jsonl"), "--max-steps", "1", "--no-progress"]
    assert main(common + ["--method", "graddiff", "--out", str(tmp_path / "gd")]) == 0
    record = json.loads((tmp_path / "gd" / BASELINE_MANIFEST).read_text())
    assert record["method"] == "graddiff" and record["baseline"]["params"] == "full"
    assert (tmp_path / "gd" / "config.json").is_file()
    assert main(common + ["--method", "npo", "--train-params", "layers", "--rank", "4",
                          "--out", str(tmp_path / "npo")]) == 0
    manifest = json.loads((tmp_path / "npo" / MANIFEST_FILE).read_text())
    assert manifest["method"] == "npo-layers"
    base = make_model("llama")
    assert manifest["base_model"]["fingerprint"] == model_fingerprint(base)
    load_layers(base, tmp_path / "npo")  # an ordinary artifact
    assert len(sites(base)) == 2
    capsys.readouterr()
    assert main(common + ["--method", "retrain", "--train-params", "layers", "--out", str(tmp_path / "x")]) == 2
    assert "error: retrain" in capsys.readouterr().err
