"""CPU benchmarks of the trunk ops (RMSNorm, SwiGLU product): eager transformers formula vs the fused
C++ kernels, forward + backward to the inputs (the frozen trunk's case: no weight gradient).

    python -m pytest benchmarks/test_bench_trunk.py --benchmark-columns=min,median,rounds

Shapes: one SmolLM2-135M training batch of the whole-step benchmark, 8 × 128 = 1024 tokens, d = 576
(RMSNorm) and the MLP width 1536 (SwiGLU), fp32.
"""

import pytest
import torch

from unlearn_fast.ops import rms_norm, rms_norm_reference, swiglu, swiglu_reference

TOKENS, HIDDEN, MLP = 1024, 576, 1536


def _cpp_or_skip():
    from unlearn_fast.ops.extension import C

    if C is None:
        pytest.skip("C++ extension not built")


@pytest.mark.parametrize("provider", ["eager", "cpp"])
def test_rms_norm(benchmark, provider, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    w = torch.randn(HIDDEN)
    dy = torch.randn(TOKENS, HIDDEN)
    if provider == "cpp":
        _cpp_or_skip()
        monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cpp")
        fn = rms_norm
    else:
        fn = rms_norm_reference

    def step():
        return torch.autograd.grad(fn(x, w, 1e-5), x, dy)

    benchmark.group = "rms_norm fwd+bwd 1024x576"
    step()
    (grad,) = benchmark(step)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("provider", ["eager", "cpp"])
def test_swiglu(benchmark, provider, monkeypatch):
    torch.manual_seed(0)
    gate = torch.randn(TOKENS, MLP, requires_grad=True)
    up = torch.randn(TOKENS, MLP, requires_grad=True)
    dh = torch.randn(TOKENS, MLP)
    if provider == "cpp":
        _cpp_or_skip()
        monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cpp")
        fn = swiglu
    else:
        fn = swiglu_reference

    def step():
        return torch.autograd.grad(fn(gate, up), (gate, up), dh)

    benchmark.group = "swiglu fwd+bwd 1024x1536"
    step()
    dg, du = benchmark(step)
    assert torch.isfinite(dg).all() and torch.isfinite(du).all()
