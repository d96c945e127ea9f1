"""Compile every Triton kernel of unlearn_fast.kernels for an H100/H200 (sm_90) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, what CI runs the kernels' tests under) accepts code that the real
compiler refuses (a plain global read inside a @triton.jit function, for one) and runs other block
sizes than a GPU would. This script drives the real compiler instead: a stand-in driver reports a
CUDA device of compute capability 9.0, the host launchers run on meta tensors (no memory), and every
launch only compiles (``warmup``), down to ptxas and a cubin. It prints one line per compiled kernel
(warps, registers, spilled bytes, shared memory, and whether ptxas serialised its wgmma instructions)
and exits non-zero at the first launcher that fails.

    python tests/ops/sm90_compile.py [--json kernels.json]   # tests/ops/test_sm90_compile.py runs it

Run it under the GPU machine's triton (3.6) when changing block sizes: register use and wgmma
serialisation differ between triton versions.

Uses triton's runtime internals (driver.set_active, JITFunction.run): written against triton 3.6-3.9.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this compiles the GPU kernels and block sizes")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class Sm90Driver:
    """What triton's launcher asks of the active driver, answered for one sm_90 device."""

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("nothing runs here: no benchmarking")


COMPILED: list[tuple[str, str, object]] = []  # (launcher, kernel name, compiled kernel)
_run = JITFunction.run
_launcher = ""


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append((_launcher, self.fn.__name__, kernel))
    return kernel


def ptxas_report(kernel) -> dict:
    """Registers, spills and warnings of one kernel, from triton's bundled ptxas run verbosely on its PTX
    (triton's own ptxas run keeps these to itself). C7515 means wgmma instructions were serialized."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas triton itself uses for sm_90

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, out)) else 0  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_bytes": number(r"(\d+) bytes spill stores"),
            "serialized_wgmma": "C7515" in out, "shared": kernel.metadata.shared,
            "warps": kernel.metadata.num_warps}


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def loss_head(dtype):
    from unlearn_fast.kernels import loss_head as k

    n, h, v = 512, 2048, 128256
    hidden, weight = meta(n, h, dtype=dtype), meta(v, h, dtype=dtype)
    student, teacher = meta(n, v), meta(n, v)
    k.logits_pair(hidden, hidden, weight, None, 1.0, student, teacher)
    k.logits_pair(hidden, hidden, weight, meta(v, dtype=dtype), 1.0, student, teacher)
    targets, coef = meta(n, dtype=torch.long), meta(n)
    for guard in (False, True):
        k.loss_rows(student, teacher, targets, coef, coef, 5.0, 5.0, 1.0, sharpening_guard=guard, grad=student)
    k.grad_hidden(student, weight, 1.0, meta(n, h, dtype=dtype))
    if dtype == torch.bfloat16:  # the other 16-bit head: its weight is split too (listed under bf16)
        k.grad_hidden(student, meta(v, h, dtype=torch.float16), 1.0, meta(n, h, dtype=torch.float16))


def unlearning_layer(dtype):
    from unlearn_fast.kernels import unlearning_layer as k

    n, d = 8192, 2048
    x = meta(n, d, dtype=dtype)
    for rank, activation in ((64, "relu"), (128, "gelu"), (512, "silu")):  # narrow (both tile widths), wide
        weights = meta(rank, d), meta(rank), meta(d, rank), meta(d)
        y, saved = k.forward(x, *weights, activation)
        k.backward(torch.empty_like(x), x, weights[0], weights[2], saved, activation, True)


def trunk(dtype):
    from unlearn_fast.kernels import trunk as k

    for d in (2048, k.MAX_BLOCK_D + 1000):  # whole rows in registers, and the chunked wide-row path
        x, w = meta(64, d, dtype=dtype), meta(d, dtype=dtype)
        y, rstd = k.rms_norm_forward(x, w, 1e-5)
        k.rms_norm_backward(y, x, w, rstd)
    g = meta(8, 1024, 8192, dtype=dtype)
    k.swiglu_forward(g, g)
    k.swiglu_backward(g, g, g)


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the table here, one object per compiled kernel")
    args = parser.parse_args(argv)
    global _launcher
    driver.set_active(Sm90Driver())
    JITFunction.run = _compile_only
    for launchers in (loss_head, unlearning_layer, trunk):
        for dtype in (torch.bfloat16, torch.float32):
            _launcher = f"{launchers.__name__} {str(dtype).removeprefix('torch.')}"
            launchers(dtype)
    seen, rows = set(), []
    print(f"{'launcher':27}{'kernel':34}{'warps':>6}{'regs':>6}{'spill B':>8}{'shared B':>10}  wgmma")
    for launcher, name, kernel in COMPILED:
        if id(kernel) in seen:  # a cached kernel launched again
            continue
        seen.add(id(kernel))
        rows.append({"launcher": launcher, "kernel": name, **ptxas_report(kernel)})
        r = rows[-1]
        print(f"{launcher:27}{name:34}{r['warps']:6}{r['registers']:6}{r['spill_bytes']:8}{r['shared']:10}  "
              f"{'SERIALIZED' if r['serialized_wgmma'] else 'ok'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
