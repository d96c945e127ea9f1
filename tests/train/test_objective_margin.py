"""The forget margin and the retained-output penalty (issue 27), against float64 hand computations."""

import math

import pytest
import torch

from conftest import TASK_OF
from test_objective import (LM_ARCHS, assert_grads_close, between, hand_loss, model_logits, objective_batch,
                            trained_like)
from unlearn_fast.cli import build_parser
from unlearn_fast.errors import ModelError
from unlearn_fast.model.layers import layers_disabled, sites
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


def hand_per_row_push(model, task, batch, done, gamma, forget_kl_weight, rows):
    """−Σ over forgotten rows of (weight / rows) · the row's mean over its positions not stopped
    (``done``), for the forget KL and the forget LM term, from float64 logits (differentiable)."""
    with torch.no_grad(), layers_disabled(model):
        log_pt = torch.log_softmax(model_logits(model, task, batch).double(), -1)
    log_ps = torch.log_softmax(model_logits(model, task, batch).double(), -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    targets = batch["targets"]
    ce = -log_ps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    forget = batch["forget"].unsqueeze(1).expand_as(targets)
    loss = log_ps.sum() * 0
    for values, mask, weight in ((kl, batch["kl_mask"] & forget, forget_kl_weight),
                                 (ce, (targets != IGNORE_INDEX) & forget, gamma)):
        for r in range(targets.shape[0]):
            pushed = mask[r] & ~done[r]
            if weight and pushed.any():
                loss = loss - weight / rows * values[r][pushed].mean()
    return loss


def margin_between_gaps(model, task, batch):
    """A forget margin with about half the forgotten target positions beyond it, and those positions."""
    gap, positions = gaps(model, task, batch)
    margin = between(gap)
    done = torch.zeros_like(positions)
    done[positions] = gap > margin
    assert done[positions].any() and (~done[positions]).any()
    return margin, done


@pytest.mark.parametrize("arch", LM_ARCHS)
def test_margin_stops_the_push_and_each_row_weighs_the_same(arch):
    model, task = trained_like(arch), TASK_OF[arch]
    batch = objective_batch(arch)
    margin, done = margin_between_gaps(model, task, batch)
    objective = EULObjective(model, task, ObjectiveConfig(**{**OFF, "gamma": 1.0, "forget_margin": margin}))
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = objective(batch)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    # hand: without rows_per_step, a mean over the batch's forgotten rows of each row's mean CE over
    # its positions not yet forgotten (a row's push does not depend on its length or its neighbours)
    expected = hand_per_row_push(model, task, batch, done, 1.0, 0.0, int(batch["forget"].sum()))
    want = torch.autograd.grad(expected, params, allow_unused=True)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert_grads_close(got, want)


@pytest.mark.parametrize("arch", LM_ARCHS)
def test_rows_per_step_sets_each_forgotten_rows_weight_in_both_forget_terms(arch):
    model, task = trained_like(arch), TASK_OF[arch]
    batch = objective_batch(arch)
    margin, done = margin_between_gaps(model, task, batch)
    weights = {**OFF, "gamma": 0.5, "forget_kl_weight": 0.7, "alpha": 0.8, "forget_margin": margin}
    rows = int(batch["forget"].sum()) + 3  # a step configured for more forgotten rows than this batch holds
    objective = EULObjective(model, task, ObjectiveConfig(**weights), rows_per_step=rows)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = objective(batch)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    # the forget KL stops where the margin stopped the LM term's position (the same positions)
    retained, _ = hand_loss(model, task, batch, alpha=0.8)
    expected = retained + hand_per_row_push(model, task, batch, done, 0.5, 0.7, rows)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert_grads_close(got, want)
    with pytest.raises(ModelError, match="rows_per_step"):
        EULObjective(model, task, ObjectiveConfig(**weights), rows_per_step=0)


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
