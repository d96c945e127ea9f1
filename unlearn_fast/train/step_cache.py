"""Work a training step need not repeat: the teacher's outputs and the frozen trunk.

During unlearning nothing below the lowest unlearning layer changes, and the teacher never
changes at all. So, per training row:

- ``teacher``: the teacher's final hidden states, computed the first time the row is seen and
  fed to the loss head from then on (the same values, so the same loss);
- ``trunk``: the output of the last block below the lowest unlearning layer. Teacher and student
  compute it identically, so within a step the student reuses the teacher's, and in later
  epochs neither recomputes it: the blocks below are swapped for stand-ins that replay it.

Both are stored per row at its real (unpadded) positions, in the model's dtype. Where
(``store``, the ``--teacher-cache`` option; :data:`TEACHER_CACHES`):

- ``gpu`` (the default): on the training device, whatever it is (a CPU run: in its memory);
- ``cpu``: in CPU memory, pinned when CUDA is available (each step copies its rows back);
- ``disk``: appended to one memory-mapped file in a temporary directory (under ``$TMPDIR``), which
  :meth:`StepCache.close` removes (and, failing that, the interpreter's exit);
- ``off``: nothing is kept between steps: the teacher runs every step, and the trunk output is
  shared between teacher and student within the step only.

The stored values are the same in every mode, so the losses are. Backward stops at the lowest
unlearning layer on its own: nothing below it requires grad.

Only single-stack models (decoder-only LMs, encoder classifiers) get the trunk replay; for T5
the teacher cache still applies.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UnlearnFastError
from ..model.layers import block_lists, sites

# where the step cache keeps its tables (see the module docstring); "gpu" is the default
TEACHER_CACHES = ("gpu", "cpu", "disk", "off")
_ALIGN = 64  # bytes: each row's record in the disk file starts at a multiple of this


def teacher_cache_mode(value: Union[str, bool]) -> str:
    """``value`` as one of :data:`TEACHER_CACHES` (True: ``gpu``, False: ``off``, as the former
    boolean ``teacher_cache`` meant); anything else is an error that names the choices."""
    if value is True or value is False:
        return "gpu" if value else "off"
    if isinstance(value, str) and value.strip().lower() in TEACHER_CACHES:
        return value.strip().lower()
    raise UnlearnFastError(f"teacher cache must be one of {', '.join(TEACHER_CACHES)} (--teacher-cache), "
                           f"got {value!r}")


class _DeviceTable(dict):
    """Row id -> tensor, each kept where ``target`` says (None: where it was computed)."""

    def __init__(self, target: Optional[str] = None, pin: bool = False):
        super().__init__()
        self.target, self.pin = target, pin

    def put(self, key: int, value: Tensor) -> None:
        if self.target is None:
            self[key] = value.clone()
        elif self.pin:
            self[key] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value)
        else:
            self[key] = value.to(self.target, copy=True)

    def close(self) -> None:
        self.clear()


class _DiskTable:
    """Row id -> tensor, the values appended to one file and read back through a memory map.

    A row stored again (the trunk recorded for a batch that holds it) overwrites its own record.
    The file lives in a fresh temporary directory, removed by :meth:`close` (or at exit)."""

    def __init__(self, prefix: str):
        self.directory = Path(tempfile.mkdtemp(prefix=f"unlearn-fast-{prefix}-"))
        self.path = self.directory / "rows.bin"
        self.file = open(self.path, "w+b")
        self.index: dict[int, tuple[int, int, torch.Size, torch.dtype]] = {}  # offset, bytes, shape, dtype
        self.size = 0
        self.map: Optional[np.memmap] = None
        self._remove = weakref.finalize(self, _remove_directory, self.file, self.directory)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key) -> bool:
        return key in self.index

    def put(self, key: int, value: Tensor) -> None:
        data = value.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()
        known = self.index.get(key)
        if known is not None and known[1] == raw.nbytes:
            offset = known[0]
        else:
            offset = self.size
            self.size += -(-raw.nbytes // _ALIGN) * _ALIGN
        self.file.seek(offset)
        self.file.write(raw.tobytes())
        self.index[key] = (offset, raw.nbytes, data.shape, data.dtype)

    def __getitem__(self, key: int) -> Tensor:
        offset, nbytes, shape, dtype = self.index[key]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if self.map is None or self.map.shape[0] < offset + nbytes:
            self.file.flush()
            self.map = np.memmap(self.path, dtype=np.uint8, mode="c")  # copy-on-write: never written back
        return torch.from_numpy(self.map[offset: offset + nbytes]).view(dtype).reshape(shape)

    def pop(self, key: int, default=None):
        return self.index.pop(key, default)  # the record stays in the file until close

    def clear(self) -> None:
        self.index.clear()

    def close(self) -> None:
        self.map = None
        self.index.clear()
        self._remove()


def _remove_directory(file, directory: Path) -> None:
    file.close()
    shutil.rmtree(directory, ignore_errors=True)


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
    """Per-row teacher states and trunk outputs for one model and one training run.

    ``store``: where the tables live, one of :data:`TEACHER_CACHES` (``off`` turns the teacher
    cache off, whatever ``teacher`` says, and keeps the trunk within a step only); ``offload=True``
    is the former spelling of ``store="cpu"``. :meth:`close` frees the tables (and removes the disk
    mode's file); the trainer's caller calls it once training is over."""

    def __init__(self, model: nn.Module, task: str, teacher: bool = True, trunk: bool = True,
                 offload: bool = False, store: str = "gpu"):
        self.model = model
        self.store = "cpu" if offload and store == "gpu" else teacher_cache_mode(store)
        self.use_teacher = teacher and self.store != "off"
        self.offload = self.store in ("cpu", "disk")
        self.keep_trunk = self.store != "off"  # off: the trunk is shared within a step, then dropped
        self.teacher = self._table("teacher")
        self.trunk = self._table("trunk")
        self.teacher_rows = 0  # rows whose teacher states were cached (kept after close)
        self.blocks, self.lowest = None, 0
        lists = block_lists(model)
        if trunk and task in ("causal", "classification") and len(lists) == 1:
            lowest = min((s.block for s in sites(model)), default=0)
            if lowest > 0:
                self.blocks, self.lowest = lists[0][1], lowest

    def _table(self, name: str):
        if self.store == "disk":
            return _DiskTable(name)
        if self.store == "cpu":
            return _DeviceTable("cpu", pin=torch.cuda.is_available())
        return _DeviceTable()

    def close(self) -> None:
        """Free both tables; the disk mode's temporary directory is removed."""
        self.teacher.close()
        self.trunk.close()

    def end_step(self) -> None:
        """Called by the objective after each batch: with ``off``, forget the trunk outputs."""
        if not self.keep_trunk:
            self.trunk.clear()

    # -- storage helpers -------------------------------------------------------------
    @staticmethod
    def _store(table, rows: Sequence, states: Tensor, lengths: Sequence[int]) -> None:
        for row, state, n in zip(rows, states.detach(), lengths):
            table.put(id(row), state[:n])

    @staticmethod
    def _assemble(table, rows: Sequence, width: int, device) -> Optional[Tensor]:
        if not all(id(r) in table for r in rows):
            return None
        first = table[id(rows[0])]
        out = torch.zeros(len(rows), width, *first.shape[1:], dtype=first.dtype, device=device)
        for i, row in enumerate(rows):
            state = table[id(row)]
            out[i, : state.shape[0]] = state.to(device, non_blocking=state.is_pinned())
        return out

    # -- teacher ---------------------------------------------------------------------
    def has_teacher(self, row) -> bool:
        return id(row) in self.teacher

    def cached_teacher(self, rows: Sequence, width: int, device) -> Optional[Tensor]:
        return self._assemble(self.teacher, rows, width, device) if self.use_teacher else None

    def store_teacher(self, rows: Sequence, states: Tensor, lengths: Sequence[int]) -> None:
        if self.use_teacher:
            self._store(self.teacher, rows, states, lengths)
            self.teacher_rows = len(self.teacher)

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
