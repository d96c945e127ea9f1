"""Triton kernels of unlearn_fast, one module per fused op.

This folder is installed as ``unlearn_fast.kernels`` (see ``package_dir`` in setup.py); it has no
top-level import name of its own. Each module holds the ``@triton.jit`` kernels of one op and a
launcher that only computes the grid, block sizes and strides; the public functions that choose a
backend live in :mod:`unlearn_fast.ops`. Importing this package does not import triton.
"""
