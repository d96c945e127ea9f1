"""EUL's selective teacher-student objective.

    L = α·KL_retain − KL_forget + λ·task_retain − γ·LM_forget

Each term is a mean over its own token positions in the batch (so a batch with few forgotten
tokens still weighs the forget terms fully). The two maximised terms are unbounded, so each is
capped per token: a forgotten token stops contributing once its KL(teacher‖student) exceeds
``forget_kl_bound`` nats, or its LM loss exceeds ``forget_lm_bound`` nats (a hinge: at the cap its
gradient is zero, so the student moves far enough from the teacher on the forget set and no
further). Defaults: α=0.8, λ=1.0, γ=0.2 (the paper's), both bounds 5 nats (the teacher gives
a token it knew probability ≤ e⁻⁵ ≈ 0.7 % once its LM loss reaches the cap).

The sharpening guard. At the start the student equals the teacher, so the forget KL has zero
gradient, and once the student moves, maximising the KL amplifies whatever direction it moved
in — including *more* confidence in the forgotten answer (which the retained data's task loss
tends to cause first, as answering retained facts sharpens answering in general). Measured on
SmolLM2: with the paper's settings the forget-set loss fell instead of rising. So, by default, a
forgotten position with a target counts in the forget KL only while the student's probability
of that target (at the KL's temperature) is at most the teacher's; where the student has become
more confident than the teacher, only the LM term acts, pushing the answer down until the KL can
take over. ``sharpening_guard=False`` gives the paper's objective exactly. The loss head's row
kernels decide this per position from statistics they compute anyway (no extra pass; see
:mod:`unlearn_fast.ops.loss_head`).

Forget target. ``forget_target="auto"`` (the default) is ``"matched"`` where the rows to read targets
from are given and the data says a row-level target carries (a sequence classifier with a held-out
set, or any model with a target reference), ``"bound"`` otherwise (:meth:`ObjectiveConfig.resolved_forget_target`).
``forget_target="bound"`` uses the two bounds as given.
``forget_target="heldout"`` derives them from a held-out set before training (see
:func:`heldout_bounds`): a forgotten token stops being pushed once its loss reaches the teacher's
mean per-token loss on the held-out targets — the level of rows the model was never asked to
forget — instead of a fixed 5 nats. ``forget_target="matched"`` gives each forgotten *row* its own
target (:func:`matched_targets`): the held-out row loss of the same rank, so the forgotten rows end
with the loss distribution of rows the model never trained on (most stay nearly as they were, the
least certain ones are pushed past the answer, as a retrained model would get them wrong); a row's
forget terms stop once its mean target loss reaches its target, and a row carried far past it by the
other rows' steps is pulled back (:data:`MATCHED_BAND`). Until it reaches its target, a row's forget LM
term is weighted by 1 / (its current loss) (:func:`matched_push_weight`): the negated loss's gradient
vanishes on a row the model is sure of, so without it such rows never reached their targets.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..model.family import Head, output_head, output_states
from ..model.layers import layers_disabled, recording_outputs
from ..ops import eul_loss_head
from ..ops.loss_head import IGNORE_INDEX
from .encoding import collate
from .step_cache import StepCache

TERMS = ("retain_kl", "forget_kl", "task_loss", "forget_lm_loss")
# reported beside the terms: the retained-output penalty (mean over the retain KL's positions of the mean
# square of what the unlearning layers add to the feed-forward output, summed over the layers' sites)
RETAIN_OUTPUT = "retain_output"
GATE_CHUNK_ROWS = 64  # forget-margin positions per logits chunk: 12 MiB of fp32 logits at V = 49152
# reported beside the terms: the forget KL's weight as applied, forget_kl_weight × the share of the
# forgotten KL positions the sharpening guard kept (a mean over the forget KL's positions, like it)
FORGET_KL_COEF = "forget_kl_coef"
FORGET_TARGETS = ("auto", "bound", "heldout", "matched")
# forget_target="matched": a row whose loss ends above target + max(0.1 × target, 0.05 nats) is pulled back
# (its forget LM term changes sign) — the steps of the other rows keep moving it after it stopped
MATCHED_BAND = (0.1, 0.05)
# forget_target="matched": the push weight 1 / loss stops growing below this loss (nats per token)
MATCHED_PUSH_FLOOR = 0.01


@dataclass
class ObjectiveConfig:
    """Weights of the EUL loss terms; a weight of 0 (or ``use_*=False``) switches a term off.

    ``gamma=None`` means the paper's 0.2 where the model has an LM head and 0 where it has not.
    """

    alpha: float = 0.8
    lam: float = 1.0
    gamma: Optional[float] = None
    forget_kl_weight: float = 1.0
    forget_kl_bound: float = 5.0
    forget_lm_bound: float = 5.0
    temperature: float = 1.0
    sharpening_guard: bool = True
    # forgotten examples with generic prompts: only response tokens that the subject makes this many
    # nats likelier than generic subjects do are forgotten (see unlearn_fast.train.selection)
    subject_margin: float = 1.0
    # "bound": the bounds above as given; "heldout": both bounds derived from the teacher's loss on a
    # held-out set before training (heldout_bounds; needs unlearn(heldout=...)); "matched": each forgotten
    # row to the held-out rows' loss of its rank; "auto": matched or bound (resolved_forget_target)
    forget_target: str = "auto"
    # stop pushing a forgotten target token once it is this many nats below the student's most likely
    # other token (where a model that never saw the fact would have it: not its answer); None: off.
    # Opt-in (the demo uses 1.0 with retain_output_weight 10): it removed the collateral damage on the
    # demo's real facts but left fictitious facts barely forgotten (scenario 1; docs/design.md)
    forget_margin: Optional[float] = None
    # weight of the retained-output penalty: keeps the layers' output near zero on retained inputs, so
    # they act on what is forgotten rather than on every fact of its kind; 0: off
    retain_output_weight: float = 0.0
    # causal LMs: up to this many of the student's own detours to each forgotten answer (greedy
    # completions that still give it, looked for every epoch) train as extra forgotten rows
    # (unlearn_fast.train.routes); 0: off
    forget_routes: int = 0

    def __post_init__(self):
        if self.forget_target not in FORGET_TARGETS:
            raise ModelError(f"forget_target must be one of {', '.join(FORGET_TARGETS)} (got {self.forget_target!r})")
        if self.forget_margin is not None and not (math.isfinite(self.forget_margin) and self.forget_margin >= 0):
            raise ModelError(f"forget_margin must be a number of nats >= 0, or None to switch it off "
                             f"(got {self.forget_margin})")
        if not (math.isfinite(self.retain_output_weight) and self.retain_output_weight >= 0):
            raise ModelError(f"retain_output_weight must be >= 0 (got {self.retain_output_weight})")
        if isinstance(self.forget_routes, bool) or not isinstance(self.forget_routes, int) or self.forget_routes < 0:
            raise ModelError(f"forget_routes must be a whole number >= 0 (got {self.forget_routes!r})")

    @classmethod
    def paper(cls, **overrides) -> "ObjectiveConfig":
        """The paper's objective: no sharpening guard, no forget margin, no retained-output penalty, no
        forget routes, the fixed bounds."""
        return cls(**{"sharpening_guard": False, "forget_margin": None, "retain_output_weight": 0.0,
                      "forget_routes": 0, "forget_target": "bound", **overrides})

    def resolved_forget_target(self, task: str, heldout: bool, reference: bool) -> str:
        """The forget target ``"auto"`` stands for, given the task and whether a held-out set
        (``heldout``) or a separate target reference (``reference``) is given; any other value as set.

        ``"matched"`` for a sequence classifier with a held-out set (its test split: measured on two
        sentiment data sets, it ends forget accuracy within 3 points of a retrained model's where the
        fixed bounds over-forget by 17–42 points), and for any model given a target reference (rows
        chosen to be what the forgotten ones should look like). ``"bound"`` otherwise: held-out *known*
        facts are the wrong reference for facts (matching them barely forgets), and without a reference
        there is nothing to match. See docs/design.md.
        """
        if self.forget_target != "auto":
            return self.forget_target
        return "matched" if reference or (heldout and task == "classification") else "bound"

    def resolved_gamma(self, task: str) -> float:
        """The weight γ of the maximised forget term for ``task``.

        Causal / seq2seq models: the negated LM loss of the forgotten text (default 0.2, the paper's).
        Sequence classifiers have no LM head, so there the term is the negated *task* loss on the
        forgotten rows' own labels (forgotten rows keep their label; see :mod:`unlearn_fast.train.encoding`):
        ``−γ·mean CE(label)`` over the forget rows, each row's CE capped at ``forget_lm_bound`` like an
        LM token's. It defaults to 0 (the paper's classification objective: the KL terms and the
        retained task loss only), but from a converged classifier that objective barely moves — the
        forget KL has zero gradient where the student equals the teacher — so an explicit γ > 0 is
        allowed. For two classes, a bound of at most ln 2 ≈ 0.69 nats lets this term lower the
        confidence in a forgotten label down to chance but not past it (the forget KL, capped by
        ``forget_kl_bound``, can still move it further). A negative γ would train a classifier on the
        forgotten labels, so it is refused there. Under ``forget_target="matched"`` a classifier's γ
        defaults to 1: that term is what pushes each row to its target and pulls it back past it (with
        γ = 0 only the forget KL acts, and nothing pulls back: with the library's other defaults the
        movie classifier's forgotten sentences ended 5.8 points below the retrained model's forget
        accuracy; see docs/design.md).
        """
        if self.gamma is None:
            if task == "classification":
                return 1.0 if self.forget_target == "matched" else 0.0
            return 0.2
        if self.gamma < 0 and task == "classification":
            raise ModelError(f"gamma is the weight of the negated task loss on the forgotten labels of a "
                             f"sequence classifier: it must be >= 0 (got {self.gamma}; --gamma)")
        return self.gamma

    def to_dict(self) -> dict:
        return asdict(self)


def binary_kl(p: float, q: float) -> float:
    """KL(Bernoulli(p) ‖ Bernoulli(q)) in nats (0·ln 0 = 0)."""
    p, q = min(max(p, 0.0), 1.0), min(max(q, 1e-300), 1.0 - 1e-16)
    out = p * math.log(p / q) if p > 0 else 0.0
    return out + ((1 - p) * math.log((1 - p) / (1 - q)) if p < 1 else 0.0)


def heldout_bounds(config: ObjectiveConfig, forget_loss: float, heldout_loss: float) -> ObjectiveConfig:
    """``config`` with its per-token forget bounds derived from the held-out level (forget_target="heldout").

    ``forget_loss``: the teacher's mean per-token loss on the forgotten targets; ``heldout_loss``: its
    mean per-token loss on the held-out set's targets (both in nats, measured before training).

    - forget LM bound = ``heldout_loss``: the negated LM (or, for a classifier, label) loss of a
      forgotten token stops pushing once that token is as unlikely as a held-out one, on average.
    - forget KL bound = KL(Bernoulli(e^−forget_loss) ‖ Bernoulli(e^−heldout_loss)): the least
      KL(teacher‖student) at which a student can give a forgotten target the held-out probability
      (moving the target's probability from p to q costs at least the two-outcome KL of p and q,
      data-processing inequality; it is reached when the other tokens keep their proportions). So the
      KL stops where the LM term does, not 5 nats further.

    Where the held-out rows are no harder than the forgotten ones (``heldout_loss <= forget_loss``),
    the KL bound is 0 (the forget KL never acts) and the LM term only lifts the forgotten tokens the
    teacher is surer of than of the average held-out token, up to that average.
    """
    if not (math.isfinite(forget_loss) and math.isfinite(heldout_loss)):
        raise ModelError(f"forget_target='heldout' needs finite teacher losses (forget {forget_loss}, "
                         f"held-out {heldout_loss})")
    lm = max(heldout_loss, 0.0)
    kl = binary_kl(math.exp(-forget_loss), math.exp(-heldout_loss)) if heldout_loss > forget_loss else 0.0
    return replace(config, forget_lm_bound=lm, forget_kl_bound=kl)


def matched_targets(forget_losses: Sequence[float], heldout_losses: Sequence[float]) -> list[float]:
    """Per forgotten row, the loss it is pushed to under ``forget_target="matched"``: the held-out
    rows' loss at the same quantile as the row's own (teacher) loss among the forgotten rows.

    Rows are ranked by ``forget_losses`` (the teacher's mean per-token loss of each forgotten row;
    ties keep their order), and the row of rank r (0-based, of n) gets the held-out losses' empirical
    quantile at (r + ½)/n. The targets therefore have the held-out rows' distribution, and a row the
    teacher is less sure of gets a higher one; where a row's target is below its teacher loss it is
    not pushed at all.
    """
    if not forget_losses:
        return []
    if not heldout_losses:
        raise ModelError("forget_target='matched' needs at least one held-out row")
    bad = [x for x in list(forget_losses) + list(heldout_losses) if not math.isfinite(x)]
    if bad:
        raise ModelError(f"forget_target='matched' needs finite teacher losses (got {bad[0]})")
    reference = sorted(heldout_losses)
    order = sorted(range(len(forget_losses)), key=lambda i: forget_losses[i])
    n, m = len(order), len(reference)
    out = [0.0] * n
    for rank, i in enumerate(order):
        out[i] = max(reference[min(int((rank + 0.5) / n * m), m - 1)], 0.0)
    return out


def matched_push_weight(row_loss: Tensor) -> Tensor:
    """forget_target="matched": the weight of a forgotten row's LM term given its current mean loss
    per target token: 1 / loss, between 1 and 1 / :data:`MATCHED_PUSH_FLOOR`.

    The negated cross-entropy's gradient on a row is proportional to 1 − p (p: the model's probability
    of the row's answer), about the loss itself when the model is sure, so a row at 0.03 nats is pushed
    thirty times more weakly than one at 1 nat. Weighted by 1 / loss it becomes the gradient of
    −log(loss): every row moves at the same relative speed. Measured (product sentiment, one seed, 5
    epochs): without it the two forgotten sentences whose target runs against the other rows' direction
    (positive sentences among mostly negative ones) stayed at 0.01 and 0.07 nats against targets of 0.85
    and 4.3; with it every target was reached.
    """
    return (1.0 / row_loss.clamp(min=MATCHED_PUSH_FLOOR)).clamp(min=1.0)


def matched_bounds(config: ObjectiveConfig, forget_losses: Sequence[float], targets: Sequence[float]) -> ObjectiveConfig:
    """``config`` with per-token bounds that never stop a row before its own target does
    (forget_target="matched"): the LM bound at the highest target, the KL bound at the highest
    two-outcome KL a row needs to reach its target (see :func:`heldout_bounds`)."""
    lm = max(targets, default=0.0)
    kl = max((binary_kl(math.exp(-f), math.exp(-t)) for f, t in zip(forget_losses, targets) if t > f), default=0.0)
    return replace(config, forget_lm_bound=lm, forget_kl_bound=kl)


def coefficients(batch: dict, config: ObjectiveConfig, gamma: float) -> tuple[Tensor, Tensor]:
    """Per-position KL and CE coefficients [B, T_out], each term normalised by its token count.

    The counts are the batch's own, or ``batch["term_counts"]`` when given (under data
    parallelism: the counts of the global batch, in the order retain KL, forget KL, task loss,
    forget LM loss; see :mod:`unlearn_fast.train.distributed`), so each rank's loss is its part of
    the one-process loss.
    """
    forget = batch["forget"].unsqueeze(1).expand_as(batch["kl_mask"])
    kl_mask = batch["kl_mask"]
    has_target = batch["targets"] != IGNORE_INDEX
    totals = batch.get("term_counts")
    totals = None if totals is None else [int(n) for n in totals.tolist()]

    def weighted(mask: Tensor, weight: float, term: int) -> Tensor:
        n = int(mask.sum()) if totals is None else totals[term]
        return mask.float() * (weight / n) if (n and weight) else torch.zeros(mask.shape)

    kl = weighted(kl_mask & ~forget, config.alpha, 0) - weighted(kl_mask & forget, config.forget_kl_weight, 1)
    ce = weighted(has_target & ~forget, config.lam, 2) - weighted(has_target & forget, gamma, 3)
    return kl, ce


def pushed_positions_only(batch: dict, kl: Tensor, ce: Tensor, done: Tensor) -> tuple[Tensor, Tensor]:
    """The forget terms' coefficients renormalised over the forgotten positions the forget margin still
    pushes (``done``: the ones it stopped): each term is then a mean over those, so the last few facts
    not yet forgotten are pushed as hard as the first. A mean over every forgotten position (stopped
    ones at weight 0) faded as the others were forgotten: measured on scenario 1, facts a small model
    was sure of stayed answered. The counts are the micro-batch's own (under data parallelism or
    accumulation, each part's)."""
    forget = batch["forget"].unsqueeze(1).expand_as(done)
    done = done.to(kl.device)
    kl, ce = kl.clone(), ce.clone()
    for coef, mask in ((kl, batch["kl_mask"] & forget), (ce, (batch["targets"] != IGNORE_INDEX) & forget)):
        mask = mask.to(kl.device)
        left = int((mask & ~done).sum())
        if left:
            coef[mask] *= int(mask.sum()) / left
    return kl, ce


