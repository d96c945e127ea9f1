"""Backend choice for the fused ops: made here and nowhere else.

``UNLEARN_FAST_BACKEND`` forces a backend for every op: ``auto`` (default), ``reference``,
``cpp`` or ``triton``. ``auto`` picks per tensor device: CUDA → Triton where an op has a Triton
kernel, CPU → the C++ extension where built, otherwise the PyTorch reference.
"""

from __future__ import annotations

import os

import torch

from ..errors import UnlearnFastError

BACKENDS = ("auto", "reference", "cpp", "triton")
ENV_VAR = "UNLEARN_FAST_BACKEND"


def forced_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise UnlearnFastError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def cpp_ops():
    """The compiled extension module, or None when it was not built."""
    from .._ext import C

    return C


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
            from .._ext import C_ERROR

            raise UnlearnFastError(f"{ENV_VAR}=cpp but the C++ extension is not live: {C_ERROR}")
        return forced
    if device.type == "cuda" and "triton" in available:
        return "triton"
    if device.type == "cpu" and "cpp" in available and cpp_ops() is not None:
        return "cpp"
    return "reference"
