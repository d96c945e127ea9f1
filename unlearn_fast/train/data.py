"""Loading and checking the forget and retain sets (files or in-memory data; no tokenisation).

A set is a list of :class:`Example`. It comes from a ``.csv``, ``.jsonl``, ``.json`` or ``.parquet``
file, a directory written by ``datasets``' ``save_to_disk`` (both read with pyarrow: the ``data``
extra; see :mod:`unlearn_fast.train.readers`), an in-memory list (of strings, dicts or
:class:`Example`), or a ``datasets.Dataset``-like object (anything with ``column_names`` that
iterates over dict rows; ``datasets`` is not imported).

Each example is either plain text (optionally with a classification label) or a prompt with its
response. Which columns hold them is picked automatically (``prompt`` + ``response``, else TOFU's
``question`` + ``answer``, else ``text`` and ``label``) or given explicitly with :class:`Columns`.

A prompt/response example may also carry what TOFU's truth ratio needs (see
:func:`unlearn_fast.eval.metrics.truth_ratio`): a ``paraphrased`` correct answer and a list of
``perturbed`` (wrong) answers, read by default from TOFU's columns ``paraphrased_answer`` and
``perturbed_answer`` when they exist. In JSONL / JSON files and in-memory rows the perturbed answers
are a list of strings; in a CSV cell they are a JSON-encoded list, e.g. ``["Rome", "Madrid"]``.

A forgotten prompt/response example may carry ``generic_prompts``: its prompt with the forgotten
subject replaced by others (column ``generic_prompts`` by default; a list of strings, or one
string). EUL then pushes only the response tokens that are specific to the subject (see
:mod:`unlearn_fast.train.selection`).

A prompt/response example may carry ``answers``: other acceptable answers to its prompt (column
``answers`` by default; a list of strings, or one string; a JSON list in a CSV cell). Scoring counts a
fact as known when the completion holds the response or any of them (see
:func:`unlearn_fast.eval.metrics.answer_found`); training ignores them.

Every user mistake raises :class:`~unlearn_fast.errors.DataError` with a one-line message that
names the set and where the data came from, and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import DataError
from .readers import (
    CSV_HEADER_HINT, Table, is_dataset_like, read_file, table_from_dataset, table_from_items, value_kind,
    where
)

# The command-line option that names each column (used in messages).
_OPTIONS = {
    "text": "--text-column",
    "prompt": "--prompt-column",
    "response": "--response-column",
    "label": "--label-column",
    "perturbed": "--perturbed-column",
    "paraphrased": "--paraphrased-column",
    "generic_prompts": "--generic-prompts-column",
    "answers": "--answers-column",
}
# TOFU's columns of the prompt and response, used when there are no prompt / response columns and no
# other is given.
QUESTION_COLUMN = "question"
ANSWER_COLUMN = "answer"
# TOFU's column names for the truth-ratio answers, used when present and no other is given.
PERTURBED_COLUMN = "perturbed_answer"
PARAPHRASED_COLUMN = "paraphrased_answer"
# The column of a forgotten example's generic prompts, used when present and no other is given.
GENERIC_PROMPTS_COLUMN = "generic_prompts"
# The column of a prompt's other acceptable answers (answer variants), used when present and no other is given.
ANSWERS_COLUMN = "answers"
_PICK_COLUMNS_HINT = (
    "name them with --text-column (and --label-column for labels), "
    "or --prompt-column and --response-column (found without them: prompt and response, TOFU's question and "
    "answer, text)"
)


@dataclass(frozen=True)
class Example:
    """One training example: plain ``text`` (optionally with a ``label``), or ``prompt`` + ``response``.

    A prompt/response example may carry evaluation-only answers for the truth ratio: ``perturbed``,
    wrong answers to the prompt (a tuple of strings; a list given here becomes a tuple), and
    ``paraphrased``, a rewording of the correct answer (when None, the ``response`` itself is used).
    Training ignores both.

    ``generic_prompts`` (a tuple of strings): the prompt with its subject replaced by others (other
    names, say). Where a forgotten example has them, EUL's forget terms apply only to the response
    tokens that the real subject makes likelier than the generic ones do (see
    :mod:`unlearn_fast.train.selection`); what the model would answer about anyone is kept.

    ``answers`` (a tuple of strings): other acceptable answers to the prompt ("Washington" beside
    "Washington, D.C."). Evaluation counts the fact as known if the completion holds the response or
    any of them; training ignores them.
    """

    text: Optional[str] = None
    prompt: Optional[str] = None
    response: Optional[str] = None
    label: Optional[Union[int, str]] = None
    perturbed: Optional[tuple] = None
    paraphrased: Optional[str] = None
    generic_prompts: Optional[tuple] = None
    answers: Optional[tuple] = None

    def __post_init__(self):
        for name in ("perturbed", "generic_prompts", "answers"):  # keep the example hashable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict:
        """The fields that are set (not None), by name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class Columns:
    """Which source columns hold each field; None means "pick automatically".

    ``perturbed`` / ``paraphrased`` name the truth-ratio answer columns (default: TOFU's
    ``perturbed_answer`` / ``paraphrased_answer`` when present); ``generic_prompts`` the column of
    generic prompts (default: ``generic_prompts`` when present); ``answers`` the column of other
    acceptable answers (default: ``answers`` when present). All go with prompt/response."""

    text: Optional[str] = None
    prompt: Optional[str] = None
    response: Optional[str] = None
    label: Optional[str] = None
    perturbed: Optional[str] = None
    paraphrased: Optional[str] = None
    generic_prompts: Optional[str] = None
    answers: Optional[str] = None

    def for_set(self, name: str) -> "Columns":
        """The columns to read for the set ``name``: generic prompts belong to the forget set only
        (another set need not have their column)."""
        return self if name == "forget set" else dataclasses.replace(self, generic_prompts=None)


