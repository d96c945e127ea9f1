"""Atomic writes: build a directory or a file as a temporary sibling, then rename it into place.

Every output of the package goes through here, so they all behave alike:

- :func:`ensure_directory` checks, before any work, that a directory can be written in (it is
  created, a probe file is written and removed);
- :func:`atomic_directory` builds an output as ``.<name>.XXXXXXXX`` next to it, gives the files the
  permissions the umask asks for, flushes them to disk and renames the result into place; an old
  output is moved aside to ``.<name>.old.XXXXXXXX`` first and deleted after;
- :func:`output_errors` turns a failed write (full disk, read-only file system ...) into one
  :class:`~unlearn_fast.errors.OutputError` line;
- :func:`remove_stale` cleans up after a run that was killed mid-write: it restores an old output
  that was moved aside and removes the temporaries, never anything that holds a finished output.

A live write holds an ``flock`` on its temporary directory, so a second run does not take it for
a stale one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from safetensors import SafetensorError

from ..errors import OutputError

PathLike = Union[str, Path]
_RANDOM = "[a-z0-9_]{8}"  # the random part tempfile puts in a name


def ensure_directory(directory: PathLike) -> Path:
    """Create ``directory`` (and its parents) if needed, then write and remove a probe file in it.

    Raises OutputError naming the path and the reason (a read-only file system, a regular file
    where a directory should be, a dangling link) so that it fails before any work is spent.
    """
    directory = Path(directory)
    problem = _not_a_directory(directory)
    if problem:
        raise OutputError(f"cannot write to {directory}: {problem}; choose another location")
    with output_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
        _remove_dead_probes(directory)
        fd, probe = tempfile.mkstemp(prefix=f".probe.{os.getpid()}.", dir=directory)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    return directory


def _remove_dead_probes(directory: Path) -> None:
    """Remove the probe files (``.probe.<pid>.XXXXXXXX``) of processes that no longer run: a process
    killed between writing its probe and removing it leaves one behind."""
    for probe in directory.glob(".probe.*"):
        pid = probe.name.split(".")[2]
        if pid.isdigit() and not _alive(int(pid)):
            probe.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _not_a_directory(directory: Path) -> Optional[str]:
    """Why ``directory`` cannot become a directory (None if it is one or can be created)."""
    for p in (directory, *directory.parents):
        if p.is_symlink() and not p.exists():
            return f"{p} is a symbolic link to a missing {os.readlink(p)}"
        if p.exists():
            return None if p.is_dir() else f"{p} is a file, not a directory"
    return None


@contextlib.contextmanager
def output_errors(path: PathLike) -> Iterator[None]:
    """Turn an OSError or a safetensors write error inside the block into one OutputError line."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        reason = str(getattr(err, "strerror", None) or err)
        full = "No space" in reason or "quota" in reason
        raise OutputError(f"cannot write {path}: {reason}; "
                          f"{'free some space or ' if full else ''}choose another location") from err


@contextlib.contextmanager
def atomic_directory(out: PathLike, *, done: Sequence[str] = (), log: Callable = print) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out``; on success it replaces ``out``.

    An existing ``out`` is moved aside before the rename and deleted after it, so a reader sees
    either the old directory or the new one, never a half-written one. On any error the
    temporary directory is removed and ``out`` is untouched; an OSError or a safetensors write
    error becomes an OutputError. The caller decides whether an existing ``out`` may be
    replaced. Stale temporaries of ``out`` are cleaned first (:func:`remove_stale`, with ``done``
    and ``log``).
    """
    out = Path(out)
    remove_stale(out, done, log)
    with output_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    lock = _lock(tmp)
    try:
        with output_errors(out):
            yield tmp
            _settle(tmp)
            _replace(out, tmp)
            _fsync_directory(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _settle(tmp: Path) -> None:
    """Give the files and directories under ``tmp`` the modes the umask asks for (mkdtemp makes
    0700, safetensors 0600: an output should look like any file the user creates), and flush
    them to disk so that the rename never exposes files whose data is not there yet."""
    mask = os.umask(0o022)
    os.umask(mask)
    for root, _, files in os.walk(tmp, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            os.chmod(path, 0o666 & ~mask)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(root, 0o777 & ~mask)
        _fsync_directory(Path(root))


def _replace(out: Path, tmp: Path) -> None:
    """Rename ``tmp`` to ``out``, moving an existing ``out`` aside first and deleting it after."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    lock = _lock(backup)
    try:
        os.rename(out, backup / out.name)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(backup / out.name, out)  # put the old one back
            raise
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        os.close(lock)
        with contextlib.suppress(OSError):
            backup.rmdir()  # empty unless the old output could not be put back (remove_stale will)


def _fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename is durable only then); skipped where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lock(path: Path, wait: bool = True) -> int:
    """An open descriptor of ``path`` holding an exclusive flock (released when it is closed, or
    when the process dies). Never follows a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale(out: PathLike, done: Sequence[str] = (), log: Callable = print) -> None:
    """Clean up what a killed write of ``out`` left next to it; say what was done through ``log``.

    Only entries named like this module's temporaries of ``out`` (``.<name>.XXXXXXXX`` and
    ``.<name>.old.XXXXXXXX``) that no live process holds are considered:

    - an old ``out`` moved aside (``.<name>.old.X/<name>``) while ``out`` is missing (a kill
      between the two renames) is put back; with ``out`` in place it was already replaced, and
      is removed;
    - a temporary holding one of the ``done`` files (a finished output never renamed into place)
      is left, and reported;
    - any other is removed.
    """
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(old\.)?{_RANDOM}$")
    try:
        found = sorted(p for p in out.parent.iterdir() if pattern.match(p.name))
    except OSError:
        return  # no parent yet, or unreadable: nothing to clean
    for stale in found:
        try:
            lock = _lock(stale, wait=False)
        except OSError:
            continue  # a live write holds it, it is a link, or it is gone already
        try:
            _clean_one(out, stale, done, log)
        except OSError as err:
            log(f"could not clean up {stale} ({err.strerror or err}); remove it yourself")
        finally:
            os.close(lock)


def _clean_one(out: Path, stale: Path, done: Sequence[str], log: Callable) -> None:
    moved = stale / out.name
    if stale.name.startswith(f".{out.name}.old.") and os.path.lexists(moved) and not os.path.lexists(out):
        os.rename(moved, out)
        stale.rmdir()
        log(f"restored {out} from {stale}, where an interrupted run had moved it")
        return
    if stale.is_dir() and any((stale / name).is_file() for name in done):
        log(f"left {stale}: it holds a finished output that an interrupted run never renamed to {out}; "
            f"rename or remove it yourself")
        return
    if stale.is_dir():
        shutil.rmtree(stale)
    else:
        stale.unlink()
    log(f"removed {stale}, left behind by an interrupted write of {out}")


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
