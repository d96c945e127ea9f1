"""A ledger of deletion requests for one base model: add, list, fuse, remove (undo).

A ledger is a directory::

    LEDGER/
      ledger.json          the requests, in order, and what the merged layer covers
      requests/r1/ ...     one artifact per request (its layers, Gram matrices and cross terms)
      merged/              the current fused artifact (serve it with ``load_layers``)

Adding a request registers an artifact written by ``unlearn`` (checked against the ledger's base
model and layout) and stores a copy with its fusion cross terms precomputed. Fusing merges every
request into ``merged/``; when ``merged/`` already covers some of them with the same ρ, only the
new ones are fused into it (exact, see :mod:`unlearn_fast.fusion.closed_form`). Removing a request re-fuses
the remaining requests from their stored weights and Gram matrices — no retraining — and deletes
the removed request's files.

``ledger.json`` is replaced atomically after the artifacts it points to are in place. One writer
at a time: the ledger takes no lock.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Optional, Union

from ..errors import UnlearnFastError
from ..io.artifacts import read_artifact, read_manifest, write_artifact
from ..io.atomic import write_json
from .closed_form import DEFAULT_RHO, check_compatible, fuse_paths, request_records, with_cross_terms

LEDGER_FILE = "ledger.json"
REQUESTS_DIR = "requests"
MERGED_DIR = "merged"
LEDGER_VERSION = 1
PathLike = Union[str, Path]


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


def list_requests(ledger: PathLike) -> list[dict]:
    """The ledger's requests in the order they were added; each says whether ``merged/`` covers it."""
    state = read_ledger(ledger)
    covered = set((state.get("merged") or {}).get("requests", []))
    return [{**r, "merged": r["id"] in covered} for r in state["requests"]]


def merged_path(ledger: PathLike) -> Optional[Path]:
    """Directory of the fused artifact, or None when nothing has been fused (or all was removed)."""
    state = read_ledger(ledger)
    return Path(ledger) / state["merged"]["artifact"] if state.get("merged") else None


def add_request(ledger: PathLike, artifact: PathLike, name: Optional[str] = None) -> dict:
    """Register the artifact of one deletion request (written by ``unlearn``); return its record.

    Creates the ledger on first use (an absent or empty directory); afterwards the artifact must
    match the ledger's base model (fingerprint) and layer layout, and must not be there already.
    """
    ledger, artifact = Path(ledger), Path(artifact)
    manifest, tensors = read_artifact(artifact)
    if "fusion" in manifest:
        raise LedgerError(f"{artifact}: a fused artifact ({len(manifest['fusion']['requests'])} requests); "
                          f"add the artifacts of the individual requests instead")
    if (ledger / LEDGER_FILE).is_file():
        state = read_ledger(ledger)
    elif ledger.exists() and (not ledger.is_dir() or any(ledger.iterdir())):
        raise LedgerError(f"{ledger}: exists and is not a ledger (no {LEDGER_FILE})")
    else:
        state = {"format_version": LEDGER_VERSION, "base_model": manifest.get("base_model"),
                 "task": manifest.get("task"), "created": _now(), "next": 1, "requests": [], "merged": None}
    request = request_records(manifest)[0]
    known = {r["request"]["id"]: r["id"] for r in state["requests"]}
    if request["id"] in known:
        raise LedgerError(f"{artifact}: this request is already in the ledger as {known[request['id']]}")
    if state["requests"]:
        first = state["requests"][0]
        check_compatible([read_manifest(ledger / first["artifact"]), manifest],
                         [f"ledger {ledger} ({first['id']})", str(artifact)])
    else:
        check_compatible([manifest], [str(artifact)])
    rid = f"r{state['next']}"
    record = {"id": rid, "name": name, "added": _now(), "source": str(artifact), "request": request,
              "artifact": f"{REQUESTS_DIR}/{rid}"}
    stored = with_cross_terms(tensors, manifest["layers"]["sites"], str(artifact))
    copy = {k: v for k, v in manifest.items() if k not in ("files", "format_version")}
    ledger.mkdir(parents=True, exist_ok=True)
    # overwrite: a directory left by an interrupted add is not in ledger.json, which is the truth
    write_artifact(ledger / record["artifact"], stored, {**copy, "request": request}, overwrite=True)
    state["requests"].append(record)
    state["next"] += 1
    _write_ledger(ledger, state)
    return record


def fuse_requests(ledger: PathLike, rho: float = DEFAULT_RHO) -> Path:
    """Fuse every request into ``LEDGER/merged`` and return that directory.

    When ``merged/`` already covers some requests (fused with the same ρ), only the others are
    fused into it; when it covers them all, nothing is done.
    """
    ledger = Path(ledger)
    state = read_ledger(ledger)
    if not state["requests"]:
        raise LedgerError(f"{ledger}: holds no requests to fuse")
    ids = [r["id"] for r in state["requests"]]
    merged = state.get("merged")
    out = ledger / MERGED_DIR
    reuse = bool(merged) and merged.get("rho") == rho and set(merged["requests"]) <= set(ids) and out.is_dir()
    if reuse and set(merged["requests"]) == set(ids):
        return out
    todo = [r for r in state["requests"] if not (reuse and r["id"] in merged["requests"])]
    inputs = ([out] if reuse else []) + [ledger / r["artifact"] for r in todo]
    _write_merged(ledger, state, inputs, ids, rho)
    return out


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
        raise LedgerError(f"{ledger}: {'no' if not matches else 'more than one'} request {which!r}; "
                          f"it holds {known or 'none'}")
    return matches[0]


def remove_request(ledger: PathLike, which: str, rho: Optional[float] = None) -> dict:
    """Undo a request (by ledger id, name or request id): drop it and re-fuse the others.

    When a merged layer exists it is rebuilt from the remaining requests' stored weights and Gram
    matrices (with ``rho``, default: the ρ it was fused with) before the request's files are
    deleted; when none remain, ``merged/`` is deleted. Returns the removed record.
    """
    ledger = Path(ledger)
    state = read_ledger(ledger)
    record = _find(state, ledger, which)
    state["requests"] = [r for r in state["requests"] if r["id"] != record["id"]]
    merged = state.get("merged")
    if merged and state["requests"]:
        rho = merged.get("rho", DEFAULT_RHO) if rho is None else rho
        _write_merged(ledger, state, [ledger / r["artifact"] for r in state["requests"]],
                      [r["id"] for r in state["requests"]], rho)
    else:
        state["merged"] = None
        _write_ledger(ledger, state)
        shutil.rmtree(ledger / MERGED_DIR, ignore_errors=True)
    shutil.rmtree(ledger / record["artifact"], ignore_errors=True)
    return record
