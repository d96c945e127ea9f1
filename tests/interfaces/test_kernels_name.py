"""kernels/ is unlearn_fast.kernels; run from the repository root it would also be the top-level
`kernels`, a name that belongs to a PyPI package recent transformers releases import."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

ROOT = str(REPO_ROOT)


def test_top_level_kernels_is_the_pypi_package_from_the_repository_root():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package 'kernels' is not installed")
    code = ("import kernels, unlearn_fast.kernels as ours; "
            "print(kernels.__file__); print(ours.__file__); print(hasattr(kernels, 'CUDAProperties'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    pypi, ours, has_api = out.stdout.split()
    assert not pypi.startswith(os.path.join(ROOT, "kernels"))
    assert ours == os.path.join(ROOT, "kernels", "__init__.py")
    assert has_api == "True"


def test_transformers_llama_imports_from_the_repository_root():
    code = "from transformers.models.llama.modeling_llama import LlamaRMSNorm; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
