"""The EUL loss head: LM-head matmul + KL(teacher‖student) + cross-entropy, in token chunks.

For every token row i, with student logits s_i = h_i Wᵀ + b and teacher logits t_i (same frozen
head, teacher hidden states):

    loss = Σ_i kl_coef_i · KL_i  +  ce_coef_i · CE_i

KL_i = T² · KL(softmax(t_i/T) ‖ softmax(s_i/T)), CE_i = −log softmax(s_i)[target_i] (zero where the
target is ``IGNORE_INDEX``). A term whose coefficient is negative is *maximised* by the objective
and would grow without bound, so it is capped per row: it contributes ``coef · min(term, bound)``
and stops pushing once a row has moved ``bound`` nats away. The objective sets the coefficients
(α and −1 for KL on retained / forgotten rows, λ and −γ for CE) already divided by its
normalisers, so the op only sums.

Sharpening guard (``sharpening_guard=True``; see :mod:`unlearn_fast.train.objective` for why): a row
with a maximised KL term (kl_coef < 0), a teacher and a target drops its KL term while the
student is more confident in the target than the teacher,
log softmax(s_i/T)[target_i] > log softmax(t_i/T)[target_i]. The row kernels decide this from
the statistics they already compute, so the guard costs no extra pass; they return each row's
effective KL coefficient (``kl_weight``: kl_coef, or 0 where the guard dropped the term), and the
loss is Σ kl_weight_i · KL-term_i + ce_coef_i · CE-term_i.

Only one chunk of [rows × vocab] logits exists at a time; logits and their gradients are fp32
whatever the hidden-state dtype (bf16 logits lose the KL gradient when student ≈ teacher, which
is exactly where EUL starts). The gradient for the student hidden states (and the head weight, if
it requires grad) is produced during the forward pass, chunk by chunk, and scaled in backward.
The forward pass is one torch custom op (``unlearn_fast::eul_loss_head_fwd``), so ``torch.compile``
sees a single node.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .backend import cpp_ops, pick_backend, triton_error

IGNORE_INDEX = -100
DEFAULT_CHUNK_ROWS = 512  # CPU: 11x less peak memory than naive at V = 49152; GPU: 0.5 GiB of fp32 logits at V = 128256


def loss_rows_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    kl_coef: Tensor,
    ce_coef: Tensor,
    kl_bound: float,
    ce_bound: float,
    temperature: float,
    sharpening_guard: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row KL, CE, d(loss)/d(student logits) and effective KL coefficient for one chunk of
    fp32 logits.

    ``teacher_logits`` with ``numel() == 0`` means there is no KL term. This is the contract the
    C++ (``_C.loss_rows``), CUDA and Triton row kernels implement.
    """
    s = student_logits.float()
    T = float(temperature)
    grad = torch.zeros_like(s)
    kl = torch.zeros(s.shape[0], dtype=torch.float32, device=s.device)
    kl_weight = kl_coef.float().clone()
    has_target = targets != IGNORE_INDEX
    safe_targets = torch.where(has_target, targets, torch.zeros_like(targets))
    if teacher_logits.numel():
        log_ps_T = torch.log_softmax(s / T, dim=-1)
        log_pt = torch.log_softmax(teacher_logits.float() / T, dim=-1)
        pt = log_pt.exp()
        kl = (T * T) * (pt * (log_pt - log_ps_T)).sum(-1)
        if sharpening_guard:
            pick = safe_targets.unsqueeze(-1)
            sharper = log_ps_T.gather(-1, pick).squeeze(-1) > log_pt.gather(-1, pick).squeeze(-1)
            kl_weight = torch.where((kl_coef < 0) & has_target & sharper, torch.zeros_like(kl_weight), kl_weight)
        active = torch.where(kl_weight < 0, kl < kl_bound, torch.ones_like(kl, dtype=torch.bool))
        weight = (kl_weight * active).unsqueeze(-1)
        grad += weight * T * (log_ps_T.exp() - pt)
    log_ps = torch.log_softmax(s, dim=-1)
    ce = -log_ps.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) * has_target
    active = has_target & torch.where(ce_coef < 0, ce < ce_bound, torch.ones_like(has_target))
    weight = (ce_coef * active).unsqueeze(-1)
    ce_grad = log_ps.exp()
    ce_grad.scatter_add_(-1, safe_targets.unsqueeze(-1), -torch.ones_like(ce_grad[:, :1]))
    grad += weight * ce_grad
    return kl, ce, grad, kl_weight


