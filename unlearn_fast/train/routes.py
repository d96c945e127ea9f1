"""Forget routes: the student's own generations that still give a forgotten answer.

The forget terms push the forgotten answer's tokens where the data puts them, right after the
prompt. A model pushed there often gives the answer a little later instead: "Tokyo is the capital
of" → " the country of Japan", or a small model's "has a pet" → "iguana pony hamster". With the forget
margin alone, 57 % of the memorised facts of scenario 1's 5 % split were still answered (one seed,
docs/design.md); with routes, 17 %.

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

import dataclasses
import random
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..ops.loss_head import IGNORE_INDEX
from . import distributed
from .data import Example
from .encoding import Row, encode

ROUTE_TOKENS = 16  # tokens each greedy completion runs for (the forget accuracy reads 8)
GENERATE_BATCH = 32
ROUTE_CONTEXTS = 2  # other contexts each forgotten prompt is also completed in
ROUTE_SHOTS = 3  # retained facts, one per line, before the forgotten prompt in each context


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


def context_probes(examples: Sequence[Optional[Example]], rows: Sequence[Row], retained: Sequence[Example],
                   tokenizer, seed: int, **encoding) -> list[tuple[Row, Row]]:
    """(trained row, probe row) pairs: each forgotten example that has routes (not None), after
    :data:`ROUTE_SHOTS` retained prompt / response facts, one per line, in :data:`ROUTE_CONTEXTS`
    seeded draws; ``encoding``: :func:`~unlearn_fast.train.encoding.encode`'s options. A model that no
    longer answers the bare prompt may still answer it after a few facts of the same kind."""
    shots = [e for e in retained if e.prompt is not None and e.response is not None]
    if len(shots) < ROUTE_SHOTS:
        return []
    rng = random.Random(seed)
    pairs = []
    for example, row in zip(examples, rows):
        if example is None:
            continue
        for _ in range(ROUTE_CONTEXTS):
            context = "".join(f"{s.prompt.rstrip()} {s.response.strip()}\n" for s in rng.sample(shots, ROUTE_SHOTS))
            probe = encode([dataclasses.replace(example, prompt=context + example.prompt)], tokenizer, "causal",
                           forget=True, name="forget set", **encoding)[0]
            if not probe.truncated:
                pairs.append((row, probe))
    return pairs


class ForgetRoutes:
    """The routes of a set of forgotten rows; :meth:`refresh` finds new ones, :meth:`expand` adds
    them to a batch.

    ``rows``: the forgotten rows trained on; ``examples``: the example of each (None: the row gets no
    routes); ``holds(text, example)``: does the completion ``text`` give ``example``'s answer.
    ``probes``: (trained row, probe row) pairs: the probe's prompt (the forgotten prompt in another
    context, e.g. after retained facts) is completed too, and what it finds trains with the trained row.
    """

    def __init__(self, tokenizer, rows: Sequence[Row], examples: Sequence[Optional[Example]],
                 holds: Callable[[str, Example], bool], limit: int, pad_id: int,
                 probes: Sequence[tuple[Row, Row]] = (), max_new_tokens: int = ROUTE_TOKENS):
        self.tokenizer, self.holds, self.limit = tokenizer, holds, limit
        self.pad_id, self.max_new_tokens = pad_id, max_new_tokens
        example_of = {id(r): e for r, e in zip(rows, examples) if e is not None and r.forget}
        # (the row the routes train with, the row whose prompt is completed, its example)
        self.sources = [(r, r, example_of[id(r)]) for r in rows if id(r) in example_of]
        self.sources += [(r, probe, example_of[id(r)]) for r, probe in probes if id(r) in example_of]
        # routes by trained row; a route row is never dropped, so the step cache (keyed by id) stays right
        self.routes: dict[int, list[Row]] = {id(r): [] for r in rows if id(r) in example_of}
        self.found = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self.routes.values())

    def expand(self, group: Sequence[Row]) -> list[Row]:
        """``group`` followed by the routes of its forgotten rows."""
        extra = [route for row in group for route in self.routes.get(id(row), ())]
        return list(group) + extra if extra else list(group)

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> int:
        """Complete every source's prompt greedily with ``model`` and keep, as a new route, each
        completion that holds the answer along a path its row does not already train (a probe's own
        answer counts: the probe is not trained). Returns the number of new routes."""
        open_rows = [source for source in self.sources if len(self.routes[id(source[0])]) < self.limit]
        found = self._routes(model, open_rows) if distributed.rank() == 0 else None
        found = distributed.broadcast_object(found, "the forget routes of rank 0")
        added = 0
        for index, ids, start, end in found:
            row = open_rows[index][0]
            if len(self.routes[id(row)]) >= self.limit:  # several sources of one row found routes at once
                continue
            self.routes[id(row)].append(Row(
                input_ids=ids,
                targets=[ids[t + 1] if start <= t + 1 < end else IGNORE_INDEX for t in range(len(ids) - 1)]
                + [IGNORE_INDEX],
                kl_mask=[start <= t + 1 < end for t in range(len(ids) - 1)] + [False],
                forget=True, loss_target=row.loss_target))
            added += 1
        self.found += added
        return added

    def _routes(self, model: nn.Module, rows: Sequence[tuple[Row, Row, Example]]) -> list[tuple[int, list[int], int, int]]:
        """(index into ``rows``, route ids, first and end answer position in them) of each new route."""
        device = next(model.parameters()).device
        decode = lambda ids: self.tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
        stops = {t for t in (self.tokenizer.eos_token_id, self.pad_id) if t is not None}
        out = []
        for first in range(0, len(rows), GENERATE_BATCH):
            chunk = rows[first:first + GENERATE_BATCH]
            prompts = [r.input_ids[:prompt_length(r)] for _, r, _ in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                       do_sample=False, pad_token_id=self.pad_id)[:, width:].tolist()
            for k, ((row, source, example), prompt, tokens) in enumerate(zip(chunk, prompts, generated)):
                cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
                span = answer_span(tokens[:cut], decode, lambda text: self.holds(text, example))
                if span is None:
                    continue
                start, end = len(prompt) + span[0], len(prompt) + span[1]
                route = list(prompt) + tokens[:span[1]]
                known = ([row.input_ids] if source is row else []) + [r.input_ids for r in self.routes[id(row)]]
                if any(list(k_ids[:end]) == route for k_ids in known):
                    continue  # the row (or a route) already targets this path
                out.append((first + k, route, start, end))
        return out
