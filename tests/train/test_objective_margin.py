"""The forget margin and the retained-output penalty (issue 27), against float64 hand computations."""

import math

import pytest
import torch

from conftest import TASK_OF
from test_objective import LM_ARCHS, assert_grads_close, between, model_logits, objective_batch, trained_like
from unlearn_fast.cli import build_parser
from unlearn_fast.errors import ModelError
from unlearn_fast.model.layers import sites
from unlearn_fast.ops.loss_head import IGNORE_INDEX
from unlearn_fast.train.objective import RETAIN_OUTPUT, EULObjective, ObjectiveConfig

OFF = dict(alpha=0.0, lam=0.0, gamma=0.0, forget_kl_weight=0.0, sharpening_guard=False,
           forget_margin=None, retain_output_weight=0.0, forget_lm_bound=math.inf, forget_kl_bound=math.inf)


def gaps(model, task, batch):
    """max other logit − target logit at each forgotten target position (float64), and those positions."""
    with torch.no_grad():
        logits = model_logits(model, task, batch).double()
    targets = batch["targets"]
    positions = batch["forget"].unsqueeze(1).expand_as(targets) & (targets != IGNORE_INDEX)
    picked = logits[positions]
    t = targets[positions].unsqueeze(-1)
    return picked.scatter(-1, t, -math.inf).max(-1).values - picked.gather(-1, t).squeeze(-1), positions


@pytest.mark.parametrize("arch", LM_ARCHS)
def test_margin_stops_the_push_on_positions_already_forgotten(arch):
    model, task = trained_like(arch), TASK_OF[arch]
    batch = objective_batch(arch)
    gap, positions = gaps(model, task, batch)
    margin = between(gap)  # about half the forgotten positions sit beyond it
    done = gap > margin
    assert done.any() and (~done).any()
    objective = EULObjective(model, task, ObjectiveConfig(**{**OFF, "gamma": 1.0, "forget_margin": margin}))
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = objective(batch)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    # hand: −γ · the mean of CE over the positions not yet forgotten (the stopped ones leave the mean:
    # the last facts still answered are pushed as hard as the first)
    student = model_logits(model, task, batch).double()
    ce = -torch.log_softmax(student, -1)[positions].gather(-1, batch["targets"][positions].unsqueeze(-1)).squeeze(-1)
    expected = -(ce * (~done)).sum() / (~done).sum()
    want = torch.autograd.grad(expected, params, allow_unused=True)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert_grads_close(got, want)


@pytest.mark.parametrize("arch", LM_ARCHS)
def test_margin_beyond_every_gap_changes_nothing(arch):
    model, task = trained_like(arch), TASK_OF[arch]
    batch = objective_batch(arch)
    gap, _ = gaps(model, task, batch)
    weights = {**OFF, "gamma": 0.5, "forget_kl_weight": 1.0, "alpha": 0.8}
    plain, _ = EULObjective(model, task, ObjectiveConfig(**weights))(batch)
    wide, _ = EULObjective(model, task, ObjectiveConfig(**{**weights, "forget_margin": float(gap.max()) + 1}))(batch)
    torch.testing.assert_close(wide, plain)


def hand_penalty(model, task, batch):
    """Σ over sites of the mean over retained positions of mean_d (what the layers add)², in float64,
    from the feed-forward outputs captured by hooks and the layers' weights (relu layers)."""
    captured = {}
    hooks = [s.base.register_forward_hook(lambda m, i, o, s=s: captured.__setitem__(s, o)) for s in sites(model)]
    try:
        model_logits(model, task, batch)
    finally:
        for h in hooks:
            h.remove()
    kept = ~batch["forget"]
    kl_positions = batch["kl_mask"] & kept.unsqueeze(1).expand_as(batch["kl_mask"])
    linear = torch.nn.functional.linear
    total = 0.0
    for site, out in captured.items():
        x = out.double()
        delta = sum(linear(torch.relu(linear(x, layer.down.weight.double(), layer.down.bias.double())),
                           layer.up.weight.double(), layer.up.bias.double()) for layer in site.layers)
        square = delta.pow(2).mean(-1)
        if tuple(square.shape) == tuple(kl_positions.shape):  # decoder positions: the retain KL's
            total = total + (square * kl_positions).sum() / kl_positions.sum()
        elif task == "classification":  # each retained row's mean over its tokens, over the retained rows
            mask = batch["attention_mask"].double()
            rows = (square * mask).sum(1) / mask.sum(1)
            total = total + rows[kept].sum() / kept.sum()
        # a seq2seq encoder's sites are not penalised
    return total


@pytest.mark.parametrize("arch", list(TASK_OF))
def test_retained_output_penalty_is_the_mean_square_of_what_the_layers_add(arch):
    model, task = trained_like(arch), TASK_OF[arch]
    batch = objective_batch(arch)
    weights = {**OFF, "alpha": 0.8}
    params = [p for p in model.parameters() if p.requires_grad]
    base, _ = EULObjective(model, task, ObjectiveConfig(**weights))(batch)
    loss, terms = EULObjective(model, task, ObjectiveConfig(**{**weights, "retain_output_weight": 3.0}))(batch)
    expected = hand_penalty(model, task, batch)
    assert float(expected.detach()) > 0
    torch.testing.assert_close((loss - base).double(), 3.0 * expected, rtol=1e-4, atol=1e-7)
    assert terms[RETAIN_OUTPUT] == pytest.approx(float(expected), rel=1e-4)
    got = torch.autograd.grad(loss - base, params, allow_unused=True)
    want = torch.autograd.grad(3.0 * hand_penalty(model, task, batch), params, allow_unused=True)
    assert_grads_close(got, want, atol=1e-7)


def test_config_validation_and_the_paper_objective():
    with pytest.raises(ModelError, match="forget_margin"):
        ObjectiveConfig(forget_margin=-1.0)
    with pytest.raises(ModelError, match="retain_output_weight"):
        ObjectiveConfig(retain_output_weight=float("nan"))
    for bad in (-1, 1.5, True):
        with pytest.raises(ModelError, match="forget_routes"):
            ObjectiveConfig(forget_routes=bad)
    paper = ObjectiveConfig.paper()
    assert (paper.sharpening_guard, paper.forget_margin, paper.retain_output_weight, paper.forget_routes) == \
        (False, None, 0.0, 0)
    default = ObjectiveConfig()  # opt-in: scenario 1's fictitious facts were barely forgotten with them
    assert (default.forget_margin, default.retain_output_weight) == (None, 0.0)


def test_cli_margin_options(capsys):
    parser = build_parser()
    common = ["unlearn", "--model", "m", "--forget", "f.jsonl", "--retain", "r.jsonl", "--out", "o"]
    assert parser.parse_args(common + ["--forget-margin", "off"]).forget_margin is None
    assert parser.parse_args(common + ["--forget-margin", "2.5"]).forget_margin == 2.5
    with pytest.raises(SystemExit):
        parser.parse_args(common + ["--forget-margin", "-1"])
    assert "expected a number of nats" in capsys.readouterr().err
