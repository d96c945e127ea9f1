"""The CUDA sources compile with nvcc, also on a machine without a GPU or a CUDA build of torch.

Each ``csrc/cuda/*.cu`` is compiled twice for Hopper (sm_90, the GPUs the kernels are tuned for):
its kernels and raw-pointer launcher alone (CUDA headers only), and with the torch-facing wrapper
(``-DUNLEARN_FAST_WITH_TORCH``, torch's headers). A CPU wheel of torch ships the c10/cuda headers but
not the one CMake generates at torch's build (``c10/cuda/impl/cuda_cmake_macros.h``); a stand-in with
the same definition is supplied. Skipped where no nvcc is found. Running the kernels needs a GPU
(``tests/ops/test_loss_head.py`` does when one is present).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCH = "sm_90"


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _compile(source: Path, out: Path, *flags: str) -> None:
    cmd = [NVCC, "-c", str(source), "-o", str(out), f"-arch={ARCH}", "-O1", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr[-4000:]}"
    assert out.stat().st_size > 0


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda holds no .cu file"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_kernels_compile_without_torch(source, tmp_path):
    _compile(source, tmp_path / "kernels.o", "-std=c++17")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_torch_wrapper_compiles(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / generated).exists() for p in include_paths()):
        stub = tmp_path / "include" / generated
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, f"-I{tmp_path / 'include'}")
    abi = int(torch.compiled_with_cxx11_abi())
    _compile(source, tmp_path / "wrapper.o", "-std=c++20", "--expt-relaxed-constexpr", "-DUNLEARN_FAST_WITH_TORCH",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes)
