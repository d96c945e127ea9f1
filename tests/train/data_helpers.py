"""Shared by the data-loading tests: small file writers, the DataError a load raises, fake datasets."""

import json
from pathlib import Path

import pytest

from unlearn_fast.errors import DataError
from unlearn_fast.train.data import load_examples

FORGET = "forget set"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def load_error(source, columns=None, name=FORGET) -> str:
    """The message of the DataError that loading ``source`` raises."""
    with pytest.raises(DataError) as info:
        load_examples(source, columns, name=name)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(name + ":")
    return message


class FakeDataset:
    """Duck-typed stand-in for datasets.Dataset."""

    def __init__(self, rows):
        self._rows = rows
        self.column_names = list(rows[0]) if rows else []

    def __iter__(self):
        return iter(self._rows)

    def __len__(self):
        return len(self._rows)


class FakeDatasetDict:
    def __init__(self):
        self.column_names = {"train": ["text"], "test": ["text"]}

    def __iter__(self):
        return iter(["train", "test"])
