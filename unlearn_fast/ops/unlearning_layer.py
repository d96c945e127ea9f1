"""The unlearning-layer op: K bottleneck adapters applied to one activation in one call.

    y = x + Σ_k ( U_k · act(D_k · x + b_k) + c_k )

The K layers of a block (one per deletion request until they are fused) read the same input and
add their outputs to the residual: summed, not chained. Summing keeps every request's layer
independent of the others' order, lets the K down-projections run as one [d, Σr] product, and is
what closed-form fusion assumes (each layer's inputs are the block's activations, not another
adapter's output).

Backends (chosen once per call by :func:`~unlearn_fast.ops.backend.pick_backend`; the
``UNLEARN_FAST_BACKEND`` variable forces one):

* ``triton`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``): ``unlearn_fast.kernels.unlearning_layer``;
  dot operands in x's dtype (bf16/fp16 tensor cores, IEEE fp32 for fp32 x), fp32 accumulation.
* ``cpp`` (CPU tensors): ``unlearn_fast._C.unlearning_layer_forward`` / ``_backward``
  (csrc/cpu/unlearning_layer.cpp), all arithmetic in fp32: one pass over blocks of rows, the block GEMMs
  in small register-tiled kernels, AVX-512 or AVX2 + FMA by what the CPU has (csrc/cpu/block_gemm.h;
  ``UNLEARN_FAST_CPU_GEMM=avx512|avx2|aten`` picks one, ``aten`` being ATen's BLAS on the blocks;
  ``python -m unlearn_fast.env`` prints the one in use).
* ``reference``: :func:`unlearning_layer_reference`, autograd through plain PyTorch.

The fused backends see the K layers as one: D = [D_1; ...; D_K] [R, d], b [R], U = [U_1 ... U_K]
[d, R] and c = Σ c_k in fp32, R = Σ r_k (concatenating copies the weights once per call, small next
to x). They save x and the pre-activation h = x Dᵀ + b ([N, R], fp32) for backward (Triton's wide
path also act(h)). float64 inputs always run the reference.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import cpp_ops, pick_backend

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def unlearning_layer_reference(
    x: Tensor,
    down_weights: Sequence[Tensor],
    down_biases: Sequence[Tensor],
    up_weights: Sequence[Tensor],
    up_biases: Sequence[Tensor],
    activation: str = "relu",
) -> Tensor:
    """Pure-PyTorch K-layer forward in fp32 or wider (autograd gives the backward); result in x's dtype."""
    act = ACTIVATIONS[activation]
    wide = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(wide)
    flat = xw.reshape(-1, xw.shape[-1])
    y = xw
    for d_w, d_b, u_w, u_b in zip(down_weights, down_biases, up_weights, up_biases, strict=True):
        bottleneck = act(torch.addmm(d_b.to(wide), flat, d_w.to(wide).t()))
        y = y + torch.addmm(u_b.to(wide), bottleneck, u_w.to(wide).t()).reshape(xw.shape)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Fused backends, by name: (forward, backward) over the K layers joined into one (fp32 weights).
#   forward(x [N, d], D [R, d], b [R], U [d, R], c [d], activation) -> (y [N, d], saved tensors)
#   backward(g, x, D, U, saved, activation, need_grad_x) -> (gx | None, gD, gb, gU, gc), fp32 but gx
# ---------------------------------------------------------------------------------------------
# Through the torch dispatcher (torch.ops.unlearn_fast.*, registered by _C), not the pybind
# functions: torch.compile traces dispatcher ops (their Meta kernels give shapes) without a graph break.
def _cpp_forward(x, D, b, U, c, activation):
    cpp_ops()  # loads _C, which registers the ops
    y, pre = torch.ops.unlearn_fast.unlearning_layer_forward(x, D, b, U, c, activation)
    return y, (pre,)


def _cpp_backward(g, x, D, U, saved, activation, need_grad_x):
    cpp_ops()
    gx, gD, gb, gU, gc = torch.ops.unlearn_fast.unlearning_layer_backward(g, x, saved[0], D, U, activation,
                                                                           need_grad_x)
    return (gx if need_grad_x else None), gD, gb, gU, gc


def _triton_kernels():
    from unlearn_fast.kernels import unlearning_layer as kernels  # imports triton: only when used

    return kernels


