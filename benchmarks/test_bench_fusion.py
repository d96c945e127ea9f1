"""CPU benchmark of closed-form fusion at a 1B-model shape: 10 requests, 16 sites, d = 2048, r = 128.

    python -m pytest benchmarks/test_bench_fusion.py --benchmark-columns=min,mean,max,rounds

Synthetic inputs (fusion's cost does not depend on the values): per request and site a random
layer and SPD Gram matrices G = Z·Zᵀ + N·I (Z of rank 32, N = 4096 tokens) in float64, about
5.4 GB in all. Three cases:

- ``precomputed_cross``: what ``fuse`` does on artifacts written by ``unlearn`` (and on ledger
  copies and fused artifacts), which store each request's cross term G_i·W_i: per site the Gram
  sums and one Cholesky factorisation of the [2049, 2049] system reused for all 128 right-hand
  sides;
- ``from_weights``: the same on artifacts without cross terms (written by older versions): the
  160 products G_i·W_i ([2049, 2049] × [2049, 128], float64, 172 GFLOP) come on top;
- ``solve_only``: the 16 Cholesky factorisations + solves alone (the float64 floor).

Measured on the shared 2-core AMD EPYC VM (MKL, 2 threads), otherwise idle (load ≈ 1), one run:
precomputed_cross 1.46 / 1.87 s (min / mean of 3), from_weights 4.71 / 4.77 s, solve_only
0.97 / 1.04 s. The previous implementation (out-of-place lower Cholesky, torch-allocated
buffers), timed in the same process right after: precomputed 2.25 s against 1.38 s now (min of
3), from_weights 4.97 against 4.67 s. On a loaded machine all of these double or worse.
End to end, ``unlearn-fast fuse`` on ten such artifacts on disk (page cache warm) takes ~5.5 s:
~2 s verifying the inputs' sha256 (on both cores), ~2 s fusing, ~1.5 s writing the 0.55 GB
result; peak memory 1.3 GB (the inputs are memory-mapped and read one site at a time).

Needs about 7 GB of memory. On shared 2-core machines the numbers are noisy.
"""

import pytest
import torch

from unlearn_fast.fusion.closed_form import fuse_tensors, solve_ridge, with_cross_terms

REQUESTS, SITES, D, R, TOKENS = 10, 16, 2048, 128, 4096


def layout():
    return [{"path": f"model.layers.{i}.mlp", "stack": "blocks", "block": i, "dim": D, "ranks": [R],
             "activations": ["relu"]} for i in range(SITES)]


def spd(n, g):
    z = torch.randn(n, 32, generator=g, dtype=torch.float64)
    gram = z @ z.t()
    gram.diagonal().add_(TOKENS)
    return gram


@pytest.fixture(scope="module")
def requests():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(REQUESTS):
        down, up = spd(D + 1, g), spd(R + 1, g)
        tensors = {}
        for rec in layout():
            key = f"{rec['path']}.0"
            tensors.update({
                f"{key}.down.weight": torch.randn(R, D, generator=g) / D ** 0.5,
                f"{key}.down.bias": torch.zeros(R), f"{key}.up.bias": torch.zeros(D),
                f"{key}.up.weight": torch.randn(D, R, generator=g) / R ** 0.5,
                f"{key}.down.gram": down.clone(), f"{key}.up.gram": up.clone(),  # distinct memory per site
            })
        out.append(tensors)
    return out


def test_fuse_from_weights(benchmark, requests):
    benchmark.pedantic(fuse_tensors, args=(requests, layout()), rounds=2, iterations=1)


def test_fuse_precomputed_cross(benchmark, requests):
    stored = [with_cross_terms(t, layout()) for t in requests]
    benchmark.pedantic(fuse_tensors, args=(stored, layout()), rounds=3, iterations=1)


def test_solve_only(benchmark, requests):
    grams = [requests[0][f"{rec['path']}.0.down.gram"] for rec in layout()]
    cross = torch.randn(D + 1, R, dtype=torch.float64)
    work = torch.empty(D + 1, D + 1, dtype=torch.float64)  # as fuse_tensors does: one factorisation buffer

    def solves():
        for gram in grams:
            solve_ridge(gram, cross, work=work)

    benchmark.pedantic(solves, rounds=3, iterations=1)
