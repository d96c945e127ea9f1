"""Checks that span a whole set, after loading: class labels resolved against the model's label names,
the overlap of the forget and retain sets, and a set's fingerprint for the manifest."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Optional, Union

from ..errors import DataError
from .data import KIND_FIELDS, Example, shorten

_INT_RE = re.compile(r"[0-9]+")


def resolve_labels(examples: list[Example], label2id: Optional[dict], *, name: str) -> list[int]:
    """Map each example's label to a class id.

    With ``label2id`` (from the model config, e.g. ``{"NEGATIVE": 0, "POSITIVE": 1}``) a label may
    be a label name (matched case-insensitively) or a class id (an int or a digit string) that the
    model has. Without it, labels must be class ids (non-negative ints or digit strings).

    Raises:
        DataError: an example has no label, or a label is unknown (the message names the label,
            the row, and the known labels).
    """
    names: dict[str, int] = {}
    valid_ids: Optional[set] = None
    if label2id is not None:
        names = {str(label).strip().lower(): int(i) for label, i in label2id.items()}
        valid_ids = {int(i) for i in label2id.values()}

    ids = []
    for i, example in enumerate(examples):
        label = example.label
        if label is None:
            raise DataError(
                f"{name}: row {i + 1} has no label; give every example a label "
                f"(with --label-column if the column is not called 'label')"
            )
        if isinstance(label, str) and label.strip().lower() in names:
            ids.append(names[label.strip().lower()])
            continue
        class_id = _as_class_id(label)
        if class_id is not None and (valid_ids is None or class_id in valid_ids):
            ids.append(class_id)
            continue
        raise DataError(f"{name}: row {i + 1} has unknown label {label!r}; {_known_labels(label2id)}")
    return ids


def check_overlap(
    forget: list[Example], retain: list[Example], *, drop: bool = False
) -> tuple[list[Example], int]:
    """Find retain examples that are also in the forget set.

    Two examples are the same when their fields are equal after stripping surrounding whitespace
    from string values.

    Returns:
        ``(retain, 0)`` when nothing overlaps; with ``drop=True``, the retain set without the
        overlapping examples and how many were dropped.

    Raises:
        DataError: examples overlap and ``drop`` is False (the message counts them, quotes the
            first, and names ``--drop-overlap``); or dropping them leaves the retain set empty.
    """
    forget_keys = {_overlap_key(example) for example in forget}
    kept = [example for example in retain if _overlap_key(example) not in forget_keys]
    dropped = len(retain) - len(kept)
    if dropped == 0:
        return list(retain), 0

    first = next(example for example in retain if _overlap_key(example) in forget_keys)
    quote = shorten(first.text if first.text is not None else (first.prompt or ""), 80)
    if not drop:
        raise DataError(
            f"retain set: {dropped} example(s) are also in the forget set (first: {quote!r}); "
            f"remove them from the retain set, or pass --drop-overlap (drop=True) to drop them"
        )
    if not kept:
        raise DataError(
            f"retain set: every example is also in the forget set ({dropped} dropped), so the "
            f"retain set is empty; give a retain set with data the model should keep"
        )
    return kept, dropped


def fingerprint(examples: list[Example]) -> dict:
    """A short identity of a set: ``{"count": n, "sha256": hex}``, never the data itself.

    The hash covers each example's canonical JSON, in order, so it changes with the content and
    with the order of the examples.
    """
    digest = hashlib.sha256()
    for example in examples:
        line = json.dumps(example.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        digest.update(line.encode("utf-8") + b"\n")  # JSON escapes newlines, so "\n" separates
    return {"count": len(examples), "sha256": digest.hexdigest()}


def _as_class_id(label: Union[int, str]) -> Optional[int]:
    """An int label, or a digit-string label, as an int; None otherwise."""
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label if label >= 0 else None
    if isinstance(label, str) and _INT_RE.fullmatch(label.strip()):
        return int(label.strip())
    return None


def _known_labels(label2id: Optional[dict]) -> str:
    if label2id is None:
        return "the model has no label names, so labels must be class ids (0, 1, ...)"
    known = ", ".join(f"{label} ({i})" for label, i in sorted(label2id.items(), key=lambda item: item[1]))
    return f"known labels: {known}"


def _overlap_key(example: Example) -> str:
    # the truth-ratio answers are evaluation-only: the same prompt/response is the same training example
    fields = {k: v.strip() if isinstance(v, str) else v for k, v in example.to_dict().items() if k in KIND_FIELDS}
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)
