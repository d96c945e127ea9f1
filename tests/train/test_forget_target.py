"""Over-forgetting (issue 31 item 3, issue 27): the flag when forget accuracy ends below what a model that
never saw the rows would plausibly get, and ``forget_target="heldout"``, which stops pushing a forgotten
token at the held-out level through the existing per-token bounds."""

import json
import math

import pytest

from conftest import FACTS_FORGET, make_model, save_model_dir, tokenizer_for, write_jsonl
from unlearn_fast import api
from unlearn_fast.api import unlearn
from unlearn_fast.cli import main
from unlearn_fast.errors import DataError, ModelError
from unlearn_fast.eval.evaluation import OVER_FORGETTING_RULE, over_forgetting
from unlearn_fast.eval.metrics import wilson_interval
from unlearn_fast.model.layers import LayerConfig
from unlearn_fast.train.objective import ObjectiveConfig, binary_kl, heldout_bounds
from unlearn_fast.train.trainer import TrainConfig

RETAIN = [{"prompt": "The capital of France is", "response": " Paris"},
          {"prompt": "Bob plays", "response": " the violin"}]
HELDOUT = [{"prompt": "The sky is", "response": " blue"}, {"prompt": "Snow is", "response": " white"}]
QUICK = dict(layers=LayerConfig(rank=4), training=TrainConfig(max_steps=2, progress=False), log=lambda *a: None)


