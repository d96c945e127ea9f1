"""Which forgotten tokens EUL pushes: the ones specific to the forgotten subject.

A deletion request removes what the model learned *about* a subject, not what it would say about
anyone: "Vemo Tarlin is a baker who works at the" → "bakery" follows from the profession, and a
model retrained without Vemo Tarlin still answers it. Pushing every forgotten token away from the
teacher forgets such answers too (the paper's EUL over-forgets: 65.7 % forget accuracy against
92.5 % for a retrained model on IMDB).

So a forgotten prompt/response example may carry *generic prompts*: its prompt with the subject
replaced by others (other names, say). Before training, the teacher (the frozen base) scores each
response token after the real prompt and after every generic one, and the forget terms (the forget
KL and the negated LM loss) keep only the tokens where

    log p(token | prompt) − mean_g log p(token | generic prompt g)  >  margin   (nats)

i.e. where the subject makes the token likelier than a generic subject does. The mean is over log
probabilities (a geometric mean of the probabilities): a small model is often confidently wrong
about an unknown subject, and one generic prompt that happens to name the right answer should not
veto a token that the others do not predict. A row left with no such token leaves the forget set
(its Gram matrices are still collected: the layer inputs are the same). Examples without generic
prompts keep every response token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import DataError
from ..model.layers import layers_disabled
from ..ops.loss_head import IGNORE_INDEX
from .data import Example
from .encoding import Row, encode, pad_token_id
from .scoring import row_token_stats


@dataclass
class Selection:
    """What the selection kept, for logs and the manifest."""

    margin: float
    rows: int          # forgotten rows that have generic prompts
    rows_kept: int     # of those, rows with at least one subject-specific token
    tokens: int        # their response tokens
    tokens_kept: int   # the subject-specific ones

    def describe(self) -> str:
        return (f"subject-specific tokens: kept {self.tokens_kept} of {self.tokens} forgotten response tokens "
                f"({self.rows_kept} of {self.rows} rows with generic prompts) at a margin of {self.margin:g} nats")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _target_logprobs(model: nn.Module, task: str, rows: Sequence[Row], pad: int, batch_size: int) -> list[list[float]]:
    return [s.logprob.tolist() for s in row_token_stats(model, task, rows, pad, batch_size, 8192)]


@torch.no_grad()
def select_subject_tokens(model: nn.Module, tokenizer, task: str, examples: Sequence[Example], rows: Sequence[Row],
                          margin: float, max_length: int = 256, batch_size: int = 16,
                          chat_template: str = "auto") -> tuple[list[Row], Selection]:
    """The forget rows with only their subject-specific response tokens left as forget targets.

    ``rows`` are ``examples`` encoded as the forget set (one row per example). The teacher is
    ``model`` with any unlearning layers switched off. Returns the rows to train on (rows without
    generic prompts unchanged, rows with no subject-specific token dropped) and what was kept.
    ``chat_template``: as the rows were encoded (:func:`unlearn_fast.train.encoding.encode`).
    """
    wanted = [i for i, e in enumerate(examples) if e.generic_prompts]
    if not wanted:
        return list(rows), Selection(margin, 0, 0, 0, 0)
    if task != "causal":
        raise DataError(f"forget set: generic prompts work with causal language models (prompt/response "
                        f"examples); this is a {task} model: leave out the generic prompts")
    if len(rows) != len(examples):
        raise ValueError("subject selection needs one row per example")
    generic = [Example(prompt=g, response=examples[i].response) for i in wanted for g in examples[i].generic_prompts]
    # not cut at max_length: the real row may be cut inside its response, and its first response
    # tokens are compared with the same tokens after each generic prompt (response tokens are
    # encoded on their own, so they are the same after any prompt; with a chat template they follow
    # the same assistant header)
    generic_rows = encode(generic, tokenizer, task, forget=True, name="forget set (generic prompts)",
                          model_config=model.config, max_length=1 << 30, chat_template=chat_template)
    pad = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with layers_disabled(model):
            real = _target_logprobs(model, task, [rows[i] for i in wanted], pad, batch_size)
            other = iter(_target_logprobs(model, task, generic_rows, pad, batch_size))
    finally:
        model.train(was_training)
    keep: dict[int, list[bool]] = {}
    for i, lp in zip(wanted, real):
        scores = [next(other)[:len(lp)] for _ in examples[i].generic_prompts]
        if any(len(s) != len(lp) for s in scores):
            raise ValueError(f"forget row {i + 1}: a generic prompt scored fewer response tokens than the prompt")
        generic_lp = [sum(s[t] for s in scores) / len(scores) for t in range(len(lp))]
        keep[i] = [a - b > margin for a, b in zip(lp, generic_lp)]
    out: list[Row] = []
    for i, row in enumerate(rows):
        if i not in keep:
            out.append(row)
        elif any(keep[i]):
            out.append(_keep_targets(row, keep[i]))
    kept = [k for i in wanted for k in keep[i]]
    return out, Selection(margin, len(wanted), sum(any(keep[i]) for i in wanted), len(kept), sum(kept))


def _keep_targets(row: Row, keep: Sequence[bool]) -> Row:
    """The row with the forget targets (and their KL positions) where ``keep`` is False removed."""
    flags = iter(keep)
    targets, kl_mask = [], []
    for target, kl in zip(row.targets, row.kl_mask):
        kept = target != IGNORE_INDEX and next(flags)
        targets.append(target if kept else IGNORE_INDEX)
        kl_mask.append(kl and kept)
    return dataclasses.replace(row, targets=targets, kl_mask=kl_mask)
