"""The loss of each baseline method, on the fused loss head where the method's loss is linear in
per-token coefficients (GA, GradDiff, finetune, NPO, SimNPO, IdK), and on one block's hidden states for
RMU. :mod:`unlearn_fast.eval.baselines` builds them from a :class:`BaselineConfig` and runs them.

Every term is a mean over its own units (target tokens, forgotten answers, RMU rows) of the batch. When
the trainer splits a global batch over ranks (torchrun) or micro-batches (``accumulate``), it passes the
whole batch's counts (:func:`group_counts`, in ``batch["group_counts"]``): each part's loss is then its
share of the one-batch loss, and the parts' gradients add up to the one-batch gradient, as EUL's do
(``global_normalisers``; see :mod:`unlearn_fast.train.distributed`).
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ModelError, UnlearnFastError
from ..model.family import backbone, output_head, output_states
from ..model.layers import block_lists
from ..ops import eul_loss_head
from ..ops.loss_head import IGNORE_INDEX
from ..train.data import Example
from ..train.encoding import Row, collate
from ..train.objective import TERMS

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


def _weighted(mask: Tensor, weight: float, total: Optional[int] = None) -> Tensor:
    """``mask`` × weight / n: a mean over the mask's positions, or over ``total`` positions (the whole
    batch's, of which this part holds the mask's) when given."""
    n = int(mask.sum()) if total is None else int(total)
    return mask.float() * (weight / n) if (n and weight) else torch.zeros(mask.shape, device=mask.device)


# what :func:`group_counts` counts, the units each baseline term averages over
COUNTS = ("retain_tokens", "forget_tokens", "retain_answers", "forget_answers", "retain_rmu_rows", "forget_rmu_rows")


def group_counts(rows: Sequence[Row]) -> dict[str, int]:
    """The units every baseline term is a mean over, counted in a whole (global) batch of ``rows``:
    target tokens of the retained / forgotten rows (CE terms), rows with a target (NPO / SimNPO's
    per-answer terms), rows with an answer position (RMU's per-row terms; an answer position holds a
    target token, see :func:`answer_positions`)."""
    out = dict.fromkeys(COUNTS, 0)
    for r in rows:
        side = "forget" if r.forget else "retain"
        tokens = sum(1 for t in r.targets if t != IGNORE_INDEX)
        out[f"{side}_tokens"] += tokens
        out[f"{side}_answers"] += int(tokens > 0)
        out[f"{side}_rmu_rows"] += int(any(t != IGNORE_INDEX for t in r.targets[:-1]))
    return out


def _total(batch: dict, name: str) -> Optional[int]:
    """The whole batch's count ``name`` when the trainer passed them (a part of a batch), else None."""
    counts = batch.get("group_counts")
    return None if counts is None else int(counts[name])


def _terms(**values: float) -> dict[str, float]:
    """Terms for the trainer's log: every EUL term name present (NaN where absent) plus extras."""
    out = {k: math.nan for k in TERMS}
    out.update(values)
    return out


class _HeadObjective:
    """Shared plumbing: states of the model, the frozen (or trained) head, the chunked loss head."""

    # terms normalised by the whole batch's counts (batch["group_counts"]) when given: the trainer sums
    # the parts of a batch split over ranks or micro-batches (see the module docstring)
    global_normalisers = True

    def group_counts(self, rows: Sequence[Row]) -> dict[str, int]:
        return group_counts(rows)

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
        return (_weighted(has_target & ~forget, self.alpha, _total(batch, "retain_tokens"))
                - _weighted(has_target & forget, self.gamma, _total(batch, "forget_tokens")))

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


def row_key(input_ids: Sequence[int], targets: Sequence[int]) -> tuple:
    """A row's identity: its unpadded input ids and its target ids (padding / ignored positions dropped)."""
    return tuple(int(i) for i in input_ids), tuple(int(t) for t in targets if int(t) != IGNORE_INDEX)


