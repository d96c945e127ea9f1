"""``forget_target="matched"`` (issue 31 item 3): each forgotten row gets its own loss target, the
held-out rows' loss of the same rank, and its forget terms stop once its mean target loss reaches it.
The gate is checked against a float64 hand computation from the full logits."""

import json
import math
import random

import pytest
import torch

from conftest import ALL_ARCHS, FACTS_FORGET, TASK_OF, make_model, save_model_dir, tokenizer_for, write_jsonl
from test_objective import assert_grads_close, model_logits, objective_batch, trained_like
from unlearn_fast.api import unlearn
from unlearn_fast.cli import main
from unlearn_fast.errors import DataError, ModelError
from unlearn_fast.model.family import output_head
from unlearn_fast.model.layers import LayerConfig, layers_disabled
from unlearn_fast.ops.loss_head import IGNORE_INDEX
from unlearn_fast.train.encoding import Row, collate
from unlearn_fast.train.objective import (MATCHED_BAND, MATCHED_PUSH_FLOOR, EULObjective, ObjectiveConfig,
                                         binary_kl, matched_bounds, matched_push_weight, matched_targets)
from unlearn_fast.train.trainer import TrainConfig

RETAIN = [{"prompt": "The capital of France is", "response": " Paris"},
          {"prompt": "Bob plays", "response": " the violin"}]
HELDOUT = [{"prompt": "The sky is", "response": " blue"}, {"prompt": "Snow is", "response": " white"},
           {"prompt": "Grass is", "response": " green"}]
QUICK = dict(layers=LayerConfig(rank=4), training=TrainConfig(max_steps=2, progress=False), log=lambda *a: None)
OFF = dict(alpha=0.0, lam=0.0, gamma=0.0, forget_kl_weight=0.0, sharpening_guard=False,
           forget_margin=None, retain_output_weight=0.0, forget_lm_bound=math.inf, forget_kl_bound=math.inf)


# ---- the targets ------------------------------------------------------------------------------------
def test_matched_targets_by_hand():
    # ranks of the forget losses: 0.1 -> 0, 0.3 -> 2, 0.2 -> 1; quantiles (r + 1/2)/3 of 6 held-out losses
    assert matched_targets([0.1, 0.3, 0.2], [6.0, 1.0, 5.0, 2.0, 4.0, 3.0]) == [2.0, 6.0, 4.0]
    assert matched_targets([0.5], [3.0, 1.0, 2.0]) == [2.0]  # one row: the median
    assert matched_targets([], [1.0]) == []


def test_matched_targets_have_the_heldout_distribution_and_keep_the_order():
    rng = random.Random(0)
    forget = [rng.random() for _ in range(40)]
    heldout = [rng.expovariate(2.0) for _ in range(40)]
    targets = matched_targets(forget, heldout)
    assert sorted(targets) == sorted(heldout)  # same size: exactly the held-out losses
    order = sorted(range(40), key=forget.__getitem__)
    assert [targets[i] for i in order] == sorted(targets)  # a less certain row gets a higher target
    many = matched_targets(forget, heldout * 3)  # more held-out rows than forgotten ones: still monotone
    assert [many[i] for i in order] == sorted(many)


def test_matched_targets_refuse_bad_input():
    with pytest.raises(ModelError, match="held-out row"):
        matched_targets([0.1], [])
    with pytest.raises(ModelError, match="finite"):
        matched_targets([0.1, float("nan")], [1.0])


def test_matched_bounds_never_stop_a_row_before_its_target():
    forget, targets = [0.1, 0.5, 2.0], [1.5, 0.7, 0.3]
    out = matched_bounds(ObjectiveConfig(forget_target="matched"), forget, targets)
    assert out.forget_lm_bound == pytest.approx(1.5)
    kl = max(binary_kl(math.exp(-0.1), math.exp(-1.5)), binary_kl(math.exp(-0.5), math.exp(-0.7)))
    assert out.forget_kl_bound == pytest.approx(kl)  # the row already past its target needs none


def test_push_weight_is_one_over_the_loss_between_one_and_the_floor():
    loss = torch.tensor([0.0, 0.001, MATCHED_PUSH_FLOOR, 0.05, 0.5, 1.0, 3.0], dtype=torch.float64)
    want = [1 / MATCHED_PUSH_FLOOR, 1 / MATCHED_PUSH_FLOOR, 1 / MATCHED_PUSH_FLOOR, 20.0, 2.0, 1.0, 1.0]
    assert matched_push_weight(loss).tolist() == pytest.approx(want)


def test_collate_carries_the_row_targets():
    rows = [Row([1, 2], [2, 3], [True, True], True, loss_target=0.5), Row([1], [4], [True], False)]
    batch = collate(rows, 0)
    assert batch["loss_target"].tolist() == [0.5, math.inf]
    assert "loss_target" not in collate([Row([1], [4], [True], False)], 0)


