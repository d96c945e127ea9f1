"""Reading a data source into a table of raw rows, before columns are picked (see
:mod:`unlearn_fast.train.data`): ``.csv`` (with a header), ``.jsonl``, ``.json`` (a list of objects),
``.parquet``, a directory written by ``datasets``' ``save_to_disk``, an in-memory list, or a
``datasets.Dataset``-like object. Every problem raises :class:`~unlearn_fast.errors.DataError` naming
the set, the source and the row or line.

Parquet files and ``save_to_disk`` directories are read with pyarrow alone (the ``data`` extra), not
with ``datasets``: Parquet needs pyarrow anyway, and a ``save_to_disk`` directory is Arrow stream files
listed in its ``state.json`` (``_data_files``, in row order; the selected rows already written out),
which pyarrow reads as they are; ``datasets`` would add pandas, dill, multiprocess, fsspec and a
pinned huggingface-hub to read the same bytes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional

from ..errors import DataError

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
SUPPORTED_HINT = ("supported: .csv, .jsonl (one JSON object per line), .json (a JSON list of objects), .parquet, "
                  "or a directory written by datasets' save_to_disk")
SAVED_STATE = "state.json"  # save_to_disk: the Arrow files of a Dataset, in order
SAVED_SPLITS = "dataset_dict.json"  # save_to_disk of a DatasetDict: one folder per split
PYARROW_INSTALL = "pip install 'unlearn-fast[data]' (or pip install pyarrow)"
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
        return read_saved_dataset(path, name)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{name}: unsupported file type {suffix or '(no extension)'!r} for {path}; {SUPPORTED_HINT}")
    if suffix == ".parquet":
        return read_parquet(path, name)
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


def _pyarrow(name: str, path: Path, what: str):
    """pyarrow, or a one-line DataError saying how to install it."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (save_to_disk's Arrow stream files)
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"{name}: reading {what} ({path}) needs pyarrow: {PYARROW_INSTALL}") from None
    return pyarrow


def read_parquet(path: Path, name: str) -> Table:
    pa = _pyarrow(name, path, "a Parquet file")
    try:
        table = pa.parquet.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{name}: {path} is not a readable Parquet file: {_first_line(e)}") from None
    return Table(list(table.column_names), table.to_pylist(), str(path), None)


def read_saved_dataset(path: Path, name: str) -> Table:
    """The rows of a ``datasets.Dataset`` written by ``save_to_disk`` (one split)."""
    if (path / SAVED_SPLITS).is_file():
        splits = _json_file(path / SAVED_SPLITS, name).get("splits") or []
        example = f", e.g. {path / str(splits[0])}" if splits else ""
        raise DataError(f"{name}: {path} holds a DatasetDict of several splits ({', '.join(map(str, splits))}); "
                        f"give one split's directory{example}")
    if not (path / SAVED_STATE).is_file():
        raise DataError(f"{name}: {path} is a directory but not a dataset written by datasets' save_to_disk (no "
                        f"{SAVED_STATE}); {SUPPORTED_HINT}")
    state = _json_file(path / SAVED_STATE, name)
    files = state.get("_data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise DataError(f"{name}: {path / SAVED_STATE} does not list the dataset's files (_data_files); save the "
                        f"dataset again with save_to_disk")
    pa = _pyarrow(name, path, "a save_to_disk directory")
    columns: list = []
    rows: list = []
    for entry in files:
        file = path / entry["filename"]
        if Path(entry["filename"]).name != entry["filename"] or not file.is_file():
            raise DataError(f"{name}: {path} lacks {entry['filename']!r}, a data file its {SAVED_STATE} lists")
        try:
            with open(file, "rb") as f:
                table = pa.ipc.open_stream(f).read_all()
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DataError(f"{name}: {file} is not a readable Arrow file: {_first_line(e)}") from None
        columns = columns or list(table.column_names)
        rows += table.to_pylist()
    shown = state.get("_format_columns")  # set_format(columns=...): the dataset shows those columns only
    if isinstance(shown, list) and not state.get("_output_all_columns"):
        columns = [c for c in columns if c in shown]
        rows = [{c: row.get(c) for c in columns} for row in rows]
    return Table(columns, rows, str(path), None)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _json_file(path: Path, name: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{name}: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{name}: {path} holds {value_kind(data)}, not the JSON object save_to_disk writes")
    return data


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