def _parts(batch: dict, alpha: float) -> tuple[Tensor, Tensor]:
    """[B, T] CPU masks of the forget rows' and the retained rows' target positions (no retained
    positions when α = 0)."""
    has_target = (batch["targets"] != IGNORE_INDEX).cpu()
    forget_rows = batch["forget"].cpu().unsqueeze(1).expand_as(has_target)
    retain_pos = has_target & ~forget_rows
    return has_target & forget_rows, (retain_pos if alpha != 0 else torch.zeros_like(retain_pos))


class SequenceObjective(_HeadObjective):
    """A forget term on each forgotten answer's summed CE c_s, plus α·mean CE_retain (NPO, SimNPO).

    The loss head is linear in per-token coefficients, so a first no-grad pass gets the per-token CE
    (hence each c_s), :meth:`forget_term` turns them into each answer's term f_s and df_s/dc_s, and a
    second pass applies γ·df_s/dc_s / S to every token of answer s (S answers: the batch's, or the whole
    batch's when it is split); the returned loss carries the term's value with its gradient.
    """

    term = "forget_term"

    def __init__(self, model: nn.Module, task: str, alpha: float, gamma: float):
        super().__init__(model, task)
        self.alpha, self.gamma = alpha, gamma

    def forget_term(self, batch: dict, rows: list[int], sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """(df_s/dc_s, f_s) per forgotten answer s of batch rows ``rows`` (summed CE c_s over ``counts``
        tokens); the term is the mean of f_s over the answers."""
        raise NotImplementedError

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
        value, term = 0.0, math.nan
        if idx:
            sums = torch.stack([ce[i][forget_pos[i]].sum() for i in idx])
            counts = torch.stack([forget_pos[i].sum() for i in idx]).double()
            grads, values = self.forget_term(batch, idx, sums, counts)
            answers = _total(batch, "forget_answers") or len(idx)
            for g, i in zip(grads, idx):
                coef[i][forget_pos[i]] = self.gamma * float(g) / answers
            value += self.gamma * float(values.sum()) / answers
            term = float(values.mean())
        retain_ce = math.nan
        if retain_pos.any():
            retain_ce = float(ce[retain_pos].mean())
            tokens = _total(batch, "retain_tokens") or int(retain_pos.sum())
            coef += _weighted(retain_pos, self.alpha, tokens)
            value += self.alpha * float(ce[retain_pos].sum()) / tokens
        out = self._head(states[sel], targets, coef[used], math.inf)
        loss = out.loss - out.loss.detach() + value
        forget_ce = float(ce[forget_pos].mean()) if forget_pos.any() else math.nan
        return loss, _terms(task_loss=retain_ce, forget_lm_loss=forget_ce, **{self.term: term})


class NPOObjective(SequenceObjective):
    """L = γ·(2/β)·mean_s softplus(β·r_s) + α·mean CE_retain, r_s = log π_θ(y_s) − log π_ref(y_s).

    Equivalently −(2/β)·log σ(−β·r_s) (open-unlearning's form). At r = 0 (the start) the forget term is
    (2/β)·log 2 and its gradient pushes every forget answer's log-prob down with weight
    (2/S)·σ(β·r_s), a weight that fades as the answer becomes unlikely (NPO's bounded-ness).
    """

    term = "npo"

    def __init__(self, model: nn.Module, task: str, reference: dict, alpha: float, gamma: float, beta: float):
        super().__init__(model, task, alpha, gamma)
        self.reference, self.beta = reference, beta

    def forget_term(self, batch: dict, rows: list[int], sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        ref = torch.tensor([self._reference(batch, i) for i in rows], dtype=torch.float64)
        ratio = -sums - ref  # r_s = log π_θ(y_s) − log π_ref(y_s), log π_θ(y_s) = −c_s
        grads = -2.0 * torch.sigmoid(self.beta * ratio)  # df_s/dc_s = −df_s/d log π_θ(y_s)
        return grads, (2.0 / self.beta) * torch.nn.functional.softplus(self.beta * ratio)

    def _reference(self, batch: dict, i: int) -> float:
        n = int(batch["attention_mask"][i].sum())
        key = row_key(batch["input_ids"][i][:n].tolist(), batch["targets"][i].tolist())
        try:
            return self.reference[key]
        except KeyError:
            raise UnlearnFastError("NPO: a forget row has no stored reference log-prob") from None


class SimNPOObjective(SequenceObjective):
    """L = γ·(−2/β)·mean_s log σ(β·(ℓ_s − δ)) + α·mean CE_retain, ℓ_s = mean CE over forget answer s's tokens.

    open-unlearning's SimNPO (no reference model; δ the margin). The forget term falls as each answer's
    length-normalised NLL rises, with weight dL/dℓ_s = −(2γ/S)·σ(−β·(ℓ_s − δ)), which fades once the
    answer is unlikely.
    """

    term = "simnpo"

    def __init__(self, model: nn.Module, task: str, alpha: float, gamma: float, beta: float, margin: float = 0.0):
        super().__init__(model, task, alpha, gamma)
        self.beta, self.margin = beta, margin

    def forget_term(self, batch: dict, rows: list[int], sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        z = self.beta * (sums / counts - self.margin)  # β·(ℓ_s − δ)
        grads = -2.0 * torch.sigmoid(-z) / counts  # df_s/dℓ_s · dℓ_s/dc_s
        return grads, -(2.0 / self.beta) * torch.nn.functional.logsigmoid(z)


class IdKObjective(CrossEntropyObjective):
    """L = γ·mean CE over the refusal tokens of the forget rows + α·mean CE_retain (IdK: the forget rows'
    answers were replaced by refusals, see :func:`idk_examples`; their likelihood is raised, not lowered)."""

    def __init__(self, model: nn.Module, task: str, alpha: float, gamma: float):
        super().__init__(model, task, alpha=alpha, gamma=gamma)

    def coefficients(self, batch: dict) -> Tensor:
        forget_pos, retain_pos = _parts(batch, self.alpha)
        return (_weighted(retain_pos, self.alpha, _total(batch, "retain_tokens"))
                + _weighted(forget_pos, self.gamma, _total(batch, "forget_tokens")))


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
                cache[row_key(r.input_ids, r.targets)] = h[i][answer[i]].clone()
    finally:
        model.train(was)
    return cache


class RMUObjective:
    """L = γ·mean_s mean_t mean_d (h_st − c·u)² + α·mean_s mean_t mean_d (h_st − h⁰_st)²: forget rows s in
    the first term, retained rows in the second, t over each row's answer positions, d over the hidden
    size; h the output of the chosen block, h⁰ the original model's (:func:`frozen_activations`), c·u the
    steering vector (:func:`rmu_control_vector`). open-unlearning's RMU loss with its EMBED_DIFF retain loss.
    """

    global_normalisers = True  # each term is normalised by the whole batch's rows when split (group_counts)

    def __init__(self, model: nn.Module, block: nn.Module, control: Tensor, frozen: dict, alpha: float,
                 gamma: float):
        self.model, self.block, self.control, self.frozen = model, block, control, frozen
        self.alpha, self.gamma = alpha, gamma

    def group_counts(self, rows: Sequence[Row]) -> dict[str, int]:
        return group_counts(rows)

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
            part = torch.stack(forget_terms)
            loss = loss + self.gamma * part.sum() / (_total(batch, "forget_rmu_rows") or len(forget_terms))
            forget_value = float(part.detach().mean())
        if retain_terms:
            part = torch.stack(retain_terms)
            loss = loss + self.alpha * part.sum() / (_total(batch, "retain_rmu_rows") or len(retain_terms))
            retain_value = float(part.detach().mean())
        return loss, _terms(rmu_forget=forget_value, rmu_retain=retain_value)

    @staticmethod
    def _key(batch: dict, i: int) -> tuple:
        n = int(batch["attention_mask"][i].sum())
        return row_key(batch["input_ids"][i][:n].tolist(), batch["targets"][i].tolist())
