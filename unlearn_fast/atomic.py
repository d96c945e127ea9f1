"""Atomic directory writes: build the files in a temporary sibling, then rename it into place."""

from __future__ import annotations

import contextlib
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
