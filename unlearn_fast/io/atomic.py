"""Atomic writes: build a directory or a file as a temporary sibling, then rename it into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union


@contextlib.contextmanager
def atomic_directory(out: Union[str, Path]) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out``; on success it replaces ``out``.

    An existing ``out`` is moved aside before the rename and deleted after it, so a reader sees
    either the old directory or the new one, never a half-written one. On any error the
    temporary directory is removed and ``out`` is untouched. The caller decides whether an
    existing ``out`` may be replaced.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rename(out, backup / out.name)
            os.rename(tmp, out)
            shutil.rmtree(backup)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Union[str, Path], obj, **dump_kwargs) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary sibling file (flushed to disk, then
    renamed): a reader, or a run killed mid-write, sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, **dump_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
