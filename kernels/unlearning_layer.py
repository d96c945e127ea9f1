"""Triton kernels of the unlearning-layer op (K adapters summed on the residual), forward and backward.

The caller (:mod:`unlearn_fast.ops.unlearning_layer`) concatenates the K layers: D [R, d], b [R],
U [d, R], c = Σ_k c_k [d], with R = Σ_k r_k, all fp32. With h = x Dᵀ + b and g = dL/dy:

    forward   y  = x + c + act(h) Uᵀ                 h ("pre", fp32 [N, R]) is saved for backward
    backward  dh = (g U) ⊙ act'(h),  dx = g + dh D,  dD = dhᵀ x,  dU = gᵀ act(h),  db = Σ dh,  dc = Σ g

Two paths, by the padded bottleneck width RP (R rounded up to a power of two ≥ 16, tl.dot's minimum):

* narrow (RP ≤ NARROW_MAX_RP; one or a few layers, the memory-bound case): one kernel per row tile
  does the whole forward — x tile → [BLOCK_M, RP] fp32 accumulator → bias + activation on chip → up
  GEMM → + x + c → y; the bottleneck never leaves the chip except as the fp32 `pre` kept for backward.
  Backward is two kernels: per row tile dh and dx; per column block of d (and a slice of the rows)
  all four weight/bias gradients, so x and g are each read once there.
* wide (many layers, compute-bound): a [BLOCK_M, RP] accumulator per row tile no longer fits in
  registers and the weights would be re-read per small row tile, so the same math runs as tiled GEMMs
  with fused epilogues: bottleneck GEMM (+b, act → pre, a; or ⊙act' → dpre), residual GEMM
  (+ x + c → y; + g → dx) and row-reduction GEMMs (dD with db, dU with dc).

Precision: x, g, y, dx are in the compute dtype (fp32, bf16 or fp16); the launchers take fp32 weights
and hand the kernels copies in the compute dtype (tl.dot wants matching operands); every dot
accumulates in fp32, fp32 inputs use IEEE dots (not TF32), biases and bias gradients stay fp32.
With relu and 16-bit x, D stays fp32 and goes into the down GEMM as 16-bit hi + lo parts (two dots):
relu's gradient jumps at h = 0, and h from a 16-bit D flips enough units on or off to put several
percent of error into the gradients (4-9 % on the test shape); with the split h is fp32-accurate.

Under TRITON_INTERPRET=1 (INTERPRET=True) the kernels work around the interpreter's bf16 handling
(its dot multiplies raw bf16 bits and its fp32 -> bf16 cast truncates): 16-bit dot operands go in as
fp32 and casts round to nearest even, so CPU runs see the GPU's numerics.

Only long-standing tl APIs are used (tl.dot, masked tl.load / tl.store, tl.where, tl.exp,
tl.math.erf, tl.sum), so this runs on triton 3.6 and 3.9 and on the CPU under TRITON_INTERPRET=1.
Block sizes are first guesses, not tuned on a GPU; ``blocks=`` overrides them (see default_blocks).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dots import cast_rounded, dot_acc

ACTIVATION_IDS = {"relu": 0, "gelu": 1, "silu": 2}
NARROW_MAX_RP = 128  # widest bottleneck the single-pass kernels take (registers: [BLOCK_M, RP] fp32 tiles)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _act(h, ACT: tl.constexpr):
    """act(h) for fp32 h; gelu is the exact erf form (torch's default)."""
    if ACT == 0:
        a = tl.maximum(h, 0.0)
    elif ACT == 1:
        a = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    else:
        a = h / (1.0 + tl.exp(-h))
    return a


@triton.jit
def _act_slope(h, ACT: tl.constexpr):
    """act'(h) for fp32 h (relu'(0) = 0, as torch)."""
    if ACT == 0:
        s = tl.where(h > 0.0, 1.0, 0.0)
    elif ACT == 1:
        s = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    else:
        sig = 1.0 / (1.0 + tl.exp(-h))
        s = sig * (1.0 + h * (1.0 - sig))
    return s


@triton.jit
def _dot_weight(a, w, acc, PREC: tl.constexpr, INTERPRET: tl.constexpr, SPLIT: tl.constexpr):
    """acc + a @ w. SPLIT: w is fp32 and goes in as hi + lo parts in a's dtype (two dots, ~fp32 exact)."""
    if SPLIT:
        hi = cast_rounded(w, a.dtype, INTERPRET)
        acc = dot_acc(a, hi, acc, PREC, INTERPRET)
        return dot_acc(a, cast_rounded(w - hi.to(tl.float32), a.dtype, INTERPRET), acc, PREC, INTERPRET)
    else:
        return dot_acc(a, w, acc, PREC, INTERPRET)


# ------------------------------------------------------------------------------------------------
# narrow path: single-pass kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _forward_kernel(x_ptr, dw_ptr, db_ptr, uw_ptr, ub_ptr, y_ptr, pre_ptr, N, D, R,
                    RP: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr,
                    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N * D can pass 2^31
    ranks = tl.arange(0, RP)
    rank_ok = ranks < R

    # h = x Dᵀ + b for all K layers at once, accumulated over column blocks of x
    h = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < D
        x = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        dt = tl.load(dw_ptr + ranks[None, :] * D + cols[:, None], mask=rank_ok[None, :] & col_ok[:, None], other=0.0)
        h = _dot_weight(x, dt, h, PREC, INTERPRET, SPLIT)
    h += tl.load(db_ptr + ranks, mask=rank_ok, other=0.0)[None, :]
    tl.store(pre_ptr + rows64[:, None] * R + ranks[None, :], h, mask=row_ok[:, None] & rank_ok[None, :])
    a = cast_rounded(_act(h, ACT), x_ptr.dtype.element_ty, INTERPRET)  # padded ranks: act(0) = 0

    # y = x + c + act(h) Uᵀ, one column block of d at a time (the x tile is re-read: an L2 hit)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < D
        io_mask = row_ok[:, None] & col_ok[None, :]
        ut = tl.load(uw_ptr + cols[None, :] * R + ranks[:, None], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        out = dot_acc(a, ut, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC, INTERPRET)
        x = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=io_mask, other=0.0)
        out += x.to(tl.float32) + tl.load(ub_ptr + cols, mask=col_ok, other=0.0)[None, :]
        tl.store(y_ptr + rows64[:, None] * D + cols[None, :], cast_rounded(out, y_ptr.dtype.element_ty, INTERPRET),
                 mask=io_mask)


@triton.jit
def _backward_rows_kernel(g_ptr, pre_ptr, dw_ptr, uw_ptr, dpre_ptr, gx_ptr, N, D, R,
                          RP: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr,
                          GRAD_X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    ranks = tl.arange(0, RP)
    rank_ok = ranks < R
    bottleneck_mask = row_ok[:, None] & rank_ok[None, :]

    # dh = (g U) ⊙ act'(h)
    da = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < D
        g = tl.load(g_ptr + rows64[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(uw_ptr + cols[:, None] * R + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        da = dot_acc(g, u, da, PREC, INTERPRET)
    h = tl.load(pre_ptr + rows64[:, None] * R + ranks[None, :], mask=bottleneck_mask, other=0.0)
    dh = da * _act_slope(h, ACT)  # padded ranks: da = 0 there
    tl.store(dpre_ptr + rows64[:, None] * R + ranks[None, :], dh, mask=bottleneck_mask)

    # dx = g + dh D
    if GRAD_X:
        dhc = cast_rounded(dh, g_ptr.dtype.element_ty, INTERPRET)
        for n0 in range(0, D, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < D
            io_mask = row_ok[:, None] & col_ok[None, :]
            w = tl.load(dw_ptr + ranks[:, None] * D + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            out = dot_acc(dhc, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC, INTERPRET)
            out += tl.load(g_ptr + rows64[:, None] * D + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
            tl.store(gx_ptr + rows64[:, None] * D + cols[None, :],
                     cast_rounded(out, gx_ptr.dtype.element_ty, INTERPRET), mask=io_mask)


@triton.jit
def _backward_weights_kernel(x_ptr, g_ptr, pre_ptr, dpre_ptr, gdw_ptr, gdb_ptr, guw_ptr, gub_ptr,
                             N, D, R, ROWS_PER_SPLIT,
                             RP: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    ranks = tl.arange(0, RP)
    rank_ok = ranks < R
    cd = x_ptr.dtype.element_ty  # dot operand dtype

    acc_dw = tl.zeros((RP, BLOCK_N), dtype=tl.float32)  # dhᵀ x  -> [R, d] block
    acc_uw = tl.zeros((BLOCK_N, RP), dtype=tl.float32)  # gᵀ a   -> [d, R] block
    acc_ub = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_db = tl.zeros((RP,), dtype=tl.float32)
    row_start = split * ROWS_PER_SPLIT
    for m0 in range(row_start, row_start + ROWS_PER_SPLIT, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        # bottleneck tiles loaded both ways round, so no tile needs a transpose on chip
        dh_t = tl.load(dpre_ptr + rows64[None, :] * R + ranks[:, None], mask=rank_ok[:, None] & row_ok[None, :],
                       other=0.0)
        h = tl.load(pre_ptr + rows64[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        g_t = tl.load(g_ptr + rows64[None, :] * D + cols[:, None], mask=col_ok[:, None] & row_ok[None, :], other=0.0)
        acc_dw = dot_acc(cast_rounded(dh_t, cd, INTERPRET), x, acc_dw, PREC, INTERPRET)
        acc_uw = dot_acc(g_t, _act(h, ACT), acc_uw, PREC, INTERPRET)
        acc_ub += tl.sum(g_t.to(tl.float32), axis=1)
        acc_db += tl.sum(dh_t, axis=1)

    tl.store(gdw_ptr + split * R * D + ranks[:, None] * D + cols[None, :], acc_dw,
             mask=rank_ok[:, None] & col_ok[None, :])
    tl.store(guw_ptr + split * D * R + cols[:, None] * R + ranks[None, :], acc_uw,
             mask=col_ok[:, None] & rank_ok[None, :])
    tl.store(gub_ptr + split * D + cols, acc_ub, mask=col_ok)
    if pid_n == 0:  # every column block has the same db; one writes it
        tl.store(gdb_ptr + split * R + ranks, acc_db, mask=rank_ok)


# ------------------------------------------------------------------------------------------------
# wide path: tiled GEMMs with fused epilogues
# ------------------------------------------------------------------------------------------------
@triton.jit
def _bottleneck_kernel(a_ptr, w_ptr, bias_ptr, pre_ptr, out_ptr, act_ptr, N, D, R, stride_wk, stride_wr,
                       BACKWARD: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr,
                       SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc = A W for A [N, D] (x or g) and W [D, R] (Dᵀ or U, strided), then
    forward:  h = acc + b  -> out (pre, fp32) and act_ptr (act(h) in A's dtype);
    backward: dh = acc ⊙ act'(pre) -> out (dpre, fp32)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rank_ok = ranks < R
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(a_ptr + rows64[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + ranks[None, :] * stride_wr, mask=k_ok[:, None] & rank_ok[None, :],
                    other=0.0)
        acc = _dot_weight(a, w, acc, PREC, INTERPRET, SPLIT)
    mask = row_ok[:, None] & rank_ok[None, :]
    offs = rows64[:, None] * R + ranks[None, :]
    if BACKWARD:
        h = tl.load(pre_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc * _act_slope(h, ACT), mask=mask)
    else:
        h = acc + tl.load(bias_ptr + ranks, mask=rank_ok, other=0.0)[None, :]
        tl.store(out_ptr + offs, h, mask=mask)
        tl.store(act_ptr + offs, cast_rounded(_act(h, ACT), act_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _residual_kernel(a_ptr, w_ptr, res_ptr, bias_ptr, out_ptr, N, R, D, stride_wr, stride_wd,
                     HAS_BIAS: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = res (+ bias) + A W for A [N, R] (act(h) or dh) and W [R, D] (Uᵀ or D, strided);
    res and out [N, D] in the compute dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < D
    rows64 = rows.to(tl.int64)
    cd = res_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < R
        a = tl.load(a_ptr + rows64[:, None] * R + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wr + cols[None, :] * stride_wd, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = dot_acc(cast_rounded(a, cd, INTERPRET), w, acc, PREC, INTERPRET)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows64[:, None] * D + cols[None, :]
    acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(out_ptr + offs, cast_rounded(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _rows_reduce_kernel(a_ptr, b_ptr, out_ptr, colsum_ptr, N, M2, N2, ROWS_PER_SPLIT,
                        PREC: tl.constexpr, INTERPRET: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[s] = Σ_{rows n of split s} A[n]ᵀ B[n] ([M2, N2], fp32) for A [N, M2], B [N, N2] row-major,
    and colsum[s] = Σ_n A[n] ([M2]) from the programs of the first column block."""
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = i < M2
    j_ok = j < N2
    cd = b_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_start = split * ROWS_PER_SPLIT
    for n0 in range(row_start, row_start + ROWS_PER_SPLIT, BLOCK_K):
        rows = n0 + tl.arange(0, BLOCK_K)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        a_t = tl.load(a_ptr + rows64[None, :] * M2 + i[:, None], mask=i_ok[:, None] & row_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rows64[:, None] * N2 + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        acc = dot_acc(cast_rounded(a_t, cd, INTERPRET), b, acc, PREC, INTERPRET)
        colsum += tl.sum(a_t.to(tl.float32), axis=1)
    tl.store(out_ptr + split * M2 * N2 + i[:, None] * N2 + j[None, :], acc, mask=i_ok[:, None] & j_ok[None, :])
    if pid_n == 0:
        tl.store(colsum_ptr + split * M2 + i, colsum, mask=i_ok)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def padded_rank(R: int) -> int:
    """Σr padded to a power of two ≥ 16 (tl.dot's smallest dimension)."""
    return max(16, triton.next_power_of_2(R))


def default_blocks(R: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Block sizes for a bottleneck of width R and inputs of ``dtype`` (first guesses; override with
    ``blocks=``).

    ``path`` is "narrow" or "wide" (see the module docstring)."""
    rp = padded_rank(R)
    if rp <= NARROW_MAX_RP:
        # 8 warps: with 4, ptxas (sm_90, triton 3.9) spills in both backward kernels. fp32 operands need
        # half-height tiles: at the 16-bit sizes their fp32 ("ieee") dots spill up to 4 KB under triton
        # 3.6; these spill none under 3.6 or 3.9 (tests/ops/sm90_compile.py).
        if dtype == torch.float32:
            rows = {"BLOCK_M": 32, "W_BLOCK_M": 32, "W_BLOCK_N": 64 if rp <= 64 else 32}
        else:
            rows = {"BLOCK_M": 64, "W_BLOCK_M": 64, "W_BLOCK_N": 128 if rp <= 64 else 64}
        return {"path": "narrow", "BLOCK_K": 64, "BLOCK_N": 64, "num_warps": 8, **rows}
    # 128 x 64 tiles on one warpgroup: at 128 x 128 with 8 warps, ptxas of triton 3.6 (the GPU machine's)
    # serialises the bottleneck kernel's wgmma and spills in its gelu backward (tests/ops/sm90_compile.py)
    return {"path": "wide", "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _common(x: torch.Tensor, activation: str) -> dict:
    return {"ACT": ACTIVATION_IDS[activation], "INTERPRET": _interpreting(),
            "PREC": "ieee" if x.dtype == torch.float32 else "tf32"}  # tf32 is ignored for 16-bit operands


def _check(x: torch.Tensor, *weights: torch.Tensor) -> None:
    assert x.dim() == 2 and x.is_contiguous(), "x must be a contiguous [N, d] tensor"
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {x.dtype}"
    assert all(w.is_contiguous() and w.dtype == torch.float32 for w in weights), "weights: contiguous fp32"
    assert x.device == weights[0].device, "x and the weights must be on one device"


def forward(x, down_weight, down_bias, up_weight, up_bias, activation: str, blocks: dict | None = None):
    """y = x + c + act(x Dᵀ + b) Uᵀ. Returns (y [N, d] in x's dtype, saved) where ``saved`` is the
    tuple of tensors :func:`backward` needs besides x and the weights (pre = x Dᵀ + b, fp32; the wide
    path also act(pre) in x's dtype)."""
    _check(x, down_weight, down_bias, up_weight, up_bias)
    N, D = x.shape
    R = down_weight.shape[0]
    b = {**default_blocks(R, x.dtype), **(blocks or {})}
    common = _common(x, activation)
    split = activation == "relu" and x.dtype != torch.float32
    # The dots take 16-bit weights when x is 16-bit: cast once here, not per tile (halves the weight
    # bytes every row tile re-reads from L2). D stays fp32 where it is split into hi + lo in the kernel.
    down_weight = down_weight if split else down_weight.to(x.dtype)
    up_weight = up_weight.to(x.dtype)
    y = torch.empty_like(x)
    pre = torch.empty((N, R), dtype=torch.float32, device=x.device)
    if b["path"] == "narrow":
        _forward_kernel[(triton.cdiv(N, b["BLOCK_M"]),)](
            x, down_weight, down_bias, up_weight, up_bias, y, pre, N, D, R, RP=padded_rank(R), SPLIT=split,
            BLOCK_M=b["BLOCK_M"], BLOCK_K=b["BLOCK_K"], BLOCK_N=b["BLOCK_N"], num_warps=b["num_warps"], **common)
        return y, (pre,)
    act = torch.empty((N, R), dtype=x.dtype, device=x.device)
    bm, bn, bk = b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"]
    _bottleneck_kernel[(triton.cdiv(N, bm), triton.cdiv(R, bn))](
        x, down_weight, down_bias, pre, pre, act, N, D, R, 1, D, BACKWARD=False, SPLIT=split,
        BLOCK_M=bm, BLOCK_R=bn, BLOCK_K=bk, num_warps=b["num_warps"], **common)
    _residual_kernel[(triton.cdiv(N, bm), triton.cdiv(D, bn))](
        act, up_weight, x, up_bias, y, N, R, D, 1, R, HAS_BIAS=True, PREC=common["PREC"], INTERPRET=common["INTERPRET"],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=b["num_warps"])
    return y, (pre, act)


def _row_splits(device: torch.device, N: int, programs: int, rows_per_step: int) -> tuple[int, int]:
    """(splits, rows per split) for a reduction over the N rows: at most one program per SM, rounded
    down (these kernels' shared memory fits one program on an SM, so a 145th program on 132 SMs would
    cost a second wave; more splits also mean more fp32 partial sums to write and add up)."""
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 1  # the interpreter: one pass is fastest
    splits = max(1, min(target // programs, triton.cdiv(N, 4 * rows_per_step)))
    rows = triton.cdiv(triton.cdiv(N, splits), rows_per_step) * rows_per_step
    return triton.cdiv(N, rows), rows


def _sum_splits(t: torch.Tensor) -> torch.Tensor:
    return t[0] if t.shape[0] == 1 else t.sum(0)


def backward(grad_y, x, down_weight, up_weight, saved, activation: str, compute_grad_x: bool = True,
             blocks: dict | None = None):
    """Gradients of :func:`forward`: (grad_x or None, grad_down_weight, grad_down_bias, grad_up_weight,
    grad_up_bias); grad_x in x's dtype, the others fp32."""
    _check(x, down_weight, up_weight)
    assert grad_y.shape == x.shape and grad_y.dtype == x.dtype and grad_y.is_contiguous()
    N, D = x.shape
    R = down_weight.shape[0]
    b = {**default_blocks(R, x.dtype), **(blocks or {})}
    common = _common(x, activation)
    pre = saved[0]
    down_weight, up_weight = down_weight.to(x.dtype), up_weight.to(x.dtype)  # dot operands (see forward)
    dpre = torch.empty((N, R), dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if compute_grad_x else None
    f32 = dict(dtype=torch.float32, device=x.device)

    if b["path"] == "narrow":
        rp = padded_rank(R)
        _backward_rows_kernel[(triton.cdiv(N, b["BLOCK_M"]),)](
            grad_y, pre, down_weight, up_weight, dpre, grad_x if compute_grad_x else dpre, N, D, R,
            RP=rp, GRAD_X=compute_grad_x, BLOCK_M=b["BLOCK_M"], BLOCK_K=b["BLOCK_K"], BLOCK_N=b["BLOCK_N"],
            num_warps=b["num_warps"], **common)
        col_programs = triton.cdiv(D, b["W_BLOCK_N"])
        splits, rows_per_split = _row_splits(x.device, N, col_programs, b["W_BLOCK_M"])
        gdw, gdb = torch.empty((splits, R, D), **f32), torch.empty((splits, R), **f32)
        guw, gub = torch.empty((splits, D, R), **f32), torch.empty((splits, D), **f32)
        _backward_weights_kernel[(col_programs, splits)](
            x, grad_y, pre, dpre, gdw, gdb, guw, gub, N, D, R, rows_per_split, RP=rp,
            BLOCK_M=b["W_BLOCK_M"], BLOCK_N=b["W_BLOCK_N"], num_warps=b["num_warps"], **common)
        return grad_x, _sum_splits(gdw), _sum_splits(gdb), _sum_splits(guw), _sum_splits(gub)

    act = saved[1]
    bm, bn, bk = b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"]
    prec, upcast = common["PREC"], common["INTERPRET"]
    _bottleneck_kernel[(triton.cdiv(N, bm), triton.cdiv(R, bn))](
        grad_y, up_weight, up_weight, pre, dpre, dpre, N, D, R, R, 1, BACKWARD=True, SPLIT=False,
        BLOCK_M=bm, BLOCK_R=bn, BLOCK_K=bk, num_warps=b["num_warps"], **common)
    if compute_grad_x:
        _residual_kernel[(triton.cdiv(N, bm), triton.cdiv(D, bn))](
            dpre, down_weight, grad_y, grad_y, grad_x, N, R, D, D, 1, HAS_BIAS=False, PREC=prec, INTERPRET=upcast,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=b["num_warps"])

    def reduce_rows(a, b_, m2, n2):  # Σ_n a[n]ᵀ b_[n] and Σ_n a[n], split over rows to fill the GPU
        tiles = (triton.cdiv(m2, bm), triton.cdiv(n2, bn))
        splits, rows_per_split = _row_splits(x.device, N, tiles[0] * tiles[1], bk)
        out, colsum = torch.empty((splits, m2, n2), **f32), torch.empty((splits, m2), **f32)
        _rows_reduce_kernel[(*tiles, splits)](a, b_, out, colsum, N, m2, n2, rows_per_split, PREC=prec,
                                              INTERPRET=upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                              num_warps=b["num_warps"])
        return _sum_splits(out), _sum_splits(colsum)

    grad_down_weight, grad_down_bias = reduce_rows(dpre, x, R, D)   # dhᵀ x, Σ dh
    grad_up_weight, grad_up_bias = reduce_rows(grad_y, act, D, R)    # gᵀ act(h), Σ g
    return grad_x, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias
