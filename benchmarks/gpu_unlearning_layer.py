"""GPU benchmark of the unlearning-layer op (issue 7): correctness first, then a timing table. ≤ 5 minutes.

    python benchmarks/gpu_unlearning_layer.py --out unlearning_layer_gpu.json
    TRITON_INTERPRET=1 python benchmarks/gpu_unlearning_layer.py --dry-run --out /tmp/ul.json  # CPU check

1. Correctness: the Triton backend against float64 on odd shapes (both kernel paths, every activation,
   fp32 and bf16 x), forward and all gradients; the fp32 PyTorch reference's own error is reported
   beside it. Tolerances: 1e-5 (fp32), 1e-2 (bf16). Timings are skipped if anything fails.
2. Ceilings of this card: bf16 matmul rate (an 8192³ GEMM) and copy bandwidth (a 1 GiB copy).
3. Timings, forward + backward (gradients of x and of every weight and bias): N = 8192, d = 2048 and
   4096, bf16 x, fp32 master weights, r = 64, K = 1 and 8, relu.
   eager  = per layer Linear, act, Linear, add under bf16 autocast, the K layers one after another;
   triton = the op (the default blocks; for tuning also K = 1 on the wide path and with the row blocks
   of NARROW_SWEEP, and K = 8 with the block sizes of WIDE_SWEEP, as triton_wide_ms /
   triton_narrow_sweep<i>_ms / triton_sweep<i>_ms).
   floor  = max(FLOPs / matmul rate, bytes / copy bandwidth) with FLOPs = 12·N·d·R (six GEMMs) and
   bytes = the minimum any implementation moves: x read twice, y written, g read, dx written (bf16),
   the fp32 pre-activation written and read, the fp32 weights read twice and their gradients written.
   Targets (issue 7): K = 1 ≥ 1.5× eager; K = 8 within 1.3× of the floor and ≥ 3× eager.

Writes everything as JSON to --out and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import results_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="where to write the JSON results")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the CPU (set TRITON_INTERPRET=1): checks the script, not the GPU")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per case (median reported)")
    results_io.add_argument(p)
    return p.parse_args()


ARGS = parse_args()
if ARGS.dry_run:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def import_package():
    """unlearn_fast, with unlearn_fast.kernels mapped to ./kernels when the package is not installed."""
    sys.path.insert(0, ROOT)
    import unlearn_fast

    try:
        import unlearn_fast.kernels  # noqa: F401
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "unlearn_fast.kernels", os.path.join(ROOT, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["unlearn_fast.kernels"] = module
        spec.loader.exec_module(module)
        unlearn_fast.kernels = module
    return unlearn_fast


import_package()
from unlearn_fast.io.atomic import write_json  # noqa: E402
from unlearn_fast.kernels import unlearning_layer as kernels  # noqa: E402
from unlearn_fast.ops import unlearning_layer, unlearning_layer_reference  # noqa: E402

DEVICE = "cpu" if ARGS.dry_run else "cuda"
ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make_layers(d, ranks, seed=0, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed)
    D = [(torch.randn(r, d, generator=g) / d ** 0.5).to(device) for r in ranks]
    b = [(0.5 * torch.randn(r, generator=g)).to(device) for r in ranks]
    U = [(torch.randn(d, r, generator=g) / r ** 0.5).to(device) for r in ranks]
    c = [(0.1 * torch.randn(d, generator=g)).to(device) for _ in ranks]
    return D, b, U, c


def fwd_bwd(fn, x, params, grad_y, activation):
    k = len(params) // 4
    y = fn(x, params[:k], params[k:2 * k], params[2 * k:3 * k], params[3 * k:], activation)
    return y, torch.autograd.grad(y, [x, *params], grad_y)


def rel_err(got, want):
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm().clamp_min(1e-30))


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, reps, warmup=3):
    """Median wall time of fn() in ms (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class forced_path:
    """Force the Triton kernels' narrow or wide path (for timing both)."""

    def __init__(self, path):
        self.path, self.saved = path, kernels.NARROW_MAX_RP

    def __enter__(self):
        if self.path == "wide":
            kernels.NARROW_MAX_RP = 0
        elif self.path == "narrow":
            kernels.NARROW_MAX_RP = 1 << 30

    def __exit__(self, *exc):
        kernels.NARROW_MAX_RP = self.saved


class forced_blocks:
    """Run the Triton kernels with the given block sizes (a small sweep for tuning)."""

    def __init__(self, blocks):
        self.blocks, self.saved = blocks, kernels.default_blocks

    def __enter__(self):
        kernels.default_blocks = lambda R, dtype=None: dict(self.blocks)

    def __exit__(self, *exc):
        kernels.default_blocks = self.saved


# Wide-path block sizes tried on the K = 8 cases besides the default (first guesses, never run on a GPU)
WIDE_SWEEP = [dict(path="wide", BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8),
              dict(path="wide", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8)]  # the default until 2026-12-05
# Narrow-path row blocks tried on the K = 1 cases (default 64: 128 programs at N = 8192, under 132 SMs)
NARROW_SWEEP = [dict(BLOCK_M=32), dict(BLOCK_M=128)]


# ------------------------------------------------------------------------------------------------
# 1. correctness
# ------------------------------------------------------------------------------------------------
def correctness():
    # Every Triton specialisation (value % 16 of N, d, R) costs compiles: the odd shape covers every
    # activation and dtype on both paths; the large ones share the timing cases' specialisations.
    fp32, bf16, all_acts = torch.float32, torch.bfloat16, tuple(ACTS)
    cases = [(37, 72, (5, 8, 3), None, (fp32, bf16), all_acts),
             (37, 72, (5, 8, 3), "wide", (fp32, bf16), all_acts if ARGS.dry_run else ("relu", "gelu"))]
    if not ARGS.dry_run:
        cases += [(1024, 2048, (64,), None, (bf16,), ("relu", "silu")),
                  (1024, 2048, (64,) * 8, None, (bf16,), ("relu",))]
    rows, ok = [], True
    for n, d, ranks, path, dtypes, acts in cases:
        D, b, U, c = make_layers(d, ranks)
        for dtype in dtypes:
            for act in acts:
                g = torch.Generator(device="cpu").manual_seed(1)
                x = torch.randn(n, d, generator=g).to(DEVICE, dtype)
                gy = torch.randn(n, d, generator=g).to(DEVICE, dtype)
                params = [t.clone().requires_grad_(True) for t in (*D, *b, *U, *c)]
                os.environ["UNLEARN_FAST_BACKEND"] = "triton"
                with forced_path(path):
                    y, grads = fwd_bwd(unlearning_layer, x.clone().requires_grad_(True), params, gy, act)
                os.environ["UNLEARN_FAST_BACKEND"] = "reference"
                y32, grads32 = fwd_bwd(unlearning_layer_reference, x.clone().requires_grad_(True), params, gy, act)
                p64 = [t.double().requires_grad_(True) for t in params]
                y64, grads64 = fwd_bwd(unlearning_layer_reference, x.double().requires_grad_(True), p64, gy.double(), act)
                err = max([rel_err(y, y64)] + [rel_err(a, w) for a, w in zip(grads, grads64)])
                err32 = max([rel_err(y32, y64)] + [rel_err(a, w) for a, w in zip(grads32, grads64)])
                passed = err <= TOL[dtype]
                ok &= passed
                rows.append({"N": n, "d": d, "ranks": list(ranks), "path": path or kernels.default_blocks(sum(ranks))["path"],
                             "dtype": str(dtype).removeprefix("torch."), "activation": act,
                             "max_rel_err_triton": err, "max_rel_err_fp32_reference": err32, "passed": passed})
                print(f"  N={n:<5} d={d:<5} R={sum(ranks):<4} {rows[-1]['path']:<6} {rows[-1]['dtype']:<8} {act:<4} "
                      f"triton {err:.2e}  fp32-ref {err32:.2e}  {'ok' if passed else 'FAIL'}", flush=True)
    os.environ.pop("UNLEARN_FAST_BACKEND", None)
    return rows, ok


# ------------------------------------------------------------------------------------------------
# 2. ceilings
# ------------------------------------------------------------------------------------------------
def ceilings():
    n = 512 if ARGS.dry_run else 8192
    dtype = torch.float32 if ARGS.dry_run else torch.bfloat16
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    mm_ms = time_ms(lambda: a @ b, reps=10)
    numel = (1 << 20) if ARGS.dry_run else (1 << 29)  # 1 GiB of bf16 on the GPU
    src = torch.empty(numel, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), reps=10)
    out = {"matmul_tflops": 2 * n ** 3 / mm_ms / 1e9, "matmul_shape": [n, n, n], "matmul_dtype": str(dtype),
           "copy_gbps": 2 * numel * 2 / copy_ms / 1e6, "copy_bytes": numel * 2}
    print(f"  matmul {out['matmul_tflops']:.4g} TFLOP/s, copy {out['copy_gbps']:.4g} GB/s (read + write)", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# 3. timings
# ------------------------------------------------------------------------------------------------
def eager(x, params, activation):
    """K layers one after another: Linear, act, Linear, add, under bf16 autocast (fp32 master weights)."""
    k = len(params) // 4
    act = ACTS[activation]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = x
        for i in range(k):
            y = y + F.linear(act(F.linear(x, params[i], params[k + i])), params[2 * k + i], params[3 * k + i])
    return y


def floor_ms(n, d, R, ceil):
    flops = 12 * n * d * R
    nbytes = 2 * 5 * n * d + 4 * 2 * n * R + 4 * 4 * R * d
    return max(flops / (ceil["matmul_tflops"] * 1e9), nbytes / (ceil["copy_gbps"] * 1e6)), flops, nbytes


def timings(ceil, save=lambda rows: None):
    """The timing table, one row per (d, K); a row that raises is kept as {"d", "K", "error"} and the
    others still run. ``save(rows)`` after every row."""
    n = 64 if ARGS.dry_run else 8192
    dims = (48, 72) if ARGS.dry_run else (2048, 4096)
    r = 8 if ARGS.dry_run else 64
    reps = 2 if ARGS.dry_run else ARGS.reps
    activation = "relu"
    rows = []
    for d in dims:
        for k in (1, 8):
            try:
                rows.append(timing_row(n, d, r, k, reps, activation, ceil))
            except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
                os.environ.pop("UNLEARN_FAST_BACKEND", None)
                rows.append({"N": n, "d": d, "r": r, "K": k, "error": f"{type(err).__name__}: {err}"[:300]})
                print(f"  d={d:<5} K={k}  ERROR {rows[-1]['error']}", flush=True)
            save(rows)
    return rows


def timing_row(n, d, r, k, reps, activation, ceil):
    """One (d, K) row: eager, the default Triton path, the other path or the wide sweep, the floor."""
    D, b, U, c = make_layers(d, [r] * k)
    params = [t.requires_grad_(True) for t in (*D, *b, *U, *c)]
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(n, d, generator=g).to(DEVICE, torch.bfloat16).requires_grad_(True)
    gy = torch.randn(n, d, generator=g).to(DEVICE, torch.bfloat16)
    R = k * r
    row = {"N": n, "d": d, "r": r, "K": k, "dtype": "bfloat16", "activation": activation,
           "default_path": kernels.default_blocks(R)["path"]}
    row["eager_ms"] = time_ms(lambda: torch.autograd.grad(eager(x, params, activation), [x, *params], gy), reps)
    os.environ["UNLEARN_FAST_BACKEND"] = "triton"
    step = lambda: fwd_bwd(unlearning_layer, x, params, gy, activation)  # noqa: E731
    row["triton_ms"] = time_ms(step, reps)
    if k == 1:  # the other path, to check the narrow/wide threshold
        other = "wide" if row["default_path"] == "narrow" else "narrow"
        with forced_path(other):
            row[f"triton_{other}_ms"] = time_ms(step, reps)
        if row["default_path"] == "narrow":
            for i, change in enumerate(NARROW_SWEEP):
                with forced_blocks({**kernels.default_blocks(R), **change}):
                    row[f"triton_narrow_sweep{i}_ms"] = time_ms(step, reps)
            row["narrow_sweep"] = NARROW_SWEEP
    elif row["default_path"] == "wide" or ARGS.dry_run:  # (dry run: to exercise the code)
        for i, blocks in enumerate(WIDE_SWEEP):
            with forced_blocks(blocks):
                row[f"triton_sweep{i}_ms"] = time_ms(step, reps)
        row["wide_sweep"] = WIDE_SWEEP
    os.environ.pop("UNLEARN_FAST_BACKEND", None)
    row["floor_ms"], row["flops"], row["bytes"] = floor_ms(n, d, R, ceil)
    row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
    row["triton_over_floor"] = row["triton_ms"] / row["floor_ms"]
    row["target"] = ("speedup >= 1.5" if k == 1 else "speedup >= 3 and triton/floor <= 1.3")
    row["target_met"] = (row["speedup_vs_eager"] >= 1.5 if k == 1 else
                         row["speedup_vs_eager"] >= 3 and row["triton_over_floor"] <= 1.3)
    extra = "".join(f"  {key} {v:.3f}" for key, v in row.items() if key.startswith("triton_") and key.endswith("_ms")
                    and key != "triton_ms")
    print(f"  d={d:<5} K={k}  eager {row['eager_ms']:8.3f} ms  triton {row['triton_ms']:8.3f} ms  "
          f"floor {row['floor_ms']:8.3f} ms  speedup {row['speedup_vs_eager']:5.2f}x  "
          f"triton/floor {row['triton_over_floor']:5.2f}  {'met' if row['target_met'] else 'NOT met'}{extra}",
          flush=True)
    return row


def main():
    import triton

    t0 = time.time()
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu",
              "dry_run": ARGS.dry_run, "torch": torch.__version__, "triton": triton.__version__}
    print(f"unlearning-layer benchmark on {result['device']} (torch {torch.__version__}, triton {triton.__version__})")

    def save():  # after every stage, so a run cut short still leaves its results
        result["seconds"] = time.time() - t0
        write_json(ARGS.out, result, indent=2)

    print("1. correctness (max relative error over y and all gradients, vs float64)")
    result["correctness"], ok = correctness()
    save()
    if ok:
        print("2. ceilings")
        result["ceilings"] = ceilings()
        print("3. forward + backward timings")
        result["timings"] = timings(result["ceilings"], lambda rows: (result.update(timings=rows), save()))
    else:
        print("correctness failed: no timings")
    save()
    print(f"wrote {ARGS.out} ({result['seconds']:.0f} s)")
    where = results_io.results_dir(ARGS.results, ARGS.dry_run)
    if where:
        print(f"results: {results_io.write_results(where, results_file(result, ok))}")
    return 0 if ok else 1


def results_file(result, ok) -> dict:
    """The timing table as a results file; correctness and the card's ceilings in its notes."""
    sig = results_io.sig
    keys = ("N", "d", "r", "K", "default_path", "eager_ms", "triton_ms", "floor_ms", "speedup_vs_eager",
            "triton_over_floor", "target_met", "error")
    rows = [{k: sig(r[k]) if isinstance(r.get(k), float) else r.get(k) for k in keys if k in r}
            for r in result.get("timings", [])]
    ceil = result.get("ceilings") or {}
    notes = f"{result['device']}; correctness vs float64: {'met' if ok else 'FAILED, no timings'}"
    if ceil:
        notes += f"; matmul {ceil['matmul_tflops']:.4g} TFLOP/s, copy {ceil['copy_gbps']:.4g} GB/s"
    return results_io.make_results("unlearning_layer_gpu", rows, results_io.command_line(__file__), notes)


if __name__ == "__main__":
    sys.exit(main())
