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
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ModelError, UnlearnFastError
from ..io.artifacts import BASELINE_FILE, DONE_FILES, check_writable, write_artifact
from ..io.atomic import atomic_directory
from ..model.family import backbone, detect_task, output_head, output_states
from ..model.layers import LayerConfig, attach, block_lists, describe, layer_state, unlearning_parameters
from ..ops import eul_loss_head
from ..ops.loss_head import IGNORE_INDEX
from ..train.data import Example, load_examples
from ..train.set_checks import check_overlap
from ..train.encoding import Row, collate, encode, pad_token_id, truncation_note
from ..train.objective import TERMS
from ..train.trainer import TrainConfig, TrainResult, train
from ..version import __version__
from .evaluation import row_losses

METHODS = ("eul", "retrain", "finetune", "ga", "graddiff", "npo", "simnpo", "rmu", "idk")
BASELINES = METHODS[1:]
PARAMS = ("full", "layers")
# RMU's steering coefficient c when none is given (open-unlearning's RMU class default; it depends on
# the model's activation scale: the WMDP paper used 6.5 to 300)
RMU_COEFFICIENT = 20.0

# IdK's refusals: each forget answer becomes one of these (see idk_examples)
REFUSALS = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea.",
    "I can't answer that.",
    "I don't have that information.",
    "That's something I don't know.",
    "I'm afraid I can't help with that.",
    "I'm not able to answer that.",
    "Sorry, I don't know the answer.",
    "I have no information about that.",
    "I couldn't tell you.",
    "That I don't know.",
    "I'm unable to say.",
    "I don't know the answer to that.",
    "I really can't say.",
    "No idea, sorry.",
    "I'm not certain, so I won't guess.",
    "I don't have an answer for that.",
    "I can't say for sure.",
    "That's beyond what I know.",
)


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


def _weighted(mask: Tensor, weight: float) -> Tensor:
    n = int(mask.sum())
    return mask.float() * (weight / n) if (n and weight) else torch.zeros(mask.shape, device=mask.device)


def _terms(**values: float) -> dict[str, float]:
    """Terms for the trainer's log: every EUL term name present (NaN where absent) plus extras."""
    out = {k: math.nan for k in TERMS}
    out.update(values)
    return out


class _HeadObjective:
    """Shared plumbing: states of the model, the frozen (or trained) head, the chunked loss head."""

    def __init__(self, model: nn.Module, task: str):
        self.model = model
        self.task = task
        self.head = output_head(model, task)

    def _head(self, states: Tensor, targets: Tensor, coef: Tensor, bound: float) -> Any:
        device = states.device
        n = targets.shape[0]
        return eul_loss_head(states, None, self.head.weight, targets.to(device), torch.zeros(n, device=device),
                             coef.to(device), bias=self.head.bias, ce_bound=bound,
                             logit_scale=self.head.logit_scale, logit_softcap=self.head.logit_softcap)


class CrossEntropyObjective(_HeadObjective):
    """L = α·mean CE over retained target tokens − γ·mean CE over forgotten ones.

    ``retrain`` / ``finetune``: (α, γ) = (1, 0); ``ga``: (0, γ); ``graddiff``: (α, γ). The loss
    decreases as the retained CE falls and the forget CE rises (the sign tests/test_baselines.py checks).
    """

    def __init__(self, model: nn.Module, task: str, alpha: float, gamma: float,
                 forget_lm_bound: Optional[float] = None):
        super().__init__(model, task)
        self.alpha, self.gamma = alpha, gamma
        self.bound = math.inf if forget_lm_bound is None else forget_lm_bound

    def coefficients(self, batch: dict) -> Tensor:
        has_target = batch["targets"] != IGNORE_INDEX
        forget = batch["forget"].unsqueeze(1).expand_as(has_target)
        return _weighted(has_target & ~forget, self.alpha) - _weighted(has_target & forget, self.gamma)

    def __call__(self, batch: dict, rows: Optional[Sequence[Row]] = None) -> tuple[Tensor, dict[str, float]]:
        coef = self.coefficients(batch)
        used = (coef != 0).cpu()
        if not used.any():
            raise UnlearnFastError("a batch has no target tokens that this baseline trains on")
        states = output_states(self.model, self.task, batch)
        out = self._head(states[used.to(states.device)], batch["targets"][used.to(batch["targets"].device)],
                         coef.cpu()[used], self.bound)
        ce = out.ce.cpu()
        forget = batch["forget"].cpu().unsqueeze(1).expand_as(used)[used]
        return out.loss, _terms(task_loss=float(ce[~forget].mean()) if (~forget).any() else math.nan,
                                forget_lm_loss=float(ce[forget].mean()) if forget.any() else math.nan)