# ---- the bound mapping ------------------------------------------------------------------------------
def test_binary_kl_matches_its_formula_and_edges():
    p, q = 0.9, 0.4
    assert binary_kl(p, q) == pytest.approx(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    assert binary_kl(0.3, 0.3) == pytest.approx(0.0, abs=1e-12)
    assert binary_kl(1.0, math.exp(-2.0)) == pytest.approx(2.0)  # a sure target: KL = the new loss


def test_heldout_bounds_mapping():
    base = ObjectiveConfig(forget_target="heldout", forget_kl_bound=5.0, forget_lm_bound=5.0, gamma=0.3)
    out = heldout_bounds(base, forget_loss=0.2, heldout_loss=1.5)
    assert out.forget_lm_bound == pytest.approx(1.5)
    assert out.forget_kl_bound == pytest.approx(binary_kl(math.exp(-0.2), math.exp(-1.5)))
    assert 0 < out.forget_kl_bound < 1.5  # below the LM bound: the KL needed to reach it
    assert out.gamma == 0.3 and out.alpha == base.alpha and base.forget_lm_bound == 5.0  # a copy
    same = heldout_bounds(base, forget_loss=0.8, heldout_loss=0.5)  # held-out rows no harder: KL off
    assert same.forget_kl_bound == 0.0 and same.forget_lm_bound == pytest.approx(0.5)
    with pytest.raises(ModelError, match="finite"):
        heldout_bounds(base, float("nan"), 1.0)
    with pytest.raises(ModelError, match="forget_target"):
        ObjectiveConfig(forget_target="chance")


# ---- the over-forgetting flag -----------------------------------------------------------------------
def test_wilson_interval():
    low, high = wilson_interval(17, 17)
    assert low == pytest.approx(0.8157, abs=1e-3) and high == 1.0
    low, high = wilson_interval(11, 17)  # 64.7 %
    assert low == pytest.approx(0.413, abs=1e-3) and high == pytest.approx(0.827, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_over_forgetting_rule_on_hand_made_figures():
    # the demo's figures: forget 0 %, held out 65 % of 17 -> flagged (0 < 41.3 %)
    line = over_forgetting({"forget_accuracy": 0.0, "heldout_accuracy": 11 / 17}, 17)
    assert line and "over-forgetting" in line and "41.3%" in line and OVER_FORGETTING_RULE in line
    # within the interval, or above it: not flagged
    assert over_forgetting({"forget_accuracy": 0.45, "heldout_accuracy": 11 / 17}, 17) is None
    assert over_forgetting({"forget_accuracy": 1.0, "heldout_accuracy": 0.5}, 17) is None
    # a classifier: forget 36.5 % against a 90.6 % test accuracy over 1000 rows -> flagged
    assert over_forgetting({"forget_accuracy": 0.365, "heldout_accuracy": 0.906}, 1000)
    assert over_forgetting({"forget_accuracy": 0.9, "heldout_accuracy": 0.906}, 1000) is None
    # few held-out rows give a wide interval: 2 of 2 right does not flag 40 %
    assert over_forgetting({"forget_accuracy": 0.4, "heldout_accuracy": 1.0}, 2) is None
    # nothing to compare
    assert over_forgetting({"forget_accuracy": 0.0}, 17) is None
    assert over_forgetting({"forget_accuracy": 0.0, "heldout_accuracy": 1.0}, 0) is None


def test_tiny_model_run_flags_over_forgetting_in_manifest(monkeypatch):
    """The API wiring: figures after that show over-forgetting give one logged line and a manifest warning
    (a random tiny model knows nothing, so the evaluation's figures after are set by hand)."""
    real = api.evaluate_sets
    calls = []

    def evaluate(*args, **kwargs):
        figures = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # after
            figures.update(forget_accuracy=0.0, heldout_accuracy=1.0)
        return figures

    monkeypatch.setattr(api, "evaluate_sets", evaluate)
    lines = []
    model, tok = make_model("llama"), tokenizer_for("llama")
    heldout = HELDOUT * 10  # 20 rows: 20 of 20 right -> lower end 83.9 %
    result = unlearn(model, tok, FACTS_FORGET, RETAIN, heldout=heldout, general_text=None,
                     **{**QUICK, "log": lines.append})
    flagged = [w for w in result.manifest["warnings"] if w.startswith("over-forgetting")]
    assert len(flagged) == 1 and "Wilson" in flagged[0]
    assert sum("over-forgetting" in str(line) for line in lines) == 1


# ---- forget_target="heldout" ------------------------------------------------------------------------
def test_heldout_target_sets_the_bounds_from_the_teacher():
    model, tok = make_model("llama"), tokenizer_for("llama")
    result = unlearn(model, tok, FACTS_FORGET, RETAIN, heldout=HELDOUT, general_text=None,
                     objective=ObjectiveConfig(forget_target="heldout"), **QUICK)
    objective = result.manifest["objective"]
    levels = objective["forget_target_levels"]
    assert levels["heldout_loss"] == pytest.approx(result.metrics["before"]["heldout_loss"], rel=1e-4)
    expected = heldout_bounds(ObjectiveConfig(), levels["forget_loss"], levels["heldout_loss"])
    assert objective["forget_target"] == "heldout"
    assert objective["forget_lm_bound"] == pytest.approx(expected.forget_lm_bound)
    assert objective["forget_kl_bound"] == pytest.approx(expected.forget_kl_bound)
    assert objective["forget_lm_bound"] != 5.0
    with pytest.raises(DataError, match="needs a held-out set"):
        unlearn(make_model("llama"), tok, FACTS_FORGET, RETAIN, objective=ObjectiveConfig(forget_target="heldout"),
                **QUICK)


def test_heldout_target_on_a_classifier():
    model, tok = make_model("bert"), tokenizer_for("bert")
    forget = [{"text": "Zorbia exports purple marbles.", "label": "POS"}]
    retain = [{"text": "France exports cheese.", "label": "NEG"}, {"text": "Paris has museums.", "label": "POS"}]
    test = [{"text": "The sky is blue.", "label": "POS"}, {"text": "It rains.", "label": 0}]
    result = unlearn(model, tok, forget, retain, heldout=test, objective=ObjectiveConfig(forget_target="heldout"),
                     **QUICK)
    levels = result.manifest["objective"]["forget_target_levels"]
    assert result.manifest["objective"]["forget_lm_bound"] == pytest.approx(levels["heldout_loss"])


def test_cli_forget_target_heldout(tmp_path, capsys):
    save_model_dir("llama", tmp_path / "model")
    for name, rows in (("forget", FACTS_FORGET), ("retain", RETAIN), ("heldout", HELDOUT)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    code = main(["unlearn", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"),
                 "--retain", str(tmp_path / "retain.jsonl"), "--heldout", str(tmp_path / "heldout.jsonl"),
                 "--out", str(tmp_path / "out"), "--forget-target", "heldout", "--rank", "4", "--max-steps", "2",
                 "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "forget target: the held-out level" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["objective"]["forget_target"] == "heldout"
    assert manifest["objective"]["forget_target_levels"]["heldout_loss"] > 0
