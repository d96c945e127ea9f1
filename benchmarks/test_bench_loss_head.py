"""CPU benchmarks of the loss head: naive full-logits autograd vs the chunked op per backend.

    python -m pytest benchmarks/test_bench_loss_head.py --benchmark-columns=min,mean,rounds

Shape: 512 token rows, H = 576, V = 49152 (SmolLM2's head), fp32, forward + backward.
"""

import pytest
import torch

from unlearn_fast.ops import eul_loss_head
from unlearn_fast.ops.loss_head import IGNORE_INDEX

N, H, V = 512, 576, 49152


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(N, H, generator=g)
    student = teacher + 1e-3 * torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::3] = IGNORE_INDEX
    kl_coef = torch.where(torch.arange(N) % 4 == 0, -1.0, 0.8) / N
    ce_coef = torch.where(torch.arange(N) % 4 == 0, -0.2, 1.0) / N
    return student, teacher, weight, targets, kl_coef, ce_coef


def naive(student, teacher, weight, targets, kl_coef, ce_coef):
    s = student @ weight.t()
    t = teacher @ weight.t()
    kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    ce = torch.nn.functional.cross_entropy(s, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return (kl_coef * kl + ce_coef * ce).sum()


def _step(fn, student, *rest):
    h = student.detach().requires_grad_(True)
    loss = fn(h, *rest)
    loss.backward()
    return h.grad


def test_naive(benchmark, inputs):
    benchmark(_step, naive, *inputs)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_chunked(benchmark, inputs, backend, monkeypatch):
    if backend == "cpp":
        from unlearn_fast._ext import C

        if C is None:
            pytest.skip("C++ extension not built")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    benchmark(_step, lambda *a: eul_loss_head(*a, chunk_rows=256).loss, *inputs)