def _row_key(input_ids: Sequence[int], targets: Sequence[int]) -> tuple:
    """A row's identity: its unpadded input ids and its target ids (padding / ignored positions dropped)."""
    return tuple(int(i) for i in input_ids), tuple(int(t) for t in targets if int(t) != IGNORE_INDEX)


class NPOObjective(_HeadObjective):
    """L = γ·(2/β)·mean_s softplus(β·r_s) + α·mean CE_retain, r_s = log π_θ(y_s) − log π_ref(y_s).

    Equivalently −(2/β)·log σ(−β·r_s) (open-unlearning's form). At r = 0 (the start) the forget term is
    (2/β)·log 2 and its gradient pushes every forget answer's log-prob down with weight
    (2/S)·σ(β·r_s), a weight that fades as the answer becomes unlikely (NPO's bounded-ness).
    The loss head is linear in per-token coefficients, so a first no-grad pass gets the per-token CE
    (hence r_s and the weights) and a second pass applies them; the returned loss carries NPO's value
    with NPO's gradient.
    """

    def __init__(self, model: nn.Module, task: str, reference: dict, alpha: float, gamma: float, beta: float):
        super().__init__(model, task)
        self.reference = reference
        self.alpha, self.gamma, self.beta = alpha, gamma, beta

    def __call__(self, batch: dict, rows: Optional[Sequence[Row]] = None) -> tuple[Tensor, dict[str, float]]:
        has_target = batch["targets"] != IGNORE_INDEX
        forget_rows = batch["forget"]
        forget_pos = forget_rows.unsqueeze(1).expand_as(has_target) & has_target
        retain_pos = ~forget_rows.unsqueeze(1).expand_as(has_target) & has_target
        if self.alpha == 0:
            retain_pos = torch.zeros_like(retain_pos)
        used = forget_pos | retain_pos
        states = output_states(self.model, self.task, batch)
        sel = used.to(states.device)
        targets = batch["targets"][used]
        with torch.no_grad():
            probe = self._head(states.detach()[sel], targets, torch.zeros(targets.shape[0]), math.inf)
        ce = torch.zeros(used.shape, dtype=torch.float64)
        ce[used] = probe.ce.double().cpu()
        # one sequence log-prob per forget row, against the stored reference
        idx = [i for i in range(forget_rows.shape[0]) if forget_rows[i]]
        coef = torch.zeros(used.shape, dtype=torch.float32)
        value = 0.0
        npo_term = math.nan
        if idx:
            logp = torch.stack([-ce[i][forget_pos[i]].sum() for i in idx])
            ref = torch.tensor([self._reference(batch, i) for i in idx], dtype=torch.float64)
            ratio = logp - ref
            weight = 2.0 / len(idx) * torch.sigmoid(self.beta * ratio)  # dL/d(log π_s), per sequence
            for w, i in zip(weight, idx):
                coef[i][forget_pos[i]] = -self.gamma * float(w)  # d(log π)/d(CE_t) = −1
            npo_term = float((2.0 / self.beta) * torch.nn.functional.softplus(self.beta * ratio).mean())
            value += self.gamma * npo_term
        retain_ce = math.nan
        if retain_pos.any():
            retain_ce = float(ce[retain_pos].mean())
            coef += _weighted(retain_pos, self.alpha)
            value += self.alpha * retain_ce
        out = self._head(states[sel], targets, coef[used], math.inf)
        loss = out.loss - out.loss.detach() + value
        forget_ce = float(ce[forget_pos].mean()) if forget_pos.any() else math.nan
        return loss, _terms(task_loss=retain_ce, forget_lm_loss=forget_ce, npo=npo_term)

    def _reference(self, batch: dict, i: int) -> float:
        n = int(batch["attention_mask"][i].sum())
        key = _row_key(batch["input_ids"][i][:n].tolist(), batch["targets"][i].tolist())
        try:
            return self.reference[key]
        except KeyError:
            raise UnlearnFastError("NPO: a forget row has no stored reference log-prob") from None


