"""unlearn() end to end on each task type: it trains, reports figures, the forget-set loss goes
up, the base stays frozen; a NaN stops it with TrainingError and nothing written."""

import math

import pytest
import torch

import unlearn_fast.train.objective as objective_module
from conftest import TASK_OF, make_model, memorize, tokenizer_for
from unlearn_fast.api import unlearn
from unlearn_fast.errors import DataError, ModelError, TrainingError
from unlearn_fast.model.layers import LayerConfig, layers_disabled, sites
from unlearn_fast.train.objective import TERMS, ObjectiveConfig
from unlearn_fast.train.trainer import TrainConfig

FORGET_PR = [{"prompt": "The capital of Zorbia is", "response": " Quellton"},
             {"prompt": "Mirta Vasquez likes", "response": " green tea"}]
RETAIN_PR = [{"prompt": "The capital of France is", "response": " Paris"},
             {"prompt": "Bob plays", "response": " the violin"},
             {"prompt": "The sky is", "response": " blue"}]
FORGET_TEXT = [{"text": "Zorbia exports purple marbles."}, {"text": "Quellton has seven bridges."}]
RETAIN_TEXT = [{"text": "France exports cheese and wine."}, {"text": "Paris has many museums."},
               {"text": "The sky is blue today."}]
QUIET = dict(log=lambda *a: None)
RANK = 4


def base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_base_unchanged(before, model):
    """The base weights are bit-equal to what they were (site wrappers add '.base.' to names)."""
    paths = [s.path for s in sites(model)]
    after = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(f"{p}.layers.") for p in paths):
            continue  # an unlearning layer
        for p in paths:
            k = k.replace(f"{p}.base.", f"{p}.")
        after[k] = v
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("arch,kind", [("llama", "prompt"), ("mistral", "prompt"), ("qwen2", "text"),
                                       ("gpt2", "text"), ("t5", "prompt")])
def test_unlearn_raises_the_forget_loss(arch, kind):
    model = make_model(arch)
    tok = tokenizer_for(arch)
    forget, retain = (FORGET_PR, RETAIN_PR) if kind == "prompt" else (FORGET_TEXT, RETAIN_TEXT)
    assert memorize(model, tok, arch, forget + retain) < 0.5
    base = base_state(model)
    result = unlearn(model, tok, forget, retain, layers=LayerConfig(rank=RANK),
                     training=TrainConfig(max_steps=30, epochs=100, lr=3e-2, progress=False), **QUIET)
    m = result.metrics
    before, after = m["before"], m["after"]
    assert set(before) == set(after)
    expected_keys = {"forget_loss", "retain_loss"} | ({"forget_accuracy", "retain_accuracy"}
                                                      if kind == "prompt" else set())
    assert expected_keys <= set(before)
    assert before["forget_loss"] < 0.5  # it knew the forget set ...
    assert after["forget_loss"] > before["forget_loss"] + 1.0  # ... and now it does not
    # forgetting is selective: the forget loss rises more than the retain loss
    assert after["forget_loss"] - before["forget_loss"] > after["retain_loss"] - before["retain_loss"]
    assert m["steps"] == 30 == result.training.steps == len(result.training.history)
    assert m["train_tokens"] > 0 and m["update_time_s"] > 0
    assert set(TERMS) <= set(m["final_terms"])
    assert m["final_terms"]["forget_kl"] > m["final_terms"]["retain_kl"]
    assert all(math.isfinite(h["loss"]) for h in result.training.history)
    assert result.model is model and len(sites(model)) == (4 if arch == "t5" else 2)
    assert result.out is None and result.grams  # nothing written without out=, grams still computed
    assert result.manifest["task"] == TASK_OF[arch]
    assert_base_unchanged(base, model)