# ---- the gate ---------------------------------------------------------------------------------------
def row_losses_and_terms(model, task, batch):
    """Per position, float64 and differentiable: the student's CE and KL(teacher‖student), and the
    forgotten CE / KL positions."""
    with torch.no_grad(), layers_disabled(model):
        teacher = torch.log_softmax(model_logits(model, task, batch).double(), -1)
    student = torch.log_softmax(model_logits(model, task, batch).double(), -1)
    targets = batch["targets"]
    forget = batch["forget"].unsqueeze(1).expand_as(targets)
    ce_positions = forget & (targets != IGNORE_INDEX)
    kl_positions = forget & batch["kl_mask"]
    ce = -student.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return ce, kl, ce_positions, kl_positions


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("first", ["reached", "past"])
def test_a_row_at_its_target_stops_being_pushed_and_one_past_it_is_pulled_back(arch, first):
    model, task = trained_like(arch), TASK_OF[arch]
    batch = objective_batch(arch)
    ce, kl, ce_pos, kl_pos = row_losses_and_terms(model, task, batch)
    with torch.no_grad():
        mean = (ce * ce_pos).sum(1) / ce_pos.sum(1).clamp(min=1)
        push = hand_push_weight(mean).unsqueeze(1)
    forgotten = [i for i in range(len(batch["forget"])) if batch["forget"][i] and ce_pos[i].any()]
    assert len(forgotten) >= 2
    m0 = float(mean[forgotten[0]])
    share, floor = MATCHED_BAND
    # reached: inside the band just above the target; past: the band ends below the row's loss
    t0 = m0 - 0.01 if first == "reached" else (m0 - floor) / (1 + share) - 0.01
    assert (m0 > t0 + max(share * t0, floor)) == (first == "past")
    target = torch.full((len(batch["forget"]),), math.inf, dtype=torch.float64)
    target[forgotten[0]] = t0
    target[forgotten[1]] = float(mean[forgotten[1]]) + 1.0  # not reached
    batch["loss_target"] = target
    objective = EULObjective(model, task, ObjectiveConfig(**{**OFF, "gamma": 0.7, "forget_kl_weight": 0.4}))
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = objective(batch)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    keep = torch.ones(len(batch["forget"]), dtype=torch.bool)
    keep[forgotten[0]] = False
    keep = keep.unsqueeze(1)
    # hand: the first row stays in the counts, with weight 0 (reached) or the sign flipped (past: its CE
    # is minimised, no forget KL); every forgotten row's CE weighted by its push weight
    expected = (-0.7 * (push * ce * (ce_pos & keep)).sum() / ce_pos.sum()
                - 0.4 * (kl * (kl_pos & keep)).sum() / kl_pos.sum())
    if first == "past":
        expected = expected + 0.7 * (push * ce * (ce_pos & ~keep)).sum() / ce_pos.sum()
    want = torch.autograd.grad(expected, params, allow_unused=True)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert_grads_close(got, want)


SURE_SCALE = 100.0  # a random tiny model's logits are flat: scaled up, its best token is near-certain


def sure_of_the_forgotten_answers(model, task, batch):
    """``batch`` with each forgotten target replaced by the model's most likely token there, after the
    output head is scaled up (so the model is sure of it: a loss well under 1 nat, where the push
    weight acts)."""
    with torch.no_grad():
        output_head(model, task).weight.mul_(SURE_SCALE)
        best = model_logits(model, task, batch).argmax(-1)
    forget = batch["forget"].unsqueeze(1).expand_as(batch["targets"]) & (batch["targets"] != IGNORE_INDEX)
    batch["targets"] = torch.where(forget, best, batch["targets"])
    return batch


def hand_push_weight(mean):
    """The push weight written out: 1 / loss, at most 1 / floor, at least 1."""
    return torch.minimum(torch.maximum(1.0 / mean, torch.ones_like(mean)),
                         torch.full_like(mean, 1 / MATCHED_PUSH_FLOOR))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_targets_out_of_reach_only_weight_the_push(arch):
    model, task = trained_like(arch), TASK_OF[arch]
    batch = sure_of_the_forgotten_answers(model, task, objective_batch(arch))
    config = ObjectiveConfig(**{**OFF, "gamma": 0.5, "forget_kl_weight": 1.0, "alpha": 0.8})
    plain, _ = EULObjective(model, task, config)(batch)
    ce, _, ce_pos, _ = row_losses_and_terms(model, task, batch)
    with torch.no_grad():
        mean = (ce * ce_pos).sum(1) / ce_pos.sum(1).clamp(min=1)
        weight = hand_push_weight(mean)
        # the forget LM term of the plain loss, and the same with each row at its push weight
        term = -0.5 * (ce * ce_pos).sum() / ce_pos.sum()
        pushed = -0.5 * (weight.unsqueeze(1) * ce * ce_pos).sum() / ce_pos.sum()
    assert float(weight[batch["forget"]].max()) > 2  # the weight does act on this batch
    batch["loss_target"] = torch.full((len(batch["forget"]),), 1e6, dtype=torch.float64)
    far, _ = EULObjective(model, task, config)(batch)
    torch.testing.assert_close(far.double(), plain.double() - term + pushed, rtol=1e-5, atol=1e-6)