def row_losses(kl: Tensor, ce: Tensor, kl_coef: Tensor, ce_coef: Tensor, kl_bound: float, ce_bound: float) -> Tensor:
    """Each row's weighted loss with maximised (negative-coefficient) terms capped at their bound."""
    kl_term = torch.where(kl_coef < 0, kl.clamp(max=kl_bound), kl)
    ce_term = torch.where(ce_coef < 0, ce.clamp(max=ce_bound), ce)
    return kl_coef * kl_term + ce_coef * ce_term


@dataclass
class LossHeadOutput:
    """The scalar loss (differentiable) and each row's KL and CE (detached, for logging); ``kl_weight``:
    each row's effective KL coefficient (kl_coef, or 0 where the sharpening guard dropped the term)."""

    loss: Tensor
    kl: Tensor
    ce: Tensor
    kl_weight: Optional[Tensor] = None


# ---------------------------------------------------------------------------------------------
# Backends. A backend is a name (a string, so torch.compile sees a constant): it picks the row
# kernel, and on CUDA tensors (or Triton under the interpreter) the GEMMs run as Triton kernels.
#   reference: loss_rows_reference (any device)      cpp:    _C.loss_rows on CPU tensors
#   cuda:      _C.loss_rows on CUDA tensors            triton: kernels/loss_head.py
# On CUDA, ``auto`` picks triton; whether the CUDA C++ row kernel should be the default instead is
# for benchmarks/gpu_loss_head.py to decide (it times both) and has not been measured yet.
# ---------------------------------------------------------------------------------------------


# Reused CPU logit buffers (see reused_logit_buffers): per thread, so concurrent calls never share one.
_reuse = threading.local()


@contextlib.contextmanager
def reused_logit_buffers():
    """Within this context, CPU calls of the loss head on one thread reuse one fp32 logit buffer.

    A fresh buffer (2 × 512 rows × V fp32: 200 MB at V = 49152) is too large for the C library to
    recycle: every call gets it from the operating system as new pages, and the first GEMM into it
    pays for faulting them in (on the 2-core test machine the head's forward GEMMs ran at ~75 instead
    of ~130 GFLOP/s). The trainer holds the buffer for a training run and lets it go at the end.
    Nothing changes on CUDA, whose caching allocator already reuses memory. Nested contexts share
    the outermost one's buffer, which goes when it exits."""
    if getattr(_reuse, "buffer", None) is not None:
        yield
        return
    _reuse.buffer = torch.empty(0)
    try:
        yield
    finally:
        _reuse.buffer = None


def _logit_buffer(rows: int, vocab: int, device: torch.device) -> Tensor:
    """An uninitialised fp32 [rows, vocab] buffer: the reused one where reused_logit_buffers is on."""
    held = getattr(_reuse, "buffer", None)
    if held is None or device.type != "cpu":
        return torch.empty(rows, vocab, dtype=torch.float32, device=device)
    if held.numel() < rows * vocab:
        del held
        _reuse.buffer = None  # the old buffer goes before the larger one comes
        _reuse.buffer = held = torch.empty(rows * vocab, dtype=torch.float32)
    return held[: rows * vocab].view(rows, vocab)


def _triton_kernels():
    # imports triton only when used; via sys.modules, so tests can re-import it under TRITON_INTERPRET
    return importlib.import_module("unlearn_fast.kernels.loss_head")


