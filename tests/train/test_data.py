"""Tests for unlearn_fast.train.data: column picking, value errors, labels, overlap, fingerprint.
Reading files and other sources (formats and their errors) is in test_readers.py."""

import json

import pytest
from data_helpers import FORGET, load_error, write, write_jsonl

from unlearn_fast.errors import DataError, UnlearnFastError
from unlearn_fast.train.data import Columns, Example, load_examples
from unlearn_fast.train.set_checks import check_overlap, fingerprint, resolve_labels

# ------------------------------------------------------------------------ Example


def test_example_to_dict_keeps_only_set_fields():
    assert Example(text="a").to_dict() == {"text": "a"}
    assert Example(text="a", label=0).to_dict() == {"text": "a", "label": 0}
    assert Example(prompt="q", response="r").to_dict() == {"prompt": "q", "response": "r"}


def test_data_error_is_a_user_facing_error():
    assert issubclass(DataError, UnlearnFastError)


# ------------------------------------------------------------------------ columns


def test_auto_prefers_prompt_response_over_text():
    rows = [{"text": "t", "prompt": "p", "response": "r", "label": 1}]
    assert load_examples(rows, name=FORGET) == [Example(prompt="p", response="r")]


def test_auto_text_without_label_column():
    assert load_examples([{"text": "t", "other": "x"}], name=FORGET) == [Example(text="t")]


def test_auto_text_when_only_prompt_exists():
    assert load_examples([{"text": "t", "prompt": "p"}], name=FORGET) == [Example(text="t")]


def test_auto_fails_listing_columns_and_options():
    message = load_error([{"sentence": "a", "sentiment": 1}])
    assert "'sentence', 'sentiment'" in message
    assert "--text-column" in message and "--prompt-column" in message
    assert "--response-column" in message and "--label-column" in message


def test_csv_without_header_is_explained(tmp_path):
    path = write(tmp_path / "f.csv", "I loved this movie,1\nterrible,0\n")
    message = load_error(path)
    assert "'I loved this movie', '1'" in message
    assert "header" in message and str(path) in message


def test_explicit_text_and_label_columns(tmp_path):
    path = write(tmp_path / "f.csv", "sentence,sentiment,text\nfine,pos,ignored\n")
    examples = load_examples(path, Columns(text="sentence", label="sentiment"), name=FORGET)
    assert examples == [Example(text="fine", label="pos")]


def test_explicit_text_column_ignores_label_column():
    rows = [{"body": "b", "label": 1}]
    assert load_examples(rows, Columns(text="body"), name=FORGET) == [Example(text="b")]


def test_explicit_label_only_uses_text_column():
    rows = [{"text": "t", "y": 1}]
    assert load_examples(rows, Columns(label="y"), name=FORGET) == [Example(text="t", label=1)]


def test_explicit_label_only_without_text_column():
    message = load_error([{"body": "t", "y": 1}], Columns(label="y"))
    assert "--text-column" in message and "'body', 'y'" in message


def test_all_none_columns_means_auto():
    assert load_examples(["a"], Columns(), name=FORGET) == [Example(text="a")]


