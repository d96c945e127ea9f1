"""Triton kernels of the frozen trunk's fused ops: RMSNorm and the SwiGLU product, forward and backward.

The caller (:mod:`unlearn_fast.ops.trunk`) hands over contiguous tensors in float32, bfloat16 or
float16; every kernel loads in that dtype, computes in fp32 and rounds once on the store.

    rms_norm   rstd = 1/sqrt(mean(x²) + eps)  (fp32, [N], saved for backward)
               y    = w · round(x · rstd)      round() to x's dtype first, as transformers' LlamaRMSNorm;
                                               the product is taken in fp32 and rounded again, which is
                                               what torch's 16-bit multiply does, so y is bit-exact
               dx   = rstd · (w·dy − x·c),  c = Σ(w·dy·x) · rstd² / d   (round() treated as identity)
    swiglu     h = silu(g) · u;   with s = σ(g):  du = dh·g·s,  dg = dh·u·s·(1 + g·(1 − s))

RMSNorm runs one program per row. Rows up to MAX_BLOCK_D wide sit in registers as one masked block
(read once); wider rows are walked twice in MAX_BLOCK_D chunks (sums, then outputs; the second read
mostly hits L2). SwiGLU is elementwise: a 1-D grid over the flat numel.

Under TRITON_INTERPRET=1 (INTERPRET=True) the fp32 -> bf16 cast truncates where the GPU rounds to
nearest even, so there the rounding is done on the bits first and CPU runs see the GPU's numerics.
Only long-standing tl APIs are used (masked tl.load / tl.store, tl.sum, tl.exp, tl.rsqrt, bitcasts),
so this runs on triton 3.6 and 3.9 and on the CPU under the interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 8192  # widest row kept in registers whole (fp32: 32 values a thread at 8 warps)
SWIGLU_BLOCK = 1024  # elements a program: 8 a thread at 4 warps, i.e. 16-byte loads for 16-bit inputs
SWIGLU_WARPS = 4


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _round(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 v rounded to ``dtype`` (nearest even). The interpreter truncates to bf16, so there the
    rounding is added to the bits first (the final cast then only drops zero bits)."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _rms_out(x, rstd, w, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """y = w · round(x · rstd), the product in fp32 and rounded to ``dtype`` (LlamaRMSNorm's order)."""
    normed = _round(x * rstd, dtype, INTERPRET).to(tl.float32)
    return _round(w * normed, dtype, INTERPRET)


@triton.jit
def _sigmoid(g):
    return 1.0 / (1.0 + tl.exp(-g))  # g → -inf: exp → inf, σ → 0 (no NaN)


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, D, eps,
                             BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # N · d can pass 2^31
    x_row = x_ptr + row * D
    y_row = y_ptr + row * D
    out_ty = y_ptr.dtype.element_ty
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, _rms_out(x, rstd, w, out_ty, INTERPRET), mask=mask)
        tl.store(rstd_ptr + row, rstd)
    else:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            x = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / D + eps)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, _rms_out(x, rstd, w, out_ty, INTERPRET), mask=mask)
        tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, D,
                              BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dy_row = dy_ptr + row * D
    x_row = x_ptr + row * D
    dx_row = dx_ptr + row * D
    out_ty = dx_ptr.dtype.element_ty
    rstd = tl.load(rstd_ptr + row)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        wdy = (tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
               * tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32))
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        c = tl.sum(wdy * x, axis=0) * rstd * rstd / D
        tl.store(dx_row + cols, _round(rstd * (wdy - x * c), out_ty, INTERPRET), mask=mask)
    else:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            wdy = (tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                   * tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32))
            acc += wdy * tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        c = tl.sum(acc, axis=0) * rstd * rstd / D
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            wdy = (tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                   * tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32))
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row + cols, _round(rstd * (wdy - x * c), out_ty, INTERPRET), mask=mask)


# ------------------------------------------------------------------------------------------------
# SwiGLU
# ------------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, numel, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, _round(g * _sigmoid(g) * u, h_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, numel, BLOCK: tl.constexpr,
                            INTERPRET: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    out_ty = dg_ptr.dtype.element_ty
    tl.store(du_ptr + offs, _round(dh * g * s, out_ty, INTERPRET), mask=mask)
    tl.store(dg_ptr + offs, _round(dh * u * s * (1.0 + g * (1.0 - s)), out_ty, INTERPRET), mask=mask)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _row_blocks(d: int) -> dict:
    """Block width, one-block flag and warps for rows of width d: about 256 row elements a warp
    (the layer-norm rule of thumb), 1 to 8 warps."""
    full = triton.next_power_of_2(d)
    block = min(full, MAX_BLOCK_D)
    return {"BLOCK_D": block, "ONE_BLOCK": full <= MAX_BLOCK_D, "num_warps": min(max(block // 256, 1), 8)}


def _check_rows(x: torch.Tensor, w: torch.Tensor) -> None:
    assert x.dim() == 2 and x.is_contiguous(), "x must be a contiguous [N, d] tensor"
    assert x.dtype in _DTYPES and w.dtype == x.dtype, f"x and w: one of {_DTYPES}, got {x.dtype}, {w.dtype}"
    assert w.shape == (x.shape[1],) and w.is_contiguous(), f"w must be a contiguous [{x.shape[1]}] tensor"


def rms_norm_forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [N, d] in x's dtype, rstd [N] fp32) for x [N, d] and w [d] (x's dtype)."""
    _check_rows(x, w)
    N, d = x.shape
    y = torch.empty_like(x)
    if x.numel() == 0:  # no rows, or d = 0 (rstd is then rsqrt(NaN) = NaN, as the reference's mean)
        return y, torch.rsqrt(x.float().pow(2).mean(-1) + eps)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    _rms_norm_forward_kernel[(N,)](x, w, y, rstd, d, float(eps), INTERPRET=_interpreting(), **_row_blocks(d))
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dx [N, d] in x's dtype (no weight gradient: the trunk is frozen)."""
    _check_rows(x, w)
    assert dy.shape == x.shape and dy.dtype == x.dtype and dy.is_contiguous(), "dy must be like x"
    assert rstd.shape == (x.shape[0],) and rstd.dtype == torch.float32, "rstd must be fp32 [N]"
    N, d = x.shape
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    _rms_norm_backward_kernel[(N,)](dy, x, w, rstd, dx, d, INTERPRET=_interpreting(), **_row_blocks(d))
    return dx


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype and a.dtype in _DTYPES, "same shape and dtype expected"
    assert a.is_contiguous() and b.is_contiguous(), "contiguous tensors expected"


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = silu(g) · u in g's dtype, any (same) shape of g and u."""
    _check_pair(g, u)
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        _swiglu_forward_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](
            g, u, h, n, BLOCK=SWIGLU_BLOCK, INTERPRET=_interpreting(), num_warps=SWIGLU_WARPS)
    return h


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) in g's dtype."""
    _check_pair(g, u)
    _check_pair(dh, g)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        _swiglu_backward_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](
            dh, g, u, dg, du, n, BLOCK=SWIGLU_BLOCK, INTERPRET=_interpreting(), num_warps=SWIGLU_WARPS)
    return dg, du
