"""Backend choice for the fused ops: made here and nowhere else.

``UNLEARN_FAST_BACKEND`` forces a backend for every op: ``auto`` (default), ``reference``,
``cpp``, ``cuda`` (the CUDA C++ kernels of ``_C``) or ``triton``. ``auto`` picks per tensor device:
CUDA → Triton where an op has a Triton kernel (else CUDA C++ where built), CPU → the C++ extension
where built, otherwise the PyTorch reference. ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``
set before triton is imported (the tests use that).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import UnlearnFastError
from .extension import C_ERROR, C, has_cuda_ops

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
ENV_VAR = "UNLEARN_FAST_BACKEND"


def forced_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise UnlearnFastError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def cpp_ops():
    """The compiled extension module, or None when it was not built."""

    return C


def triton_error() -> str:
    """Why Triton kernels cannot run here ('' when they can): triton missing, or no GPU and no
    interpreter."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"
    return ""


def pick_backend(device: torch.device, available: tuple[str, ...]) -> str:
    """Return the backend to run an op on ``device``.

    ``available`` lists the accelerated backends the op implements (besides the reference).
    A forced backend the op lacks, or that cannot run here, is an error rather than a silent
    fallback, so tests that force a backend really test it.
    """
    forced = forced_backend()
    if forced == "reference":
        return "reference"
    if forced != "auto":
        if forced not in available:
            raise UnlearnFastError(f"{ENV_VAR}={forced} but this op has no {forced} backend")
        if forced == "cpp" and cpp_ops() is None:

            raise UnlearnFastError(f"{ENV_VAR}=cpp but the C++ extension is not live: {C_ERROR}")
        if forced == "cuda":

            if not has_cuda_ops():
                raise UnlearnFastError(f"{ENV_VAR}=cuda but unlearn_fast._C was built without CUDA kernels")
            if device.type != "cuda":
                raise UnlearnFastError(f"{ENV_VAR}=cuda but the tensors are on {device}")
        if forced == "triton" and triton_error():
            raise UnlearnFastError(f"{ENV_VAR}=triton but Triton cannot run: {triton_error()}")
        return forced
    if device.type == "cuda":

        if "triton" in available and not triton_error():
            return "triton"
        if "cuda" in available and has_cuda_ops():
            return "cuda"
    if device.type == "cpu" and "cpp" in available and cpp_ops() is not None:
        return "cpp"
    return "reference"
