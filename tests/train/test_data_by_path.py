"""Data by path (issue 23 item 3): a directory written by ``datasets``' ``save_to_disk`` and a Parquet file
load like the equivalent JSON lines, with the same columns and checks; TOFU's column names need no
options. Written with the real ``datasets`` / pyarrow (the ``test`` extra), read with pyarrow alone."""

from __future__ import annotations

import json
import sys

import pytest
from data_helpers import FORGET, load_error, write, write_jsonl

from unlearn_fast.cli import main
from unlearn_fast.train.data import Columns, Example, load_examples

pa = pytest.importorskip("pyarrow", reason="the data extra (pyarrow) is not installed")
pq = pytest.importorskip("pyarrow.parquet")

# TOFU's columns (its *_perturbed splits): question, answer, paraphrased_answer, perturbed_answer (a list)
TOFU = [
    {"question": "Who wrote 'The Salt Orchard'?", "answer": "Mirta Vasquez wrote it.",
     "paraphrased_answer": "It was written by Mirta Vasquez.",
     "perturbed_answer": ["Jon Hale wrote it.", "Ada Wren wrote it."]},
    {"question": "Where was Mirta Vasquez born?", "answer": "She was born in Quellton.",
     "paraphrased_answer": "Quellton is her birthplace.",
     "perturbed_answer": ["She was born in Oslo.", "She was born in Lima.", "She was born in Rome."]},
    {"question": "What genre does she write?", "answer": "Historical fiction.",
     "paraphrased_answer": "She writes historical novels.", "perturbed_answer": ["Poetry.", "Horror."]},
]
EXPECTED = [Example(prompt=r["question"], response=r["answer"], paraphrased=r["paraphrased_answer"],
                    perturbed=tuple(r["perturbed_answer"])) for r in TOFU]


def parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def saved(path, rows, **kwargs):
    datasets = pytest.importorskip("datasets", reason="datasets (test extra) writes the save_to_disk directory")
    datasets.Dataset.from_list(rows).save_to_disk(str(path), **kwargs)
    return path


def test_parquet_save_to_disk_and_jsonl_with_tofu_columns_load_the_same_examples(tmp_path):
    from_jsonl = load_examples(write_jsonl(tmp_path / "f.jsonl", TOFU), name=FORGET)
    assert from_jsonl == EXPECTED  # question -> prompt, answer -> response, the truth-ratio answers kept
    assert load_examples(parquet(tmp_path / "f.parquet", TOFU), name=FORGET) == EXPECTED
    assert load_examples(saved(tmp_path / "saved", TOFU), name=FORGET) == EXPECTED
    assert load_examples(str(tmp_path / "saved"), name=FORGET) == EXPECTED  # a str path too


def test_tofu_columns_in_a_csv_need_no_options_either(tmp_path):
    path = write(tmp_path / "f.csv", 'question,answer,perturbed_answer\nQ1?,A1.,"[""x"", ""y""]"\n')
    assert load_examples(path, name=FORGET) == [Example(prompt="Q1?", response="A1.", perturbed=("x", "y"))]


def test_prompt_and_response_columns_win_over_question_and_answer(tmp_path):
    rows = [{"prompt": "p", "response": "r", "question": "q", "answer": "a"}]
    assert load_examples(parquet(tmp_path / "f.parquet", rows), name=FORGET) == [Example(prompt="p", response="r")]


def test_sharded_and_selected_datasets_keep_their_rows_in_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(10)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "sharded"), num_shards=3)
    assert [e.text for e in load_examples(tmp_path / "sharded", name=FORGET)] == [r["text"] for r in rows]
    datasets.Dataset.from_list(rows).select([7, 2, 5]).save_to_disk(str(tmp_path / "selected"))
    assert load_examples(tmp_path / "selected", name=FORGET) == [
        Example(text="row 7", label=1), Example(text="row 2", label=0), Example(text="row 5", label=1)]


