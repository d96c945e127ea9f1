"""CPU benchmarks of the unlearning-layer op: eager composition vs the op's backends, forward + backward.

    python -m pytest benchmarks/test_bench_unlearning_layer.py --benchmark-columns=min,median,rounds

On a machine shared with other jobs, wall times of a 2-thread run swing by 10-50x (OpenMP threads wait
for descheduled partners); compare one thread's CPU time instead:

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_bench_unlearning_layer.py \
        --benchmark-timer=time.process_time --benchmark-min-rounds=15 --benchmark-columns=min,median,rounds

Shape (issue 7): N = 2048 tokens, d = 576 (SmolLM2-135M), r = 32, K = 1 and 4, fp32, relu.
``eager`` is what a model would do without the op: per layer nn.Linear, activation, nn.Linear, add,
the K layers one after another. ``reference`` is the op's PyTorch fallback, ``cpp`` the fused C++
kernels. Every case computes the gradients of x and of every weight and bias.

All three do the same six GEMMs (2·N·d·Σr FLOPs each), most of eager's time. ``cpp`` runs them per
block of rows in its own AVX-512 or AVX2 kernel with the elementwise work in between and writes y and dx once,
past the caches; eager makes K times the passes over [N, d] tensors and K times the parallel regions.
Measured on the 2-core Zen 4 box (shared, so noisy; eager and cpp alternating in one process, min /
median of 20-40 steps each): K = 1 about 1.3-1.6x / 1.5-2x eager, K = 4 about 1.7-2x / 2-2.3x.
Under oversubscription (other busy processes on the 2 cores) eager slows down far more than cpp.
"""

import os

import pytest
import torch
from torch import nn

from unlearn_fast.ops import unlearning_layer
from unlearn_fast.ops.unlearning_layer import ACTIVATIONS

N, D, R = 2048, 576, 32
ACTIVATION = "relu"


class Eager(nn.Module):
    """K adapters as separate modules, summed on the residual (the composition the op fuses)."""

    def __init__(self, k: int):
        super().__init__()
        self.downs = nn.ModuleList(nn.Linear(D, R) for _ in range(k))
        self.ups = nn.ModuleList(nn.Linear(R, D) for _ in range(k))
        for up in self.ups:  # trained layers, not the zero init
            nn.init.normal_(up.weight, std=R ** -0.5)
            nn.init.normal_(up.bias, std=0.1)

    def forward(self, x):
        act = ACTIVATIONS[ACTIVATION]
        y = x
        for down, up in zip(self.downs, self.ups):
            y = y + up(act(down(x)))
        return y


def fused(module: Eager, x):
    return unlearning_layer(x, [m.weight for m in module.downs], [m.bias for m in module.downs],
                            [m.weight for m in module.ups], [m.bias for m in module.ups], ACTIVATION)


@pytest.fixture(scope="module", params=[1, 4], ids=["K1", "K4"])
def case(request):
    torch.manual_seed(0)
    module = Eager(request.param)
    x = torch.randn(N, D, requires_grad=True)
    grad_y = torch.randn(N, D)
    return module, x, grad_y


def _step(fn, module, x, grad_y):
    y = fn(module, x)
    return torch.autograd.grad(y, [x, *module.parameters()], grad_y)


@pytest.mark.parametrize("provider", ["eager", "reference", "cpp"])
def test_forward_backward(benchmark, case, provider, monkeypatch):
    module, x, grad_y = case
    if provider == "eager":
        fn = lambda m, x: m(x)  # noqa: E731
    else:
        if provider == "cpp":
            from unlearn_fast.ops.extension import C

            if C is None or not hasattr(C, "unlearning_layer_forward"):
                pytest.skip("C++ extension not built")
        monkeypatch.setenv("UNLEARN_FAST_BACKEND", provider)
        fn = fused
    benchmark.group = f"unlearning_layer K={len(module.downs)}"
    for _ in range(2):  # warm up (allocator, thread pool) outside the timed rounds
        _step(fn, module, x, grad_y)
    benchmark(_step, fn, module, x, grad_y)


def test_ratio_interleaved(benchmark, case, monkeypatch):
    """eager and cpp in turn, 30 times each: on a shared machine both see the same load; the ratios of
    the minima and of the medians are the figures issue 7 asks for (>= 1.5x)."""
    import statistics
    import time

    from unlearn_fast.ops.extension import C

    if C is None or not hasattr(C, "unlearning_layer_forward"):
        pytest.skip("C++ extension not built")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cpp")
    module, x, grad_y = case
    fns = {"eager": lambda m, x: m(x), "cpp": fused}
    kernel = C.cpu_gemm_kernel() if hasattr(C, "cpu_gemm_kernel") else "?"
    if kernel not in ("aten", "?"):  # the same op with ATen's BLAS on the blocks: what the kernel buys

        def fused_aten(m, x):
            os.environ["UNLEARN_FAST_CPU_GEMM"] = "aten"  # read by the op on every call
            try:
                return fused(m, x)
            finally:
                os.environ.pop("UNLEARN_FAST_CPU_GEMM")

        monkeypatch.delenv("UNLEARN_FAST_CPU_GEMM", raising=False)
        fns["cpp-aten"] = fused_aten
    times = {name: [] for name in fns}
    for _ in range(2):
        for fn in fns.values():
            _step(fn, module, x, grad_y)
    for _ in range(30):
        for name, fn in fns.items():
            start = time.perf_counter()
            _step(fn, module, x, grad_y)
            times[name].append(time.perf_counter() - start)
    summary = {f"{stat}_ms_{name}": round(1e3 * f(t), 3) for name, t in times.items()
               for stat, f in (("min", min), ("median", statistics.median))}
    summary["cpp_gemm_kernel"] = kernel
    for other in [name for name in times if name != "eager"]:
        summary[f"eager/{other}_min"] = round(min(times["eager"]) / min(times[other]), 2)
        summary[f"eager/{other}_median"] = round(statistics.median(times["eager"]) / statistics.median(times[other]), 2)
    benchmark.group = f"unlearning_layer K={len(module.downs)} interleaved"
    benchmark.extra_info.update(summary)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nK={len(module.downs)}", summary)
