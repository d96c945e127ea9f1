"""Whole EUL training steps, four ways, for the CPU suite and the GPU script.

- ``naive``: what a plain transformers/PyTorch loop does — a teacher forward without grad and a
  student forward, both to full-vocabulary logits, the KL / CE terms on them, backward, AdamW;
- ``reference``: this package's objective on the pure-PyTorch ops (chunked loss head);
- ``fused``: the same on the fused ops (C++ on CPU, Triton on GPU), the frozen trunk's RMSNorms
  and SwiGLU products included (:func:`unlearn_fast.model.fused_trunk.fused_trunk`, as the trainer runs);
- ``fused+cache``: fused, with the step cache warm (teacher states and frozen trunk stored);
- ``fused+cache+compile`` (optional, not in ``MODES``): fused+cache with each transformer block
  run through ``torch.compile`` (:func:`unlearn_fast.train.trainer.compiled_blocks`; the warm-up step
  pays the compilation).

All modes compute the same loss (``naive`` on materialised logits). One step = 8 rows × ``length``
tokens: half forgotten, half retained, every position a target.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from unlearn_fast.train.encoding import Row, collate
from unlearn_fast.model.fused_trunk import fused_trunk
from unlearn_fast.model.layers import LayerConfig, attach, layers_disabled, unlearning_parameters
from unlearn_fast.train.objective import EULObjective, ObjectiveConfig, coefficients
from unlearn_fast.ops.loss_head import IGNORE_INDEX, reused_logit_buffers, row_losses
from unlearn_fast.train.step_cache import StepCache
from unlearn_fast.train.trainer import compiled_blocks, forced_backend

MODES = ("naive", "reference", "fused", "fused+cache")
ALL_MODES = MODES + ("fused+cache+compile",)


def make_rows(vocab: int, rows: int = 8, length: int = 128, seed: int = 0) -> list[Row]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        targets = ids[1:] + [IGNORE_INDEX]
        out.append(Row(ids, targets, [t != IGNORE_INDEX for t in targets], forget=i < rows // 2))
    return out


def naive_loss(model, batch: dict, config: ObjectiveConfig, gamma: float) -> torch.Tensor:
    """EUL's loss from full fp32 logits, the way an unfused loop computes it."""
    with torch.no_grad(), layers_disabled(model):
        teacher = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    kl_coef, ce_coef = (c.to(student.device) for c in coefficients(batch, config, gamma))
    log_s = torch.log_softmax(student, -1)
    log_t = torch.log_softmax(teacher, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    targets = batch["targets"]
    pick = targets.clamp(min=0).unsqueeze(-1)
    ce = -log_s.gather(-1, pick).squeeze(-1) * (targets != IGNORE_INDEX)
    if config.sharpening_guard:  # the objective's default (T = 1 here): drop the forget KL where the student is sharper
        sharper = (log_s.gather(-1, pick) > log_t.gather(-1, pick)).squeeze(-1)
        kl_coef = torch.where((kl_coef < 0) & (targets != IGNORE_INDEX) & sharper, torch.zeros_like(kl_coef), kl_coef)
    return row_losses(kl, ce, kl_coef, ce_coef, config.forget_kl_bound, config.forget_lm_bound).sum()


@dataclass
class StepRunner:
    """One model with unlearning layers, an optimizer, and a step function per mode."""

    model: torch.nn.Module
    rows: list[Row]
    mode: str
    # the bounded objective with the guard (naive_loss's formula); the forget margin and the retained-output
    # penalty (issue 27's defaults) are left out of this speed comparison
    config: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(forget_margin=None,
                                                                            retain_output_weight=0.0))
    fused_trunk: bool = True  # False: a fused mode without the fused trunk ops (to measure what they buy)

    def __post_init__(self):
        if self.mode not in ALL_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; one of {', '.join(ALL_MODES)}")
        self.device = next(self.model.parameters()).device
        self.batch = {k: v.to(self.device) for k, v in collate(self.rows, 0).items()}
        self.optimizer = torch.optim.AdamW(unlearning_parameters(self.model), lr=1e-4)
        self._contexts = contextlib.ExitStack()  # the compiled blocks, restored by close()
        if self.mode.endswith("+compile"):
            self._contexts.enter_context(compiled_blocks(self.model))
        if self.mode != "naive":  # as the trainer does: one logit buffer for every step
            self._contexts.enter_context(reused_logit_buffers())
        cache = StepCache(self.model, "causal") if self.mode.startswith("fused+cache") else None
        self.objective = EULObjective(self.model, "causal", self.config, cache)
        self.tokens = int(self.batch["attention_mask"].sum())
        if cache is not None:  # warm the cache: the first epoch fills it
            with self._trunk():
                self.objective(self.batch, self.rows)

    @property
    def label(self) -> str:
        return self.label_of(self.mode, self.fused_trunk)

    @staticmethod
    def label_of(mode: str, fused_trunk: bool) -> str:
        trunk_off = mode.startswith("fused") and not fused_trunk
        return f"{mode} (no fused trunk)" if trunk_off else mode

    def _trunk(self):
        """The fused trunk for the fused modes, switched on per step: interleaved runners share one model."""
        return fused_trunk(self.model, enabled=self.fused_trunk and self.mode.startswith("fused"))

    def step(self) -> float:
        backend = "reference" if self.mode == "reference" else "auto"
        with forced_backend(backend), self._trunk():
            if self.mode == "naive":
                loss = naive_loss(self.model, self.batch, self.config, self.objective.gamma)
            else:
                loss, _ = self.objective(self.batch, self.rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def close(self) -> None:
        """Undo what the mode changed on the shared model (compiled blocks)."""
        self._contexts.close()


def prepare(model, rank: int = 32, blocks="all", seed: int = 0):
    """Attach one unlearning layer per selected block, with a non-zero up-projection so the
    student differs from the teacher as it does after the first steps."""
    torch.manual_seed(seed)
    attach(model, LayerConfig(rank=rank, blocks=blocks))
    with torch.no_grad():
        for p in unlearning_parameters(model):
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 1e-3)
    return model


def time_steps(runner: StepRunner, steps: int, sync=lambda: None) -> dict:
    """Seconds per step over ``steps`` steps after a warm-up step, whose loss is kept as ``first_loss``
    (runners started from the same layer weights must agree on it)."""
    first_loss = runner.step()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    return {"mode": runner.label, "s_per_step": seconds, "tokens_per_s": runner.tokens / seconds,
            "tokens": runner.tokens, "first_loss": first_loss}


def time_interleaved(runners: list[StepRunner], steps: int, sync=lambda: None) -> list[dict]:
    """One step of each runner in turn, ``steps`` times (after one warm-up step each): the modes
    share the machine's load, so their ratio holds where absolute times drift. Medians and minima;
    closes the runners."""
    import statistics

    times = {id(r): [] for r in runners}
    try:
        for r in runners:
            r.step()
        for _ in range(steps):
            for r in runners:
                sync()
                start = time.perf_counter()
                r.step()
                sync()
                times[id(r)].append(time.perf_counter() - start)
    finally:
        for r in runners:
            r.close()
    out = []
    for r in runners:
        median = statistics.median(times[id(r)])
        out.append({"mode": r.label, "s_per_step": median, "s_min": min(times[id(r)]),
                    "s_all": times[id(r)], "tokens_per_s": r.tokens / median, "tokens": r.tokens})
    return out