def _parts(batch: dict, alpha: float) -> tuple[Tensor, Tensor]:
    """[B, T] CPU masks of the forget rows' and the retained rows' target positions (no retained
    positions when α = 0)."""
    has_target = (batch["targets"] != IGNORE_INDEX).cpu()
    forget_rows = batch["forget"].cpu().unsqueeze(1).expand_as(has_target)
    retain_pos = has_target & ~forget_rows
    return has_target & forget_rows, (retain_pos if alpha != 0 else torch.zeros_like(retain_pos))


class SimNPOObjective(_HeadObjective):
    """L = γ·(−2/β)·mean_s log σ(β·(ℓ_s − δ)) + α·mean CE_retain, ℓ_s = mean CE over forget answer s's tokens.

    open-unlearning's SimNPO (no reference model; δ the margin). The forget term falls as each answer's
    length-normalised NLL rises, with weight dL/dℓ_s = −(2γ/S)·σ(−β·(ℓ_s − δ)), which fades once the
    answer is unlikely. Like :class:`NPOObjective`, a no-grad pass of the loss head gets the per-token
    CE and a second applies the per-token coefficients; the loss carries SimNPO's value and gradient.
    """

    def __init__(self, model: nn.Module, task: str, alpha: float, gamma: float, beta: float, margin: float = 0.0):
        super().__init__(model, task)
        self.alpha, self.gamma, self.beta, self.margin = alpha, gamma, beta, margin

    def __call__(self, batch: dict, rows: Optional[Sequence[Row]] = None) -> tuple[Tensor, dict[str, float]]:
        forget_pos, retain_pos = _parts(batch, self.alpha)
        used = forget_pos | retain_pos
        if not used.any():
            raise UnlearnFastError("a batch has no target tokens that this baseline trains on")
        states = output_states(self.model, self.task, batch)
        sel = used.to(states.device)
        targets = batch["targets"][used.to(batch["targets"].device)]
        with torch.no_grad():
            probe = self._head(states.detach()[sel], targets, torch.zeros(targets.shape[0]), math.inf)
        ce = torch.zeros(used.shape, dtype=torch.float64)
        ce[used] = probe.ce.double().cpu()
        idx = [i for i in range(used.shape[0]) if forget_pos[i].any()]
        coef = torch.zeros(used.shape, dtype=torch.float32)
        value, simnpo_term = 0.0, math.nan
        if idx:
            counts = torch.stack([forget_pos[i].sum() for i in idx]).double()
            nll = torch.stack([ce[i][forget_pos[i]].sum() for i in idx]) / counts  # ℓ_s
            z = self.beta * (nll - self.margin)
            weight = -2.0 / len(idx) * torch.sigmoid(-z)  # dL/dℓ_s; dℓ_s/d(CE_t) = 1/n_s
            for w, n, i in zip(weight, counts, idx):
                coef[i][forget_pos[i]] = self.gamma * float(w / n)
            simnpo_term = float(-(2.0 / self.beta) * torch.nn.functional.logsigmoid(z).mean())
            value += self.gamma * simnpo_term
        retain_ce = math.nan
        if retain_pos.any():
            retain_ce = float(ce[retain_pos].mean())
            coef += _weighted(retain_pos, self.alpha)
            value += self.alpha * retain_ce
        out = self._head(states[sel], targets, coef[used], math.inf)
        loss = out.loss - out.loss.detach() + value
        forget_ce = float(ce[forget_pos].mean()) if forget_pos.any() else math.nan
        return loss, _terms(task_loss=retain_ce, forget_lm_loss=forget_ce, simnpo=simnpo_term)


class IdKObjective(CrossEntropyObjective):
    """L = γ·mean CE over the refusal tokens of the forget rows + α·mean CE_retain (IdK: the forget rows'
    answers were replaced by refusals, see :func:`idk_examples`; their likelihood is raised, not lowered)."""

    def __init__(self, model: nn.Module, task: str, alpha: float, gamma: float):
        super().__init__(model, task, alpha=alpha, gamma=gamma)

    def coefficients(self, batch: dict) -> Tensor:
        forget_pos, retain_pos = _parts(batch, self.alpha)
        return _weighted(retain_pos, self.alpha) + _weighted(forget_pos, self.gamma)