# The fields that decide an example's kind (the answer columns only add to prompt/response).
KIND_FIELDS = ("text", "prompt", "response", "label")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_examples(source: Any, columns: Optional[Columns] = None, *, name: str) -> list[Example]:
    """Load and check one set of examples.

    Args:
        source: a path (``str`` or ``pathlib.Path``) to a ``.csv``, ``.jsonl``, ``.json`` (a JSON
            list of objects) or ``.parquet`` file, or to a directory written by ``datasets``'
            ``save_to_disk`` (one split); a list of strings (each one a text example), of dicts, or of
            :class:`Example`; or a ``datasets.Dataset``-like object (has ``column_names`` and
            iterates over dict rows).
        columns: which columns hold the fields. Without it (or with every field None): ``prompt``
            and ``response`` when both exist, else TOFU's ``question`` and ``answer``, else ``text``
            (with ``label`` when that exists).
            With prompt and response columns, ``perturbed_answer`` and ``paraphrased_answer`` are
            read too when they exist (or the columns ``columns.perturbed`` / ``columns.paraphrased``
            name). Perturbed answers: a list of strings (a JSON-encoded list in a CSV cell), at
            least one per row; an empty paraphrased answer means "use the response".
            Ignored for a list of :class:`Example`.
        name: the set's name for messages, e.g. ``"forget set"``.

    Returns:
        The examples, in source order. Text and response values are kept exactly as given.

    Raises:
        DataError: the source cannot be read, has no rows, has no usable columns, or a row lacks a
            required value.
    """
    if isinstance(source, (str, os.PathLike)):
        table = read_file(Path(source).expanduser(), name)
    elif isinstance(source, (list, tuple)):
        if source and all(isinstance(item, Example) for item in source):
            return _check_examples(list(source), name)
        table = table_from_items(list(source), "the given list", None, name)
    elif is_dataset_like(source):
        table = table_from_dataset(source, name)
    else:
        raise DataError(
            f"{name}: unsupported source of type {type(source).__name__}; give a path to a "
            f".csv, .jsonl, .json or .parquet file or a save_to_disk directory, a list of strings or dicts, "
            f"or a datasets.Dataset"
        )

    if not table.rows:
        raise DataError(f"{name}: {table.origin} has no rows; a set needs at least one example")
    picked = _pick_columns(columns, table, name)
    return [_make_example(row, picked, where(table, i), name, table.is_csv) for i, row in enumerate(table.rows)]


# --------------------------------------------------------------------------------------------
# Columns and values
# --------------------------------------------------------------------------------------------


