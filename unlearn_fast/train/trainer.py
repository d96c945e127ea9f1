"""The thin trainer: AdamW over the unlearning layers only, warmup + linear decay, clipping.

Two schedules: ``alternate`` (the paper's: each epoch is one pass over the retained rows, then
one pass over the forgotten rows) and ``mixed`` (every batch holds up to ``batch_size`` retained
rows and ``batch_size`` forgotten rows, the smaller set cycled; an epoch is one pass over the
larger set).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import TrainingError, UnlearnFastError
from ..model.fused_trunk import fused_trunk
from ..model.grad_checkpoint import checkpointed_blocks
from ..model.layers import block_lists, sites, unlearning_parameters
from ..ops.backend import BACKENDS, ENV_VAR
from ..ops.loss_head import reused_logit_buffers
from . import checkpoint
from .batching import batches, count_steps
from .distributed import DataParallel, all_gather_floats, count_index, is_main, split_rows, term_counts
from .encoding import Row, collate, token_count
from .objective import TERMS, EULObjective
from .reporting import check_reporter, reporting, start_step, step_values
from .routes import ForgetRoutes
from .step_cache import teacher_cache_mode

SCHEDULES = ("alternate", "mixed")
# AdamW moves every weight by about lr on each step, whatever the gradient's scale: above 1 a weight moves
# by more than its own typical size (O(1/sqrt(d)) to O(1)) every step. Usual values: 1e-5 to 1e-2.
MAX_LR = 1.0
# weights beyond this are damage, not learning: trained unlearning-layer weights are O(0.01 to 1), and
# 1e4 times activations of O(10) already overflows fp16 (max 65504). Full-model baselines may start
# with larger weights: their limit is 10x their largest initial weight when that is higher.
WEIGHT_LIMIT = 1e4
# steps after which the trainer logs its estimate of the time left (the first steps pay one-off costs)
ESTIMATE_AFTER = 3


@dataclass
class TrainConfig:
    """Optimisation settings. ``max_steps`` (if set) stops training early."""

    epochs: int = 3
    schedule: str = "mixed"
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    max_steps: Optional[int] = None
    progress: bool = True
    # where the teacher's per-row outputs (and the replayed trunk) are kept: gpu (the training device),
    # cpu (pinned with CUDA), disk (a memory-mapped temporary file) or off (the teacher runs every
    # step); see unlearn_fast.train.step_cache. True / False mean gpu / off. Same losses in every mode.
    teacher_cache: str = "gpu"
    shared_trunk: bool = True
    bucket_by_length: bool = True
    backend: str = "auto"
    # checkpoints (see unlearn_fast.train.checkpoint): every ``checkpoint_every`` steps (0: only after
    # the last step) into ``checkpoint_dir``; ``resume`` continues from the newest one there
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    resume: bool = False
    # FSDP2-shard the frozen base over the ranks (see unlearn_fast.train.distributed)
    shard_base: bool = False
    # torch.compile each transformer block's forward while training (see compiled_blocks)
    compile_blocks: bool = False
    # run the frozen trunk's RMSNorms and SwiGLU products through the fused ops (see fused_trunk)
    fused_trunk: bool = True
    # recompute the activations of the blocks above the lowest unlearning layer in the backward pass
    # instead of keeping them (see unlearn_fast.model.grad_checkpoint); same losses, less memory
    gradient_checkpointing: bool = False
    # micro-batches per optimiser step: each step takes ``batch_size * accumulate`` rows (per set in
    # the mixed schedule) and runs them ``batch_size`` at a time; the update is the larger batch's
    accumulate: int = 1
    # per-step figures for tensorboard or wandb (see unlearn_fast.train.reporting), into report_dir
    # (default: runs/unlearn-<timestamp>)
    report_to: str = "none"
    report_dir: Optional[str] = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UnlearnFastError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UnlearnFastError("epochs and batch size must be ≥ 1")
        if self.accumulate < 1:
            raise UnlearnFastError(f"gradient accumulation must be ≥ 1 micro-batch per step, got {self.accumulate}")
        if not 0 < self.lr <= MAX_LR:  # also refuses NaN and infinity
            raise UnlearnFastError(f"learning rate must be > 0 and at most {MAX_LR:g} (AdamW moves every weight "
                                   f"by about lr per step; usual values are 1e-5 to 1e-2), got {self.lr}")
        if not 0 <= self.weight_decay * self.lr < 1:  # AdamW scales the weights by 1 - lr * weight decay
            raise UnlearnFastError(f"weight decay must be ≥ 0 and below 1 / lr, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio <= 1:
            raise UnlearnFastError(f"warmup ratio must be between 0 and 1, got {self.warmup_ratio}")
        if not self.max_grad_norm > 0:
            raise UnlearnFastError(f"gradient clipping norm must be > 0, got {self.max_grad_norm}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UnlearnFastError(f"max steps must be ≥ 1, got {self.max_steps}")
        if self.backend not in BACKENDS:
            raise UnlearnFastError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)
        if self.checkpoint_every < 0:
            raise UnlearnFastError(f"checkpoint interval must be ≥ 0 steps, got {self.checkpoint_every}")
        if self.resume and not self.checkpoint_dir:
            raise UnlearnFastError("resume needs a checkpoint directory (--checkpoint-dir)")
        self.teacher_cache = teacher_cache_mode(self.teacher_cache)
        check_reporter(self.report_to)  # a missing package is said now, before anything is loaded
        if self.report_dir is not None:
            self.report_dir = str(self.report_dir)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    update_time_s: float
    tokens: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0  # steps loaded from a checkpoint
    earlier_time_s: float = 0.0  # update time of the interrupted run(s), included in update_time_s
    earlier_rank_time_s: float = 0.0  # the same summed over their ranks
    damage: Optional[str] = None  # why training stopped early under allow_damage (see train)


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, enabled: bool = True):
    """Run each transformer block's forward through ``torch.compile`` inside the block (fuses the
    frozen trunk's norms, rotary embeddings and activations around the unlearning-layer ops).
    The first steps pay the compilation (minutes on a CPU); the blocks are restored on exit."""
    if not enabled:
        yield
        return
    blocks = [block for _, stack in block_lists(model) for block in stack]
    for block in blocks:
        block.forward = torch.compile(block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute; the class's forward is back


def largest_weight(tensors) -> float:
    """The largest |value| over ``tensors`` (NaN if any value is NaN, inf if any is infinite)."""
    peaks = [t.detach().abs().amax().float() for t in tensors if t.numel()]
    return float(torch.stack([p.to(peaks[0].device) for p in peaks]).max()) if peaks else 0.0


def weight_damage(tensors, limit: float = WEIGHT_LIMIT) -> Optional[str]:
    """What makes these weights unusable (non-finite values, or some |w| above ``limit``), or None."""
    largest = largest_weight(tensors)
    if not math.isfinite(largest):
        return "the weights hold NaN or infinite values"
    if largest > limit:
        return f"the largest weight is {largest:.3g} (limit {limit:g})"
    return None


def train(model: nn.Module, objective: EULObjective, forget: Sequence[Row], retain: Sequence[Row],
          config: TrainConfig, pad_id: int, params: Optional[Sequence[nn.Parameter]] = None, *,
          allow_damage: bool = False, log=None, routes: Optional[ForgetRoutes] = None) -> TrainResult:
    """Train the model's unlearning layers on the EUL objective; the base stays frozen.

    ``objective`` is any callable batch → (loss, terms dict) (the baselines of
    :mod:`unlearn_fast.eval.baselines` pass theirs). ``params`` (default: the unlearning layers'
    parameters) are what the optimiser updates; the caller makes them require grad.
    Under ``torch.distributed`` (world size > 1) each rank trains on its share of every global
    batch and the gradients are all-reduced (see :mod:`unlearn_fast.train.distributed`); with
    ``config.checkpoint_dir`` checkpoints are saved, and ``config.resume`` continues from the
    newest (see :mod:`unlearn_fast.train.checkpoint`).
    With ``config.compile_blocks`` the blocks run compiled (see :func:`compiled_blocks`); with
    ``config.fused_trunk`` (the default) Llama-family norms and MLP products run the fused trunk
    ops (see :mod:`unlearn_fast.model.fused_trunk`); with ``config.gradient_checkpointing`` the blocks
    above the lowest unlearning layer recompute their activations in the backward pass (see
    :mod:`unlearn_fast.model.grad_checkpoint`); with ``config.accumulate = N`` each step runs N
    micro-batches of ``batch_size`` rows and makes the update of one N times larger batch.
    Raises TrainingError (before anything is written) if the loss becomes NaN or infinite, or the
    trained weights do (:func:`weight_damage`, checked after every step); with ``allow_damage``
    training stops there instead and the result's ``damage`` says why.
    With ``log`` (a print-like callable): one line before the first step says what trains and for how
    many steps (:func:`training_line`), and one after :data:`ESTIMATE_AFTER` steps the time left.
    With ``config.report_to`` (``tensorboard`` / ``wandb``) every step's loss, terms, learning rate,
    tokens/s and memory go to ``config.report_dir`` (see :mod:`unlearn_fast.train.reporting`; rank 0).
    With ``routes`` (:class:`~unlearn_fast.train.routes.ForgetRoutes`) the student's detours to a forgotten
    answer are looked for at the start of every epoch after the first (and of a resumed run) and train
    with their forgotten rows.
    """
    with compiled_blocks(model, config.compile_blocks), fused_trunk(model, config.fused_trunk), \
            checkpointed_blocks(model, config.gradient_checkpointing), reused_logit_buffers(), \
            reporting(config.report_to, config.report_dir, config.to_dict(), is_main(), log) as reporter:
        return _train(model, objective, forget, retain, config, pad_id, params, allow_damage, log, reporter, routes)


def _train(model, objective, forget, retain, config: TrainConfig, pad_id: int, params,
           allow_damage: bool, log=None, reporter=None, routes=None) -> TrainResult:
    torch.manual_seed(config.seed)
    params = unlearning_parameters(model) if params is None else list(params)
    if not params:
        raise UnlearnFastError("the model has no unlearning layers to train")
    device = params[0].device
    limit = max(WEIGHT_LIMIT, 10 * largest_weight(params))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = count_steps(forget, retain, config)
    per_epoch = sum(1 for _ in batches(forget, retain, config)) // config.epochs if routes is not None else 0
    warmup = int(math.ceil(config.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
    history, tokens = [], 0
    dp = DataParallel.current(params, retain, forget, objective)  # None in one process
    if dp is not None:
        dp.broadcast_parameters()
    first, earlier, earlier_ranks, key = 0, 0.0, 0.0, None
    if config.checkpoint_dir:
        key = checkpoint.run_key(config, total, params, forget, retain)
        found = checkpoint.latest(config.checkpoint_dir) if config.resume else None
        if found is not None:
            saved = checkpoint.restore(found, params, optimizer, scheduler, key)
            first, history, tokens = saved["step"], saved["progress"]["history"], saved["progress"]["tokens"]
            earlier, earlier_ranks = saved["progress"]["update_time_s"], saved["progress"]["rank_time_s"]
    if log is not None:
        log(training_line(model, params, total - first, config))
    progress = _progress(total, config.progress and (dp is None or dp.rank == 0))
    progress.update(first)
    resumed_tokens = tokens
    model.train(False)  # dropout off: teacher and student must see the same function
    start = time.perf_counter()
    damage = None
    for step, group in enumerate(batches(forget, retain, config)):
        if step >= total:
            break
        if step < first:  # finished before the checkpoint we resumed from
            continue
        if routes is not None and step > 0 and (step % per_epoch == 0 or step == first):
            new = routes.refresh(model)
            if log is not None and new:
                with _above_bar(progress):
                    log(f"forget routes: {new} new at step {step + 1} ({len(routes)} in all)")
        if routes is not None:
            group = routes.expand(group)
        if reporter is not None:
            step_start = time.perf_counter()
            start_step(device)
        rows, counted = (group, True) if dp is None else dp.share(group)
        # with several ranks or micro-batches, each term is normalised by its positions in the whole
        # group (the global batch): the parts' gradients then add up to the whole batch's
        global_counts = term_counts(group) if dp is not None or config.accumulate > 1 else None
        optimizer.zero_grad(set_to_none=True)
        loss, terms, step_tokens = _accumulate(objective, rows, counted, group, global_counts, config,
                                               pad_id, device)
        if dp is None:
            value = loss.item()
            if not math.isfinite(value):
                damage = _not_finite(value, step, terms)
                break
        else:  # gradients, loss and term sums of all ranks, in one all-reduce
            value, terms, step_tokens = dp.reduce(loss, terms, rows, group, counted, global_counts)
            if not math.isfinite(value):
                damage = _not_finite(value, step, terms)
                break
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # this step's
        optimizer.step()
        scheduler.step()
        tokens += step_tokens
        elapsed = time.perf_counter() - start
        record = {"step": step + 1, "loss": value, **terms}
        history.append(record)
        if reporter is not None:
            reporter.log(step + 1, step_values(value, terms, lr, step_tokens, time.perf_counter() - step_start,
                                               device))
        found = weight_damage(params, limit)
        if found is not None:  # stop before a checkpoint keeps the damaged weights
            damage = f"the weights left the sane range at step {step + 1}: {found}"
            break
        if config.checkpoint_dir and (step + 1 == total or
                                      (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)):
            rank_time = earlier_ranks + (sum(all_gather_floats(elapsed)) if dp is not None else elapsed)
            if dp is None or dp.rank == 0:
                checkpoint.save(config.checkpoint_dir, step + 1, params, optimizer, scheduler, key,
                                {"history": history, "tokens": tokens, "update_time_s": earlier + elapsed,
                                 "rank_time_s": rank_time, "world_size": 1 if dp is None else dp.world})
        progress.update(1)
        if log is not None and step + 1 - first == ESTIMATE_AFTER and step + 1 < total:
            per_step, left = elapsed / ESTIMATE_AFTER, total - step - 1
            with _above_bar(progress):
                log(f"{per_step:.2f} s per step over the first {ESTIMATE_AFTER} steps: about "
                    f"{_duration(per_step * left)} left for the other {left}")
        progress.set_postfix({"loss": f"{record['loss']:.3f}",
                              **{k: f"{terms[k]:.3f}" for k in TERMS if not math.isnan(terms[k])},
                              "tok/s": f"{(tokens - resumed_tokens) / elapsed:.0f}"})
    progress.close()
    if damage is not None and not allow_damage:
        raise TrainingError(f"{damage}; nothing was written. Try a lower learning rate (--lr), or pass "
                            "--allow-damage (allow_damage=True) to write the result anyway.")
    return TrainResult(len(history), earlier + time.perf_counter() - start, tokens, history,
                       resumed_from=first, earlier_time_s=earlier, earlier_rank_time_s=earlier_ranks,
                       damage=damage)


def _accumulate(objective, rows: Sequence[Row], counted: bool, group: Sequence[Row], global_counts,
                config: TrainConfig, pad_id: int, device) -> tuple[torch.Tensor, dict, int]:
    """Forward and backward of this rank's ``rows`` in ``config.accumulate`` micro-batches (split as
    :func:`~unlearn_fast.train.distributed.split_rows` splits a global batch over ranks); the
    gradients add up in ``.grad``. Returns the summed loss (detached), the terms over all the rows
    and their tokens.

    Terms normalised by ``global_counts`` (the EUL objective's), or by the counts an objective's
    ``group_counts(group)`` gives (passed as ``batch["group_counts"]``; the baselines'), make each
    micro-batch's loss its part of the whole batch's; another objective's micro-batch means are averaged. Under ``shard_base``
    every rank runs all its micro-batches, an empty one as a zero-weight forward of a borrowed row
    (the sharded forwards must run in lockstep); otherwise empty ones are skipped."""
    micros = [split_rows(rows, config.accumulate, i) for i in range(config.accumulate)]
    micros = micros if config.shard_base else [m for m in micros if m]
    scale = 1.0 if getattr(objective, "global_normalisers", False) else 1.0 / len(micros)
    # an objective with its own normalisers (the baselines') counts them on the whole group
    counts_of = getattr(objective, "group_counts", None)
    group_counts = counts_of(group) if global_counts is not None and counts_of is not None else None
    total, parts, tokens, terms = None, [], 0, {}
    for micro in micros:
        live = counted and bool(micro)
        micro = micro or [group[0]]
        batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
        if global_counts is not None:
            batch["term_counts"] = global_counts
        if group_counts is not None:
            batch["group_counts"] = group_counts
        with forced_backend(config.backend):
            loss, terms = objective(batch, micro)
        loss = loss * scale if scale != 1.0 else loss
        (loss if live else loss * 0).backward()
        part = loss.detach() if live else loss.detach() * 0
        total = part if total is None else total + part
        if live:
            parts.append((terms, micro))
            tokens += token_count(batch)
    return total, (_combine_terms(parts) if len(parts) > 1 else terms), tokens


def _combine_terms(parts: Sequence[tuple[dict, Sequence[Row]]]) -> dict:
    """Each term's mean over all the micro-batches: an EUL term weighted by its positions in each
    (:func:`~unlearn_fast.train.distributed.term_counts`), another figure averaged; NaN where absent."""
    counts = [term_counts(rows).double() for _, rows in parts]
    out = {}
    for name in parts[0][0]:
        index = count_index(name)
        values = [(terms[name], float(c[index]) if index is not None else 1.0)
                  for (terms, _), c in zip(parts, counts)]
        values = [(v, n) for v, n in values if n and not math.isnan(v)]
        weight = sum(n for _, n in values)
        out[name] = sum(v * n for v, n in values) / weight if weight else float("nan")
    return out


def training_line(model: nn.Module, params: Sequence[nn.Parameter], steps: int, config: TrainConfig) -> str:
    """One line on what trains: the parameter count, which parameters, and the steps."""
    n = sum(p.numel() for p in params)
    everything = sum(p.numel() for p in model.parameters())
    ids = {id(p) for p in params}
    if ids <= {id(p) for p in unlearning_parameters(model)}:
        trained = [s for s in sites(model) if any(id(p) in ids for p in s.layers.parameters())]
        blocks = sorted({s.block for s in trained})
        shown = ", ".join(map(str, blocks)) if len(blocks) < 6 else f"{blocks[0]}-{blocks[-1]}"
        which = f"the unlearning layers at {len(trained)} site(s) (blocks {shown}); the base stays frozen"
    elif n >= everything:
        which = "every weight of the model (full-parameter)"
    else:
        which = f"{len(params)} weight tensors, {100 * n / max(everything, 1):.1f} % of the model's weights"
    return (f"training {n:,} parameters: {which}; {steps} steps ({config.epochs} epoch(s), batch {config.batch_size}, "
            f"{config.schedule} schedule)")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


@contextlib.contextmanager
def _above_bar(progress):
    """Print above a live progress bar without breaking it."""
    if getattr(progress, "disable", True):
        yield
    else:
        with type(progress).external_write_mode():
            yield


def _not_finite(value: float, step: int, terms: dict) -> str:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    return f"the loss became {value} at step {step + 1} ({shown})"


@contextlib.contextmanager
def forced_backend(name: str):
    """Run with ``UNLEARN_FAST_BACKEND=name`` (``auto`` leaves the environment as it is)."""
    if name == "auto":
        yield
        return
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = previous


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="unlearning", unit="step", disable=not enabled, dynamic_ncols=True)
