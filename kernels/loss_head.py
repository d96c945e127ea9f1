"""Triton kernels of the EUL loss head, and their launchers (grid, block sizes, strides only).

Three kernels serve one chunk of token rows (see unlearn_fast/ops/loss_head.py for the math and
the chunk loop):

* ``logits_pair``: student and teacher logits of the chunk, ``scale * (x @ Wᵀ + b)``, fp32
  accumulation and fp32 output. Each program loads a weight tile once and multiplies it with both
  the student and the teacher rows, so the frozen head is read once for both products.
* ``loss_rows``: the row kernel, same contract as ``_C.loss_rows`` /
  ``unlearn_fast.ops.loss_head.loss_rows_reference``. One program per row: an online-softmax sweep
  over vocabulary tiles (student at T and at 1, teacher at T, and E_pt[t - s] for the KL), then a
  second sweep that writes the fp32 gradient. The gradient may overwrite the student logits (each
  element is read before it is written by the same program), which saves a [rows × V] buffer.
* ``grad_hidden``: ``scale * (G @ W)`` for fp32 logit gradients G. For a bf16 weight, G is split
  into a bf16 high part and a bf16 low part (two tensor-core products on one weight tile), so the
  logit gradient keeps ~16 bits instead of bf16's 8: rounding G to bf16 is what loses the KL
  gradient when student ≈ teacher. An fp16 weight is split the same way (it is exactly the sum of
  two bf16 numbers), so fp16 heads also stay on the tensor cores.

Only long-standing ``tl`` APIs are used (triton 3.6 on the GPU machine, 3.9 in CI). The kernels also
run on the CPU under ``TRITON_INTERPRET=1`` (set before triton is imported), which is how CI tests them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dots import dot_acc

IGNORE_INDEX = tl.constexpr(-100)  # a constexpr: the compiler refuses plain globals in kernels
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Block sizes. On a GPU they are a first guess for H100/H200 that the GPU benchmark has not yet
# tuned; under the interpreter small blocks keep CI fast (tl.dot needs every block dim >= 16).
ROW_BLOCK_V = 256 if INTERPRET else 4096
ROW_WARPS = 1 if INTERPRET else 8
PAIR_BLOCKS = dict(BLOCK_M=32, BLOCK_V=128, BLOCK_K=32) if INTERPRET else dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64)
# One warpgroup for 16-bit operands: with 8 warps on a 64-row tile, ptxas of triton 3.6 serialises the
# sm_90 wgmma instructions (warning C7515; tests/ops/sm90_compile.py shows it). fp32 tiles need the 8
# warps' registers (4 spill 0.8-34 KB).
PAIR_WARPS_16BIT, PAIR_WARPS_FP32, PAIR_STAGES = (1, 1, 1) if INTERPRET else (4, 8, 3)
GRAD_BLOCKS = dict(BLOCK_M=32, BLOCK_H=32, BLOCK_V=128) if INTERPRET else dict(BLOCK_M=64, BLOCK_H=128, BLOCK_V=64)
GRAD_WARPS, GRAD_STAGES = (1, 1) if INTERPRET else (8, 3)
# The interpreter's tl.dot gives garbage for 16-bit operands (numpy has no bf16): there the kernels
# upcast 16-bit tiles to fp32 before tl.dot, which is exact (a bf16 x bf16 product fits in fp32).
DOT_FP32 = INTERPRET


# ---------------------------------------------------------------------------------------------
# row kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _loss_rows_kernel(
    s_ptr, t_ptr, g_ptr, tgt_ptr, klc_ptr, cec_ptr, kl_ptr, ce_ptr, klw_ptr,
    V, stride_s, stride_t, stride_g,
    kl_bound, ce_bound, T, inv_T,
    HAS_TEACHER: tl.constexpr, TEMP_ONE: tl.constexpr, GUARD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = g_ptr + row * stride_g
    neg_inf = float("-inf")

    # Sweep 1: running maxima and rescaled sums (one scalar update per tile).
    m_s = tl.full([], neg_inf, tl.float32)  # max of s
    z1 = tl.zeros([], tl.float32)  # sum exp(s - m_s)
    zT = tl.zeros([], tl.float32)  # sum exp((s - m_s) / T)
    m_t = tl.full([], neg_inf, tl.float32)  # max of t
    zt = tl.zeros([], tl.float32)  # sum exp((t - m_t) / T)
    a = tl.zeros([], tl.float32)  # sum exp((t - m_t) / T) * (t - s)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=neg_inf)
        m_new = tl.maximum(m_s, tl.max(s, axis=0))
        z1 = z1 * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        if not TEMP_ONE:
            zT = zT * tl.exp((m_s - m_new) * inv_T) + tl.sum(tl.exp((s - m_new) * inv_T), axis=0)
        m_s = m_new
        if HAS_TEACHER:
            t = tl.load(t_row + cols, mask=mask, other=neg_inf)
            mt_new = tl.maximum(m_t, tl.max(t, axis=0))
            f = tl.exp((m_t - mt_new) * inv_T)
            e = tl.exp((t - mt_new) * inv_T)
            zt = zt * f + tl.sum(e, axis=0)
            diff = tl.where(mask, t, 0.0) - tl.where(mask, s, 0.0)  # no (-inf) - (-inf) in padding
            a = a * f + tl.sum(e * diff, axis=0)
            m_t = mt_new
    if TEMP_ONE:
        zT = z1

    # Row results and the active coefficients (a maximised term past its cap has no gradient).
    target = tl.load(tgt_ptr + row)
    has_ce = target != IGNORE_INDEX
    bad = has_ce & ((target < 0) | (target >= V))  # checked here: a host check would synchronise
    ok_ce = has_ce & (target >= 0) & (target < V)
    s_target = tl.load(s_row + tl.where(ok_ce, target, 0))
    log_z1 = tl.log(z1)
    ce = tl.where(ok_ce, (m_s - s_target) + log_z1, 0.0)
    ce = tl.where(bad, float("nan"), ce)
    log_zT = tl.log(zT)
    log_zt = tl.log(zt)
    kl = tl.zeros([], tl.float32)
    if HAS_TEACHER:
        # T * E_pt[t - s] + T^2 * (lse(s/T) - lse(t/T)), maxima subtracted first
        kl = T * (a / zt) + T * T * ((m_s - m_t) * inv_T + (log_zT - log_zt))
    klc = tl.load(klc_ptr + row)
    cec = tl.load(cec_ptr + row)
    if HAS_TEACHER and GUARD:
        # sharpening guard: log softmax(s/T)[target] > log softmax(t/T)[target] drops the KL term
        t_target = tl.load(t_row + tl.where(ok_ce, target, 0))
        lp_s = (s_target - m_s) * inv_T - log_zT
        lp_t = (t_target - m_t) * inv_T - log_zt
        klc = tl.where(ok_ce & (klc < 0.0) & (lp_s > lp_t), 0.0, klc)
    kl_on = (klc != 0.0) & ((klc >= 0.0) | (kl < kl_bound))
    a_coef = tl.where(kl_on, klc * T, 0.0)
    ce_on = ok_ce & (cec != 0.0) & ((cec >= 0.0) | (ce < ce_bound))
    c_coef = tl.where(ce_on, cec, 0.0)
    tl.store(kl_ptr + row, kl)
    tl.store(ce_ptr + row, ce)
    tl.store(klw_ptr + row, klc)

    # Sweep 2: the gradient, written once.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        ds = tl.load(s_row + cols, mask=mask, other=0.0) - m_s
        ps = tl.exp(ds - log_z1)
        if HAS_TEACHER:
            t = tl.load(t_row + cols, mask=mask, other=0.0)
            pt = tl.exp((t - m_t) * inv_T - log_zt)
            if TEMP_ONE:
                g = a_coef * (ps - pt) + c_coef * ps  # (ps - pt) first: exactly 0 when student == teacher
            else:
                g = a_coef * (tl.exp(ds * inv_T - log_zT) - pt) + c_coef * ps
        else:
            g = c_coef * ps
        g = tl.where(cols == target, g - c_coef, g)
        tl.store(g_row + cols, g, mask=mask)


def loss_rows(student_logits, teacher_logits, targets, kl_coef, ce_coef, kl_bound, ce_bound, temperature,
              sharpening_guard=False, grad=None):
    """Launch the row kernel; same contract as ``loss_rows_reference``, returns ``(kl, ce, grad, kl_weight)``.

    ``grad`` is where the gradient goes (a new tensor when None); it may be ``student_logits``
    itself. Logits are fp32 [n, V] with unit column stride; ``teacher_logits.numel() == 0`` means
    no KL term. A target outside [0, V) that is not -100 gives ce = NaN and no CE gradient.
    """
    n, V = student_logits.shape
    has_teacher = teacher_logits.numel() != 0
    if grad is None:
        grad = torch.empty_like(student_logits)
    kl = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    ce = torch.empty_like(kl)
    kl_weight = torch.empty_like(kl)
    if n == 0:
        return kl, ce, grad, kl_weight
    for x in (student_logits, grad) + ((teacher_logits,) if has_teacher else ()):
        assert x.dtype == torch.float32 and x.stride(1) == 1, "loss_rows: fp32 logits with unit column stride"
    t = teacher_logits if has_teacher else student_logits  # never read without a teacher
    T = float(temperature)
    _loss_rows_kernel[(n,)](
        student_logits, t, grad, targets, kl_coef, ce_coef, kl, ce, kl_weight,
        V, student_logits.stride(0), t.stride(0), grad.stride(0),
        float(kl_bound), float(ce_bound), T, 1.0 / T,
        HAS_TEACHER=has_teacher, TEMP_ONE=T == 1.0, GUARD=bool(sharpening_guard),
        BLOCK_V=min(ROW_BLOCK_V, triton.next_power_of_2(V)), num_warps=ROW_WARPS,
    )
    return kl, ce, grad, kl_weight


# ---------------------------------------------------------------------------------------------
# logits of student and teacher from one pass over the weight
# ---------------------------------------------------------------------------------------------
@triton.jit
def _logits_pair_kernel(
    xs_ptr, xt_ptr, w_ptr, b_ptr, s_ptr, t_ptr,
    M, V, H, stride_xs, stride_xt, stride_w, stride_s, stride_t, scale,
    HAS_TEACHER: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Row blocks vary fastest, so the programs that share a weight tile run together (L2 reuse).
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_v = pid // num_m
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < V
    acc_s = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        # Wᵀ tile [BLOCK_K, BLOCK_V], loaded once for both products
        w = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        xs = tl.load(xs_ptr + rows[:, None] * stride_xs + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            w = w.to(tl.float32)
            xs = xs.to(tl.float32)
        acc_s = tl.dot(xs, w, acc_s, input_precision=PRECISION)
        if HAS_TEACHER:
            xt = tl.load(xt_ptr + rows[:, None] * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
            if DOT_FP32:
                xt = xt.to(tl.float32)
            acc_t = tl.dot(xt, w, acc_t, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_s += b[None, :]
        acc_t += b[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(s_ptr + rows[:, None] * stride_s + cols[None, :], acc_s * scale, mask=out_mask)
    if HAS_TEACHER:
        tl.store(t_ptr + rows[:, None] * stride_t + cols[None, :], acc_t * scale, mask=out_mask)


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands: exact fp32 products (tf32 would round the logits to 10 bits); 16-bit operands
    # are exact in any mode.
    return "ieee" if dtype == torch.float32 else "tf32"


def logits_pair(student_hidden, teacher_hidden, weight, bias, scale, out_s, out_t):
    """Write ``scale * (x @ weight.T + bias)`` in fp32 for the student rows into ``out_s`` and, when
    ``teacher_hidden`` is not None, for the teacher rows into ``out_t``, reading each weight tile once.

    Hidden states [M, H] and weight [V, H] share a dtype and have unit inner stride; outputs are fp32
    [M, V] with unit column stride.
    """
    M, H = student_hidden.shape
    V = weight.shape[0]
    has_teacher = teacher_hidden is not None
    xt = teacher_hidden if has_teacher else student_hidden
    t = out_t if has_teacher else out_s
    for x in (student_hidden, xt, weight):
        assert x.stride(1) == 1 and x.dtype == weight.dtype, "logits_pair: same dtype, unit inner stride"
    if M == 0:
        return
    grid = (triton.cdiv(M, PAIR_BLOCKS["BLOCK_M"]) * triton.cdiv(V, PAIR_BLOCKS["BLOCK_V"]),)
    _logits_pair_kernel[grid](
        student_hidden, xt, weight, weight if bias is None else bias, out_s, t,
        M, V, H, student_hidden.stride(0), xt.stride(0), weight.stride(0), out_s.stride(0), t.stride(0),
        float(scale),
        HAS_TEACHER=has_teacher, HAS_BIAS=bias is not None, PRECISION=_precision(weight.dtype),
        DOT_FP32=DOT_FP32 and weight.dtype != torch.float32,
        num_warps=PAIR_WARPS_FP32 if weight.dtype == torch.float32 else PAIR_WARPS_16BIT, num_stages=PAIR_STAGES,
        **PAIR_BLOCKS,
    )


# ---------------------------------------------------------------------------------------------
# gradient of the hidden states: scale * (G @ W)
# ---------------------------------------------------------------------------------------------
# How G (fp32) and W enter the tensor cores. fp32 FMA ("ieee") runs ~15x slower than bf16 tensor
# cores on Hopper, so 16-bit heads split their operands into exact bf16 sums instead.
SPLIT_NONE = tl.constexpr(0)  # fp32 weight: fp32 products
SPLIT_G = tl.constexpr(1)  # bf16 weight: G = G_hi + G_lo
SPLIT_G_AND_W = tl.constexpr(2)  # fp16 weight: G split, and W = W_hi + W_lo
_SPLITS = {torch.bfloat16: SPLIT_G.value, torch.float16: SPLIT_G_AND_W.value}


@triton.jit
def _grad_hidden_kernel(
    g_ptr, w_ptr, out_ptr, M, V, H, stride_g, stride_w, stride_out, scale,
    SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_h = pid // num_m
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    hs = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    row_ok = rows < M
    h_ok = hs < H
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        v_ok = vs < V
        g = tl.load(g_ptr + rows[:, None] * stride_g + vs[None, :], mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        w = tl.load(w_ptr + vs[:, None] * stride_w + hs[None, :], mask=v_ok[:, None] & h_ok[None, :], other=0.0)
        if SPLIT == SPLIT_NONE:
            acc = tl.dot(g, w.to(tl.float32), acc, input_precision="ieee")
        else:
            # G = hi + lo, both bf16: tensor-core products that keep ~16 bits of G
            g_hi = g.to(tl.bfloat16)
            g_lo = (g - g_hi.to(tl.float32)).to(tl.bfloat16)
            if SPLIT == SPLIT_G_AND_W:
                # an fp16 weight (11 significant bits) is exactly w_hi + w_lo in bf16; g_lo * w_lo
                # (~2^-18 relative) is dropped
                w_hi = w.to(tl.float32).to(tl.bfloat16)
                w_lo = (w.to(tl.float32) - w_hi.to(tl.float32)).to(tl.bfloat16)
                w = w_hi
            acc = dot_acc(g_hi, w, acc, "tf32", DOT_FP32)  # (the precision applies to fp32 operands only)
            acc = dot_acc(g_lo, w, acc, "tf32", DOT_FP32)
            if SPLIT == SPLIT_G_AND_W:
                acc = dot_acc(g_hi, w_lo, acc, "tf32", DOT_FP32)
    out = acc * scale
    tl.store(out_ptr + rows[:, None] * stride_out + hs[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & h_ok[None, :])


def grad_hidden(grad_logits, weight, scale, out):
    """Write ``scale * (grad_logits @ weight)`` into ``out`` [M, H] (any float dtype).

    ``grad_logits`` is fp32 [M, V], ``weight`` [V, H]; both with unit inner stride. A bf16 weight
    uses the hi/lo bf16 split of the gradient (two bf16 products), an fp16 weight splits both the
    gradient and the weight (three bf16 products); an fp32 weight multiplies in fp32.
    """
    M, V = grad_logits.shape
    H = weight.shape[1]
    assert grad_logits.dtype == torch.float32 and grad_logits.stride(1) == 1 and weight.stride(1) == 1
    if M == 0:
        return
    # The interpreter truncates fp32 -> 16-bit stores (GPUs round to nearest even): there, stage the
    # result in fp32 and let torch round it.
    dest = torch.empty(out.shape, dtype=torch.float32, device=out.device) if INTERPRET and out.dtype != torch.float32 else out
    grid = (triton.cdiv(M, GRAD_BLOCKS["BLOCK_M"]) * triton.cdiv(H, GRAD_BLOCKS["BLOCK_H"]),)
    _grad_hidden_kernel[grid](
        grad_logits, weight, dest, M, V, H, grad_logits.stride(0), weight.stride(0), dest.stride(0), float(scale),
        SPLIT=_SPLITS.get(weight.dtype, SPLIT_NONE.value), DOT_FP32=DOT_FP32,
        num_warps=GRAD_WARPS, num_stages=GRAD_STAGES, **GRAD_BLOCKS,
    )
    if dest is not out:
        out.copy_(dest)