# ---- through the API and the CLI --------------------------------------------------------------------
def test_matched_target_through_the_api():
    model, tok = make_model("llama"), tokenizer_for("llama")
    result = unlearn(model, tok, FACTS_FORGET, RETAIN, heldout=HELDOUT, general_text=None,
                     objective=ObjectiveConfig(forget_target="matched"), **QUICK)
    objective = result.manifest["objective"]
    levels = objective["forget_target_levels"]
    assert objective["forget_target"] == "matched"
    assert levels["heldout_loss"] == pytest.approx(result.metrics["before"]["heldout_loss"], rel=0.2)
    assert 0 <= levels["pushed_rows"] <= len(FACTS_FORGET)
    assert objective["forget_lm_bound"] >= levels["heldout_median"] - 1e-9  # the highest target
    with pytest.raises(DataError, match="needs a held-out set"):
        unlearn(make_model("llama"), tok, FACTS_FORGET, RETAIN, objective=ObjectiveConfig(forget_target="matched"),
                **QUICK)


def test_matched_target_on_a_classifier():
    model, tok = make_model("bert"), tokenizer_for("bert")
    forget = [{"text": "Zorbia exports purple marbles.", "label": "POS"},
              {"text": "Quellton has seven bridges.", "label": "NEG"}]
    retain = [{"text": "France exports cheese.", "label": "NEG"}, {"text": "Paris has museums.", "label": "POS"}]
    test = [{"text": "The sky is blue.", "label": "POS"}, {"text": "It rains.", "label": 0}]
    result = unlearn(model, tok, forget, retain, heldout=test, objective=ObjectiveConfig(forget_target="matched"),
                     **QUICK)
    assert result.manifest["objective"]["forget_target_levels"]["pushed_rows"] in (0, 1, 2)


