"""The thin trainer: AdamW over the unlearning layers only, warmup + linear decay, clipping.

Two schedules: ``alternate`` (the paper's: each epoch is one pass over the retained rows, then
one pass over the forgotten rows) and ``mixed`` (every batch holds up to ``batch_size`` retained
rows and ``batch_size`` forgotten rows, the smaller set cycled; an epoch is one pass over the
larger set).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .encoding import Row, collate, pad_token_id, token_count
from .errors import TrainingError, UnlearnFastError
from .layers import unlearning_parameters
from .objective import TERMS, EULObjective
from .ops.backend import BACKENDS, ENV_VAR

SCHEDULES = ("alternate", "mixed")


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
    teacher_cache: bool = True
    shared_trunk: bool = True
    bucket_by_length: bool = True
    backend: str = "auto"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UnlearnFastError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UnlearnFastError("epochs and batch size must be ≥ 1")
        if not self.lr > 0:
            raise UnlearnFastError(f"learning rate must be > 0, got {self.lr}")
        if self.backend not in BACKENDS:
            raise UnlearnFastError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    update_time_s: float
    tokens: int
    history: list[dict] = field(default_factory=list)


def _length(row: Row) -> int:
    return len(row.input_ids) + len(row.decoder_input_ids or ())


def _chunks(rows: Sequence[Row], size: int, rng: random.Random, bucket: bool = False) -> list[list[Row]]:
    """Shuffled batches; with ``bucket``, rows of similar length share a batch (less padding):
    rows are sorted by length inside shuffled windows of 16 batches, and the batches shuffled."""
    order = list(rows)
    rng.shuffle(order)
    if not bucket:
        return [order[i:i + size] for i in range(0, len(order), size)]
    window = 16 * size
    groups = []
    for w in range(0, len(order), window):
        part = sorted(order[w:w + window], key=_length)
        groups += [part[i:i + size] for i in range(0, len(part), size)]
    rng.shuffle(groups)
    return groups


def padding_fraction(groups: Sequence[Sequence[Row]]) -> float:
    """Share of the token slots in padded batches that are padding."""
    real = sum(_length(r) for g in groups for r in g)
    slots = sum(len(g) * max(len(r.input_ids) for r in g) + len(g) * max(len(r.decoder_input_ids or ()) for r in g)
                for g in groups)
    return 1.0 - real / slots if slots else 0.0


def batches(forget: Sequence[Row], retain: Sequence[Row], config: TrainConfig) -> Iterator[list[Row]]:
    """Row groups in training order, for every epoch."""
    rng = random.Random(config.seed)
    for _ in range(config.epochs):
        if config.schedule == "alternate":
            yield from _chunks(retain, config.batch_size, rng, config.bucket_by_length)
            yield from _chunks(forget, config.batch_size, rng, config.bucket_by_length)
        else:
            big, small = (retain, forget) if len(retain) >= len(forget) else (forget, retain)
            small_groups = itertools.cycle(_chunks(small, config.batch_size, rng, config.bucket_by_length)) if small else None
            for group in _chunks(big, config.batch_size, rng, config.bucket_by_length):
                yield group + next(small_groups) if small_groups else group


def count_steps(forget: Sequence[Row], retain: Sequence[Row], config: TrainConfig) -> int:
    n = sum(1 for _ in batches(forget, retain, config))
    return min(n, config.max_steps) if config.max_steps else n


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train(model: nn.Module, objective: EULObjective, forget: Sequence[Row], retain: Sequence[Row],
          config: TrainConfig, pad_id: int) -> TrainResult:
    """Train the model's unlearning layers on the EUL objective; the base stays frozen.

    Raises TrainingError (before anything is written) if the loss becomes NaN or infinite.
    """
    torch.manual_seed(config.seed)
    params = unlearning_parameters(model)
    if not params:
        raise UnlearnFastError("the model has no unlearning layers to train")
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = count_steps(forget, retain, config)
    warmup = int(math.ceil(config.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
    progress = _progress(total, config.progress)
    history, tokens = [], 0
    model.train(False)  # dropout off: teacher and student must see the same function
    start = time.perf_counter()
    for step, group in enumerate(batches(forget, retain, config)):
        if step >= total:
            break
        batch = {k: v.to(device) for k, v in collate(group, pad_id).items()}
        with forced_backend(config.backend):
            loss, terms = objective(batch, group)
        if not torch.isfinite(loss):
            progress.close()
            shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
            raise TrainingError(f"the loss became {loss.item()} at step {step + 1} ({shown}); "
                                "nothing was written. Try a lower learning rate (--lr).")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        tokens += token_count(batch)
        elapsed = time.perf_counter() - start
        record = {"step": step + 1, "loss": loss.item(), **terms}
        history.append(record)
        progress.update(1)
        progress.set_postfix({"loss": f"{record['loss']:.3f}",
                              **{k: f"{terms[k]:.3f}" for k in TERMS if not math.isnan(terms[k])},
                              "tok/s": f"{tokens / elapsed:.0f}"})
    progress.close()
    return TrainResult(len(history), time.perf_counter() - start, tokens, history)


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
