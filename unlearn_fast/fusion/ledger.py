"""A ledger of deletion requests for one base model: add, list, fuse, remove (undo).

A ledger is a directory::

    LEDGER/
      ledger.json          the requests, in order, and what the merged layer covers
      requests/r1/ ...     one artifact per request (its layers, Gram matrices and cross terms)
      merged/              the current fused artifact (serve it with ``load_layers``)
      .lock                taken (flock) by every operation that writes

Adding a request registers an artifact written by ``unlearn`` (checked against the ledger's base
model and layout) and stores a copy with its fusion cross terms precomputed. Fusing merges every
request into ``merged/``; when ``merged/`` already covers some of them with the same ρ, only the
new ones are fused into it (exact, see :mod:`unlearn_fast.fusion.closed_form`). Removing a request re-fuses
the remaining requests from their stored weights and Gram matrices — no retraining — and deletes
the removed request's files.

``ledger.json`` is the truth. It is replaced atomically after the artifacts it points to are in
place, and every add / fuse / remove holds an exclusive ``flock`` on ``LEDGER/.lock`` from its read
of ``ledger.json`` to its last write, so concurrent writers queue instead of losing each other's
requests (reading, ``list``, takes no lock). Under the lock, what an interrupted operation left
behind (temporaries of the atomic writes, request directories ``ledger.json`` does not list) is
removed first. The ledger only reads and deletes paths of its own naming inside its folder
(``requests/rN``, ``merged``): an entry of ``ledger.json`` that names anything else, or that leads out
of the folder through a symbolic link, is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from ..errors import UnlearnFastError
from ..io.artifacts import read_artifact, read_manifest, write_artifact
from ..io.atomic import write_json
from .closed_form import DEFAULT_RHO, check_compatible, fuse_paths, request_records, with_cross_terms

LEDGER_FILE = "ledger.json"
REQUESTS_DIR = "requests"
MERGED_DIR = "merged"
LOCK_FILE = ".lock"
LEDGER_VERSION = 1
PathLike = Union[str, Path]
Log = Callable[[str], None]

_ID = re.compile(r"r[1-9][0-9]*")
# temporaries of io.atomic (a ".<name>." prefix): requests/.rN.XXXX, .merged.XXXX, .ledger.json.XXXX,
# and the ".<name>.old.XXXX" a replaced directory is moved to
_REQUEST_TEMP = re.compile(r"\.r[1-9][0-9]*\..+")
_ROOT_TEMPS = (f".{LEDGER_FILE}.", f".{MERGED_DIR}.")


class LedgerError(UnlearnFastError):
    """A ledger is missing, malformed, or asked for a request it does not hold."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_ledger(ledger: PathLike) -> dict:
    """The ledger's state (the parsed ``ledger.json``)."""
    path = Path(ledger) / LEDGER_FILE
    if not path.is_file():
        raise LedgerError(f"{path}: not found (is {ledger} a ledger? `ledger add` creates one)")
    try:
        with open(path) as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LedgerError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(state, dict) or state.get("format_version") != LEDGER_VERSION:
        raise LedgerError(f"{path}: unsupported ledger format {state.get('format_version') if isinstance(state, dict) else state!r}")
    return state


def _write_ledger(ledger: Path, state: dict) -> None:
    write_json(ledger / LEDGER_FILE, state, indent=2, sort_keys=True)


# -- paths: only the ledger's own, inside its folder ------------------------------------------
def _own_path(ledger: Path, named: object, own: str, entry: str) -> Path:
    """``LEDGER/own``, once sure that ``ledger.json`` names exactly it for ``entry`` and that it does
    not lead elsewhere through a symbolic link: the ledger touches only what it created."""
    if named != own:
        raise LedgerError(f"{ledger / LEDGER_FILE}: {entry} points to {named!r}, not to the ledger's own {own!r} "
                          f"(was the file edited?); refusing to read or delete it")
    path = ledger / own
    real = path.resolve()
    if real != ledger.resolve() / own:
        raise LedgerError(f"{path}: {entry} leads to {real} through a symbolic link, outside the ledger's own "
                          f"{own!r}; refusing to read or delete it")
    return path


def _request_path(ledger: Path, record: dict) -> Path:
    rid = record.get("id")
    if not (isinstance(rid, str) and _ID.fullmatch(rid)):
        raise LedgerError(f"{ledger / LEDGER_FILE}: a request has the malformed id {rid!r} (was the file edited?)")
    return _own_path(ledger, record.get("artifact"), f"{REQUESTS_DIR}/{rid}", f"request {rid}")


def _merged_path(ledger: Path, state: dict) -> Optional[Path]:
    merged = state.get("merged")
    return _own_path(ledger, merged.get("artifact"), MERGED_DIR, "the merged layer") if merged else None


