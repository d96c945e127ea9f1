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

Only one chunk of [rows × vocab] logits exists at a time; logits and their gradients are fp32
whatever the hidden-state dtype (bf16 logits lose the KL gradient when student ≈ teacher, which
is exactly where EUL starts). The gradient for the student hidden states (and the head weight, if
it requires grad) is produced during the forward pass, chunk by chunk, and scaled in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .backend import cpp_ops, pick_backend

IGNORE_INDEX = -100
DEFAULT_CHUNK_ROWS = 1024


def loss_rows_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    kl_coef: Tensor,
    ce_coef: Tensor,
    kl_bound: float,
    ce_bound: float,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row KL, CE and d(loss)/d(student logits) for one chunk of fp32 logits.

    ``teacher_logits`` with ``numel() == 0`` means there is no KL term. This is the contract the
    C++ (``_C.loss_rows``), CUDA and Triton row kernels implement.
    """
    s = student_logits.float()
    T = float(temperature)
    grad = torch.zeros_like(s)
    kl = torch.zeros(s.shape[0], dtype=torch.float32, device=s.device)
    if teacher_logits.numel():
        log_ps_T = torch.log_softmax(s / T, dim=-1)
        log_pt = torch.log_softmax(teacher_logits.float() / T, dim=-1)
        pt = log_pt.exp()
        kl = (T * T) * (pt * (log_pt - log_ps_T)).sum(-1)
        active = torch.where(kl_coef < 0, kl < kl_bound, torch.ones_like(kl, dtype=torch.bool))
        weight = (kl_coef * active).unsqueeze(-1)
        grad += weight * T * (log_ps_T.exp() - pt)
    has_target = targets != IGNORE_INDEX
    safe_targets = torch.where(has_target, targets, torch.zeros_like(targets))
    log_ps = torch.log_softmax(s, dim=-1)
    ce = -log_ps.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) * has_target
    active = has_target & torch.where(ce_coef < 0, ce < ce_bound, torch.ones_like(has_target))
    weight = (ce_coef * active).unsqueeze(-1)
    ce_grad = log_ps.exp()
    ce_grad.scatter_add_(-1, safe_targets.unsqueeze(-1), -torch.ones_like(ce_grad[:, :1]))
    grad += weight * ce_grad
    return kl, ce, grad


def row_losses(kl: Tensor, ce: Tensor, kl_coef: Tensor, ce_coef: Tensor, kl_bound: float, ce_bound: float) -> Tensor:
    """Each row's weighted loss with maximised (negative-coefficient) terms capped at their bound."""
    kl_term = torch.where(kl_coef < 0, kl.clamp(max=kl_bound), kl)
    ce_term = torch.where(ce_coef < 0, ce.clamp(max=ce_bound), ce)
    return kl_coef * kl_term + ce_coef * ce_term


@dataclass
class LossHeadOutput:
    """The scalar loss (differentiable) and each row's KL and CE (detached, for logging)."""

    loss: Tensor
    kl: Tensor
    ce: Tensor


RowsFn = Callable[..., tuple[Tensor, Tensor, Tensor]]


def _cpp_rows(*args):
    return cpp_ops().loss_rows(*args)


_ROWS = {"reference": loss_rows_reference, "cpp": _cpp_rows}


def _logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], scale: float, softcap: Optional[float]):
    """fp32 logits of one chunk, and the factor d(logits)/d(raw logits) where a soft-cap applies."""
    raw = hidden.float() @ weight.t()
    if bias is not None:
        raw = raw + bias
    raw = raw * scale
    if softcap is None:
        return raw, None
    squashed = torch.tanh(raw / softcap)
    return softcap * squashed, 1.0 - squashed * squashed


class _LossHeadFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, bias, targets, kl_coef, ce_coef,
                kl_bound, ce_bound, temperature, logit_scale, logit_softcap, chunk_rows, rows_fn):
        n = student_hidden.shape[0]
        w32 = weight.detach().float()
        b32 = None if bias is None else bias.detach().float()
        want_w_grad = weight.requires_grad
        grad_hidden = torch.empty_like(student_hidden)
        grad_weight = torch.zeros_like(w32) if want_w_grad else None
        kl_all = torch.zeros(n, dtype=torch.float32, device=student_hidden.device)
        ce_all = torch.zeros_like(kl_all)
        total = torch.zeros((), dtype=torch.float64, device=student_hidden.device)
        empty = torch.empty(0, device=student_hidden.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            hs = student_hidden[rows]
            s, s_squash = _logits(hs, w32, b32, logit_scale, logit_softcap)
            t = empty if teacher_hidden is None else _logits(teacher_hidden[rows], w32, b32, logit_scale, logit_softcap)[0]
            kl, ce, g = rows_fn(s.contiguous(), t.contiguous(), targets[rows].contiguous(),
                                kl_coef[rows].contiguous(), ce_coef[rows].contiguous(),
                                float(kl_bound), float(ce_bound), float(temperature))
            total += row_losses(kl, ce, kl_coef[rows], ce_coef[rows], kl_bound, ce_bound).double().sum()
            kl_all[rows], ce_all[rows] = kl, ce
            if s_squash is not None:
                g = g * s_squash
            g = g * logit_scale
            grad_hidden[rows] = (g @ w32).to(grad_hidden.dtype)
            if want_w_grad:
                grad_weight += g.t() @ hs.float()
        ctx.save_for_backward(grad_hidden, grad_weight if want_w_grad else None)
        ctx.want_w_grad = want_w_grad
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kl_all, ce_all)
        return total.float(), kl_all, ce_all

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype)
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.want_w_grad else None
        return gh, None, gw, None, None, None, None, None, None, None, None, None, None, None


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
         chunk_rows=DEFAULT_CHUNK_ROWS) -> LossHeadOutput:
    _check(student_hidden, teacher_hidden, weight, targets, kl_coef, ce_coef)
    teacher = None if teacher_hidden is None else teacher_hidden.detach()
    loss, kl, ce = _LossHeadFunction.apply(
        student_hidden, teacher, weight, bias, targets.long(), kl_coef.float(), ce_coef.float(),
        kl_bound, ce_bound, temperature, float(logit_scale), logit_softcap, int(chunk_rows), _ROWS[backend])
    return LossHeadOutput(loss, kl, ce)


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

    Returns:
        :class:`LossHeadOutput` with the scalar loss and per-row KL and CE.
    """
    backend = pick_backend(student_hidden.device, available=("cpp",))
    return _run(backend, student_hidden, teacher_hidden, weight, targets, kl_coef, ce_coef, bias=bias,
                kl_bound=kl_bound, ce_bound=ce_bound, temperature=temperature, logit_scale=logit_scale,
                logit_softcap=logit_softcap, chunk_rows=chunk_rows)
