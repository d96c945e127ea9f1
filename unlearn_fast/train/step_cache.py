"""Work a training step need not repeat: the teacher's outputs and the frozen trunk.

During unlearning nothing below the lowest unlearning layer changes, and the teacher never
changes at all. So, per training row:

- ``teacher``: the teacher's final hidden states, computed the first time the row is seen and
  fed to the loss head from then on (the same values, so the same loss);
- ``trunk``: the output of the last block below the lowest unlearning layer. Teacher and student
  compute it identically, so within a step the student reuses the teacher's, and in later
  epochs neither recomputes it: the blocks below are swapped for stand-ins that replay it.

Both are stored per row at its real (unpadded) positions, in the model's dtype, on the
model's device (or CPU with ``offload=True``). Backward stops at the lowest unlearning layer on
its own: nothing below it requires grad.

Only single-stack models (decoder-only LMs, encoder classifiers) get the trunk replay; for T5
the teacher cache still applies.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..model.layers import block_lists, sites


class _PassThrough(nn.Module):
    """Stands in for a block below the replayed one: its output is never used, so it returns its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Replay(nn.Module):
    """Stands in for the last trunk block: returns the stored trunk output."""

    def __init__(self, output: Tensor):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class StepCache:
    """Per-row teacher states and trunk outputs for one model and one training run."""

    def __init__(self, model: nn.Module, task: str, teacher: bool = True, trunk: bool = True,
                 offload: bool = False):
        self.model = model
        self.use_teacher = teacher
        self.offload = offload
        self.teacher: dict[int, Tensor] = {}
        self.trunk: dict[int, Tensor] = {}
        self.blocks, self.lowest = None, 0
        lists = block_lists(model)
        if trunk and task in ("causal", "classification") and len(lists) == 1:
            lowest = min((s.block for s in sites(model)), default=0)
            if lowest > 0:
                self.blocks, self.lowest = lists[0][1], lowest

    # -- storage helpers -------------------------------------------------------------
    def _store(self, table: dict, rows: Sequence, states: Tensor, lengths: Sequence[int]) -> None:
        target = "cpu" if self.offload else states.device
        for row, state, n in zip(rows, states.detach(), lengths):
            table[id(row)] = state[:n].to(target, copy=True)

    @staticmethod
    def _assemble(table: dict, rows: Sequence, width: int, device) -> Optional[Tensor]:
        if not all(id(r) in table for r in rows):
            return None
        first = table[id(rows[0])]
        out = torch.zeros(len(rows), width, *first.shape[1:], dtype=first.dtype, device=device)
        for i, row in enumerate(rows):
            state = table[id(row)]
            out[i, : state.shape[0]] = state.to(device)
        return out

    # -- teacher ---------------------------------------------------------------------
    def has_teacher(self, row) -> bool:
        return id(row) in self.teacher

    def cached_teacher(self, rows: Sequence, width: int, device) -> Optional[Tensor]:
        return self._assemble(self.teacher, rows, width, device) if self.use_teacher else None

    def store_teacher(self, rows: Sequence, states: Tensor, lengths: Sequence[int]) -> None:
        if self.use_teacher:
            self._store(self.teacher, rows, states, lengths)

    # -- trunk -----------------------------------------------------------------------
    @contextlib.contextmanager
    def recording_trunk(self, rows: Sequence, lengths: Sequence[int]):
        """Record the last trunk block's output during a forward pass (if not yet cached)."""
        if self.blocks is None or all(id(r) in self.trunk for r in rows):
            yield
            return

        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self._store(self.trunk, rows, out, lengths)

        handle = self.blocks[self.lowest - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def replaying_trunk(self, rows: Sequence, width: int, device):
        """Skip the blocks below the lowest unlearning layer when their output is cached."""
        replay = None if self.blocks is None else self._assemble(self.trunk, rows, width, device)
        if replay is None:
            yield
            return
        originals = [self.blocks[i] for i in range(self.lowest)]
        try:
            for i in range(self.lowest - 1):
                self.blocks[i] = _PassThrough()
            self.blocks[self.lowest - 1] = _Replay(replay)
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
