"""Gradient checkpointing of the blocks the student's backward runs through.

The base is frozen, so the student's backward only runs through the blocks at or above the lowest
unlearning layer (nothing below it requires grad); those blocks keep their activations from the
forward pass for the backward, about ``(6·d + 2·d_kv + 3·d_ff)`` values per token per block for a
Llama-family block (see :mod:`unlearn_fast.train.plan`). :func:`checkpointed_blocks` makes each of
them keep only its input instead, and run its forward once more during the backward pass
(``torch.utils.checkpoint``, non-reentrant): one extra forward of those blocks per step for
activations of one block at a time.

The math is unchanged (the recomputation runs the same code on the same inputs; dropout is off
while training), so losses, teacher cache, trunk replay and artifacts are the same. Like
:func:`unlearn_fast.model.fused_trunk.fused_trunk`, only each block's ``forward`` is overridden on
the instance, and restored on exit: hooks, parameters and state-dict keys stay as they are (what
FSDP2 wraps, and what a forward that an outer context already overrode, e.g. ``torch.compile``, keeps).
The teacher's forward runs under ``torch.no_grad`` and is not checkpointed.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import block_lists, sites


def trained_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks the student's backward passes through: in each block list, those at or above its
    lowest unlearning layer, and every block of a later list (an encoder-decoder's decoder reads
    the encoder's output) once an earlier list has layers. A model without unlearning layers (a
    full-parameter baseline) trains every block."""
    attached = sites(model)
    if not attached:
        return [block for _, blocks in block_lists(model) for block in blocks]
    found, seen_layers = [], False
    for list_path, blocks in block_lists(model):
        indices = [s.block for s in attached if s.path.startswith(list_path + ".")]
        start = 0 if seen_layers else min(indices, default=len(blocks))
        found += list(blocks)[start:]
        seen_layers = seen_layers or bool(indices)
    return found


def _checkpointed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # the teacher, evaluation: nothing to keep for a backward
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[list[nn.Module]]:
    """Within the context, every block of :func:`trained_blocks` runs under gradient checkpointing.
    Yields the blocks it wrapped; their previous ``forward`` is back on exit."""
    blocks = trained_blocks(model) if enabled else []
    previous = [vars(block).get("forward") for block in blocks]  # an instance override, or None
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    try:
        yield blocks
    finally:
        for block, forward in zip(blocks, previous):
            if forward is None:
                del block.forward  # the class's forward is back
            else:
                block.forward = forward