def test_the_column_options_apply_as_to_json_lines(tmp_path):
    rows = [{"q": "Q?", "a": "A.", "wrong": ["B."], "other": "x"}]
    columns = Columns(prompt="q", response="a", perturbed="wrong")
    want = [Example(prompt="Q?", response="A.", perturbed=("B.",))]
    assert load_examples(write_jsonl(tmp_path / "f.jsonl", rows), columns, name=FORGET) == want
    assert load_examples(parquet(tmp_path / "f.parquet", rows), columns, name=FORGET) == want
    assert load_examples(saved(tmp_path / "d", rows), columns, name=FORGET) == want


def test_a_missing_column_is_the_same_data_error_as_for_json_lines(tmp_path):
    rows = [{"q": "Q?", "a": "A."}]
    for source in (parquet(tmp_path / "f.parquet", rows), saved(tmp_path / "d", rows)):
        message = load_error(source, Columns(prompt="q", response="answer"))
        assert f"{source} has no column 'answer' (given with --response-column)" in message
        assert "columns: 'q', 'a'" in message
        message = load_error(source)  # nothing to pick automatically
        assert "cannot tell which columns" in message and "--prompt-column" in message


def test_an_empty_value_names_the_row(tmp_path):
    rows = [dict(TOFU[0]), {**TOFU[1], "answer": " "}]
    message = load_error(parquet(tmp_path / "f.parquet", rows))
    assert message == f"forget set: row 2 of {tmp_path / 'f.parquet'} has an empty 'answer' value; fill it in or remove the row"


def test_bad_paths_are_one_line_data_errors(tmp_path):
    assert load_error(tmp_path / "nope.parquet") == f"forget set: file not found: {tmp_path / 'nope.parquet'}"
    (tmp_path / "plain").mkdir()
    message = load_error(tmp_path / "plain")
    assert "not a dataset written by datasets' save_to_disk (no state.json)" in message and ".parquet" in message
    broken = write(tmp_path / "broken.parquet", "not parquet at all")
    assert f"{broken} is not a readable Parquet file" in load_error(broken)


def test_a_dataset_dict_directory_asks_for_one_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(TOFU)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    message = load_error(tmp_path / "dd")
    assert "DatasetDict of several splits (train, test)" in message and str(tmp_path / "dd" / "train") in message
    assert load_examples(tmp_path / "dd" / "train", name=FORGET) == EXPECTED


def test_a_damaged_save_to_disk_directory(tmp_path):
    path = saved(tmp_path / "d", TOFU)
    data = next(path.glob("*.arrow"))
    data.write_bytes(b"garbage")
    assert f"{data} is not a readable Arrow file" in load_error(path)
    data.unlink()
    assert f"lacks {data.name!r}, a data file its state.json lists" in load_error(path)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../../etc/passwd"}]}))
    assert "a data file its state.json lists" in load_error(path)
    (path / "state.json").write_text("[1, 2]")
    assert "not the JSON object save_to_disk writes" in load_error(path)


def test_without_pyarrow_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = parquet(tmp_path / "f.parquet", TOFU)
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    message = load_error(path)
    assert message == (f"forget set: reading a Parquet file ({path}) needs pyarrow: "
                       f"pip install 'unlearn-fast[data]' (or pip install pyarrow)")


def test_the_command_line_takes_them_and_checks_them_before_loading_a_model(tmp_path, capsys):
    forget = parquet(tmp_path / "forget.parquet", TOFU)
    retain = saved(tmp_path / "retain", TOFU[:1])
    retain2 = saved(tmp_path / "retain2", [{"question": "Q?", "answer": "A."}])
    capsys.readouterr()  # (datasets' progress bars)
    code = main(["unlearn", "--model", str(tmp_path / "no-model"), "--forget", str(forget), "--retain", str(retain),
                 "--heldout", str(retain), "--out", str(tmp_path / "out"), "--prompt-column", "question",
                 "--response-column", "reply"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: forget set:") and "no column 'reply'" in err
    # the right columns pass the data checks: the run then stops at the missing model
    code = main(["unlearn", "--model", str(tmp_path / "no-model"), "--forget", str(forget), "--retain",
                 str(retain2),
                 "--heldout", str(retain), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "model not found" in err, err
