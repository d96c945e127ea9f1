"""The fused trunk at model level: which modules it switches, that the model computes the same
outputs and gradients with it, that it is undone on exit, and that the trainer runs with it."""

import inspect
import re

import pytest
import torch

from conftest import TASK_OF, make_model, perturb, sample_batch, tokenizer_for
from unlearn_fast.ops.extension import C
from unlearn_fast.model.fused_trunk import RMS_NORM_CLASSES, SWIGLU_MLP_CLASSES, fused_trunk
from unlearn_fast.model.layers import LayerConfig, attach, unlearning_parameters

needs_cpp = pytest.mark.skipif(C is None, reason="the C++ extension is not built")


def _module_class(name: str):
    import importlib

    family = re.match(r"[A-Z][a-z0-9]*", name).group(0).lower()
    return getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)


@pytest.mark.parametrize("names", [RMS_NORM_CLASSES, SWIGLU_MLP_CLASSES], ids=["rms-norm", "mlp"])
def test_switched_classes_compute_llamas_formula(names):
    """The fused forward reproduces LlamaRMSNorm / LlamaMLP; every other listed class must have the
    same forward (if a transformers release changes one, this fails instead of the math drifting)."""
    def body(name):
        source = inspect.getsource(_module_class(name).forward)
        return source.replace(re.match(r"[A-Z][a-z0-9]*", name).group(0), "<family>")

    first = body(names[0])
    for name in names[1:]:
        assert body(name) == first, name


@needs_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_same_outputs_and_gradients(arch, monkeypatch):
    monkeypatch.delenv("UNLEARN_FAST_BACKEND", raising=False)
    model = make_model(arch)
    attach(model, LayerConfig(rank=4))
    perturb(model, scale=0.2)
    batch = sample_batch(arch)
    params = unlearning_parameters(model)

    def run():
        logits = model(**batch).logits
        grads = torch.autograd.grad(logits.pow(2).sum(), params)
        return logits.detach(), grads

    plain_logits, plain_grads = run()
    blocks = model.config.num_hidden_layers
    with fused_trunk(model) as switched:
        assert len(switched) == 3 * blocks + 1  # two norms and the MLP per block, the final norm
        fused_logits, fused_grads = run()
        # the fused ops really ran: their autograd nodes are in the graph
        names, seen = set(), {}  # seen keeps the node wrappers alive, so their ids stay unique
        stack = [model(**batch).logits.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and id(node) not in seen:
                seen[id(node)] = node
                names.add(type(node).__name__)
                stack.extend(f for f, _ in node.next_functions)
        assert {"_RMSNormFunctionBackward", "_SwiGLUFunctionBackward"} <= names
    assert all("forward" not in vars(m) for m in switched)  # restored
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "t5", "bert"])
def test_other_architectures_are_untouched(arch):
    model = make_model(arch)
    before = model(**sample_batch(arch)).logits.detach()
    with fused_trunk(model) as switched:
        assert switched == []
        after = model(**sample_batch(arch)).logits.detach()
    assert torch.equal(before, after)


def test_disabled_switches_nothing_and_restores_on_error():
    model = make_model("llama")
    with fused_trunk(model, enabled=False) as switched:
        assert switched == []
    with pytest.raises(RuntimeError, match="boom"):
        with fused_trunk(model) as switched:
            assert switched
            raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in model.modules())


def test_state_dict_keys_unchanged():
    model = make_model("llama")
    keys = list(model.state_dict())
    with fused_trunk(model):
        assert list(model.state_dict()) == keys


@needs_cpp
def test_trainer_runs_the_fused_trunk_and_matches_the_plain_one(monkeypatch):
    """Five EUL steps on a tiny Llama, fused trunk on and off: the same losses (fp32), and the
    modules are restored after training."""
    from unlearn_fast.train.data import Example
    from unlearn_fast.train.encoding import encode, pad_token_id
    from unlearn_fast.train.objective import EULObjective, ObjectiveConfig
    from unlearn_fast.ops import trunk
    from unlearn_fast.train.trainer import TrainConfig, train

    calls = []
    real = trunk._RMSNormFunction.apply
    monkeypatch.setattr(trunk._RMSNormFunction, "apply", lambda *a: calls.append(1) or real(*a))
    forget = [Example(prompt=f"Secret {i} is", response=f"code{i * 7}") for i in range(3)]
    retain = [Example(prompt=f"Fact {i} says", response=f"value {i}") for i in range(6)]

    def losses(fused: bool):
        torch.manual_seed(0)
        model = make_model("llama")
        tok = tokenizer_for("llama")
        kw = dict(model_config=model.config, max_length=64)
        f = encode(forget, tok, "causal", forget=True, name="forget", **kw)
        r = encode(retain, tok, "causal", forget=False, name="retain", **kw)
        attach(model, LayerConfig(rank=4))
        perturb(model, scale=0.05)
        objective = EULObjective(model, TASK_OF["llama"], ObjectiveConfig(gamma=0.5))
        config = TrainConfig(epochs=5, batch_size=3, lr=1e-2, max_steps=5, progress=False, fused_trunk=fused)
        history = train(model, objective, f, r, config, pad_token_id(tok)).history
        assert not any("forward" in vars(m) for m in model.modules())
        return [h["loss"] for h in history]

    plain = losses(False)
    assert not calls
    fused = losses(True)
    assert calls
    assert len(plain) == len(fused) == 5
    for a, b in zip(plain, fused):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (plain, fused)