def idk_examples(examples: Sequence[Example], seed: int = 0) -> list[Example]:
    """The forget examples with each response replaced by a refusal from :data:`REFUSALS`, chosen from the
    prompt and ``seed`` alone (the same prompt gets the same refusal in every run and batch order)."""
    out = []
    for e in examples:
        if e.prompt is None or e.response is None:
            raise UnlearnFastError("idk replaces forget answers with refusals: every forget example needs a "
                                   "prompt and a response")
        out.append(Example(prompt=e.prompt, response=random.Random(f"{seed}:{e.prompt}").choice(REFUSALS)))
    return out


class _BlockReached(Exception):
    """Raised by the hook of :func:`block_output` once the wanted block has run (the rest is not needed)."""


def rmu_block(model: nn.Module, layer: Optional[int] = None) -> tuple[int, nn.Module]:
    """RMU's block: ``layer`` (None: the middle one, ``n_blocks // 2``) of a causal LM's block list."""
    lists = block_lists(model)
    if len(lists) != 1:
        raise ModelError(f"RMU needs a decoder-only model with one list of blocks; "
                         f"{model.__class__.__name__} has {len(lists)}")
    blocks = lists[0][1]
    index = len(blocks) // 2 if layer is None else layer
    if not 0 <= index < len(blocks):
        raise UnlearnFastError(f"RMU layer {index} is out of range: the model has blocks 0 to {len(blocks) - 1}")
    return index, blocks[index]


