"""The compiled extension ``unlearn_fast._C``, imported once.

``C`` is the module, or None when it is not usable; ``C_ERROR`` then says why (empty when live).
Importing ``_C`` also registers its ops as ``torch.ops.unlearn_fast.*``.
"""

from __future__ import annotations

import importlib.util

import torch  # noqa: F401  - _C links against torch's libraries: load them first

BUILD_HINT = "pip install --no-build-isolation -e ."


def _load():
    if importlib.util.find_spec("unlearn_fast._C") is None:
        return None, f"not built: run {BUILD_HINT} (set UNLEARN_FAST_BUILD_EXT=1 to see build errors)"
    try:
        from unlearn_fast import _C
    except ImportError as err:  # built against another torch / Python, or a missing library
        return None, f"built but not importable ({err}); rebuild with {BUILD_HINT}"
    return _C, ""


C, C_ERROR = _load()


def has_cuda_ops() -> bool:
    """True when ``_C`` is live and was compiled with its CUDA kernels (a GPU may still be absent)."""
    return C is not None and bool(getattr(C, "WITH_CUDA", False))
