"""The command line, in-process: help texts, one-line errors with exit status 2 and no traceback,
one real unlearn run on a tiny saved model and eval of its artifact."""

import json

import pytest

from conftest import FACTS_FORGET, FACTS_RETAIN, make_model, save_model_dir, tokenizer_for, write_jsonl
from unlearn_fast.io.artifacts import MANIFEST_FILE, WEIGHTS_FILE, load_layers, read_manifest
from unlearn_fast.cli import main
from unlearn_fast.train.data import Example
from unlearn_fast.eval.evaluation import evaluate_sets

FORGET, RETAIN = FACTS_FORGET, FACTS_RETAIN



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_model_dir("llama", root / "model")
    save_model_dir("llama", root / "other-model", seed=1)
    write_jsonl(root / "forget.jsonl", FORGET)
    write_jsonl(root / "retain.jsonl", RETAIN)
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    """Status 2 and one ``error: ...`` line (the last one on stderr), no traceback.

    (Other lines on stderr can only be progress bars, e.g. transformers' weight loading.)"""
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    line = errors[0]
    assert line.startswith("error: ") and len(line) > len("error: ") + 10
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the CLI loads a model (data errors must come first)."""
    import unlearn_fast.io.base_model as hub

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(hub, "load_model", refuse)


def unlearn_args(root, out=None, forget=None, retain=None, model=None):
    return ["unlearn", "--model", model or root / "model", "--forget", forget or root / "forget.jsonl",
            "--retain", retain or root / "retain.jsonl", "--out", out or root / "out",
            "--max-steps", "2", "--no-eval", "--no-progress", "--rank", "4"]


# --------------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------------

HELP_OPTIONS = {
    "unlearn": ["--model", "--forget", "--retain", "--out", "--overwrite", "--drop-overlap", "--text-column",
                "--prompt-column", "--response-column", "--label-column", "--rank", "--reduction-factor",
                "--activation", "--blocks", "--alpha", "--lam", "--gamma", "--forget-kl-weight",
                "--forget-kl-bound", "--forget-lm-bound", "--subject-margin", "--generic-prompts-column", "--schedule", "--epochs", "--batch-size", "--lr",
                "--max-steps", "--seed", "--no-progress", "--no-eval", "--device", "--dtype"],
    "eval": ["--model", "--forget", "--retain", "--layers", "--json", "--text-column"],
    "demo": ["--out", "--overwrite", "--device"],
    "fuse": ["--layers", "--out"],
}


@pytest.mark.parametrize("command", list(HELP_OPTIONS))
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: unlearn-fast {command}")
    for option in HELP_OPTIONS[command]:
        assert option in out, option


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in HELP_OPTIONS:
        assert command in out
    code, out, _ = run(capsys)  # no command: help, status 2
    assert code == 2 and "usage:" in out


def test_fuse_without_out_is_a_clear_error(capsys):
    code, _, err = run(capsys, "fuse", "--layers", "a", "b")
    assert code == 2 and "--out" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# user errors: exit status 2, one line, no traceback
# --------------------------------------------------------------------------------------------


def test_missing_forget_file(workdir, capsys, no_model_load):
    out = workdir / "out-missing"
    code, _, err = run(capsys, *unlearn_args(workdir, out=out, forget=workdir / "nope.jsonl"))
    assert_one_line_error(code, err, "forget set", "file not found", "nope.jsonl")
    assert not out.exists()


@pytest.mark.parametrize("content,name", [("", "empty.jsonl"), ("prompt,response\n", "empty.csv"), ("[]", "empty.json")])
def test_empty_set(workdir, tmp_path, capsys, no_model_load, content, name):
    empty = tmp_path / name
    empty.write_text(content)
    out = tmp_path / "out"
    code, _, err = run(capsys, *unlearn_args(workdir, out=out, forget=empty))
    assert_one_line_error(code, err, "forget set", "no rows")
    assert not out.exists()


def test_misnamed_column_lists_the_columns(workdir, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    code, _, err = run(capsys, *unlearn_args(workdir, out=out), "--text-column", "body")
    line = assert_one_line_error(code, err, "'body'", "--text-column", "'prompt'", "'response'")
    assert "columns:" in line
    assert not out.exists()


def test_undetectable_columns(workdir, tmp_path, capsys, no_model_load):
    # (TOFU's question / answer are detected: see tests/train/test_data_by_path.py)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"query": "q", "reply": "a"}])
    code, _, err = run(capsys, *unlearn_args(workdir, out=tmp_path / "out", retain=odd))
    assert_one_line_error(code, err, "retain set", "'query'", "'reply'")


def test_example_in_both_sets(workdir, tmp_path, capsys, no_model_load):
    retain = write_jsonl(tmp_path / "retain.jsonl", RETAIN + FORGET[:1])
    out = tmp_path / "out"
    code, _, err = run(capsys, *unlearn_args(workdir, out=out, retain=retain))
    assert_one_line_error(code, err, "also in the forget set", "--drop-overlap")
    assert not out.exists()


def test_non_existing_model_dir(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, *unlearn_args(workdir, out=out, model=tmp_path / "no-such-model"))
    assert_one_line_error(code, err, "model not found", "no-such-model")
    assert not out.exists()


def test_existing_out_without_overwrite(workdir, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, *unlearn_args(workdir, out=out))
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("extra,needle", [(["--blocks", "5"], "1..2"), (["--rank", "0"], "rank"),
                                          (["--lr", "0"], "learning rate"), (["--gamma", "-1", "--lam", "0", "--alpha", "0",
                                                                              "--forget-kl-weight", "0"], None)])
def test_bad_settings(workdir, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    code, _, err = run(capsys, *unlearn_args(workdir, out=out), *extra)
    if needle is None:  # a legal (if odd) setting must not crash
        assert code == 0, err
        return
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_unparsable_option_is_a_usage_error(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in unlearn_args(workdir, out=tmp_path / "out")] + ["--blocks", "lots"])
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_eval_needs_data(workdir, capsys):
    code, _, err = run(capsys, "eval", "--model", workdir / "model")
    assert_one_line_error(code, err, "--forget")


# --------------------------------------------------------------------------------------------
# a successful run, then eval of its artifact
# --------------------------------------------------------------------------------------------


def test_unlearn_then_eval(workdir, tmp_path, capsys):
    out = tmp_path / "layers"
    code, stdout, err = run(capsys, *unlearn_args(workdir, out=out), "--lr", "5e-2")
    assert code == 0, err
    assert "Traceback" not in err
    assert f"artifact written to {out}" in stdout
    assert (out / WEIGHTS_FILE).is_file() and (out / MANIFEST_FILE).is_file()
    manifest = read_manifest(out)
    assert manifest["training"]["max_steps"] == 2 and manifest["metrics"]["steps"] == 2
    assert manifest["layers"]["config"]["rank"] == 4
    assert manifest["base_model"]["name_or_path"] == str(workdir / "model")

    common = ["--model", workdir / "model", "--forget", workdir / "forget.jsonl", "--retain", workdir / "retain.jsonl"]
    code, stdout, err = run(capsys, "eval", *common, "--layers", out, "--json")
    assert code == 0, err
    with_layers = json.loads(stdout)
    assert {"forget_loss", "retain_loss", "forget_accuracy", "retain_accuracy"} <= set(with_layers)

    code, stdout, err = run(capsys, "eval", *common, "--json")
    assert code == 0, err
    without = json.loads(stdout)
    assert with_layers["forget_loss"] != without["forget_loss"]

    # the same figures as the API gives for base + loaded layers
    model = make_model("llama")
    load_layers(model, out)
    sets = {"forget": [Example(**e) for e in FORGET], "retain": [Example(**e) for e in RETAIN]}
    figures = evaluate_sets(model, tokenizer_for("llama"), "causal", sets)
    for k, v in figures.items():
        assert with_layers[k] == pytest.approx(v, rel=1e-6, abs=1e-9)

    code, stdout, err = run(capsys, "eval", *common, "--layers", out)  # plain-text table
    assert code == 0 and "forget_loss" in stdout

    code, _, err = run(capsys, "eval", "--model", workdir / "other-model", "--forget", workdir / "forget.jsonl",
                       "--layers", out)
    assert_one_line_error(code, err, "different base model")

    code, _, err = run(capsys, *unlearn_args(workdir, out=out))  # exists now
    assert_one_line_error(code, err, "already exists")
    code, stdout, err = run(capsys, *unlearn_args(workdir, out=out), "--overwrite", "--seed", "1")
    assert code == 0, err
    assert read_manifest(out)["training"]["seed"] == 1


def test_eval_of_a_missing_artifact(workdir, tmp_path, capsys):
    code, _, err = run(capsys, "eval", "--model", workdir / "model", "--forget", workdir / "forget.jsonl",
                       "--layers", tmp_path / "nothing-here")
    assert_one_line_error(code, err, "manifest")