def test_cli_forget_target_matched(tmp_path, capsys):
    save_model_dir("llama", tmp_path / "model")
    for name, rows in (("forget", FACTS_FORGET), ("retain", RETAIN), ("heldout", HELDOUT)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    code = main(["unlearn", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"),
                 "--retain", str(tmp_path / "retain.jsonl"), "--heldout", str(tmp_path / "heldout.jsonl"),
                 "--out", str(tmp_path / "out"), "--forget-target", "matched", "--rank", "4", "--max-steps", "2",
                 "--no-progress"])
    assert code == 0
    assert "forget target: matched to the held-out rows' losses" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["objective"]["forget_target"] == "matched"


UNKNOWN = [{"prompt": "The capital of Quorvia is", "response": " Belzat"},
           {"prompt": "Trelm plays", "response": " the krummhorn"}]


def test_target_reference_replaces_the_heldout_rows_for_the_targets():
    tok = tokenizer_for("llama")
    runs = {}
    for name, reference in (("heldout", None), ("reference", UNKNOWN)):
        result = unlearn(make_model("llama"), tok, FACTS_FORGET, RETAIN, heldout=HELDOUT, target_reference=reference,
                         general_text=None, objective=ObjectiveConfig(forget_target="matched"), **QUICK)
        runs[name] = result.manifest
    assert runs["heldout"]["target_reference_set"] is None
    assert runs["reference"]["target_reference_set"] is not None
    levels = {k: m["objective"]["forget_target_levels"] for k, m in runs.items()}
    assert levels["heldout"]["forget_loss"] == pytest.approx(levels["reference"]["forget_loss"])
    assert levels["heldout"]["heldout_loss"] != pytest.approx(levels["reference"]["heldout_loss"])
    # with a reference, no held-out set is needed for the target
    unlearn(make_model("llama"), tok, FACTS_FORGET, RETAIN, target_reference=UNKNOWN, general_text=None,
            objective=ObjectiveConfig(forget_target="heldout"), **QUICK)


def test_cli_target_reference(tmp_path, capsys):
    save_model_dir("llama", tmp_path / "model")
    for name, rows in (("forget", FACTS_FORGET), ("retain", RETAIN), ("unknown", UNKNOWN)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    common = ["--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"),
              "--retain", str(tmp_path / "retain.jsonl"), "--target-reference", str(tmp_path / "unknown.jsonl"),
              "--rank", "4", "--max-steps", "2", "--no-progress"]
    code = main(["unlearn", *common, "--out", str(tmp_path / "out"), "--forget-target", "matched"])
    assert code == 0
    assert "forget target: matched to the reference rows' losses" in capsys.readouterr().out
    assert main(["unlearn", *common, "--out", str(tmp_path / "b"), "--method", "npo"]) != 0
    assert "--target-reference sets EUL's forget target" in capsys.readouterr().err


# ---- the default: forget_target="auto" --------------------------------------------------------------
@pytest.mark.parametrize("task, heldout, reference, expected", [
    ("classification", True, False, "matched"),  # a classifier with its test split
    ("classification", False, False, "bound"),   # nothing to match
    ("causal", True, False, "bound"),            # held-out known facts: the wrong reference for facts
    ("seq2seq", True, False, "bound"),
    ("causal", False, True, "matched"),          # a target reference is chosen to be matched
    ("classification", False, True, "matched"),
])
def test_auto_forget_target_rule(task, heldout, reference, expected):
    assert ObjectiveConfig().forget_target == "auto"
    assert ObjectiveConfig().resolved_forget_target(task, heldout, reference) == expected
    for given in ("bound", "heldout", "matched"):  # an explicit choice is kept
        assert ObjectiveConfig(forget_target=given).resolved_forget_target(task, heldout, reference) == given
    assert ObjectiveConfig.paper().resolved_forget_target(task, heldout, reference) == "bound"


def test_a_classifier_gamma_defaults_to_one_under_matched():
    assert ObjectiveConfig(forget_target="matched").resolved_gamma("classification") == 1.0
    assert ObjectiveConfig(forget_target="bound").resolved_gamma("classification") == 0.0
    assert ObjectiveConfig(forget_target="matched", gamma=0.3).resolved_gamma("classification") == 0.3
    assert ObjectiveConfig(forget_target="matched").resolved_gamma("causal") == 0.2


def test_auto_forget_target_through_the_api():
    tok = tokenizer_for("bert")
    forget = [{"text": "Zorbia exports purple marbles.", "label": "POS"},
              {"text": "Quellton has seven bridges.", "label": "NEG"}]
    retain = [{"text": "France exports cheese.", "label": "NEG"}, {"text": "Paris has museums.", "label": "POS"}]
    test = [{"text": "The sky is blue.", "label": "POS"}, {"text": "It rains.", "label": 0}]
    lines = []
    result = unlearn(make_model("bert"), tok, forget, retain, heldout=test,
                     **{**QUICK, "log": lambda m: lines.append(str(m))})
    objective = result.manifest["objective"]
    assert (objective["forget_target"], objective["forget_target_requested"]) == ("matched", "auto")
    assert objective["gamma"] == 1.0  # the term that pushes and pulls each row back
    assert objective["forget_target_levels"]["pushed_rows"] in (0, 1, 2)
    assert any(line.startswith("forget target: matched (the default for a classifier") for line in lines)
    # the same classifier without a held-out set, and a causal LM with one: the fixed bounds
    plain = unlearn(make_model("bert"), tok, forget, retain, **QUICK).manifest["objective"]
    assert (plain["forget_target"], plain["forget_target_levels"]) == ("bound", None)
    assert plain["gamma"] == 0.0  # the paper's classification objective
    lm = unlearn(make_model("llama"), tokenizer_for("llama"), FACTS_FORGET, RETAIN, heldout=HELDOUT,
                 general_text=None, **QUICK).manifest["objective"]
    assert (lm["forget_target"], lm["forget_lm_bound"]) == ("bound", 5.0)


def test_cli_paper_objective_keeps_the_fixed_bounds(tmp_path):
    save_model_dir("bert", tmp_path / "model")
    forget = [{"text": "Zorbia exports purple marbles.", "label": 1}]
    retain = [{"text": "France exports cheese.", "label": 0}, {"text": "Paris has museums.", "label": 1}]
    test = [{"text": "The sky is blue.", "label": 1}, {"text": "It rains.", "label": 0}]
    for name, rows in (("forget", forget), ("retain", retain), ("test", test)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    common = ["--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"),
              "--retain", str(tmp_path / "retain.jsonl"), "--heldout", str(tmp_path / "test.jsonl"),
              "--rank", "4", "--max-steps", "2", "--no-progress"]
    targets = {}
    for name, extra in (("default", []), ("paper", ["--paper-objective"])):
        assert main(["unlearn", *common, "--out", str(tmp_path / name), *extra]) == 0
        targets[name] = json.loads((tmp_path / name / "manifest.json").read_text())["objective"]["forget_target"]
    assert targets == {"default": "matched", "paper": "bound"}
