"""The order rows are trained in: shuffled groups of rows, one per optimiser step, optionally
bucketed by length so a batch pads little (``TrainConfig.bucket_by_length``), for the mixed schedule
(each step holds retained and forgotten rows) and the paper's alternating one."""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING, Iterator, Sequence

from .encoding import Row

if TYPE_CHECKING:  # only for annotations: the trainer imports this module
    from .trainer import TrainConfig


def _length(row: Row) -> int:
    return len(row.input_ids) + len(row.decoder_input_ids or ())


def _longest(group: Sequence[Row]) -> int:
    return max(_length(r) for r in group)


def shuffled_groups(rows: Sequence[Row], size: int, rng: random.Random, bucket: bool = False) -> list[list[Row]]:
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


def batches(forget: Sequence[Row], retain: Sequence[Row], config: "TrainConfig") -> Iterator[list[Row]]:
    """Row groups in training order, for every epoch: one group per optimiser step, of
    ``batch_size * accumulate`` rows (per set in the mixed schedule)."""
    rng = random.Random(config.seed)
    size = config.batch_size * config.accumulate
    for _ in range(config.epochs):
        if config.schedule == "alternate":
            yield from shuffled_groups(retain, size, rng, config.bucket_by_length)
            yield from shuffled_groups(forget, size, rng, config.bucket_by_length)
        else:
            big, small = (retain, forget) if len(retain) >= len(forget) else (forget, retain)
            small_groups = shuffled_groups(small, size, rng, config.bucket_by_length) if small else []
            big_groups = shuffled_groups(big, size, rng, config.bucket_by_length)
            if not small_groups:
                yield from big_groups
                continue
            # each group of the larger set goes with the next group of the smaller one, cycling
            partners = list(itertools.islice(itertools.cycle(small_groups), len(big_groups)))
            if config.bucket_by_length:
                # pair long with long and short with short, so the combined batch pads little
                pairs = list(zip(sorted(big_groups, key=_longest), sorted(partners, key=_longest)))
                rng.shuffle(pairs)
            else:
                pairs = list(zip(big_groups, partners))
            for group, partner in pairs:
                yield group + partner


def count_steps(forget: Sequence[Row], retain: Sequence[Row], config: "TrainConfig") -> int:
    n = sum(1 for _ in batches(forget, retain, config))
    return min(n, config.max_steps) if config.max_steps else n
