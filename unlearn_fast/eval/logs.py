"""Retain logs: the retrained model's per-example statistics, saved once and reused.

Forget quality (a KS test between per-example truth ratios or losses on the forget set) and privleak
(the relative gap between membership-inference AUCs) compare an unlearned model with the model
retrained without the forget set. open-unlearning does not re-run that model for every comparison: it
reads its saved evaluation (``retain_logs_path``). This module does the same for our figures.

``unlearn-fast eval --model RETRAINED ... --save-logs FILE`` writes one JSON file (:func:`save_logs`):

    {"format": "unlearn-fast retain logs", "version": 1, "meta": {...},
     "sets": {name: {"examples": n, "sha256": ...}},       # what was evaluated (:func:`set_fingerprint`)
     "figures": {...},                                     # every figure, "mia" AUCs included
     "per_example": {"forget": [{"truth_ratio", "loss", "mia_min_k", ...}, ...]}}

and ``unlearn-fast eval ... --retain-logs FILE`` uses it in place of a live ``--retrained`` model
(:func:`load_logs`, :func:`check_sets`, :func:`as_result`): the same forget quality, privleak and gaps,
without loading the retrained model.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import DataError, UnlearnFastError
from ..io.atomic import write_json
from ..train.data import Example

LOGS_FORMAT = "unlearn-fast retain logs"
LOGS_VERSION = 1


def set_fingerprint(examples: Sequence[Example]) -> dict:
    """Size and SHA-256 of a set's examples (their fields, perturbed answers included): two
    evaluations compare per-example statistics only when the sets are the same."""
    text = json.dumps([e.to_dict() for e in examples], sort_keys=True, ensure_ascii=False)
    return {"examples": len(examples), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def _json_safe(value):
    """NaN / inf as null, tuples as lists (the file stays plain JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def retain_logs(result: dict, sets: dict[str, Sequence[Example]], *, forget: str = "forget",
                meta: Optional[dict] = None) -> dict:
    """The logs of one :func:`~unlearn_fast.eval.per_example.evaluate_model` result: every figure, the
    forget set's per-example statistics and the fingerprint of every evaluated set."""
    if forget not in result.get("per_example", {}):
        raise UnlearnFastError("retain logs need per-example statistics of the forget set; give --forget")
    return _json_safe({"format": LOGS_FORMAT, "version": LOGS_VERSION, "meta": meta or {},
                       "sets": {name: set_fingerprint(ex) for name, ex in sets.items() if ex},
                       "figures": result["figures"], "per_example": {forget: result["per_example"][forget]}})


def check_logs_path(path: Union[str, Path]) -> Path:
    """Fail before any evaluation when ``path`` cannot be written (its folder is created)."""
    path = Path(path)
    if path.is_dir():
        raise UnlearnFastError(f"cannot write retain logs to {path}: it is a directory; name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnlearnFastError(f"cannot write retain logs to {path}: {err.strerror or err}") from err
    return path


def save_logs(result: dict, sets: dict[str, Sequence[Example]], path: Union[str, Path], *,
              forget: str = "forget", meta: Optional[dict] = None) -> Path:
    """Write :func:`retain_logs` to ``path`` atomically (a reader never sees half a file)."""
    path = check_logs_path(path)
    logs = retain_logs(result, sets, forget=forget, meta=meta)
    try:
        write_json(path, logs, indent=1, allow_nan=False)
    except OSError as err:
        raise UnlearnFastError(f"cannot write retain logs to {path}: {err.strerror or err}") from err
    return path


def load_logs(path: Union[str, Path]) -> dict:
    """Read and check retain logs written by :func:`save_logs`; DataError says what is wrong."""
    path = Path(path)
    try:
        logs = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"retain logs {path}: no such file (write them with eval --save-logs)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"retain logs {path}: not readable JSON ({err})") from err
    if not isinstance(logs, dict) or logs.get("format") != LOGS_FORMAT:
        raise DataError(f"retain logs {path}: not a file written by unlearn-fast eval --save-logs")
    version = logs.get("version")
    if not isinstance(version, int) or version > LOGS_VERSION:
        raise DataError(f"retain logs {path}: version {version!r}, this unlearn-fast reads up to {LOGS_VERSION}")
    per_example = logs.get("per_example")
    if not isinstance(logs.get("figures"), dict) or not isinstance(per_example, dict) or not all(
            isinstance(v, list) and all(isinstance(r, dict) for r in v) for v in per_example.values()):
        raise DataError(f"retain logs {path}: 'figures' or 'per_example' is missing or malformed")
    return logs


def check_sets(logs: dict, sets: dict[str, Sequence[Example]], names: Sequence[str],
               source: str = "retain logs") -> None:
    """DataError unless each set of ``names`` evaluated now is the one the logs were saved on (a KS
    test or an AUC against another forget or held-out set would be meaningless). A set the logs were
    saved without is no error: the figures that need it are left out."""
    saved = logs.get("sets") or {}
    for name in names:
        if name not in sets or not sets[name] or name not in saved:
            continue
        now = set_fingerprint(sets[name])
        if now != saved[name]:
            raise DataError(f"{source}: the {name} set differs from the one they were saved on "
                            f"({now['examples']} examples now, {saved[name].get('examples')} then); "
                            "save them again with the same data")


def as_result(logs: dict) -> dict:
    """The logs in the shape of an evaluation result, for
    :func:`~unlearn_fast.eval.per_example.compare_to_retrained` and the report."""
    return {"figures": logs["figures"], "per_example": logs["per_example"]}