def _pick_columns(columns: Optional[Columns], table: Table, name: str) -> Columns:
    """The columns to read, explicit or detected; every returned column exists."""
    columns = columns or Columns()
    picked = _pick_kind_columns(columns, table, name)
    answers = {"perturbed": columns.perturbed, "paraphrased": columns.paraphrased,
               "generic_prompts": columns.generic_prompts, "answers": columns.answers}
    if picked.prompt is None:
        if any(answers.values()):
            raise DataError(f"{name}: perturbed and paraphrased answer columns, answer-variant columns and generic "
                            f"prompt columns go with prompt and response columns, not with a text column")
        return picked
    for field, default in (("perturbed", PERTURBED_COLUMN), ("paraphrased", PARAPHRASED_COLUMN),
                           ("generic_prompts", GENERIC_PROMPTS_COLUMN), ("answers", ANSWERS_COLUMN)):
        column = answers[field]
        if column is None:
            answers[field] = default if default in table.columns else None
        elif column not in table.columns:
            raise DataError(
                f"{name}: {table.origin} has no column {column!r} (given with {_OPTIONS[field]}); "
                f"columns: {_list_columns(table.columns)}{_csv_hint(table)}"
            )
    return dataclasses.replace(picked, **answers)


def _pick_kind_columns(columns: Columns, table: Table, name: str) -> Columns:
    """The text / label or prompt / response columns, explicit or detected (answer columns unset)."""
    existing = table.columns
    columns = Columns(**{f: getattr(columns, f) for f in KIND_FIELDS})
    if columns == Columns():
        if "prompt" in existing and "response" in existing:
            return Columns(prompt="prompt", response="response")
        if QUESTION_COLUMN in existing and ANSWER_COLUMN in existing:  # TOFU
            return Columns(prompt=QUESTION_COLUMN, response=ANSWER_COLUMN)
        if "text" in existing:
            return Columns(text="text", label="label" if "label" in existing else None)
        raise DataError(
            f"{name}: cannot tell which columns of {table.origin} to use (columns: "
            f"{_list_columns(existing)}); {_PICK_COLUMNS_HINT}{_csv_hint(table)}"
        )

    if columns.text is not None and (columns.prompt is not None or columns.response is not None):
        raise DataError(f"{name}: give either a text column or a prompt and a response column, not both")
    if (columns.prompt is None) != (columns.response is None):
        raise DataError(f"{name}: a prompt column needs a response column, and the other way round; give both")
    if columns.label is not None and columns.prompt is not None:
        raise DataError(f"{name}: a label column goes with a text column, not with prompt and response columns")
    if columns.text is None and columns.prompt is None:  # only a label column was named
        if "text" not in existing:
            raise DataError(
                f"{name}: a label column needs a text column, and {table.origin} has no 'text' column "
                f"(columns: {_list_columns(existing)}); name it with --text-column{_csv_hint(table)}"
            )
        columns = dataclasses.replace(columns, text="text")

    for field, column in dataclasses.asdict(columns).items():
        if column is not None and column not in existing:
            raise DataError(
                f"{name}: {table.origin} has no column {column!r} (given with {_OPTIONS[field]}); "
                f"columns: {_list_columns(existing)}{_csv_hint(table)}"
            )
    return columns


def _make_example(row: Mapping, columns: Columns, where: str, name: str, is_csv: bool = False) -> Example:
    if columns.text is not None:
        return Example(
            text=_required_text(row, columns.text, where, name),
            label=_label(row, columns.label, where, name) if columns.label is not None else None,
        )
    return Example(
        prompt=_required_text(row, columns.prompt, where, name),
        response=_required_text(row, columns.response, where, name),
        perturbed=_perturbed(row, columns.perturbed, where, name, is_csv) if columns.perturbed else None,
        paraphrased=_optional_text(row, columns.paraphrased, where, name) if columns.paraphrased else None,
        generic_prompts=(_text_list(row, columns.generic_prompts, where, name, is_csv, "generic prompt")
                         if columns.generic_prompts else None),
        answers=_text_list(row, columns.answers, where, name, is_csv, "answer") if columns.answers else None,
    )