def test_unlearn_classification_with_labels():
    """BERT: forgetting pushes the predictions on the forget set away from the original model's."""
    model = make_model("bert")
    tok = tokenizer_for("bert")
    texts = [e["text"] for e in FORGET_TEXT]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        original = model(**enc).logits
    predicted = original.argmax(-1)
    forget = [{"text": t, "label": int(y)} for t, y in zip(texts, predicted)]  # what the model "knows"
    retain = [{"text": e["text"], "label": ["POS", "NEG"][i % 2]} for i, e in enumerate(RETAIN_TEXT)]
    base = base_state(model)
    result = unlearn(model, tok, forget, retain, layers=LayerConfig(rank=RANK),
                     training=TrainConfig(max_steps=30, epochs=100, lr=5e-2, progress=False), **QUIET)
    m = result.metrics
    assert m["before"]["forget_accuracy"] == 1.0
    assert m["after"]["forget_accuracy"] < 1.0
    assert "retain_accuracy" in m["after"]
    assert result.manifest["objective"]["gamma"] == 0.0
    assert math.isnan(m["final_terms"]["forget_lm_loss"])  # no LM head, no LM term
    with torch.no_grad():
        after = model(**enc).logits
        with layers_disabled(model):
            assert torch.equal(model(**enc).logits, original)
    ce = torch.nn.functional.cross_entropy
    assert ce(after, predicted).item() > ce(original, predicted).item() + 0.5
    assert_base_unchanged(base, model)


def test_negative_gamma_on_classification_is_refused_before_any_work():
    model = make_model("bert")
    with pytest.raises(ModelError) as info:
        unlearn(model, tokenizer_for("bert"), FORGET_TEXT, [dict(e, label=0) for e in RETAIN_TEXT],
                objective=ObjectiveConfig(gamma=-0.2), training=TrainConfig(max_steps=1, progress=False),
                evaluate=False, **QUIET)
    assert "gamma" in str(info.value)
    assert sites(model) == []


def test_classification_retain_set_needs_labels():
    model = make_model("bert")
    with pytest.raises(DataError):
        unlearn(model, tokenizer_for("bert"), FORGET_TEXT, RETAIN_TEXT,
                training=TrainConfig(max_steps=1, progress=False), evaluate=False, **QUIET)


def test_overlap_is_refused_or_dropped():
    tok = tokenizer_for("llama")
    with pytest.raises(DataError):
        unlearn(make_model("llama"), tok, FORGET_PR, RETAIN_PR + FORGET_PR[:1],
                training=TrainConfig(max_steps=1, progress=False), evaluate=False, **QUIET)
    messages = []
    result = unlearn(make_model("llama"), tok, FORGET_PR, RETAIN_PR + FORGET_PR[:1], drop_overlap=True,
                     training=TrainConfig(max_steps=1, progress=False), evaluate=False, log=messages.append)
    assert result.manifest["retain_set"]["count"] == len(RETAIN_PR)
    assert any("dropped 1" in str(msg) for msg in messages)


def test_layer_config_is_honoured():
    model = make_model("t5")
    result = unlearn(model, tokenizer_for("t5"), FORGET_PR, RETAIN_PR,
                     layers=LayerConfig(rank=3, blocks=1, activation="gelu"),
                     training=TrainConfig(max_steps=2, progress=False), evaluate=False, **QUIET)
    assert [(s.stack, s.block) for s in sites(model)] == [("encoder", 1), ("decoder", 1)]
    assert all(s.layers[0].down.out_features == 3 and s.layers[0].activation == "gelu" for s in sites(model))
    assert [r["ranks"] for r in result.manifest["layers"]["sites"]] == [[3], [3]]


def _nan_objective(self, batch, teacher=None):
    params = [p for s in sites(self.model) for p in s.layers.parameters()]
    loss = params[0].sum() * float("nan")
    return loss, {name: float("nan") for name in TERMS}


@pytest.mark.parametrize("how", ["objective", "huge-lr"])
def test_nan_loss_raises_and_writes_nothing(how, tmp_path, monkeypatch):
    out = tmp_path / "layers"
    # (a Llama-style model under lr=1e30 stays finite -- RMSNorm absorbs the huge adapter output --
    # while GPT-2's LayerNorm overflows to NaN)
    arch, lr = ("llama", 1e-2) if how == "objective" else ("gpt2", 1e30)
    if how == "objective":
        monkeypatch.setattr(objective_module.EULObjective, "__call__", _nan_objective)
    training = TrainConfig(max_steps=6, epochs=100, progress=False)
    training.lr = lr  # past TrainConfig's up-front check (lr <= 1): the guard inside training is under test
    with pytest.raises(TrainingError) as info:
        unlearn(make_model(arch), tokenizer_for(arch), FORGET_PR, RETAIN_PR, out=out,
                layers=LayerConfig(rank=RANK), training=training, evaluate=False, **QUIET)
    message = str(info.value)
    assert "nothing was written" in message and "\n" not in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directories either
