"""Per-token statistics of a model's next-token predictions, without holding [tokens × vocab] logits.

:func:`token_stats` works on hidden states and the output head, in row and vocabulary tiles;
:func:`row_token_stats` runs encoded rows through a model and yields each row's statistics. Subject
selection (:mod:`unlearn_fast.train.selection`) scores tokens with it before training, and evaluation
(:mod:`unlearn_fast.eval.evaluation`) after.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..model.family import output_head, output_states
from ..ops.loss_head import IGNORE_INDEX
from .data import Example
from .encoding import Row, collate


class TokenStats(NamedTuple):
    """Per target position: log p(target), E_p[log p], Var_p[log p], and whether argmax == target."""

    logprob: Tensor
    mean_logprob: Tensor
    var_logprob: Tensor
    argmax_hit: Tensor


def token_stats(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                logit_scale: float = 1.0, logit_softcap: Optional[float] = None,
                row_chunk: int = 256, vocab_chunk: int = 8192) -> TokenStats:
    """Statistics of the next-token distribution at each row without ever holding [N, V] logits.

    ``hidden`` [N, H] are the states that feed the output head ``weight`` [V, H] (+ ``bias``, logit
    scale and soft-cap as :mod:`unlearn_fast.ops.loss_head` applies them); ``targets`` [N] are token
    ids. Logits are fp32 tiles of at most ``row_chunk × vocab_chunk``; a one-pass online merge over the
    vocabulary tiles keeps, per row, the running max m, Σe^{z−m}, Σe^{z−m}(z−m), Σe^{z−m}(z−m)², the
    best logit and the target's logit, so that

        log Z = m + log S,   log p(target) = z_target − log Z,
        μ = E_p[log p] = E_p[z] − log Z,   σ² = Var_p[log p] = Var_p[z]   (log p = z − log Z).
    """
    n = hidden.shape[0]
    device = hidden.device
    v = weight.shape[0]
    out_lp = torch.empty(n, dtype=torch.float64, device=device)
    out_mu = torch.empty_like(out_lp)
    out_var = torch.empty_like(out_lp)
    out_hit = torch.empty(n, dtype=torch.bool, device=device)
    targets = targets.to(device).long()
    for r0 in range(0, n, row_chunk):
        h = hidden[r0:r0 + row_chunk].float()
        t = targets[r0:r0 + row_chunk]
        rows = h.shape[0]
        m = torch.full((rows,), -math.inf, dtype=torch.float64, device=device)
        s = torch.zeros(rows, dtype=torch.float64, device=device)
        a = torch.zeros_like(s)  # Σ w (z − m)
        b = torch.zeros_like(s)  # Σ w (z − m)²
        best = torch.full((rows,), -math.inf, dtype=torch.float64, device=device)
        best_id = torch.zeros(rows, dtype=torch.long, device=device)
        z_target = torch.full((rows,), math.nan, dtype=torch.float64, device=device)
        for v0 in range(0, v, vocab_chunk):
            w = weight[v0:v0 + vocab_chunk].float()
            z = h @ w.t()
            if bias is not None:
                z = z + bias[v0:v0 + vocab_chunk].float()
            z = z * logit_scale
            if logit_softcap is not None:
                z = logit_softcap * torch.tanh(z / logit_softcap)
            z = z.double()
            tile_max, tile_arg = z.max(dim=1)
            better = tile_max > best
            best = torch.where(better, tile_max, best)
            best_id = torch.where(better, tile_arg + v0, best_id)
            in_tile = (t >= v0) & (t < v0 + z.shape[1])
            if in_tile.any():
                idx = (t - v0).clamp(0, z.shape[1] - 1)
                z_target = torch.where(in_tile, z.gather(1, idx.unsqueeze(1)).squeeze(1), z_target)
            new_m = torch.maximum(m, tile_max)
            delta = torch.where(torch.isfinite(m), m - new_m, torch.zeros_like(m))  # ≤ 0
            scale = torch.exp(delta) * torch.isfinite(m)
            # shift the running sums from reference m to new_m: (z−m) = (z−new_m) − delta
            a_shift = a + delta * s
            b_shift = b + 2 * delta * a + delta * delta * s
            s, a, b = scale * s, scale * a_shift, scale * b_shift
            d = z - new_m.unsqueeze(1)
            e = torch.exp(d)
            s = s + e.sum(1)
            a = a + (e * d).sum(1)
            b = b + (e * d * d).sum(1)
            m = new_m
        log_z = m + torch.log(s)
        mean_z_shift = a / s  # E[z] − m
        out_lp[r0:r0 + rows] = z_target - log_z
        out_mu[r0:r0 + rows] = (m + mean_z_shift) - log_z
        out_var[r0:r0 + rows] = (b / s - mean_z_shift ** 2).clamp(min=0.0)
        out_hit[r0:r0 + rows] = best_id == t
    return TokenStats(out_lp, out_mu, out_var, out_hit)


def target_text(example: Example) -> str:
    """The text whose tokens are the targets: the response, or the whole text."""
    return example.response if example.prompt is not None else (example.text or "")


def row_token_stats(model: nn.Module, task: str, rows: Sequence[Row], pad: int, batch_size: int,
                    vocab_chunk: int):
    """Per row, in order: the :class:`TokenStats` of its target tokens (on the CPU).

    Rows are run in batches through :func:`unlearn_fast.model.family.output_states` and the output head in
    row and vocabulary chunks (:func:`token_stats`): no [tokens × vocab] logits."""

    head = output_head(model, task)
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad).items()}
        states = output_states(model, task, batch)
        has_target = batch["targets"] != IGNORE_INDEX
        stats = token_stats(states[has_target], head.weight, batch["targets"][has_target], bias=head.bias,
                            logit_scale=head.logit_scale, logit_softcap=head.logit_softcap, vocab_chunk=vocab_chunk)
        stats = TokenStats(*(t.cpu() for t in stats))
        start = 0
        for j, n in enumerate(has_target.sum(1).tolist()):
            if n == 0:
                raise ValueError(f"row {i + j + 1} has no target tokens")
            yield TokenStats(*(t[start:start + n] for t in stats))
            start += n
