"""Tests for unlearn_fast.train.readers (through load_examples): CSV / JSONL / JSON files, in-memory
lists and dataset-like objects, and every way a source can fail to be read."""

import json

import pytest
from data_helpers import FORGET, FakeDataset, FakeDatasetDict, load_error, write, write_jsonl

from unlearn_fast.train.data import Columns, Example, load_examples

# ------------------------------------------------------------------------ formats


def test_csv_text_column_needs_no_options(tmp_path):
    path = write(tmp_path / "f.csv", 'text\nhello world\n"with, comma"\n')
    assert load_examples(path, name=FORGET) == [Example(text="hello world"), Example(text="with, comma")]


def test_csv_path_as_str_and_labels_stay_strings(tmp_path):
    path = write(tmp_path / "f.csv", "text,label\ngood,1\nbad,NEGATIVE\n")
    assert load_examples(str(path), name=FORGET) == [
        Example(text="good", label="1"),
        Example(text="bad", label="NEGATIVE"),
    ]


def test_csv_with_bom(tmp_path):
    path = write(tmp_path / "f.csv", "text,label\nhé,0\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_examples(path, name=FORGET) == [Example(text="hé", label="0")]


def test_csv_multiline_value_and_blank_lines(tmp_path):
    path = write(tmp_path / "f.csv", 'prompt,response\n"line 1\nline 2",answer\n\n,\nq2,a2\n')
    assert load_examples(path, name=FORGET) == [
        Example(prompt="line 1\nline 2", response="answer"),
        Example(prompt="q2", response="a2"),
    ]


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "q", "response": " a"}, {"prompt": "q2", "response": "a2"}])
    assert load_examples(path, name=FORGET) == [
        Example(prompt="q", response=" a"),  # values are kept exactly (leading space matters to tokenisers)
        Example(prompt="q2", response="a2"),
    ]


def test_jsonl_skips_blank_lines(tmp_path):
    path = write(tmp_path / "f.jsonl", '{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert [e.text for e in load_examples(path, name=FORGET)] == ["a", "b"]


def test_json_list_of_objects_with_int_labels(tmp_path):
    path = write(tmp_path / "f.json", json.dumps([{"text": "a", "label": 1}, {"text": "b", "label": "POSITIVE"}]))
    assert load_examples(path, name=FORGET) == [Example(text="a", label=1), Example(text="b", label="POSITIVE")]


def test_uppercase_extension(tmp_path):
    path = write(tmp_path / "F.JSONL", '{"text": "a"}\n')
    assert load_examples(path, name=FORGET) == [Example(text="a")]


def test_list_of_strings():
    assert load_examples(["a", "b"], name=FORGET) == [Example(text="a"), Example(text="b")]


def test_list_of_dicts():
    rows = [{"text": "a", "label": 0, "id": 7}, {"text": "b", "label": 1, "id": 8}]
    assert load_examples(rows, name=FORGET) == [Example(text="a", label=0), Example(text="b", label=1)]


def test_list_of_examples():
    examples = [Example(prompt="q", response="r"), Example(prompt="q2", response="r2")]
    assert load_examples(examples, name=FORGET) == examples


def test_dataset_like_object():
    dataset = FakeDataset([{"question": "q", "answer": "a"}])
    assert load_examples(dataset, Columns(prompt="question", response="answer"), name=FORGET) == [
        Example(prompt="q", response="a")
    ]
    assert load_examples(FakeDataset([{"text": "t", "label": 2}]), name=FORGET) == [Example(text="t", label=2)]


# ------------------------------------------------------------------------ file errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    assert load_error(path) == f"forget set: file not found: {path}"


def test_missing_file_names_the_set(tmp_path):
    assert load_error(tmp_path / "nope.jsonl", name="retain set").startswith("retain set: file not found")


def test_directory(tmp_path):
    message = load_error(tmp_path)
    assert "directory" in message and str(tmp_path) in message


def test_unknown_extension(tmp_path):
    path = write(tmp_path / "f.txt", "hello\n")
    message = load_error(path)
    assert "'.txt'" in message and ".csv" in message and ".jsonl" in message and ".json" in message


def test_malformed_jsonl_gives_line_number(tmp_path):
    path = write(tmp_path / "f.jsonl", '{"text": "a"}\n\n{"text": "b"\n')
    message = load_error(path)
    assert "line 3" in message and str(path) in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "f.jsonl", '{"text": "a"}\n[1, 2]\n')
    message = load_error(path)
    assert "row 2" in message and "line 2" in message and "a list" in message


def test_malformed_json(tmp_path):
    path = write(tmp_path / "f.json", '[{"text": "a"},\n {"text": }]')
    message = load_error(path)
    assert "invalid JSON" in message and "line 2" in message


def test_json_that_is_really_jsonl(tmp_path):
    path = write(tmp_path / "f.json", '{"text": "a"}\n{"text": "b"}\n')
    assert ".jsonl" in load_error(path)


def test_json_object_instead_of_list(tmp_path):
    path = write(tmp_path / "f.json", '{"text": "a"}')
    assert "list of objects" in load_error(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes("text\ncafé\n".encode("latin-1"))
    assert "UTF-8" in load_error(path)


def test_empty_csv_file(tmp_path):
    path = write(tmp_path / "f.csv", "")
    message = load_error(path)
    assert "empty" in message and "header" in message


def test_csv_header_with_blank_name(tmp_path):
    path = write(tmp_path / "f.csv", "text,,label\na,b,0\n")
    assert "column 2" in load_error(path)


def test_csv_duplicate_header(tmp_path):
    path = write(tmp_path / "f.csv", "text,text\na,b\n")
    assert "'text' twice" in load_error(path)


def test_csv_row_with_too_many_values(tmp_path):
    path = write(tmp_path / "f.csv", "text,label\na,0\nb,c,1\n")
    message = load_error(path)
    assert "row 2" in message and "3 values" in message


@pytest.mark.parametrize("source", [[], FakeDataset([])])
def test_empty_in_memory_set(source):
    assert "no rows" in load_error(source)


@pytest.mark.parametrize("content", ["text,label\n", ""])
def test_empty_jsonl_or_header_only_csv(tmp_path, content):
    path = write(tmp_path / ("f.csv" if content else "f.jsonl"), content)
    assert "no rows" in load_error(path)


def test_empty_json_list(tmp_path):
    assert "no rows" in load_error(write(tmp_path / "f.json", "[]"))


def test_unsupported_source_type():
    assert "unsupported source" in load_error(42)


def test_dataset_dict_asks_for_a_split():
    message = load_error(FakeDatasetDict())
    assert "'train'" in message and "split" in message


def test_mixed_list():
    assert "row 2" in load_error(["a", {"text": "b"}])
    assert "row 2" in load_error([{"text": "a"}, "b"])
