"""Print the environment: versions, the live kernel backends, and why the others are not live.

    python -m unlearn_fast.env
"""

from __future__ import annotations

import importlib
import os
import platform

import torch

from .ops.extension import C_ERROR, C, has_cuda_ops

BACKEND_VAR = "UNLEARN_FAST_BACKEND"


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed (no __version__)")
    except Exception as err:  # noqa: BLE001 - report anything, never fail
        return f"not importable ({type(err).__name__}: {err})"


def backend_report() -> dict:
    """Versions and backends as a dict: ``versions``, ``live`` (list), ``not_live`` (name -> why),
    ``forced`` (the value of UNLEARN_FAST_BACKEND, or None)."""
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "unlearn_fast": _version("unlearn_fast"),
    }
    gpu = torch.cuda.is_available()
    if gpu:
        versions["GPU"] = torch.cuda.get_device_name(0)

    live, not_live = ["reference"], {}
    if C is not None:
        live.append("cpp")
    else:
        not_live["cpp"] = C_ERROR

    try:
        importlib.import_module("triton")
        triton_err = None
    except Exception as err:  # noqa: BLE001
        triton_err = f"triton not importable ({type(err).__name__}: {err})"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if triton_err:
        not_live["triton"] = triton_err
    elif gpu or interpret:
        live.append("triton")
    else:
        not_live["triton"] = "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"

    if C is None:
        not_live["cuda"] = f"_C not live: {C_ERROR}"
    elif not has_cuda_ops():
        not_live["cuda"] = "_C was built without CUDA kernels (torch without CUDA, or no nvcc at build time)"
    elif not gpu:
        not_live["cuda"] = "no CUDA GPU visible"
    else:
        live.append("cuda")

    # the CPU unlearning-layer op's block GEMM (csrc/cpu/block_gemm.h): avx512, avx2 or aten
    cpu_gemm = C.cpu_gemm_kernel() if C is not None and hasattr(C, "cpu_gemm_kernel") else None
    return {"versions": versions, "live": live, "not_live": not_live, "forced": os.environ.get(BACKEND_VAR),
            "cpu_gemm": cpu_gemm}


def main() -> None:
    report = backend_report()
    width = max(map(len, report["versions"]))
    for name, value in report["versions"].items():
        print(f"{name:<{width}}  {value}")
    print()
    print("live backends: " + ", ".join(report["live"]))
    for name, why in report["not_live"].items():
        print(f"  not live: {name}: {why}")
    if report["cpu_gemm"]:
        print(f"cpp unlearning-layer GEMM kernel: {report['cpu_gemm']} (UNLEARN_FAST_CPU_GEMM=avx512|avx2|aten picks one)")
    forced = report["forced"]
    print(f"{BACKEND_VAR}={forced}" if forced is not None else f"{BACKEND_VAR} not set (auto)")


if __name__ == "__main__":
    main()
