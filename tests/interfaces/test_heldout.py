"""A reference in every run (issue 31, item 2): ``--heldout FILE`` (known examples nobody asked to
delete; a classifier's test split) gives held-out accuracy and loss beside forget and retain, and the
general-text perplexity (the shipped text, or ``--ppl-text FILE``) is reported, in the table, the
manifest and the report."""

import json

import pytest

from conftest import FACTS_FORGET, make_model, save_model_dir, tokenizer_for
from unlearn_fast.api import unlearn
from unlearn_fast.cli import main
from unlearn_fast.errors import DataError
from unlearn_fast.eval.general_text import GENERAL_TEXT, load_general_text
from unlearn_fast.model.layers import LayerConfig
from unlearn_fast.train.trainer import TrainConfig

FORGET = FACTS_FORGET
RETAIN = [{"prompt": "The capital of France is", "response": " Paris"},
          {"prompt": "Bob plays", "response": " the violin"}]
HELDOUT = [{"prompt": "The sky is", "response": " blue"}, {"prompt": "Snow is", "response": " white"}]
QUICK = dict(layers=LayerConfig(rank=4), training=TrainConfig(max_steps=2, progress=False), log=lambda *a: None)


def test_unlearn_reports_heldout_and_general_text_by_default():
    model, tok = make_model("llama"), tokenizer_for("llama")
    result = unlearn(model, tok, FORGET, RETAIN, heldout=HELDOUT, **QUICK)
    for side in ("before", "after"):
        figures = result.metrics[side]
        for key in ("forget_accuracy", "retain_accuracy", "heldout_accuracy", "forget_loss", "retain_loss",
                    "heldout_loss", "general_perplexity"):
            assert key in figures, (side, key)
    assert result.manifest["heldout_set"]["count"] == 2
    assert result.manifest["general_text"]["shipped"] is True
    assert result.manifest["general_text"]["count"] == len(GENERAL_TEXT)


def test_without_heldout_or_general_text():
    model, tok = make_model("llama"), tokenizer_for("llama")
    result = unlearn(model, tok, FORGET, RETAIN, general_text=None, **QUICK)
    assert not any(k.startswith(("heldout", "general")) for k in result.metrics["after"])
    assert result.manifest["heldout_set"] is None and result.manifest["general_text"] is None


def test_classifier_heldout_is_a_labelled_test_split():
    model, tok = make_model("bert"), tokenizer_for("bert")
    forget = [{"text": "Zorbia exports purple marbles.", "label": "POS"}]
    retain = [{"text": "France exports cheese.", "label": "NEG"}, {"text": "Paris has museums.", "label": "POS"}]
    test = [{"text": "The sky is blue.", "label": "POS"}, {"text": "It rains.", "label": 0}]
    result = unlearn(model, tok, forget, retain, heldout=test, **QUICK)
    after = result.metrics["after"]
    assert 0 <= after["heldout_accuracy"] <= 1 and after["heldout_loss"] > 0
    assert "general_perplexity" not in after  # a classifier has no text perplexity
    with pytest.raises(DataError, match="heldout set: row 1 has no label"):
        unlearn(make_model("bert"), tok, forget, retain, heldout=[{"text": "No label here."}], **QUICK)


def test_load_general_text(tmp_path):
    path = tmp_path / "ppl.txt"
    path.write_text("First passage.\n\n  Second passage.  \n", encoding="utf-8")
    assert load_general_text(path) == ["First passage.", "Second passage."]
    with pytest.raises(DataError, match="file not found"):
        load_general_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="has no text"):
        load_general_text(tmp_path / "empty.txt")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    save_model_dir("llama", root / "model")
    for name, rows in (("forget", FORGET), ("retain", RETAIN), ("heldout", HELDOUT)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "ppl.txt").write_text("A plain sentence about the weather.\nAnother one about trains.\n")
    return root


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_unlearn_then_eval_with_heldout_and_ppl_text(workdir, tmp_path, capsys):
    data = ["--forget", workdir / "forget.jsonl", "--heldout", workdir / "heldout.jsonl",
            "--ppl-text", workdir / "ppl.txt"]
    code, out, err = cli(capsys, "unlearn", "--model", workdir / "model", *data, "--retain",
                         workdir / "retain.jsonl", "--out", tmp_path / "out", "--rank", "4", "--max-steps", "2",
                         "--no-progress")
    assert code == 0, err
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert len(table["heldout_accuracy"]) == 2 and len(table["heldout_loss"]) == 2  # before and after
    assert len(table["general_perplexity"]) == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "heldout_loss" in manifest["metrics"]["after"] and manifest["general_text"]["shipped"] is False

    code, out, err = cli(capsys, "eval", "--model", workdir / "model", "--layers", tmp_path / "out", *data,
                         "--json", "--no-progress")
    assert code == 0, err
    figures = json.loads(out)
    assert {"heldout_accuracy", "heldout_loss", "general_perplexity"} <= set(figures)
    assert figures["heldout_loss"] == pytest.approx(manifest["metrics"]["after"]["heldout_loss"], rel=1e-4)

    code, out, err = cli(capsys, "eval", "--model", workdir / "model", "--layers", tmp_path / "out", *data,
                         "--report", tmp_path / "report", "--no-progress")
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "heldout_accuracy" in report["methods"]["original"]["figures"]
    assert "general_perplexity" in report["methods"]["original"]["figures"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| Forget LM loss | Held-out ↑ | General ppl | Time (s) |" in md


def test_cli_mistakes_come_before_the_model_loads(workdir, tmp_path, capsys, monkeypatch):
    import unlearn_fast.io.base_model as hub

    monkeypatch.setattr(hub, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    base = ["unlearn", "--model", workdir / "model", "--forget", workdir / "forget.jsonl", "--retain",
            workdir / "retain.jsonl", "--out", tmp_path / "out"]
    code, _, err = cli(capsys, *base, "--ppl-text", tmp_path / "missing.txt")
    assert code == 2 and "general text (--ppl-text): file not found" in err
    code, _, err = cli(capsys, *base, "--heldout", tmp_path / "missing.jsonl")
    assert code == 2 and "heldout set: file not found" in err
    code, _, err = cli(capsys, *base, "--heldout", workdir / "heldout.jsonl", "--method", "ga")
    assert code == 2 and "baselines do not evaluate" in err