def term_means(batch: dict, kl: Tensor, ce: Tensor) -> dict[str, float]:
    """Unweighted means of each term over its positions (for logging); NaN where absent."""
    forget = batch["forget"].unsqueeze(1).expand_as(batch["kl_mask"])
    has_target = batch["targets"] != IGNORE_INDEX
    out = {}
    for name, values, mask in (("retain_kl", kl, batch["kl_mask"] & ~forget),
                               ("forget_kl", kl, batch["kl_mask"] & forget),
                               ("task_loss", ce, has_target & ~forget),
                               ("forget_lm_loss", ce, has_target & forget)):
        out[name] = float(values[mask].double().mean()) if mask.any() else float("nan")
    return out


def retained_output_penalty(batch: dict, added: Sequence[tuple]) -> tuple[Tensor, float]:
    """The retained-output penalty: for each site's recorded output (what its layers added, [B, T, d]),
    the mean square over d at the retained rows' positions, averaged over those positions and summed
    over the sites; and its value as a float (for logging).

    Where a site's positions are the output positions (decoder-only models, a seq2seq decoder), they
    are the retain KL's, normalised like it (``batch["term_counts"]`` under data parallelism or
    accumulation). A classifier's sites (one output position per row) count each retained row's mean over
    its tokens, normalised by the retained rows (the retain KL's count there too). A seq2seq encoder's
    sites are left out: no global count of their positions exists, and the decoder's sites see the forgotten
    and retained answers."""
    kept = ~batch["forget"]
    kl_positions = batch["kl_mask"] & kept.unsqueeze(1).expand_as(batch["kl_mask"])
    totals = batch.get("term_counts")
    n = int(totals[0]) if totals is not None else int(kl_positions.sum())
    total = None
    for site, delta in added:
        square = delta.float().pow(2).mean(-1)  # [B, T]
        if tuple(square.shape) == tuple(kl_positions.shape):
            part = (square * kl_positions.to(square.device)).sum()
        elif kl_positions.shape[1] == 1 and site.stack != "encoder":  # a classifier: per-row means
            mask = batch["attention_mask"].to(square.device).float()
            rows = (square * mask).sum(1) / mask.sum(1).clamp(min=1)
            part = (rows * kl_positions[:, 0].to(square.device)).sum()
        else:
            continue
        total = part if total is None else total + part.to(total.device)
    if total is None or not n:
        return torch.zeros(()), float("nan")
    total = total / n
    return total, float(total.detach())


