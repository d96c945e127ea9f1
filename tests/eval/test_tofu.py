"""TOFU-shaped runs (issue 24, item 3): the generated set has TOFU's file layout, the reader reads it and
rejects malformed files with a one-line error, and ``unlearn-fast bench tofu`` runs end to end on a tiny
model (EUL against retain logs, a baseline without them), writing report.json / .md (/ .png)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import save_model_dir, tokenizer_for
from unlearn_fast.cli import main
from unlearn_fast.errors import DataError, UnlearnFastError
from unlearn_fast.eval.tofu import (
    REAL_AUTHORS, RETAIN_PERTURBED, SPLITS, WORLD_FACTS, eval_sets, expected_files, format_question,
    make_tofu_data, read_qa_file, read_tofu, train_sets
)

AUTHORS, QUESTIONS = 10, 2  # small: forget01 = forget05 = 1 author, forget10 = 1 author (10 %)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tofu")
    make_tofu_data(root / "data", seed=3, authors=AUTHORS, questions=QUESTIONS)
    return root / "data"


def test_generator_writes_tofu_shaped_files(data, tmp_path):
    names = {p.name for p in data.iterdir()}
    for split in SPLITS:
        assert {f"{n}.json" for n in expected_files(split)} <= names
    assert "full.json" in names
    full = {r["question"] for r in _lines(data / "full.json")}
    assert len(full) == AUTHORS * QUESTIONS
    for split, (retain, holdout) in SPLITS.items():
        forget = _lines(data / f"{split}.json")
        kept = _lines(data / f"{retain}.json")
        # complementary: together the whole set, no question in both
        assert {r["question"] for r in forget} | {r["question"] for r in kept} == full
        assert not {r["question"] for r in forget} & {r["question"] for r in kept}
        assert all(set(r) == {"question", "answer"} for r in forget + kept)
        perturbed = _lines(data / f"{split}_perturbed.json")
        assert [r["question"] for r in perturbed] == [r["question"] for r in forget]
        for r in perturbed:
            assert set(r) == {"question", "answer", "paraphrased_answer", "perturbed_answer"}
            assert len(r["perturbed_answer"]) == 3 and r["answer"] not in r["perturbed_answer"]
            assert r["paraphrased_answer"] != r["answer"]
        held = _lines(data / f"{holdout}.json")
        assert len(held) == len(forget) and not {r["question"] for r in held} & full  # never trained on
    assert {r["question"] for r in _lines(data / f"{RETAIN_PERTURBED}.json")} <= {r["question"] for r in
                                                                                 _lines(data / "retain90.json")}
    for name in (REAL_AUTHORS, WORLD_FACTS):
        rows = _lines(data / f"{name}.json")
        assert rows and all(set(r) == {"question", "answer", "perturbed_answer"} for r in rows)
    # deterministic from the seed; another seed gives other authors
    make_tofu_data(tmp_path / "again", seed=3, authors=AUTHORS, questions=QUESTIONS)
    make_tofu_data(tmp_path / "other", seed=4, authors=AUTHORS, questions=QUESTIONS)
    assert (tmp_path / "again" / "forget10_perturbed.json").read_bytes() == (data / "forget10_perturbed.json").read_bytes()
    assert (tmp_path / "other" / "full.json").read_bytes() != (data / "full.json").read_bytes()
    # TOFU's own sizes with 200 authors: 2 / 10 / 20 forgotten authors
    big = make_tofu_data(tmp_path / "big", authors=200, questions=1)
    assert [len(_lines(big[s])) for s in SPLITS] == [2, 10, 20]
    with pytest.raises(UnlearnFastError, match="already holds"):  # never over a directory's files unasked
        make_tofu_data(tmp_path / "again", seed=3, authors=AUTHORS, questions=QUESTIONS)


def test_reader_reads_the_split_and_builds_prompts(data):
    tofu = read_tofu(data, "forget10")
    assert len(tofu.forget) == len(tofu.forget_eval) == QUESTIONS and len(tofu.retain) == (AUTHORS - 1) * QUESTIONS
    assert tofu.missing() == [] and set(tofu.files) == set(expected_files("forget10"))
    tok = tokenizer_for("llama")
    sets = eval_sets(tofu, tok, "auto")
    assert set(sets) == {"forget", "retain", "real_authors", "world_facts", "test"}
    example = sets["forget"][0]
    assert example.prompt == f"Question: {tofu.forget_eval[0].question}\nAnswer:"
    assert example.paraphrased and len(example.perturbed) == 3
    forget, retain = train_sets(tofu, tok, "none")
    assert len(forget) == len(retain) == QUESTIONS  # as many retained questions as forgotten ones, by default
    assert len(train_sets(tofu, tok, "none", retain_sample=0)[1]) == len(tofu.retain)
    # with a chat template the prompt is the bare question: encode makes it the user turn
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert format_question("Who?", tok, "auto") == "Who?"
    assert format_question("Who?", tok, "none") == "Question: Who?\nAnswer:"


@pytest.mark.parametrize("line,message", [
    ('{"question": "Q?", "answer": "A."', "line 2: not a JSON object"),
    ('{"question": "Q?", "answer": "A.", "paraphrased_answer": "P.", "perturbed_answer": "W."}',
     "line 2: 'perturbed_answer' must be a non-empty list"),
    ('{"question": "Q?", "paraphrased_answer": "P.", "perturbed_answer": ["W."]}', "line 2: 'answer' must be"),
    ('["Q?", "A."]', "line 2: a row must be a JSON object"),
])
def test_reader_rejects_a_malformed_file_naming_file_line_and_field(data, tmp_path, line, message):
    bad = tmp_path / "data"
    bad.mkdir()
    for p in data.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    target = bad / "forget10_perturbed.json"
    rows = target.read_text().splitlines()
    target.write_text("\n".join([rows[0], line, *rows[1:]]) + "\n")
    with pytest.raises(DataError, match="forget10_perturbed.json " + message.replace("(", r"\(")):
        read_tofu(bad, "forget10")


def test_reader_names_a_missing_file_and_rejects_overlapping_splits(data, tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "forget05.json").write_bytes((data / "forget05.json").read_bytes())
    with pytest.raises(DataError, match=r"missing retain95\.json, forget05_perturbed\.json, retain_perturbed\.json"):
        read_tofu(tmp_path / "only", "forget05")
    with pytest.raises(DataError, match="no such directory"):
        read_tofu(tmp_path / "nowhere", "forget05")
    with pytest.raises(UnlearnFastError, match="split must be one of"):
        read_tofu(data, "forget20")
    overlap = tmp_path / "overlap"
    overlap.mkdir()
    for p in data.iterdir():
        (overlap / p.name).write_bytes(p.read_bytes())
    (overlap / "retain99.json").write_text((data / "full.json").read_text())
    with pytest.raises(DataError, match="share 2 question"):
        read_tofu(overlap, "forget01")
    assert read_qa_file(data / "forget01.json")[0].perturbed == ()


@pytest.fixture(scope="module")
def bench(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("tofu-bench")
    save_model_dir("llama", root / "model")
    common = ["bench", "tofu", "--data", str(data), "--split", "forget10", "--model", str(root / "model"),
              "--max-new-tokens", "4", "--max-length", "128", "--epochs", "1", "--no-progress"]
    # the "retrained" model's logs (the tiny model itself stands in for it), then EUL against them
    assert main([*common, "--eval-only", "--save-logs", str(root / "retain90.json"), "--out", str(root / "gold")]) == 0
    assert main([*common, "--method", "eul", "--retain-logs", str(root / "retain90.json"), "--out",
                 str(root / "eul")]) == 0
    assert main([*common, "--method", "npo", "--train-params", "layers", "--out", str(root / "npo")]) == 0
    return root


def test_bench_tofu_eul_against_retain_logs(bench):
    out = bench / "eul"
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["original", "eul", "retrain"] and report["retrained"] == "retrain"
    summary = report["tofu"]["summary"]
    for name in ("original", "eul"):
        row = summary[name]
        assert 0 <= row["forget_quality"] <= 1 and 0 <= row["forget_truth_ratio"] <= 1
        assert 0 < row["forget_Q_A_Prob"] < 1 and row["forget_Q_A_ROUGE"] is not None
        assert row["model_utility"] is not None and row["privleak"] is not None
    assert summary["eul"]["time_s"] > 0 and report["tofu"]["absent"] == {}
    assert report["tofu"]["split"] == "forget10" and report["tofu"]["missing_optional"] == []
    figures = report["methods"]["eul"]["figures"]
    for key in ("retain_Truth_Ratio", "real_authors_Q_A_Prob_normalised", "world_facts_Q_A_ROUGE", "mia"):
        assert key in figures, key
    md = (out / "report.md").read_text()
    assert "## TOFU forget10: headline figures" in md and "| eul |" in md
    assert "absent" not in md
    assert (out / "eul" / "manifest.json").is_file()  # the artifact, evaluated later with eval --layers
    if importlib.util.find_spec("matplotlib"):
        assert (out / "report.png").stat().st_size > 0
    logs = json.loads((bench / "retain90.json").read_text())
    assert logs["meta"]["method"] == "original" and logs["per_example"]["forget"]


def test_bench_tofu_baseline_without_retain_logs_says_why_figures_are_absent(bench):
    out = bench / "npo"
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["original", "npo-layers"] and report["retrained"] is None
    row = report["tofu"]["summary"]["npo-layers"]
    assert row["forget_quality"] is None and row["privleak"] is None and row["model_utility"] is not None
    absent = report["tofu"]["absent"]
    assert "--retain-logs" in absent["forget_quality"] and "--retain-logs" in absent["privleak"]
    md = (out / "report.md").read_text()
    assert "- forget_quality: absent: no --retain-logs" in md
    assert (out / "npo-layers" / "manifest.json").is_file()
    assert json.loads((out / "npo-layers" / "manifest.json").read_text())["method"] == "npo-layers"


def test_bench_tofu_refuses_before_loading_a_model(data, tmp_path, capsys):
    assert main(["bench", "tofu", "--data", str(tmp_path / "none"), "--model", "x", "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["bench", "tofu", "--data", str(data)]) == 2
    assert "needs --data DIR and --model M" in capsys.readouterr().err
    assert main(["bench", "tofu", "--make-data", str(data)]) == 2  # its files exist: --overwrite to replace
    assert "already holds" in capsys.readouterr().err