def _delete(path: Path) -> None:
    """Delete a file, a symbolic link (never what it points to) or a directory tree."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)  # a leftover is an orphan the next operation removes


# -- the lock, and what an interrupted operation leaves ----------------------------------------
@contextlib.contextmanager
def _locked(ledger: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``ledger`` (an existing directory) until the block ends."""
    try:  # O_NOFOLLOW: a planted symbolic link must not make us create a file elsewhere
        fd = os.open(ledger / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise LedgerError(f"{ledger / LOCK_FILE}: cannot open the ledger's lock file ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _is_skeleton(ledger: Path) -> bool:
    """Whether ``ledger`` holds only what an interrupted first ``add`` leaves (the lock file, an
    empty ``requests/``, temporaries of the ledger's own naming): it is completed, not refused."""
    for p in ledger.iterdir():
        if p.is_symlink():
            return False
        if p.name == LOCK_FILE or p.name.startswith(_ROOT_TEMPS):
            continue
        if p.name == REQUESTS_DIR and p.is_dir() and all(_REQUEST_TEMP.fullmatch(q.name) for q in p.iterdir()):
            continue
        return False
    return True


def _clean(ledger: Path, state: Optional[dict], log: Log) -> None:
    """Remove (under the lock) what an interrupted operation left: temporaries of the atomic writes
    and request directories that ``ledger.json`` (``state``; None: not written yet) does not list."""
    stale = [p for p in ledger.iterdir() if p.name.startswith(_ROOT_TEMPS)]
    requests = ledger / REQUESTS_DIR
    if requests.is_dir() and not requests.is_symlink():
        listed = {r.get("id") for r in state["requests"]} if state else set()
        stale += [p for p in requests.iterdir() if _REQUEST_TEMP.fullmatch(p.name)
                  or (state is not None and _ID.fullmatch(p.name) and p.name not in listed)]
    for p in stale:
        _delete(p)
    if stale:
        log(f"{ledger}: removed {len(stale)} entr{'y' if len(stale) == 1 else 'ies'} left by an interrupted "
            f"operation: {', '.join(str(p.relative_to(ledger)) for p in sorted(stale))}")


@contextlib.contextmanager
def _writing(ledger: Path, log: Log) -> Iterator[dict]:
    """Lock an existing ledger, clean it up and yield its state, for one read-modify-write."""
    read_ledger(ledger)  # refuse a missing ledger before creating a lock file in it
    with _locked(ledger):
        state = read_ledger(ledger)
        _clean(ledger, state, log)
        yield state


# -- the operations ---------------------------------------------------------------------------
def list_requests(ledger: PathLike, which: Optional[str] = None) -> list[dict]:
    """The ledger's requests in the order they were added (or only ``which``: a ledger id, name or
    request id); each says whether ``merged/`` covers it. Reads ``ledger.json`` only, without lock."""
    state = read_ledger(ledger)
    covered = set((state.get("merged") or {}).get("requests", []))
    records = [_find(state, Path(ledger), which)] if which is not None else state["requests"]
    return [{**r, "merged": r["id"] in covered} for r in records]


def merged_path(ledger: PathLike) -> Optional[Path]:
    """Directory of the fused artifact, or None when nothing has been fused (or all was removed)."""
    return _merged_path(Path(ledger), read_ledger(ledger))


def add_request(ledger: PathLike, artifact: PathLike, name: Optional[str] = None, log: Log = print) -> dict:
    """Register the artifact of one deletion request (written by ``unlearn``); return its record.

    Creates the ledger on first use (an absent or empty directory, or the skeleton an interrupted
    first add left); afterwards the artifact must match the ledger's base model (fingerprint) and
    layer layout, and must not be there already. ``log`` reports a clean-up of leftovers.
    """
    ledger, artifact = Path(ledger), Path(artifact)
    manifest, tensors = read_artifact(artifact)
    if "fusion" in manifest:
        raise LedgerError(f"{artifact}: a fused artifact ({len(manifest['fusion']['requests'])} requests); "
                          f"add the artifacts of the individual requests instead")
    # skeleton first: ledger.json is written before anything else appears, so a ledger being
    # created meanwhile shows as a skeleton or has its ledger.json by the time we look
    if ledger.exists() and not (ledger.is_dir() and _is_skeleton(ledger)) and not (ledger / LEDGER_FILE).is_file():
        raise LedgerError(f"{ledger}: exists and is not a ledger (no {LEDGER_FILE})")
    ledger.mkdir(parents=True, exist_ok=True)
    with _locked(ledger):
        if (ledger / LEDGER_FILE).is_file():
            state = read_ledger(ledger)
        elif _is_skeleton(ledger):
            state = None
        else:
            raise LedgerError(f"{ledger}: exists and is not a ledger (no {LEDGER_FILE})")
        _clean(ledger, state, log)
        return _add_locked(ledger, state, artifact, manifest, tensors, name)


def _add_locked(ledger: Path, state: Optional[dict], artifact: Path, manifest: dict, tensors, name) -> dict:
    request = request_records(manifest)[0]
    known = {r["request"]["id"]: r["id"] for r in (state or {}).get("requests", [])}
    if request["id"] in known:
        raise LedgerError(f"{artifact}: this request is already in the ledger as {known[request['id']]}")
    if state and state["requests"]:
        first = state["requests"][0]
        check_compatible([read_manifest(_request_path(ledger, first)), manifest],
                         [f"ledger {ledger} ({first['id']})", str(artifact)])
    else:
        check_compatible([manifest], [str(artifact)])
    stored = with_cross_terms(tensors, manifest["layers"]["sites"], str(artifact))
    if state is None:  # a new ledger: its ledger.json comes first, so it is never a bare skeleton again
        state = {"format_version": LEDGER_VERSION, "created": _now(), "next": 1, "requests": [], "merged": None}
        _write_ledger(ledger, state)
    if not state["requests"]:
        state.update(base_model=manifest.get("base_model"), task=manifest.get("task"))
    # ids are never reused (also when "next" was edited down): an undo names one request only
    n = max([int(state["next"])] + [int(r["id"][1:]) + 1 for r in state["requests"] if _ID.fullmatch(str(r["id"]))])
    rid = f"r{n}"
    record = {"id": rid, "name": name, "added": _now(), "source": str(artifact), "request": request,
              "artifact": f"{REQUESTS_DIR}/{rid}"}
    copy = {k: v for k, v in manifest.items() if k not in ("files", "format_version")}
    write_artifact(_request_path(ledger, record), stored, {**copy, "request": request}, overwrite=True)
    state["requests"].append(record)
    state["next"] = n + 1
    _write_ledger(ledger, state)
    return record


def fuse_requests(ledger: PathLike, rho: float = DEFAULT_RHO, log: Log = print) -> Path:
    """Fuse every request into ``LEDGER/merged`` and return that directory.

    When ``merged/`` already covers some requests (fused with the same ρ), only the others are
    fused into it; when it covers them all, nothing is done.
    """
    ledger = Path(ledger)
    with _writing(ledger, log) as state:
        if not state["requests"]:
            raise LedgerError(f"{ledger}: holds no requests to fuse")
        paths = {r["id"]: _request_path(ledger, r) for r in state["requests"]}
        merged, out = state.get("merged"), _merged_path(ledger, state)
        reuse = bool(merged) and merged.get("rho") == rho and set(merged["requests"]) <= set(paths) and out.is_dir()
        if reuse and set(merged["requests"]) == set(paths):
            return out
        inputs = ([out] if reuse else []) + [p for rid, p in paths.items() if not (reuse and rid in merged["requests"])]
        _write_merged(ledger, state, inputs, list(paths), rho)
        return ledger / MERGED_DIR


def _write_merged(ledger: Path, state: dict, inputs: list[Path], ids: list[str], rho: float) -> None:
    tensors, manifest = fuse_paths(inputs, rho)
    manifest["ledger"] = {"requests": ids}
    write_artifact(ledger / MERGED_DIR, tensors, manifest, overwrite=True)
    state["merged"] = {"artifact": MERGED_DIR, "requests": ids, "rho": rho, "fused": _now()}
    _write_ledger(ledger, state)


def _find(state: dict, ledger: Path, which: str) -> dict:
    matches = [r for r in state["requests"] if which in (r["id"], r.get("name"), r["request"]["id"])]
    if len(matches) != 1:
        known = ", ".join(r["id"] + (f" ({r['name']})" if r.get("name") else "") for r in state["requests"])
        if not matches and _ID.fullmatch(which) and int(which[1:]) < int(state.get("next", 1)):
            raise LedgerError(f"{ledger}: request {which} was removed already; it holds {known or 'none'}")
        raise LedgerError(f"{ledger}: {'no' if not matches else 'more than one'} request {which!r}; "
                          f"it holds {known or 'none'}")
    return matches[0]


def remove_request(ledger: PathLike, which: str, rho: Optional[float] = None, log: Log = print) -> dict:
    """Undo a request (by ledger id, name or request id): drop it and re-fuse the others.

    When a merged layer exists it is rebuilt from the remaining requests' stored weights and Gram
    matrices (with ``rho``, default: the ρ it was fused with) before the request's files are
    deleted; when none remain, ``merged/`` is deleted. Returns the removed record.
    """
    ledger = Path(ledger)
    with _writing(ledger, log) as state:
        record = _find(state, ledger, which)
        target = _request_path(ledger, record)  # every path is checked before anything changes
        paths = {r["id"]: _request_path(ledger, r) for r in state["requests"]}
        merged = state.get("merged")
        _merged_path(ledger, state)
        state["requests"] = [r for r in state["requests"] if r["id"] != record["id"]]
        if merged and state["requests"]:
            rho = merged.get("rho", DEFAULT_RHO) if rho is None else rho
            ids = [r["id"] for r in state["requests"]]
            _write_merged(ledger, state, [paths[i] for i in ids], ids, rho)
        else:
            state["merged"] = None
            _write_ledger(ledger, state)
            _delete(ledger / MERGED_DIR)
        _delete(target)
        return record
