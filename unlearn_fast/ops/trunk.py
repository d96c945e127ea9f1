"""Fused ops for the frozen trunk of Llama-family models: RMSNorm and the SwiGLU product.

    rms_norm(x, w, eps) = w · (x / sqrt(mean(x²) + eps))      (over the last dimension)
    swiglu(gate, up)    = silu(gate) · up                      (the MLP's gated product)

The trunk is frozen during unlearning, but the student's backward still runs through every block
above the lowest unlearning layer. Eager PyTorch spends about eight elementwise passes on one
RMSNorm (and as many on its backward) and three on silu(gate)·up forward, five backward; these
ops do each in one pass. They change nothing in the math: the references below are the
transformers formulas (``LlamaRMSNorm``: normalise in fp32, cast back to x's dtype, then scale).

Backends (chosen once per call by :func:`~unlearn_fast.ops.backend.pick_backend`):

* ``cpp`` (CPU, float32): ``unlearn_fast._C`` (csrc/cpu/trunk.cpp) through ``torch.ops.unlearn_fast``;
* ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): ``unlearn_fast.kernels.trunk``, fp32
  arithmetic, result in the input dtype;
* ``reference``: the formulas below, autograd through plain PyTorch.

The fused kernels compute no weight gradient (the base is frozen); when the norm weight does
require grad, the backward adds it in PyTorch from the saved tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import cpp_ops, pick_backend


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm: fp32 statistics, normalised x cast back to x's dtype, then × weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up, as transformers' LlamaMLP computes it."""
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------
# Fused backends. Both expose the same four kernels under the same names, over contiguous 2-D
# (RMSNorm) or same-shaped (SwiGLU) tensors:
#   rms_norm_forward(x [N, d], w [d], eps) -> (y [N, d], rstd [N] fp32)
#   rms_norm_backward(dy, x, w, rstd) -> dx
#   swiglu_forward(g, u) -> h;   swiglu_backward(dh, g, u) -> (dg, du)
# ---------------------------------------------------------------------------------------------
# What each backend's kernels take: the C++ ones are float32 only.
_DTYPES = {"cpp": (torch.float32,), "triton": (torch.float32, torch.bfloat16, torch.float16)}


def _kernels(backend: str):
    """The namespace holding ``backend``'s four kernels."""
    if backend == "cpp":
        cpp_ops()  # loads _C, which registers torch.ops.unlearn_fast.*
        return torch.ops.unlearn_fast
    from unlearn_fast.kernels import trunk  # imports triton: only when used

    return trunk


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, backend):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        w = weight.contiguous()
        y, rstd = _kernels(backend).rms_norm_forward(x2, w, eps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.backend, ctx.x_shape = backend, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2, w, rstd = ctx.saved_tensors
        dy = grad_y.reshape(x2.shape).to(x2.dtype).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _kernels(ctx.backend).rms_norm_backward(dy, x2, w, rstd).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # frozen in unlearning; kept correct for other uses
            normed = (x2.float() * rstd.unsqueeze(1)).to(x2.dtype)
            grad_w = (dy.float() * normed.float()).sum(0).to(w.dtype)
        return grad_x, grad_w, None, None


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, backend):
        g, u = gate.contiguous(), up.contiguous()
        h = _kernels(backend).swiglu_forward(g, u)
        ctx.save_for_backward(g, u)
        ctx.backend = backend
        return h

    @staticmethod
    def backward(ctx, grad_h):
        g, u = ctx.saved_tensors
        dg, du = _kernels(ctx.backend).swiglu_backward(grad_h.to(g.dtype).contiguous(), g, u)
        need = ctx.needs_input_grad
        return (dg if need[0] else None), (du if need[1] else None), None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm of ``x`` [..., d] with ``weight`` [d], as transformers' LlamaRMSNorm computes it.

    Fused (one pass forward, one backward) where a backend takes x's dtype and the weight has it
    too; otherwise the reference. Differentiable in x and in weight.
    """
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1]}], got {list(weight.shape)}")
    backend = pick_backend(x.device, available=tuple(_DTYPES))
    if (backend == "reference" or x.dtype not in _DTYPES[backend] or weight.dtype != x.dtype
            or x.numel() == 0):
        return rms_norm_reference(x, weight, eps)
    return _RMSNormFunction.apply(x, weight, float(eps), backend)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up in one pass (forward and backward); the reference where no backend fits."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have one shape, got {list(gate.shape)} and {list(up.shape)}")
    backend = pick_backend(gate.device, available=tuple(_DTYPES))
    if (backend == "reference" or gate.dtype not in _DTYPES[backend] or up.dtype != gate.dtype
            or gate.numel() == 0):
        return swiglu_reference(gate, up)
    return _SwiGLUFunction.apply(gate, up, backend)
