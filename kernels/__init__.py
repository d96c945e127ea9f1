"""Triton kernels of unlearn_fast, one module per fused op.

This folder is installed as ``unlearn_fast.kernels`` (see ``package_dir`` in setup.py); it has no
top-level import name of its own. Each module holds the ``@triton.jit`` kernels of one op and a
launcher that only computes the grid, block sizes and strides; the public functions that choose a
backend live in :mod:`unlearn_fast.ops`. Importing this package does not import triton.
"""

import sys

if __name__ == "kernels":
    # Imported as the top-level ``kernels`` only because the repository root is on sys.path (``python
    # -m`` / ``-c`` from the root, scripts that add it). That name belongs to a PyPI package which
    # recent transformers releases import; hand the name over to it when it is installed (the import
    # system returns what sys.modules holds once this module has run).
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
