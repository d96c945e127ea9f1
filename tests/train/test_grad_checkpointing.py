"""Gradient checkpointing of the blocks above the lowest unlearning layer (TrainConfig.gradient_checkpointing):
the same losses with the step cache and the fused trunk on, the blocks really recomputed, and less memory."""

import pytest
import torch
import transformers

from conftest import TASK_OF, encode_sets, make_model, perturb, tokenizer_for
from memory_probe import measure
from unlearn_fast.model.grad_checkpoint import checkpointed_blocks, trained_blocks
from unlearn_fast.model.layers import LayerConfig, attach
from unlearn_fast.train.data import Example
from unlearn_fast.train.encoding import pad_token_id
from unlearn_fast.train.objective import EULObjective, ObjectiveConfig
from unlearn_fast.train.plan import PlanSettings, estimate, model_shape
from unlearn_fast.train.step_cache import StepCache
from unlearn_fast.train.trainer import TrainConfig, train

FORGET = [Example(prompt=f"Secret {i} is", response=f"code{i * 7}") for i in range(3)]
RETAIN = [Example(prompt=f"Public fact number {i} says", response=f"value {i}") for i in range(9)]


def _trajectory(arch, checkpointing: bool, blocks=1, calls=None):
    torch.manual_seed(0)
    model = make_model(arch)
    tokenizer, task = tokenizer_for(arch), TASK_OF[arch]
    forget, retain = encode_sets(model, arch, FORGET, RETAIN)
    attach(model, LayerConfig(rank=4, blocks=blocks))
    perturb(model, scale=0.05)  # student != teacher, so that every term has a gradient from the start
    if calls is not None:  # count the runs of the top block's MLP (a recomputation runs it again; a pre-hook,
        # since the recomputation stops as soon as it has what the backward needs, before the MLP returns)
        top = trained_blocks(model)[-1]
        top.mlp.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    objective = EULObjective(model, task, ObjectiveConfig(gamma=None if task == "classification" else 0.5),
                             StepCache(model, task))
    config = TrainConfig(epochs=50, batch_size=4, lr=1e-2, max_steps=20, progress=False,
                         gradient_checkpointing=checkpointing)
    result = train(model, objective, forget, retain, config, pad_token_id(tokenizer))
    assert all("forward" not in vars(block) for block in trained_blocks(model)), "a wrapped forward was left behind"
    return [h["loss"] for h in result.history]


@pytest.mark.parametrize("arch,blocks", [("llama", 1), ("llama", "all"), ("gpt2", 1), ("t5", 1), ("bert", "all")])
def test_same_loss_trajectory_with_and_without(arch, blocks):
    """20 fp32 steps, step cache (teacher states, trunk replay below the lowest layer) and fused trunk on."""
    plain = _trajectory(arch, False, blocks)
    checkpointed = _trajectory(arch, True, blocks)
    assert len(plain) == len(checkpointed) == 20
    for a, b in zip(plain, checkpointed):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (plain, checkpointed)


def test_the_trained_blocks_are_recomputed_in_the_backward():
    plain, checkpointed = [], []
    _trajectory("llama", False, calls=plain)
    _trajectory("llama", True, calls=checkpointed)
    # the student's forward runs the top block with grad; checkpointing runs it once more, in the backward
    assert plain.count(True) == 20
    assert checkpointed.count(True) == 40
    assert plain.count(False) == checkpointed.count(False)  # the teacher (no grad) is not checkpointed


def test_trained_blocks():
    model = make_model("llama")
    attach(model, LayerConfig(rank=4, blocks=[1]))
    assert trained_blocks(model) == [model.model.layers[1]]
    t5 = make_model("t5")  # the decoder reads the encoder's output: all of it trains once the encoder has layers
    attach(t5, LayerConfig(rank=4, blocks=1))
    assert trained_blocks(t5) == [t5.encoder.block[1], *t5.decoder.block]
    with checkpointed_blocks(t5) as wrapped:
        assert len(wrapped) == 3 and all("forward" in vars(b) for b in wrapped)
    assert not any("forward" in vars(b) for b in wrapped)
    with checkpointed_blocks(t5, enabled=False) as wrapped:
        assert wrapped == []


# SmolLM2-135M's shape (random weights) with 6 of its 30 blocks, a layer after each
SMOLLM2_6 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def test_checkpointing_lowers_the_measured_cpu_peak():
    """One fp32 step of 2 × 4 rows × 256 tokens, with and without, each in a fresh process; the plan's
    estimates of both are within 25 % of what is measured."""
    peaks = {}
    for checkpointing in (False, True):
        spec = {"config": SMOLLM2_6, "batch_size": 4, "max_length": 256, "rank": 32, "blocks": "all",
                "steps": 1, "gradient_checkpointing": checkpointing}
        m = measure(spec)
        peaks[checkpointing] = m["peak"] - m["start"]
        shape = model_shape(transformers.LlamaConfig(**SMOLLM2_6), LayerConfig(rank=32))
        plan = estimate(shape, PlanSettings(batch_size=4, max_length=256, rows=8,
                                            gradient_checkpointing=checkpointing))
        print(f"gradient checkpointing {checkpointing}: measured peak {peaks[checkpointing] / 2**20:.1f} MiB "
              f"(step {(m['peak'] - m['loaded']) / 2**20:.1f} MiB), estimated {plan.total / 2**20:.1f} MiB, "
              f"{m['update_time_s']:.1f} s")
        assert abs(plan.total - peaks[checkpointing]) <= 0.25 * peaks[checkpointing]
    assert peaks[True] < 0.8 * peaks[False]
