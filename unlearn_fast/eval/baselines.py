"""Baselines to compare EUL with, through the same trainer, data interfaces and loss head.

Methods (``METHODS``; ``eul`` itself is :func:`unlearn_fast.api.unlearn`):

- ``retrain``: re-initialise the model from its config and train it on the retained data only — the
  gold standard. Only meaningful when the recipe (epochs, lr, batch size) is the one the original
  model was trained with, and only affordable for small models.
- ``finetune``: continue training on the retained data only (task loss); the forget set is never
  used (the paper's "fine-tune on retained data").
- ``ga``: gradient ascent on the forget set, L = −γ·mean CE_forget (the paper's "reverse gradient").
- ``graddiff``: gradient difference, L = −γ·mean CE_forget + α·mean CE_retain.
- ``npo``: negative preference optimisation (Zhang et al. 2024) as open-unlearning implements it:
  L = γ·(2/β)·mean_s softplus(β·(log π_θ(y_s|x_s) − log π_ref(y_s|x_s))) + α·mean CE_retain, sequence
  log-probs summed over the answer tokens, β = 0.1; α = 0 gives the original retain-free NPO.
  The reference π_ref is the model before unlearning, stored as one log-prob per forget row
  (computed once before training, so no second copy of the weights is kept).
- ``simnpo``: SimNPO (Fan et al. 2024) as open-unlearning implements it, reference-free and
  length-normalised: L = γ·(−2/β)·mean_s log σ(β·(ℓ_s − δ)) + α·mean CE_retain, ℓ_s the mean per-token
  CE of forget answer s, δ the margin (``simnpo_margin``).
- ``rmu``: representation misdirection (Li et al. 2024, WMDP; open-unlearning's RMU with the
  EMBED_DIFF retain loss): with h the output of block ``rmu_layer`` (default the middle block) at the
  answer tokens, L = γ·mean_s mean_t mean_d (h − c·u)² over forget rows + α·(the same against the
  original model's h) over retained rows; u a fixed random unit vector (uniform in [0, 1)^d,
  normalised, from the training seed), c the steering coefficient (``rmu_coefficient``). The original
  model's retained activations are computed once before training and cached (no second model).
  Causal LMs only; the blocks above ``rmu_layer`` never run while training.
- ``idk``: each forget answer is replaced by a refusal from :data:`REFUSALS` (chosen per prompt,
  deterministically, from the training seed) and L = γ·mean CE over the refusal tokens + α·mean
  CE_retain. Needs prompt/response forget examples on a causal or seq2seq model.

Means are over target tokens of each part of a batch (as in the EUL objective), so a batch with few
forget tokens weighs the forget term fully.

Which parameters train (``BaselineConfig.params``): ``"full"`` (default) updates every base weight, as
the paper's and open-unlearning's baselines do; ``"layers"`` trains EUL's unlearning layers instead
(same :class:`~unlearn_fast.model.layers.LayerConfig`, base frozen) — a cheaper adapter variant, labelled
``<method>-layers`` in reports. ``retrain`` is always full.

GA and GradDiff are unbounded in the papers (the forget CE grows without limit); ``forget_lm_bound``
optionally caps each forget token's CE as EUL's objective does (default: no cap).
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError, UnlearnFastError
from ..io.artifacts import BASELINE_FILE, DONE_FILES, check_writable, model_fingerprint, write_artifact
from ..io.atomic import atomic_directory
from ..model.family import detect_task
from ..model.layers import LayerConfig, attach, describe, layer_state, unlearning_parameters
from ..train import distributed
from ..train.checkpoint import data_fingerprint
from ..train.data import Example, load_examples
from ..train.encoding import Row, chat_template_record, check_chat_template_mode, encode, pad_token_id, truncation_note
from ..train.set_checks import check_overlap
from ..train.trainer import TrainConfig, TrainResult, train
from ..version import __version__
from .baseline_objectives import (
    CrossEntropyObjective, IdKObjective, NPOObjective, RMUObjective, SimNPOObjective, frozen_activations,
    idk_examples, rmu_block, rmu_control_vector, row_key
)
from .evaluation import row_losses

METHODS = ("eul", "retrain", "finetune", "ga", "graddiff", "npo", "simnpo", "rmu", "idk")
BASELINES = METHODS[1:]
PARAMS = ("full", "layers")
# RMU's steering coefficient c when none is given (open-unlearning's RMU class default; it depends on
# the model's activation scale: the WMDP paper used 6.5 to 300)
RMU_COEFFICIENT = 20.0



@dataclass
class BaselineConfig:
    """A baseline and its loss weights: α on the retained term, γ on the forget term, β for NPO and
    SimNPO, SimNPO's margin δ, RMU's block (None: the middle one) and steering coefficient."""

    method: str = "graddiff"
    params: str = "full"
    alpha: float = 1.0
    gamma: float = 1.0
    beta: float = 0.1
    forget_lm_bound: Optional[float] = None
    layers: LayerConfig = field(default_factory=LayerConfig)
    simnpo_margin: float = 0.0
    rmu_layer: Optional[int] = None
    rmu_coefficient: float = RMU_COEFFICIENT

    def __post_init__(self):
        if self.method not in BASELINES:
            raise UnlearnFastError(f"baseline method must be one of {', '.join(BASELINES)}, got {self.method!r}")
        if self.params not in PARAMS:
            raise UnlearnFastError(f"params must be 'full' or 'layers', got {self.params!r}")
        if self.method == "retrain" and self.params != "full":
            raise UnlearnFastError("retrain trains a fresh model: it needs params='full'")
        if not self.beta > 0:
            raise UnlearnFastError(f"NPO beta must be > 0, got {self.beta}")
        if not math.isfinite(self.simnpo_margin):
            raise UnlearnFastError(f"SimNPO margin must be finite, got {self.simnpo_margin}")
        if self.rmu_layer is not None and self.rmu_layer < 0:
            raise UnlearnFastError(f"RMU layer must be ≥ 0, got {self.rmu_layer}")
        if not (math.isfinite(self.rmu_coefficient) and self.rmu_coefficient > 0):
            raise UnlearnFastError(f"RMU steering coefficient must be > 0, got {self.rmu_coefficient}")

    @property
    def label(self) -> str:
        return self.method if self.params == "full" else f"{self.method}-layers"

    def uses_forget(self) -> bool:
        return self.method in ("ga", "graddiff", "npo", "simnpo", "rmu", "idk")

    def uses_retain(self) -> bool:
        return self.method in ("retrain", "finetune") or (
            self.method in ("graddiff", "npo", "simnpo", "rmu", "idk") and self.alpha != 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = self.layers.to_dict()
        return d


@torch.no_grad()
def reference_logprobs(model: nn.Module, task: str, rows: Sequence[Row], pad_id: int,
                       batch_size: int = 16) -> dict[tuple, float]:
    """Summed target log-prob of each row under ``model`` as it is now (NPO's frozen reference)."""

    was = model.training
    model.eval()
    try:
        losses = row_losses(model, task, rows, pad_id, batch_size)
    finally:
        model.train(was)
    return {row_key(r.input_ids, r.targets): -total for r, (total, _) in zip(rows, losses)}


def build_objective(model: nn.Module, task: str, config: BaselineConfig,
                    forget_rows: Sequence[Row] = (), pad_id: int = 0, retain_rows: Sequence[Row] = (),
                    seed: int = 0):
    """The loss callable of a baseline (NPO computes its reference log-probs here, before training, and
    RMU the original model's activations on ``retain_rows``; ``seed`` draws RMU's steering direction)."""
    m = config.method
    if m in ("retrain", "finetune"):
        return CrossEntropyObjective(model, task, alpha=1.0, gamma=0.0)
    if m == "ga":
        return CrossEntropyObjective(model, task, alpha=0.0, gamma=config.gamma, forget_lm_bound=config.forget_lm_bound)
    if m == "graddiff":
        return CrossEntropyObjective(model, task, alpha=config.alpha, gamma=config.gamma,
                                     forget_lm_bound=config.forget_lm_bound)
    if m == "npo":
        reference = reference_logprobs(model, task, forget_rows, pad_id)
        return NPOObjective(model, task, reference, alpha=config.alpha, gamma=config.gamma, beta=config.beta)
    if m == "simnpo":
        return SimNPOObjective(model, task, alpha=config.alpha, gamma=config.gamma, beta=config.beta,
                               margin=config.simnpo_margin)
    if m == "idk":
        return IdKObjective(model, task, alpha=config.alpha, gamma=config.gamma)
    if m == "rmu":
        if task != "causal":
            raise ModelError(f"RMU steers a decoder-only model's hidden states; this is a {task} model")
        _, block = rmu_block(model, config.rmu_layer)
        control = rmu_control_vector(model.config.hidden_size, config.rmu_coefficient, seed)
        frozen = frozen_activations(model, block, retain_rows, pad_id) if config.alpha != 0 else {}
        return RMUObjective(model, block, control, frozen, alpha=config.alpha, gamma=config.gamma)
    raise UnlearnFastError(f"unknown baseline {m!r}")


def trainable_parameters(model: nn.Module, config: BaselineConfig) -> list[nn.Parameter]:
    """Unfreeze and return what the baseline trains: every weight, or freshly attached unlearning layers."""
    if config.params == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return [p for p in model.parameters()]
    attach(model, config.layers)
    return unlearning_parameters(model)


def fresh_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A newly initialised model of the same class and config (for ``retrain``)."""
    torch.manual_seed(seed)
    fresh = model.__class__(model.config)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    return fresh.to(device=device, dtype=dtype).eval()


def encode_for_baseline(examples: Sequence[Example], tokenizer, task: str, model_config, forget: bool,
                        labels: Optional[Sequence[int]] = None, max_length: int = 256, name: str = "set",
                        chat_template: str = "auto") -> list[Row]:
    """Rows with plain targets on the answer / text / label for both sets (the forget flag set as asked).

    Unlike EUL's forget rows (whose seq2seq LM term uses the masked-word view), a baseline's forget
    rows carry the same targets as a retained example would: GA / NPO push exactly that likelihood down.
    """
    rows = encode(examples, tokenizer, task, forget=False, name=name, model_config=model_config,
                  labels=labels, max_length=max_length, chat_template=chat_template)
    for r in rows:
        r.forget = forget
    return rows


@dataclass
class BaselineResult:
    model: nn.Module
    training: TrainResult
    config: BaselineConfig
    metrics: dict = field(default_factory=dict)


def run_baseline(model: nn.Module, tokenizer, forget, retain, config: BaselineConfig,
                 training: Optional[TrainConfig] = None, *, max_length: int = 256, columns=None,
                 drop_overlap: bool = False, forget_labels: Optional[Sequence[int]] = None,
                 retain_labels: Optional[Sequence[int]] = None, allow_damage: bool = False,
                 log=print, chat_template: str = "auto") -> BaselineResult:
    """Run one baseline on ``model`` (in place, except ``retrain``, which returns a new model).

    ``forget`` / ``retain`` are anything :func:`unlearn_fast.train.data.load_examples` takes. For
    classification models, pass integer labels for the sets the method trains on. Rows are cut at
    ``max_length``, capped at the model's context (one logged line says how many were). A NaN loss
    or out-of-range weights raise TrainingError unless ``allow_damage`` (see
    :func:`unlearn_fast.train.trainer.train`); the damage is then in the metrics. ``chat_template``: how
    prompt/response rows are encoded (:func:`unlearn_fast.train.encoding.encode`); the metrics record it.

    Under torchrun (a process group of N > 1 ranks) every rank loads the same model and data and
    trains on its share of each global batch, the gradients summed (as EUL's; see
    :mod:`unlearn_fast.train.distributed`), ``params="full"`` and ``"layers"`` alike; rank 0 logs, and
    :func:`save_baseline` writes from rank 0.
    """
    training = training or TrainConfig()
    check_chat_template_mode(chat_template)
    if not distributed.is_main():  # under torchrun, rank 0 speaks for the job
        log = lambda *args, **kwargs: None  # noqa: E731
    task = detect_task(model)
    forget_set = load_examples(forget, columns, name="forget set")
    retain_set = load_examples(retain, columns, name="retain set")
    retain_set, dropped = check_overlap(forget_set, retain_set, drop=drop_overlap)
    if dropped:
        log(f"dropped {dropped} retained example(s) that are also in the forget set")
    if config.method in ("rmu", "idk") and task == "classification" or config.method == "rmu" and task != "causal":
        raise ModelError(f"{config.method} needs a causal LM{'' if config.method == 'rmu' else ' or seq2seq'} "
                         f"model; this is a {task} model")
    if config.method == "idk":
        forget_set = idk_examples(forget_set, training.seed)
    if task == "classification":
        if config.uses_forget() and forget_labels is None:
            raise ModelError(f"{config.method} on a classification model needs labels for the forget set")
        if config.uses_retain() and retain_labels is None:
            raise ModelError(f"{config.method} on a classification model needs labels for the retain set")
    enc = dict(model_config=model.config, max_length=max_length, chat_template=chat_template)
    forget_rows = encode_for_baseline(forget_set, tokenizer, task, forget=True, labels=forget_labels,
                                      name="forget set", **enc) if config.uses_forget() else []
    retain_rows = encode_for_baseline(retain_set, tokenizer, task, forget=False, labels=retain_labels,
                                      name="retain set", **enc) if config.uses_retain() else []
    note = truncation_note({"forget set": forget_rows, "retain set": retain_rows}, max_length, model.config, tokenizer)
    if note:
        log(note)
    pad = pad_token_id(tokenizer)
    if distributed.world_size() > 1:  # every rank must train the same model on the same rows
        distributed.check_same(model_fingerprint(model) + data_fingerprint(forget_rows, retain_rows),
                               "base model and data")
    if config.method == "retrain":
        model = fresh_copy(model, training.seed)
    torch.manual_seed(training.seed)  # the unlearning layers' initial weights (params="layers"), reproducibly
    params = trainable_parameters(model, config)
    objective = build_objective(model, task, config, forget_rows, pad, retain_rows, training.seed)
    result = train(model, objective, forget_rows, retain_rows, training, pad, params=params, allow_damage=allow_damage,
                   log=log)
    if result.damage:
        log(f"warning: {result.damage}; kept anyway (allow_damage)")
    for p in model.parameters():  # leave the model frozen, like a model after EUL
        p.requires_grad_(False)
    return BaselineResult(model.eval(), result, config,
                          {"update_time_s": result.update_time_s, "steps": result.steps,
                           "train_tokens": result.tokens,
                           "final_terms": result.history[-1] if result.history else {},
                           "damage": [result.damage] if result.damage else [],
                           "chat_template": chat_template_record(tokenizer, chat_template, task)})


BASELINE_MANIFEST = BASELINE_FILE  # io.artifacts knows it too: --overwrite may replace such a directory


def save_baseline(out, result: BaselineResult, tokenizer, *, base_fingerprint: str, model_name: str = "",
                  overwrite: bool = False, extra: Optional[dict] = None):
    """Write a baseline's result to ``out`` (atomically) and return the directory.

    ``params="layers"``: an unlearning artifact like EUL's (``load_layers`` / ``eval --layers`` attach
    it; it has no Gram matrices, so it cannot be fused). ``params="full"``: a whole model directory
    (``save_pretrained`` + tokenizer, loadable with ``--model DIR``) with ``baseline.json`` saying how
    it was made. Under torchrun, rank 0 writes once every rank has finished; every rank returns ``out``.
    """
    distributed.barrier()  # a rank that failed never gets here, and its peers fail in a collective
    written = _save_baseline(out, result, tokenizer, base_fingerprint, model_name, overwrite, extra) \
        if distributed.is_main() else None
    distributed.barrier()
    return Path(out) if written is None else written


def _save_baseline(out, result: BaselineResult, tokenizer, base_fingerprint: str, model_name: str,
                   overwrite: bool, extra: Optional[dict]):
    model, config = result.model, result.config
    record = {
        "package": {"name": "unlearn_fast", "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": config.label,
        "baseline": config.to_dict(),
        "base_model": {"name_or_path": model_name, "class": model.__class__.__name__,
                       "fingerprint": base_fingerprint,
                       "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "task": detect_task(model),
        "metrics": result.metrics,
        "damage": result.metrics.get("damage", []),  # what allow_damage let through; eval warns on it
        "chat_template": result.metrics.get("chat_template"),  # how prompt/response rows were encoded
        "update_time_s": result.training.update_time_s,
        # under torchrun: the ranks that trained it data parallel (see unlearn_fast.train.distributed)
        "distributed": {"world_size": distributed.world_size(), "backend": distributed.backend_name()},
        **(extra or {}),
    }
    if config.params == "layers":
        record["layers"] = {"config": config.layers.to_dict(), "sites": describe(model)}
        record["grams"] = None  # not collected for baselines: this artifact cannot be fused
        return write_artifact(out, layer_state(model), record, overwrite)
    out = check_writable(out, overwrite)
    with atomic_directory(out, done=DONE_FILES) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(tmp / BASELINE_MANIFEST, "w") as f:  # last: a temporary holding it is finished
            json.dump(record, f, indent=2, default=lambda v: None)
    return out