def test_explicit_column_missing_lists_existing(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": 0}])
    message = load_error(path, Columns(text="sentence"))
    assert "'sentence'" in message and "--text-column" in message
    assert "'text', 'label'" in message and str(path) in message


def test_explicit_label_column_missing():
    message = load_error([{"text": "a"}], Columns(text="text", label="y"))
    assert "'y'" in message and "--label-column" in message and "'text'" in message


@pytest.mark.parametrize(
    "columns, needle",
    [
        (Columns(text="t", prompt="p", response="r"), "not both"),
        (Columns(prompt="p"), "give both"),
        (Columns(response="r"), "give both"),
        (Columns(prompt="p", response="r", label="l"), "label column goes with a text column"),
    ],
)
def test_inconsistent_columns(columns, needle):
    row = {"t": "x", "p": "x", "r": "x", "l": 1}
    assert needle in load_error([row], columns)


# ------------------------------------------------------------------------ value errors


@pytest.mark.parametrize("bad", ["", "   \t", None])
def test_empty_required_value_gives_row(bad):
    message = load_error([{"text": "ok"}, {"text": "ok"}, {"text": bad}])
    assert "row 3" in message and "'text'" in message


def test_missing_key_counts_as_empty():
    message = load_error([{"prompt": "p", "response": "r"}, {"prompt": "p"}])
    assert "row 2" in message and "'response'" in message


def test_empty_value_in_csv_gives_row_and_line(tmp_path):
    path = write(tmp_path / "f.csv", "prompt,response\nq,a\nq2,  \n")
    message = load_error(path)
    assert "row 2" in message and "line 3" in message and "'response'" in message and str(path) in message


def test_short_csv_row_is_an_empty_value(tmp_path):
    path = write(tmp_path / "f.csv", "prompt,response\nq\n")
    assert "row 1" in load_error(path)


def test_non_string_text():
    message = load_error([{"text": 5}])
    assert "row 1" in message and "must be text" in message


@pytest.mark.parametrize("bad", [None, "", " "])
def test_missing_label_value(tmp_path, bad):
    message = load_error([{"text": "a", "label": 0}, {"text": "b", "label": bad}])
    assert "row 2" in message and "label" in message


def test_missing_label_value_in_csv(tmp_path):
    path = write(tmp_path / "f.csv", "text,label\na,0\nb,\n")
    message = load_error(path)
    assert "row 2" in message and "'label'" in message


def test_bad_label_type():
    assert "row 1" in load_error([{"text": "a", "label": [1]}])
    assert "row 1" in load_error([{"text": "a", "label": True}])


def test_integral_float_label_becomes_int():
    assert load_examples([{"text": "a", "label": 1.0}], name=FORGET)[0].label == 1


@pytest.mark.parametrize(
    "example, needle",
    [
        (Example(text=" "), "'text'"),
        (Example(prompt="p"), "one kind"),
        (Example(text="t", prompt="p"), "both"),
        (Example(label=1), "label without text"),
        (Example(), "'text'"),
    ],
)
def test_invalid_examples(example, needle):
    message = load_error([Example(text="ok"), example])
    assert "row 2" in message and needle in message


def test_example_prompt_without_response():
    message = load_error([Example(prompt="p")])
    assert "row 1" in message and "'response'" in message


def test_examples_of_mixed_kinds():
    message = load_error([Example(text="a"), Example(prompt="p", response="r")])
    assert "row 2" in message and "one kind" in message


# ------------------------------------------------------------------------ labels


LABEL2ID = {"NEGATIVE": 0, "POSITIVE": 1}


def test_labels_by_name_case_insensitive():
    examples = [Example(text="a", label="positive"), Example(text="b", label=" NEGATIVE "), Example(text="c", label="Positive")]
    assert resolve_labels(examples, LABEL2ID, name=FORGET) == [1, 0, 1]


def test_labels_by_id_with_label2id():
    examples = [Example(text="a", label=1), Example(text="b", label="0")]
    assert resolve_labels(examples, LABEL2ID, name=FORGET) == [1, 0]


def test_labels_without_label2id():
    examples = [Example(text="a", label=3), Example(text="b", label=" 0 ")]
    assert resolve_labels(examples, None, name=FORGET) == [3, 0]


def test_csv_labels_resolve(tmp_path):
    path = write(tmp_path / "f.csv", "text,label\na,positive\nb,0\n")
    assert resolve_labels(load_examples(path, name=FORGET), LABEL2ID, name=FORGET) == [1, 0]


def test_unknown_label_name():
    examples = [Example(text="a", label="POSITIVE"), Example(text="b", label="neutral")]
    with pytest.raises(DataError) as info:
        resolve_labels(examples, LABEL2ID, name=FORGET)
    message = str(info.value)
    assert message.startswith("forget set:")
    assert "'neutral'" in message and "row 2" in message
    assert "NEGATIVE (0)" in message and "POSITIVE (1)" in message


@pytest.mark.parametrize("label", [2, "2", -1])
def test_out_of_range_id(label):
    with pytest.raises(DataError) as info:
        resolve_labels([Example(text="a", label=label)], LABEL2ID, name=FORGET)
    assert repr(label) in str(info.value) and "known labels" in str(info.value)


@pytest.mark.parametrize("label", ["positive", -1, "1.5"])
def test_names_without_label2id(label):
    with pytest.raises(DataError) as info:
        resolve_labels([Example(text="a", label=label)], None, name=FORGET)
    assert "row 1" in str(info.value) and "class ids" in str(info.value)


def test_example_without_label():
    with pytest.raises(DataError) as info:
        resolve_labels([Example(text="a", label=0), Example(text="b")], LABEL2ID, name="retain set")
    assert str(info.value).startswith("retain set:") and "row 2" in str(info.value)


# ------------------------------------------------------------------------ overlap


def test_no_overlap():
    retain = [Example(text="b")]
    assert check_overlap([Example(text="a")], retain) == (retain, 0)


def test_overlap_is_an_error_by_default():
    forget = [Example(text="secret one"), Example(text="secret two")]
    retain = [Example(text="keep"), Example(text="  secret two\n"), Example(text="secret one")]
    with pytest.raises(DataError) as info:
        check_overlap(forget, retain)
    message = str(info.value)
    assert "\n" not in message
    assert "2 example" in message and "'secret two'" in message and "--drop-overlap" in message


def test_overlap_quote_is_truncated():
    long = "x" * 500
    with pytest.raises(DataError) as info:
        check_overlap([Example(text=long)], [Example(text=long)])
    assert long not in str(info.value) and "..." in str(info.value)
    assert len(str(info.value)) < 300


def test_overlap_drop():
    forget = [Example(prompt="q", response="a")]
    retain = [Example(prompt="q ", response=" a"), Example(prompt="q", response="b")]
    assert check_overlap(forget, retain, drop=True) == ([Example(prompt="q", response="b")], 1)


def test_overlap_compares_labels():
    assert check_overlap([Example(text="a", label=0)], [Example(text="a", label=1)]) == ([Example(text="a", label=1)], 0)


def test_overlap_drop_everything_is_an_error():
    with pytest.raises(DataError) as info:
        check_overlap([Example(text="a")], [Example(text="a")], drop=True)
    assert "empty" in str(info.value)


# ------------------------------------------------------------------------ fingerprint


def test_fingerprint_is_stable_and_has_no_data():
    examples = [Example(text="secret é"), Example(prompt="p", response="r")]
    first = fingerprint(examples)
    assert first == fingerprint(list(examples))
    assert first["count"] == 2 and len(first["sha256"]) == 64
    assert set(first) == {"count", "sha256"}
    assert "secret" not in json.dumps(first)


def test_fingerprint_same_from_file_and_memory(tmp_path):
    path = write(tmp_path / "f.csv", "text\na\nb\n")
    assert fingerprint(load_examples(path, name=FORGET)) == fingerprint(load_examples(["a", "b"], name=FORGET))


def test_fingerprint_changes_with_order_and_content():
    base = fingerprint([Example(text="a"), Example(text="b")])
    assert fingerprint([Example(text="b"), Example(text="a")]) != base
    assert fingerprint([Example(text="a"), Example(text="c")]) != base
    assert fingerprint([Example(text="a"), Example(text="b", label=0)]) != base
    assert fingerprint([Example(text="ab")]) != fingerprint([Example(text="a"), Example(text="b")])
    assert fingerprint([]) == {"count": 0, "sha256": fingerprint([])["sha256"]}