def _rows(backend: str, s: Tensor, t: Tensor, targets: Tensor, kl_coef: Tensor, ce_coef: Tensor,
          kl_bound: float, ce_bound: float, temperature: float,
          guard: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The row op of ``backend``: (kl, ce, grad, kl_weight); the gradient may be ``s`` itself, overwritten."""
    if backend == "triton":
        return _triton_kernels().loss_rows(s, t, targets, kl_coef, ce_coef, kl_bound, ce_bound, temperature,
                                           sharpening_guard=guard, grad=s)
    if backend in ("cpp", "cuda"):
        C = cpp_ops()
        if s.device.type == "cpu" and hasattr(C, "loss_rows_inplace"):
            kl, ce, kl_weight = C.loss_rows_inplace(s, t, targets, kl_coef, ce_coef, kl_bound, ce_bound,
                                                    temperature, guard)
            return kl, ce, s, kl_weight
        return C.loss_rows(s, t, targets, kl_coef, ce_coef, kl_bound, ce_bound, temperature, guard)
    return loss_rows_reference(s, t, targets, kl_coef, ce_coef, kl_bound, ce_bound, temperature, guard)


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result from fp32 accumulation, whatever the (matching) input dtypes."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)  # 16-bit tensor cores, fp32 output (torch >= 2.8)
        except (TypeError, RuntimeError):  # older torch, or a dtype without that kernel
            pass
    return a.float() @ b.float()


class _Head:
    """The frozen head in the form one backend's GEMMs want, and the three per-chunk products."""

    def __init__(self, backend: str, weight: Tensor, bias: Optional[Tensor], scale: float, hidden_dtype):
        self.use_triton = backend == "triton" or (weight.is_cuda and backend == "cuda" and not triton_error())
        w = weight.detach()
        if self.use_triton and w.dtype != hidden_dtype:
            w = w.float()  # mixed dtypes (rare): the Triton GEMMs want one dtype; fp32 loses nothing
        elif not self.use_triton and not w.is_cuda:
            w = w.float()  # CPU GEMMs in fp32 (no copy for an fp32 head)
        self.weight = w.contiguous() if w.stride(-1) != 1 else w
        self.bias = None if bias is None else bias.detach().float()
        self.scale = scale

    def logits(self, hs: Tensor, ht: Optional[Tensor], out_s: Tensor, out_t: Optional[Tensor]) -> None:
        """fp32 ``scale * (h @ Wᵀ + b)`` for the student (and teacher) rows into the given buffers."""
        if self.use_triton:
            cast = self.weight.dtype
            _triton_kernels().logits_pair(hs.to(cast).contiguous(), None if ht is None else ht.to(cast).contiguous(),
                                          self.weight, self.bias, self.scale, out_s, out_t)
            return
        for h, out in ((hs, out_s), (ht, out_t)):
            if h is None:
                continue
            if out.device.type == "cpu":
                h = h.float()
                if self.bias is None:
                    torch.mm(h, self.weight.t(), out=out)
                else:
                    torch.addmm(self.bias, h, self.weight.t(), out=out)
            else:
                out.copy_(_mm_fp32(h.to(self.weight.dtype), self.weight.t()))
                if self.bias is not None:
                    out.add_(self.bias)
            if self.scale != 1.0:
                out.mul_(self.scale)

    def grad_hidden(self, g: Tensor, out: Tensor) -> None:
        """``out = scale * (g @ W)`` for fp32 logit gradients ``g``."""
        if self.use_triton:
            _triton_kernels().grad_hidden(g, self.weight, self.scale, out)
            return
        if out.dtype == torch.float32 and self.weight.dtype == torch.float32:
            torch.mm(g, self.weight, out=out)  # straight into grad_hidden: no temporary
            if self.scale != 1.0:
                out.mul_(self.scale)
            return
        if self.weight.dtype == torch.bfloat16:
            # g as bf16 hi + lo parts: rounding g to bf16 alone loses the KL gradient near student == teacher
            hi = g.to(torch.bfloat16)
            lo = (g - hi.float()).to(torch.bfloat16)
            r = _mm_fp32(hi, self.weight) + _mm_fp32(lo, self.weight)
        else:
            r = g @ self.weight.float()
        out.copy_(r * self.scale if self.scale != 1.0 else r)  # scale before rounding to out's dtype


# The forward pass is one torch custom op: torch.compile sees a single node with a fake (shape-only)
# implementation instead of tracing the chunk loop and breaking its graph at every C++ / Triton call.
# It returns the loss, the per-row terms and the gradients, which backward only scales.
@torch.library.custom_op("unlearn_fast::eul_loss_head_fwd", mutates_args=())
def _loss_head_fwd(
    student_hidden: Tensor, teacher_hidden: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
    targets: Tensor, kl_coef: Tensor, ce_coef: Tensor, kl_bound: float, ce_bound: float, temperature: float,
    logit_scale: float, logit_softcap: Optional[float], chunk_rows: int, backend: str, want_w_grad: bool,
    sharpening_guard: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, kl, ce, grad_hidden, grad_weight, kl_weight); grad_weight is empty unless ``want_w_grad``."""
    n, V = student_hidden.shape[0], weight.shape[0]
    device = student_hidden.device
    head = _Head(backend, weight, bias, logit_scale, student_hidden.dtype)
    grad_hidden = torch.empty(student_hidden.shape, dtype=student_hidden.dtype, device=device)
    grad_weight = torch.zeros(weight.shape if want_w_grad else (0,), dtype=torch.float32, device=device)
    kl_all = torch.zeros(n, dtype=torch.float32, device=device)
    ce_all = torch.zeros_like(kl_all)
    kl_weight_all = kl_coef.clone()
    # One pair of fp32 logit buffers for all chunks; the row op writes the gradient over s.
    rows_per_chunk = max(1, min(chunk_rows, n))
    buf = _logit_buffer((1 if teacher_hidden is None else 2) * rows_per_chunk, V, device)
    s_buf, t_buf = buf[:rows_per_chunk], None if teacher_hidden is None else buf[rows_per_chunk:]
    empty = torch.empty(0, device=device)
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n))
        m = rows.stop - rows.start
        s, t = s_buf[:m], None if t_buf is None else t_buf[:m]
        hs = student_hidden[rows]
        head.logits(hs, None if teacher_hidden is None else teacher_hidden[rows], s, t)
        squash = None
        if logit_softcap is not None:
            squash = _softcap_(s, logit_softcap)
            if t is not None:
                _softcap_(t, logit_softcap)
        kl, ce, g, kl_weight = _rows(backend, s, empty if t is None else t, targets[rows], kl_coef[rows],
                                     ce_coef[rows], kl_bound, ce_bound, temperature, sharpening_guard)
        kl_all[rows], ce_all[rows], kl_weight_all[rows] = kl, ce, kl_weight
        if squash is not None:
            g = g * squash
        head.grad_hidden(g, grad_hidden[rows])
        if want_w_grad:
            grad_weight.addmm_(g.t(), hs.float(), alpha=logit_scale)
    # the loss from the per-row terms, once for all rows (float64 sum: N terms of mixed sign)
    total = row_losses(kl_all, ce_all, kl_weight_all, ce_coef, kl_bound, ce_bound).double().sum().float()
    return total, kl_all, ce_all, grad_hidden, grad_weight, kl_weight_all


@_loss_head_fwd.register_fake
def _(student_hidden, teacher_hidden, weight, bias, targets, kl_coef, ce_coef, kl_bound, ce_bound, temperature,
      logit_scale, logit_softcap, chunk_rows, backend, want_w_grad, sharpening_guard):
    n = student_hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=student_hidden.device)
    return (student_hidden.new_empty((), **f32), student_hidden.new_empty((n,), **f32),
            student_hidden.new_empty((n,), **f32), torch.empty_like(student_hidden, memory_format=torch.contiguous_format),
            student_hidden.new_empty(weight.shape if want_w_grad else (0,), **f32),
            student_hidden.new_empty((n,), **f32))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[3], output[4])
    ctx.want_w_grad = inputs[-2]
    ctx.weight_dtype = inputs[2].dtype


def _backward(ctx, grad_loss, _grad_kl, _grad_ce, _grad_gh, _grad_gw, _grad_kw):
    grad_hidden, grad_weight = ctx.saved_tensors
    gh = grad_hidden * grad_loss.to(grad_hidden.dtype)
    gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.want_w_grad else None
    return gh, None, gw, None, None, None, None, None, None, None, None, None, None, None, None, None


_loss_head_fwd.register_autograd(_backward, setup_context=_setup_context)


def _softcap_(x: Tensor, cap: float) -> Tensor:
    """x ← cap·tanh(x/cap) in place; returns d(new x)/d(old x) = 1 − tanh²."""
    x.div_(cap).tanh_()
    squash = 1.0 - x * x
    x.mul_(cap)
    return squash


def _check(student_hidden, teacher_hidden, weight, targets, kl_coef, ce_coef):
    n, h = student_hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"head weight must be [V, {h}], got {list(weight.shape)}")
    if teacher_hidden is not None and teacher_hidden.shape != student_hidden.shape:
        raise ValueError("teacher and student hidden states must have the same shape")
    for name, t in (("targets", targets), ("kl_coef", kl_coef), ("ce_coef", ce_coef)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {list(t.shape)}")


def _run(backend: str, student_hidden: Tensor, teacher_hidden: Optional[Tensor], weight: Tensor,
         targets: Tensor, kl_coef: Tensor, ce_coef: Tensor, *, bias=None, kl_bound=float("inf"),
         ce_bound=float("inf"), temperature=1.0, logit_scale=1.0, logit_softcap=None,
         chunk_rows=DEFAULT_CHUNK_ROWS, sharpening_guard=False) -> LossHeadOutput:
    _check(student_hidden, teacher_hidden, weight, targets, kl_coef, ce_coef)
    teacher = None if teacher_hidden is None else teacher_hidden.detach()
    if bias is not None and bias.requires_grad:
        bias = bias.detach()  # the head is frozen: no bias gradient (as before)
    loss, kl, ce, _, _, kl_weight = _loss_head_fwd(
        student_hidden, teacher, weight, bias, targets.long(), kl_coef.float(), ce_coef.float(),
        float(kl_bound), float(ce_bound), float(temperature), float(logit_scale),
        None if logit_softcap is None else float(logit_softcap), int(chunk_rows), backend,
        bool(weight.requires_grad), bool(sharpening_guard))
    return LossHeadOutput(loss, kl.detach(), ce.detach(), kl_weight.detach())


def eul_loss_head_reference(student_hidden, teacher_hidden, weight, targets, kl_coef, ce_coef, **kwargs) -> LossHeadOutput:
    """The chunked loss head on the pure-PyTorch row op (fp32 logits): oracle and fallback."""
    return _run("reference", student_hidden, teacher_hidden, weight, targets, kl_coef, ce_coef, **kwargs)


def eul_loss_head(
    student_hidden: Tensor,
    teacher_hidden: Optional[Tensor],
    weight: Tensor,
    targets: Tensor,
    kl_coef: Tensor,
    ce_coef: Tensor,
    *,
    bias: Optional[Tensor] = None,
    kl_bound: float = float("inf"),
    ce_bound: float = float("inf"),
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    sharpening_guard: bool = False,
) -> LossHeadOutput:
    """EUL loss over token rows without materialising [rows × vocab] logits.

    Args:
        student_hidden: [N, H] final hidden states of the student (requires grad).
        teacher_hidden: [N, H] teacher hidden states (no grad), or None for no KL term.
        weight: [V, H] frozen output-head weight (gradient only if it requires grad).
        targets: [N] next-token / label ids, ``IGNORE_INDEX`` (-100) for rows without CE.
        kl_coef, ce_coef: [N] per-row coefficients; negative ones mark maximised terms.
        kl_bound, ce_bound: per-row caps for maximised terms (see module docstring).
        temperature: softmax temperature of the KL term (scaled by T²).
        logit_scale, logit_softcap: for model families whose logits are scaled or soft-capped.
        chunk_rows: token rows per chunk.
        sharpening_guard: drop the maximised KL term of rows where the student is more confident
            in the target than the teacher (see module docstring).

    Returns:
        :class:`LossHeadOutput` with the scalar loss and per-row KL and CE.
    """
    backend = pick_backend(student_hidden.device, available=("cpp", "cuda", "triton"))
    return _run(backend, student_hidden, teacher_hidden, weight, targets, kl_coef, ce_coef, bias=bias,
                kl_bound=kl_bound, ce_bound=ce_bound, temperature=temperature, logit_scale=logit_scale,
                logit_softcap=logit_softcap, chunk_rows=chunk_rows, sharpening_guard=sharpening_guard)