def block_output(model: nn.Module, block: nn.Module, batch: dict) -> Tensor:
    """[B, T, H] output of ``block`` (a hidden state) on ``batch``; the blocks above it never run."""
    captured = {}

    def hook(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _BlockReached

    handle = block.register_forward_hook(hook)
    try:
        backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _BlockReached:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise ModelError("RMU: the chosen block did not run in the model's forward")
    return captured["h"]


def answer_positions(batch: dict) -> Tensor:
    """[B, T] CPU mask of the answer tokens themselves (position t holds a target token of position t−1),
    the positions open-unlearning's RMU takes (labels ≠ −100)."""
    has_target = (batch["targets"] != IGNORE_INDEX).cpu()
    answer = torch.zeros_like(has_target)
    answer[:, 1:] = has_target[:, :-1]
    return answer


def rmu_control_vector(hidden: int, coefficient: float, seed: int = 0) -> Tensor:
    """c·u: u uniform in [0, 1)^hidden (float64, from ``seed``), normalised to unit length (as WMDP's RMU)."""
    u = torch.rand(hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (coefficient * u / u.norm()).float()


@torch.no_grad()
def frozen_activations(model: nn.Module, block: nn.Module, rows: Sequence[Row], pad_id: int,
                       batch_size: int = 16) -> dict[tuple, Tensor]:
    """Each row's ``block`` output at its answer positions ([n, H], float32 on the CPU) under ``model`` as
    it is now: RMU's frozen retained activations, cached once so no second model is kept."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    cache = {}
    try:
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
            h = block_output(model, block, batch).float().cpu()
            answer = answer_positions(batch)
            for i, r in enumerate(part):
                cache[_row_key(r.input_ids, r.targets)] = h[i][answer[i]].clone()
    finally:
        model.train(was)
    return cache


class RMUObjective:
    """L = γ·mean_s mean_t mean_d (h_st − c·u)² + α·mean_s mean_t mean_d (h_st − h⁰_st)²: forget rows s in
    the first term, retained rows in the second, t over each row's answer positions, d over the hidden
    size; h the output of the chosen block, h⁰ the original model's (:func:`frozen_activations`), c·u the
    steering vector (:func:`rmu_control_vector`). open-unlearning's RMU loss with its EMBED_DIFF retain loss.
    """

    def __init__(self, model: nn.Module, block: nn.Module, control: Tensor, frozen: dict, alpha: float,
                 gamma: float):
        self.model, self.block, self.control, self.frozen = model, block, control, frozen
        self.alpha, self.gamma = alpha, gamma

    def __call__(self, batch: dict, rows: Optional[Sequence[Row]] = None) -> tuple[Tensor, dict[str, float]]:
        h = block_output(self.model, self.block, batch).float()
        answer = answer_positions(batch)
        forget = batch["forget"].cpu()
        steer = self.control.to(h.device)
        forget_terms, retain_terms = [], []
        for i in range(h.shape[0]):
            if not answer[i].any():
                continue
            states = h[i][answer[i].to(h.device)]
            if forget[i]:
                forget_terms.append(((states - steer) ** 2).mean())
            elif self.alpha != 0:
                reference = self.frozen.get(self._key(batch, i))
                if reference is None:
                    raise UnlearnFastError("RMU: a retained row has no cached frozen activations")
                retain_terms.append(((states - reference.to(h.device)) ** 2).mean())
        if not forget_terms and not retain_terms:
            raise UnlearnFastError("a batch has no answer tokens that this baseline trains on")
        loss = h.sum() * 0
        forget_value = retain_value = math.nan
        if forget_terms:
            part = torch.stack(forget_terms).mean()
            loss = loss + self.gamma * part
            forget_value = float(part.detach())
        if retain_terms:
            part = torch.stack(retain_terms).mean()
            loss = loss + self.alpha * part
            retain_value = float(part.detach())
        return loss, _terms(rmu_forget=forget_value, rmu_retain=retain_value)

    @staticmethod
    def _key(batch: dict, i: int) -> tuple:
        n = int(batch["attention_mask"][i].sum())
        return _row_key(batch["input_ids"][i][:n].tolist(), batch["targets"][i].tolist())


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
    return {_row_key(r.input_ids, r.targets): -total for r, (total, _) in zip(rows, losses)}


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
                        labels: Optional[Sequence[int]] = None, max_length: int = 256, name: str = "set") -> list[Row]:
    """Rows with plain targets on the answer / text / label for both sets (the forget flag set as asked).

    Unlike EUL's forget rows (whose seq2seq LM term uses the masked-word view), a baseline's forget
    rows carry the same targets as a retained example would: GA / NPO push exactly that likelihood down.
    """
    rows = encode(examples, tokenizer, task, forget=False, name=name, model_config=model_config,
                  labels=labels, max_length=max_length)
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
                 log=print) -> BaselineResult:
    """Run one baseline on ``model`` (in place, except ``retrain``, which returns a new model).

    ``forget`` / ``retain`` are anything :func:`unlearn_fast.train.data.load_examples` takes. For
    classification models, pass integer labels for the sets the method trains on. Rows are cut at
    ``max_length``, capped at the model's context (one logged line says how many were). A NaN loss
    or out-of-range weights raise TrainingError unless ``allow_damage`` (see
    :func:`unlearn_fast.train.trainer.train`); the damage is then in the metrics.
    """
    training = training or TrainConfig()
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
    enc = dict(model_config=model.config, max_length=max_length)
    forget_rows = encode_for_baseline(forget_set, tokenizer, task, forget=True, labels=forget_labels,
                                      name="forget set", **enc) if config.uses_forget() else []
    retain_rows = encode_for_baseline(retain_set, tokenizer, task, forget=False, labels=retain_labels,
                                      name="retain set", **enc) if config.uses_retain() else []
    note = truncation_note({"forget set": forget_rows, "retain set": retain_rows}, max_length, model.config, tokenizer)
    if note:
        log(note)
    pad = pad_token_id(tokenizer)
    if config.method == "retrain":
        model = fresh_copy(model, training.seed)
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
                           "damage": [result.damage] if result.damage else []})


BASELINE_MANIFEST = BASELINE_FILE  # io.artifacts knows it too: --overwrite may replace such a directory


def save_baseline(out, result: BaselineResult, tokenizer, *, base_fingerprint: str, model_name: str = "",
                  overwrite: bool = False, extra: Optional[dict] = None):
    """Write a baseline's result to ``out`` (atomically) and return the directory.

    ``params="layers"``: an unlearning artifact like EUL's (``load_layers`` / ``eval --layers`` attach
    it; it has no Gram matrices, so it cannot be fused). ``params="full"``: a whole model directory
    (``save_pretrained`` + tokenizer, loadable with ``--model DIR``) with ``baseline.json`` saying how
    it was made.
    """
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
        "update_time_s": result.training.update_time_s,
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
