"""Reading a data source into a table of raw rows, before columns are picked (see
:mod:`unlearn_fast.train.data`): ``.csv`` (with a header), ``.jsonl``, ``.json`` (a list of objects),
an in-memory list, or a ``datasets.Dataset``-like object. Every problem raises
:class:`~unlearn_fast.errors.DataError` naming the set, the source and the row or line."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional

from ..errors import DataError

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json")
CSV_HEADER_HINT = "the first line of a CSV file must be a header naming the columns"


class Table(NamedTuple):
    """Raw rows read from a source, before columns are picked."""

    columns: list          # column names, in order of first appearance
    rows: list             # one dict per row
    origin: str            # where the rows came from, for messages ("data/forget.csv", "the given list")
    lines: Optional[list]  # file line number of each row, when it came from a text file
    is_csv: bool = False



def read_file(path: Path, name: str) -> Table:
    if not path.exists():
        raise DataError(f"{name}: file not found: {path}")
    if path.is_dir():
        raise DataError(f"{name}: {path} is a directory; give the path of a .csv, .jsonl or .json file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{name}: unsupported file type {suffix or '(no extension)'!r} for {path}; "
            f"supported: .csv, .jsonl (one JSON object per line), .json (a JSON list of objects)"
        )
    try:
        # utf-8-sig reads plain UTF-8 too, and drops a byte-order mark when there is one.
        with open(path, encoding="utf-8-sig", newline="") as f:
            if suffix == ".csv":
                return read_csv(f, str(path), name)
            if suffix == ".jsonl":
                return read_jsonl(f, str(path), name)
            return read_json(f, str(path), name)
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read {path}: {e.strerror or e}") from None


def read_csv(f, origin: str, name: str) -> Table:
    reader = csv.reader(f)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{name}: {origin} is empty; {CSV_HEADER_HINT}, followed by one row per example")
        header = [column.strip() for column in header]
        for i, column in enumerate(header):
            if not column:
                raise DataError(f"{name}: {origin} has no name for column {i + 1} in its header; {CSV_HEADER_HINT}")
            if column in header[:i]:
                raise DataError(f"{name}: {origin} names column {column!r} twice in its header; give each column its own name")

        rows, lines = [], []
        for values in reader:
            if not values or all(not v.strip() for v in values):
                continue  # a blank line, or one of empty cells (spreadsheets write these at the end)
            if len(values) > len(header):
                raise DataError(
                    f"{name}: row {len(rows) + 1} of {origin} (line {reader.line_num}) has "
                    f"{len(values)} values but the header names {len(header)} columns; quote values that contain commas"
                )
            rows.append(dict(zip(header, values)))  # a short row leaves its last columns missing
            lines.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{name}: {origin} is not valid CSV (line {reader.line_num}): {e}") from None
    return Table(header, rows, origin, lines, is_csv=True)


def read_jsonl(f, origin: str, name: str) -> Table:
    items, lines = [], []
    for line_number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name}: invalid JSON on line {line_number} of {origin} ({e.msg}, column {e.colno}); "
                f"a .jsonl file holds one JSON object per line"
            ) from None
        lines.append(line_number)
    return table_from_items(items, origin, lines, name)


def read_json(f, origin: str, name: str) -> Table:
    try:
        data = json.load(f)
    except json.JSONDecodeError as e:
        hint = "a .json file holds one JSON list of objects"
        if e.msg == "Extra data":
            hint += "; if it has one object per line, name it .jsonl"
        raise DataError(f"{name}: invalid JSON in {origin} ({e.msg}, line {e.lineno} column {e.colno}); {hint}") from None
    if not isinstance(data, list):
        raise DataError(
            f"{name}: {origin} holds {value_kind(data)}, but a .json file must hold a list of objects "
            f"(one per example); for one object per line use .jsonl"
        )
    return table_from_items(data, origin, None, name)


def table_from_items(items: list, origin: str, lines: Optional[list], name: str) -> Table:
    """Rows from a list whose items are all strings (text examples) or all dicts."""
    if not items:
        return Table([], [], origin, lines)
    table = Table([], [], origin, lines)
    if isinstance(items[0], str):
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise DataError(
                    f"{name}: {where(table, i)} of {origin} is {value_kind(item)}, but row 1 is a "
                    f"string; give all strings (text examples) or all objects"
                )
        return Table(["text"], [{"text": item} for item in items], origin, lines)

    columns: dict = {}  # ordered set of column names
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise DataError(
                f"{name}: {where(table, i)} of {origin} is {value_kind(item)}; each example must be "
                f"an object with named fields (e.g. {{\"text\": ...}})"
            )
        columns.update(dict.fromkeys(item))
        rows.append(dict(item))
    return Table(list(columns), rows, origin, lines)


def is_dataset_like(source: Any) -> bool:
    return hasattr(source, "column_names") and hasattr(source, "__iter__")


def table_from_dataset(dataset: Any, name: str) -> Table:
    origin = "the given dataset"
    if isinstance(dataset.column_names, Mapping):  # a datasets.DatasetDict: one entry per split
        splits = ", ".join(repr(s) for s in dataset.column_names)
        raise DataError(f"{name}: the given dataset has several splits ({splits}); pass one split, e.g. dataset['train']")
    rows = []
    for i, row in enumerate(dataset):
        if not isinstance(row, Mapping):
            raise DataError(f"{name}: row {i + 1} of {origin} is {value_kind(row)}, expected a dict of column values")
        rows.append(dict(row))
    return Table(list(dataset.column_names), rows, origin, None)


def where(table: Table, index: int) -> str:
    """'row 3 of data/forget.jsonl (line 4)': 1-based row, plus the file line when known."""
    line = f" (line {table.lines[index]})" if table.lines else ""
    return f"row {index + 1} of {table.origin}{line}"



def value_kind(value: Any) -> str:
    """A value's type in JSON words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"
