"""A command line that says what it does (issue 31, item 4): help and default on every option, a line on
what trains and an estimate of the time left, silent bars with --no-progress, a warning when the forget
loss did not rise, tokens/s in the summary, and full-parameter baselines on a model converted from GGUF."""

import argparse
import json
import os

import pytest
import transformers

from conftest import FACTS_FORGET, FACTS_RETAIN, make_model, save_model_dir, tokenizer_for
from unlearn_fast.api import unlearn
from unlearn_fast.cli import build_parser, main
from unlearn_fast.cli.common import says_default
from unlearn_fast.eval.evaluation import forget_unmoved
from unlearn_fast.model.layers import LayerConfig
from unlearn_fast.train.trainer import ESTIMATE_AFTER, TrainConfig

FORGET, RETAIN = FACTS_FORGET, FACTS_RETAIN


def options(parser, path=()):
    """(verb path, action, help as --help shows it) of every option of every (sub-)command."""
    for action in parser._actions:
        if isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield from options(sub, (*path, name))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield path, action, parser._get_formatter()._expand_help(action)


def test_every_option_has_help_and_shows_its_default():
    found = list(options(build_parser()))
    assert len(found) > 50
    for path, action, text in found:
        assert action.help, f"{' '.join(path)} {action.option_strings[0]} has no help"
        assert says_default(text), f"{' '.join(path)} {action.option_strings[0]}: no default in {text!r}"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for needle in ("(default: 3)", "(default: relu)", "(default: mixed)", "(default: off)", "(default: none)",
                   "(required)"):
        assert needle in out, needle


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_help")
    save_model_dir("llama", root / "model")
    for name, rows in (("forget", FORGET), ("retain", RETAIN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def restore_bars(monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    yield
    transformers.utils.logging.enable_progress_bar()


def test_no_progress_silences_every_bar_and_the_summary_has_tokens_per_s(workdir, tmp_path, capsys, restore_bars):
    code = main([str(a) for a in ["unlearn", "--model", workdir / "model", "--forget", workdir / "forget.jsonl",
                                  "--retain", workdir / "retain.jsonl", "--out", tmp_path / "out", "--rank", "4",
                                  "--epochs", "10", "--max-steps", "5", "--no-progress"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "it/s]" not in captured.err and "step/s]" not in captured.err and "%|" not in captured.err
    assert "training " in captured.out and "parameters: the unlearning layers" in captured.out
    assert "5 steps" in captured.out
    assert f"s per step over the first {ESTIMATE_AFTER} steps" in captured.out
    assert "tokens/s" in captured.out.splitlines()[-2]  # the update-time line, above "artifact written"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["tokens_per_s"] > 0


def test_the_training_line_says_what_trains():
    model, tok = make_model("llama"), tokenizer_for("llama")
    said = []
    unlearn(model, tok, FORGET, RETAIN, layers=LayerConfig(rank=4, blocks=[1]), log=said.append, evaluate=False,
            training=TrainConfig(max_steps=2, progress=False))
    line = next(s for s in said if s.startswith("training "))
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"training {count:,} parameters: the unlearning layers at 1 site(s) (blocks 1)" in line
    assert "2 steps" in line


def test_a_forget_loss_that_did_not_rise_is_a_warning():
    assert forget_unmoved({"forget_loss": 2.0}, {"forget_loss": 2.5}) is None
    assert "did not rise" in forget_unmoved({"forget_loss": 2.0}, {"forget_loss": 2.0})
    assert forget_unmoved({}, {"forget_loss": 2.0}) is None
    model, tok = make_model("llama"), tokenizer_for("llama")
    said = []
    # one step at a negligible learning rate leaves the model where it was
    result = unlearn(model, tok, FORGET, RETAIN, layers=LayerConfig(rank=4), log=said.append,
                     training=TrainConfig(max_steps=1, lr=1e-12, progress=False))
    assert any(s.startswith("warning: the forget-set loss did not rise") for s in said), said
    assert result.manifest["warnings"] and "did not rise" in result.manifest["warnings"][0]


def test_full_parameter_baseline_on_a_model_converted_from_gguf(tmp_path, capsys):
    """The embedded SmolLM2 is converted from GGUF; its cached config kept transformers' GGUF
    quantization_config, and save_pretrained refused the model after training. The loader drops it."""
    model_dir = save_model_dir("llama", tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"dequantize": False, "gguf_file": "model.gguf", "quant_method": "gguf"}
    (model_dir / "config.json").write_text(json.dumps(config))
    for name, rows in (("forget", FORGET), ("retain", RETAIN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main([str(a) for a in ["unlearn", "--model", model_dir, "--forget", tmp_path / "forget.jsonl",
                                  "--retain", tmp_path / "retain.jsonl", "--out", tmp_path / "npo",
                                  "--method", "npo", "--max-steps", "2", "--no-progress"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "every weight of the model" in captured.out and "tokens/s" in captured.out
    saved = json.loads((tmp_path / "npo" / "config.json").read_text())
    assert "quantization_config" not in saved
    assert (tmp_path / "npo" / "baseline.json").is_file()