def _optional_text(row: Mapping, column: str, where: str, name: str) -> Optional[str]:
    """A text value that may be missing or empty (then None)."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _required_text(row, column, where, name)


def _perturbed(row: Mapping, column: str, where: str, name: str, is_csv: bool) -> tuple:
    """The perturbed answers of one row: a non-empty list of non-empty strings.

    A CSV cell holds them JSON-encoded (a CSV value is always a string, and any separator
    character could occur in an answer)."""
    value = row.get(column)
    hint = f"give at least one wrong answer per row, or leave out column {column!r}"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{name}: {where} has no perturbed answers in column {column!r}; {hint}")
    if is_csv:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(
                f"{name}: {where} has {shorten(value, 40)!r} in column {column!r}; a CSV cell of perturbed "
                f"answers must hold a JSON list of strings, e.g. [\"Rome\", \"Madrid\"] (double quotes)"
            ) from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{name}: {where} has {value_kind(value)} in column {column!r}; perturbed answers must "
                        f"be a list of strings")
    for item in value:
        if not isinstance(item, str):
            raise DataError(f"{name}: {where} has {value_kind(item)} among the perturbed answers in column "
                            f"{column!r}; each answer must be a string")
    if not value or any(not v.strip() for v in value):
        raise DataError(f"{name}: {where} has an empty list or an empty answer in column {column!r}; {hint}")
    return tuple(value)


def _text_list(row: Mapping, column: str, where: str, name: str, is_csv: bool, what: str) -> Optional[tuple]:
    """The generic prompts or answer variants (``what``) of one row: one string or a list of non-empty
    strings; missing or empty means none (for generic prompts: the row's every response token is
    forgotten). A CSV cell holds one value, or a JSON list when it starts with ``[``."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()) or value == []:
        return None
    if is_csv and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{name}: {where} has {shorten(value, 40)!r} in column {column!r}, which is not a "
                            f"JSON list; several {what}s go in a JSON list of strings "
                            f"(double quotes), one needs no brackets") from None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise DataError(f"{name}: {where} has {value_kind(value)} in column {column!r}; {what}s must be "
                        f"a string or a list of strings")
    if any(not v.strip() for v in values):
        raise DataError(f"{name}: {where} has an empty {what} in column {column!r}; remove it")
    return tuple(values)


def _required_text(row: Mapping, column: str, where: str, name: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{name}: {where} has an empty {column!r} value; fill it in or remove the row")
    if not isinstance(value, str):
        raise DataError(f"{name}: {where} has {value_kind(value)} in column {column!r}; it must be text")
    return value


def _label(row: Mapping, column: str, where: str, name: str) -> Union[int, str]:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{name}: {where} has no value in label column {column!r}; give every row a label")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(
            f"{name}: {where} has {value_kind(value)} as label in column {column!r}; "
            f"a label must be a class id (0, 1, ...) or a label name"
        )
    return value


def _check_examples(examples: list[Example], name: str) -> list[Example]:
    """Check a list of Example: each complete, all of one kind (text or prompt/response).

    Returns equal examples, except that an integral float label (1.0) becomes an int.
    """
    origin = "the given list"
    first_kind = None
    checked = []
    for i, example in enumerate(examples):
        where = f"row {i + 1} of {origin}"
        if example.text is not None and (example.prompt is not None or example.response is not None):
            raise DataError(f"{name}: {where} has both text and prompt/response; an example has one or the other")
        if example.text is None and example.label is not None:
            raise DataError(f"{name}: {where} has a label without text; labels go with text examples")
        is_text = example.text is not None or (example.prompt is None and example.response is None)
        kind = "text" if is_text else "prompt/response"
        first_kind = first_kind or kind
        if kind != first_kind:
            raise DataError(f"{name}: {where} is a {kind} example but row 1 is a {first_kind} example; a set holds one kind")
        if kind == "text":
            if (example.perturbed is not None or example.paraphrased is not None or example.generic_prompts
                    or example.answers):
                raise DataError(f"{name}: {where} has perturbed or paraphrased answers, answer variants or generic "
                                f"prompts without a prompt; they go with prompt/response examples")
            columns = Columns(text="text", label="label" if example.label is not None else None)
        else:
            columns = Columns(prompt="prompt", response="response",
                              perturbed="perturbed" if example.perturbed is not None else None,
                              paraphrased="paraphrased" if example.paraphrased is not None else None,
                              generic_prompts="generic_prompts" if example.generic_prompts is not None else None,
                              answers="answers" if example.answers is not None else None)
        checked.append(_make_example(example.to_dict(), columns, where, name))  # raises on an empty value
    return checked


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _csv_hint(table: Table) -> str:
    return f" ({CSV_HEADER_HINT})" if table.is_csv else ""


def _list_columns(columns: list) -> str:
    if not columns:
        return "none"
    shown = ", ".join(repr(shorten(str(c), 40)) for c in columns[:20])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "")


def shorten(text: str, limit: int) -> str:
    """Text on one line, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