def _output_lengths(task: str, batch: dict) -> list[int]:
    if task == "classification":
        return [1] * batch["input_ids"].shape[0]
    key = "decoder_attention_mask" if task == "seq2seq" else "attention_mask"
    return batch[key].sum(1).tolist()


class EULObjective:
    """Computes the EUL loss of a batch for a model with unlearning layers attached.

    With a :class:`~unlearn_fast.train.step_cache.StepCache` and the batch's rows, the teacher's
    states are computed once per row and the frozen trunk below the lowest unlearning layer is
    shared between teacher and student (and replayed in later epochs).
    """

    # its terms are normalised by ``batch["term_counts"]`` when given: data-parallel ranks sum
    # their losses' gradients (see :mod:`unlearn_fast.train.distributed`)
    global_normalisers = True

    def __init__(self, model: nn.Module, task: str, config: ObjectiveConfig, cache: Optional[StepCache] = None):
        self.model = model
        self.task = task
        self.config = config
        self.gamma = config.resolved_gamma(task)
        self.head: Head = output_head(model, task)
        self.cache = cache

    def teacher_states(self, batch: dict) -> Tensor:
        with torch.no_grad(), layers_disabled(self.model):
            return output_states(self.model, self.task, batch)

    def _teacher(self, batch: dict, rows, cache: Optional[StepCache]) -> Tensor:
        if cache is None:
            return self.teacher_states(batch)
        lengths = batch["attention_mask"].sum(1).tolist()
        if not cache.use_teacher:  # still share the trunk with the student within this step
            with cache.recording_trunk(rows, lengths):
                return self.teacher_states(batch)
        missing = [r for r in rows if not cache.has_teacher(r)]
        if missing:  # run the teacher on the rows it has not seen yet, and only on them
            device = batch["input_ids"].device
            sub = batch if len(missing) == len(rows) else \
                {k: v.to(device) for k, v in collate(missing, pad_id=0).items()}
            with cache.recording_trunk(missing, sub["attention_mask"].sum(1).tolist()):
                states = self.teacher_states(sub)
            cache.store_teacher(missing, states, _output_lengths(self.task, sub))
        return cache.cached_teacher(rows, batch["targets"].shape[1], batch["input_ids"].device)

    def _student(self, batch: dict, rows, cache: Optional[StepCache]) -> Tensor:
        if cache is None:
            return output_states(self.model, self.task, batch)
        width = batch["input_ids"].shape[1]
        with cache.recording_trunk(rows, batch["attention_mask"].sum(1).tolist()), \
                cache.replaying_trunk(rows, width, batch["input_ids"].device):
            return output_states(self.model, self.task, batch)

    def __call__(self, batch: dict, rows: Optional[Sequence] = None) -> tuple[Tensor, dict[str, float]]:
        """The scalar loss (differentiable w.r.t. the unlearning layers) and each term's mean.

        ``rows`` (the encoded rows of the batch, in order) lets the step cache work; without it
        every pass is computed.
        """
        kl_coef, ce_coef = coefficients(batch, self.config, self.gamma)
        rows_used = (kl_coef != 0) | (ce_coef != 0)
        kl_off, ce_off = kl_coef == 0, ce_coef == 0  # switched off by the config (not by the guard)
        cache = self.cache if rows is not None else None
        teacher = self._teacher(batch, rows, cache) if bool((kl_coef != 0).any()) else None
        penalty_on = self.config.retain_output_weight > 0 and not bool(batch["forget"].all())
        with (recording_outputs(self.model) if penalty_on else contextlib.nullcontext([])) as added:
            student = self._student(batch, rows, cache)
        device = student.device
        done = None  # gated positions stay in the head, with weight 0
        if self.config.forget_margin is not None:
            done = self._forgotten_positions(batch, student)
            kl_coef, ce_coef = pushed_positions_only(batch, kl_coef, ce_coef, done)
        past = None
        if "loss_target" in batch:
            reached, past, row_loss = self._rows_at_target(batch, student)
            push = torch.where(batch["forget"].cpu(), matched_push_weight(row_loss), 1.0)
            ce_coef = ce_coef * push.float().unsqueeze(1).to(ce_coef.device)
            reached = reached.unsqueeze(1).expand_as(kl_coef)
            done = reached if done is None else done | reached
        if done is not None:
            kl_coef = kl_coef.masked_fill(done, 0.0)
            if past is not None:  # pulled back: the forget LM term of a row far past its target changes sign
                back = past.unsqueeze(1).expand_as(ce_coef) & (ce_coef < 0)
                ce_coef = torch.where(back, -ce_coef, ce_coef)
                done = done & ~back
            ce_coef = ce_coef.masked_fill(done, 0.0)
        sel = rows_used.to(device)
        out = eul_loss_head(
            student[sel],
            None if teacher is None else teacher[sel],
            self.head.weight,
            batch["targets"].to(device)[sel],
            kl_coef.to(device)[sel],
            ce_coef.to(device)[sel],
            bias=self.head.bias,
            kl_bound=self.config.forget_kl_bound,
            ce_bound=self.config.forget_lm_bound,
            temperature=self.config.temperature,
            logit_scale=self.head.logit_scale,
            logit_softcap=self.head.logit_softcap,
            sharpening_guard=self.config.sharpening_guard,
        )
        full_kl = torch.zeros(rows_used.shape, dtype=torch.float32)
        full_ce = torch.zeros(rows_used.shape, dtype=torch.float32)
        full_kl[rows_used] = out.kl.cpu()
        full_ce[rows_used] = out.ce.cpu()
        full_kl[kl_off] = float("nan")  # a switched-off term is not computed: report it absent,
        full_ce[ce_off] = float("nan")  # not as 0
        if cache is not None:
            cache.end_step()
        terms = term_means(batch, full_kl, full_ce)
        terms[FORGET_KL_COEF] = self._forget_kl_coef(batch, rows_used, out.kl_weight)
        loss = out.loss
        if self.config.retain_output_weight > 0:  # the same figures on every rank (NaN: no retained rows)
            terms[RETAIN_OUTPUT] = float("nan")
        if penalty_on:
            penalty, terms[RETAIN_OUTPUT] = retained_output_penalty(batch, added)
            loss = loss + self.config.retain_output_weight * penalty.to(loss.device)
        return loss, terms

    def _forgotten_target_logits(self, batch: dict, student: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """At the forgotten target positions ([B, T_out] bool mask, returned first): the target's logit,
        the best other logit and the logsumexp, in float32 and without gradient, computed a chunk of
        rows of logits at a time (never [positions × vocab] at once). All on the CPU."""
        positions = batch["forget"].unsqueeze(1).expand_as(batch["targets"]) & (batch["targets"] != IGNORE_INDEX)
        positions = positions.cpu()
        head = self.head
        states = student[positions.to(student.device)]
        targets = batch["targets"].cpu()[positions].to(states.device)
        parts = []
        with torch.no_grad():
            for start in range(0, states.shape[0], GATE_CHUNK_ROWS):
                logits = states[start: start + GATE_CHUNK_ROWS].float() @ head.weight.float().t()
                if head.bias is not None:
                    logits = logits + head.bias.float()
                logits = logits * head.logit_scale
                if head.logit_softcap is not None:
                    logits = head.logit_softcap * torch.tanh(logits / head.logit_softcap)
                t = targets[start: start + GATE_CHUNK_ROWS].unsqueeze(-1)
                target_logit = logits.gather(-1, t).squeeze(-1)
                lse = torch.logsumexp(logits, -1)
                best_other = logits.scatter_(-1, t, float("-inf")).max(-1).values
                parts.append((target_logit.cpu(), best_other.cpu(), lse.cpu()))
        if not parts:
            empty = torch.zeros(0)
            return positions, empty, empty, empty
        return (positions,) + tuple(torch.cat(p) for p in zip(*parts))

    def _forgotten_positions(self, batch: dict, student: Tensor) -> Tensor:
        """[B, T_out] bool: forgotten target positions whose target the student already puts
        ``forget_margin`` nats below its most likely other token (no gradient; a few rows of logits)."""
        positions, target_logit, best_other, _ = self._forgotten_target_logits(batch, student)
        done = torch.zeros_like(positions)
        # log-probabilities differ as the logits do: no softmax needed
        done[positions] = target_logit < best_other - self.config.forget_margin
        return done.to(batch["targets"].device)

    def _rows_at_target(self, batch: dict, student: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Two [B] bools (forget_target="matched"; no gradient): the forgotten rows whose mean target
        loss under the student has reached the row's ``loss_target``, and those of them that have gone
        past its band (:data:`MATCHED_BAND`: above target + max(band × target, band_floor) nats); and
        that mean loss per row ([B] float64 on the CPU; 0 for a row without forgotten targets)."""
        positions, target_logit, _, lse = self._forgotten_target_logits(batch, student)
        per_position = torch.zeros(positions.shape, dtype=torch.float64)
        per_position[positions] = (lse - target_logit).double()
        counts = positions.sum(1)
        mean = per_position.sum(1) / counts.clamp(min=1)
        target = batch["loss_target"].cpu()
        rows = batch["forget"].cpu() & (counts > 0)
        reached = rows & (mean >= target)
        share, floor = MATCHED_BAND
        past = reached & (mean > target + torch.clamp(share * target, min=floor))
        device = batch["targets"].device
        return reached.to(device), past.to(device), mean

    def _forget_kl_coef(self, batch: dict, rows_used: Tensor, kl_weight: Optional[Tensor]) -> float:
        """The forget KL's weight as the loss head applied it: ``forget_kl_weight`` times the share of
        the batch's forgotten KL positions where the sharpening guard kept the term (NaN: none)."""
        positions = (batch["kl_mask"] & batch["forget"].unsqueeze(1).expand_as(batch["kl_mask"])).cpu()
        if not bool(positions.any()):
            return float("nan")
        weight = float(self.config.forget_kl_weight)
        if not weight or kl_weight is None:
            return weight
        full = torch.zeros(rows_used.shape, dtype=torch.float32)
        full[rows_used.cpu()] = kl_weight.float().cpu()
        kept = (full[positions] != 0).double().mean()
        return float(weight * kept)