def _triton_forward(x, D, b, U, c, activation):
    return _triton_kernels().forward(x, D, b, U, c, activation)


def _triton_backward(g, x, D, U, saved, activation, need_grad_x):
    return _triton_kernels().backward(g, x, D, U, saved, activation, need_grad_x)


_FUSED = {"cpp": (_cpp_forward, _cpp_backward), "triton": (_triton_forward, _triton_backward)}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _join(tensors: Sequence[Tensor], dim: int) -> Tensor:
    t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)
    return t.float().contiguous()


class _UnlearningLayerFunction(torch.autograd.Function):
    """K layers through one fused forward and one fused backward of ``backend``."""

    @staticmethod
    def forward(ctx, x, activation, backend, *params):
        k = len(params) // 4
        down_w, down_b, up_w, up_b = params[:k], params[k:2 * k], params[2 * k:3 * k], params[3 * k:]
        D, b, U = _join(down_w, 0), _join(down_b, 0), _join(up_w, 1)
        c = up_b[0].float() if k == 1 else torch.stack([t.float() for t in up_b]).sum(0)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, saved = _FUSED[backend][0](x2, D, b, U, c, activation)
        ctx.save_for_backward(x2, D, U, *saved)
        ctx.activation, ctx.backend, ctx.x_shape = activation, backend, x.shape
        ctx.ranks = [w.shape[0] for w in down_w]
        ctx.param_dtypes = [p.dtype for p in params]
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2, D, U, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad_y.reshape(x2.shape).to(x2.dtype).contiguous()
        gx, gD, gb, gU, gc = _FUSED[ctx.backend][1](g, x2, D, U, tuple(saved), ctx.activation, need[0])
        k = len(ctx.ranks)
        grads = [*gD.split(ctx.ranks, 0), *gb.split(ctx.ranks, 0), *gU.split(ctx.ranks, 1)]
        grads += [gc] + [gc.clone() for _ in range(k - 1)]  # one c-gradient per layer, never shared storage
        out = [t.contiguous().to(dt) if want else None
               for t, dt, want in zip(grads, ctx.param_dtypes, need[3:], strict=True)]
        grad_x = gx.view(ctx.x_shape) if need[0] else None
        return (grad_x, None, None, *out)


def _check(x: Tensor, down_weights, down_biases, up_weights, up_biases) -> None:
    k = len(down_weights)
    if not (len(down_biases) == len(up_weights) == len(up_biases) == k):
        raise ValueError(f"need as many down biases, up weights and up biases as down weights ({k}), got "
                         f"{len(down_biases)}, {len(up_weights)}, {len(up_biases)}")
    d = x.shape[-1]
    for i, (dw, db, uw, ub) in enumerate(zip(down_weights, down_biases, up_weights, up_biases)):
        r = dw.shape[0]
        if dw.shape != (r, d) or db.shape != (r,) or uw.shape != (d, r) or ub.shape != (d,):
            raise ValueError(f"layer {i}: expected D [r, {d}], b [r], U [{d}, r], c [{d}], got "
                             f"{list(dw.shape)}, {list(db.shape)}, {list(uw.shape)}, {list(ub.shape)}")


def unlearning_layer(
    x: Tensor,
    down_weights: Sequence[Tensor],
    down_biases: Sequence[Tensor],
    up_weights: Sequence[Tensor],
    up_biases: Sequence[Tensor],
    activation: str = "relu",
) -> Tensor:
    """Apply K unlearning layers to ``x`` [..., d]: D_k [r_k, d], b_k [r_k], U_k [d, r_k], c_k [d].

    Returns ``x + Σ_k U_k·act(D_k·x + b_k) + c_k`` in x's dtype, accumulated in fp32 (bf16 / fp16
    x with fp32 weights is the GPU case). All K layers share ``activation`` (relu, gelu — the exact
    erf form — or silu). Differentiable in x and every weight and bias.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    _check(x, down_weights, down_biases, up_weights, up_biases)
    backend = pick_backend(x.device, available=tuple(_FUSED))
    if backend == "reference" or x.dtype not in _KERNEL_DTYPES or x.numel() == 0 or not down_weights:
        return unlearning_layer_reference(x, down_weights, down_biases, up_weights, up_biases, activation)
    return _UnlearningLayerFunction.apply(x, activation, backend, *down_weights, *down_biases, *up_weights,
                                          *up_biases)
