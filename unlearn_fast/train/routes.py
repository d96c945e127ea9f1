"""Forget routes: the student's own generations that still give a forgotten answer.

The forget terms push the forgotten answer's tokens where the data puts them, right after the
prompt. A model pushed there often gives the answer a little later instead: "Tokyo is the capital
of" → " the country of Japan", or a small model's "born in" → "Lintar Fort Wextar". Measured on the
benchmarks (docs/design.md), such detours left 60–95 % of the facts still answered where the forget
margin stopped the push at the first position.

So, once per epoch after the first, the student (with its unlearning layers) completes each forgotten
prompt greedily. Where the completion still holds the answer (the same test as the forget accuracy,
given by the caller), the row up to the answer becomes a *route*: an extra forgotten row whose forget
targets are the answer's tokens in that completion. From then on the route trains with its forgotten
row, in the same batches, until the end (at most ``limit`` routes per row, kept so the push does not
oscillate between two detours).

Only causal LM prompt / response rows have routes. Of the examples with generic prompts, those the
subject selection kept (:mod:`unlearn_fast.train.selection`) have routes; the ones it dropped, whose
answer follows from what is not forgotten, have none.
Under data parallelism rank 0 finds the routes and every rank trains on the same.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..ops.loss_head import IGNORE_INDEX
from . import distributed
from .data import Example
from .encoding import Row

ROUTE_TOKENS = 16  # tokens each greedy completion runs for (the forget accuracy reads 8)
GENERATE_BATCH = 32


def prompt_length(row: Row) -> int:
    """Tokens before the first target (the prompt of a prompt / response row)."""
    return next(i for i, t in enumerate(row.targets) if t != IGNORE_INDEX) + 1


def answer_span(tokens: Sequence[int], decode: Callable[[Sequence[int]], str],
                holds: Callable[[str], bool]) -> Optional[tuple[int, int]]:
    """(start, end): the shortest head ``tokens[:end]`` whose text holds the answer, and the latest
    ``start`` such that ``tokens[start:end]`` alone still does; None if no head holds it."""
    end = next((n for n in range(1, len(tokens) + 1) if holds(decode(tokens[:n]))), None)
    if end is None:
        return None
    start = next(s for s in range(end - 1, -1, -1) if holds(decode(tokens[s:end])))
    return start, end


class ForgetRoutes:
    """The routes of a set of forgotten rows; :meth:`refresh` finds new ones, :meth:`expand` adds
    them to a batch.

    ``rows``: the forgotten rows trained on; ``examples``: the example of each (None: the row gets no
    routes); ``holds(text, example)``: does the completion ``text`` give ``example``'s answer.
    """

    def __init__(self, tokenizer, rows: Sequence[Row], examples: Sequence[Optional[Example]],
                 holds: Callable[[str, Example], bool], limit: int, pad_id: int,
                 max_new_tokens: int = ROUTE_TOKENS):
        self.tokenizer, self.holds, self.limit = tokenizer, holds, limit
        self.pad_id, self.max_new_tokens = pad_id, max_new_tokens
        self.sources = [(r, e) for r, e in zip(rows, examples) if e is not None and r.forget]
        # routes by source row; a route row is never dropped, so the step cache (keyed by id) stays right
        self.routes: dict[int, list[Row]] = {id(r): [] for r, _ in self.sources}
        self.found = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self.routes.values())

    def expand(self, group: Sequence[Row]) -> list[Row]:
        """``group`` followed by the routes of its forgotten rows."""
        extra = [route for row in group for route in self.routes.get(id(row), ())]
        return list(group) + extra if extra else list(group)

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> int:
        """Complete every source row's prompt greedily with ``model`` and keep, as a new route, each
        completion that holds the answer somewhere else than the row already targets. Returns the
        number of new routes."""
        open_rows = [(r, e) for r, e in self.sources if len(self.routes[id(r)]) < self.limit]
        found = self._routes(model, open_rows) if distributed.rank() == 0 else None
        found = distributed.broadcast_object(found, "the forget routes of rank 0")
        for index, ids, start, end in found:
            row = open_rows[index][0]
            self.routes[id(row)].append(Row(
                input_ids=ids,
                targets=[ids[t + 1] if start <= t + 1 < end else IGNORE_INDEX for t in range(len(ids) - 1)]
                + [IGNORE_INDEX],
                kl_mask=[start <= t + 1 < end for t in range(len(ids) - 1)] + [False],
                forget=True, loss_target=row.loss_target))
        self.found += len(found)
        return len(found)

    def _routes(self, model: nn.Module, rows: Sequence[tuple[Row, Example]]) -> list[tuple[int, list[int], int, int]]:
        """(index into ``rows``, route ids, first and end answer position in them) of each new route."""
        device = next(model.parameters()).device
        decode = lambda ids: self.tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
        stops = {t for t in (self.tokenizer.eos_token_id, self.pad_id) if t is not None}
        out = []
        for first in range(0, len(rows), GENERATE_BATCH):
            chunk = rows[first:first + GENERATE_BATCH]
            prompts = [r.input_ids[:prompt_length(r)] for r, _ in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                       do_sample=False, pad_token_id=self.pad_id)[:, width:].tolist()
            for k, ((row, example), prompt, tokens) in enumerate(zip(chunk, prompts, generated)):
                cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
                span = answer_span(tokens[:cut], decode, lambda text: self.holds(text, example))
                if span is None:
                    continue
                start, end = len(prompt) + span[0], len(prompt) + span[1]
                route = list(prompt) + tokens[:span[1]]
                known = [row.input_ids] + [r.input_ids for r in self.routes[id(row)]]
                if any(list(k_ids[:end]) == route for k_ids in known):
                    continue  # the row (or a route) already targets this path
                out.append((first + k, route, start, end))
        return out
