"""The report: JSON (strict, every figure), Markdown shaped like the paper's Table 2, a PNG plot (or a
clear note without matplotlib), and ``unlearn-fast eval --report`` end to end on a tiny model."""

import builtins
import json
import math

import pytest

from conftest import make_model, save_model_dir, tokenizer_for
from unlearn_fast.cli import main
from unlearn_fast.train.data import Example
from unlearn_fast.eval.per_example import evaluate_model
from unlearn_fast.eval.report import REPORT_JSON, REPORT_MD, REPORT_PNG, build_report, describe_methods, write_report

FORGET = [Example(prompt="The capital of Zorbia is", response=" Quellton"),
          Example(prompt="Mirta Vasquez likes", response=" green tea")]
RETAIN = [Example(prompt="The capital of France is", response=" Paris"),
          Example(prompt="Bob plays", response=" the violin")]
TEST = [Example(prompt="Hugo Bern eats", response=" apples"), Example(prompt="Ada plays", response=" chess")]
SETS = {"forget": FORGET, "retain": RETAIN, "test": TEST}


def strict_json(path):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=no_constants)


@pytest.fixture(scope="module")
def report():
    tok = tokenizer_for("llama")
    results = {name: evaluate_model(make_model("llama", seed), tok, "causal", SETS, max_new_tokens=2)
               for name, seed in (("original", 0), ("eul", 1), ("retrain", 2))}
    return build_report(results, times={"original": None, "eul": 1.25, "retrain": 9.5}, retrained="retrain",
                        title="toy", meta={"scenario": "toy"})


def test_report_files_are_written_and_parseable(report, tmp_path):
    written = write_report(report, tmp_path)
    assert set(written) == {"json", "md", "png"}
    data = strict_json(tmp_path / REPORT_JSON)
    assert list(data["methods"]) == ["original", "eul", "retrain"]
    assert data["retrained"] == "retrain" and data["plot"] == REPORT_PNG and data["plot_note"] is None
    eul = data["methods"]["eul"]
    assert eul["time_s"] == 1.25
    assert set(eul["figures"]["mia"]) == {"mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"}
    assert 0.0 <= eul["vs_retrained"]["forget_quality"] <= 1.0
    gold = data["methods"]["retrain"]["figures"]
    assert eul["vs_retrained"]["gap"]["forget_loss"] == pytest.approx(eul["figures"]["forget_loss"] - gold["forget_loss"])
    assert "vs_retrained" not in data["methods"]["retrain"]
    assert len(eul["per_example"]["forget"]) == 2
    md = (tmp_path / REPORT_MD).read_text()
    assert "| Method | Test ↑ | Retain ↑ | Forget | Forget LM loss | Time (s) |" in md
    table = [line for line in md.splitlines() if line.startswith("| eul |")]
    assert len(table) == 3  # one row in Table 2, one in open-unlearning's figures, one in the MIA table
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[4] == f"{eul['figures']['forget_lm_loss']:.3f}" and cells[5] == "1.2"
    assert "(gold standard)" in md and "![forget vs retain](report.png)" in md
    assert (tmp_path / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_plot_is_skipped_with_a_note(report, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    written = write_report(report, tmp_path)
    assert "png" not in written and not (tmp_path / REPORT_PNG).exists()
    data = strict_json(tmp_path / REPORT_JSON)
    assert data["plot"] is None and "matplotlib is not installed" in data["plot_note"]
    assert "matplotlib is not installed" in (tmp_path / REPORT_MD).read_text()


def test_nan_figures_become_null(tmp_path):
    results = {"a": {"figures": {"forget_loss": math.nan, "mia": {"mia_loss": math.inf}}, "per_example": {}}}
    write_report(build_report(results), tmp_path)
    data = strict_json(tmp_path / REPORT_JSON)
    assert data["methods"]["a"]["figures"] == {"forget_loss": None, "mia": {"mia_loss": None}}


def test_cli_eval_report(tmp_path, capsys):
    model_dir = save_model_dir("llama", tmp_path / "model")
    retrained = save_model_dir("llama", tmp_path / "retrained", seed=5)
    for name, rows in SETS.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in rows))
    data = ["--forget", str(tmp_path / "forget.jsonl"), "--retain", str(tmp_path / "retain.jsonl")]
    assert main(["unlearn", "--model", str(model_dir), *data, "--out", str(tmp_path / "eul"), "--max-steps", "1",
                 "--no-progress", "--no-eval", "--rank", "4"]) == 0
    assert main(["unlearn", "--model", str(model_dir), *data, "--method", "ga", "--out", str(tmp_path / "ga"),
                 "--max-steps", "1", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["eval", "--model", str(model_dir), *data, "--test", str(tmp_path / "test.jsonl"),
                 "--layers", str(tmp_path / "eul"), "--retrained", str(retrained),
                 "--compare", f"ga={tmp_path / 'ga'}", "--report", str(tmp_path / "report"), "--max-new-tokens", "2"])
    assert code == 0, capsys.readouterr().err
    report = strict_json(tmp_path / "report" / REPORT_JSON)
    assert list(report["methods"]) == ["original", "eul", "ga", "retrain"]
    assert report["methods"]["eul"]["time_s"] > 0 and report["methods"]["ga"]["time_s"] >= 0
    assert report["methods"]["original"]["time_s"] is None
    assert "forget_quality" in report["methods"]["ga"]["vs_retrained"]
    assert (tmp_path / "report" / REPORT_MD).is_file()
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), *data, "--compare", "nonsense"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_describe_methods_lists_each_methods_settings():
    from unlearn_fast.eval.baselines import BaselineConfig
    from unlearn_fast.model.layers import LayerConfig
    from unlearn_fast.train.objective import ObjectiveConfig
    from unlearn_fast.train.trainer import TrainConfig

    settings = {"eul": {"layers": LayerConfig(rank=8), "objective": ObjectiveConfig(gamma=0.5),
                        "training": TrainConfig(epochs=4, lr=2e-3)},
                "npo": {"config": BaselineConfig(method="npo", beta=0.3), "training": TrainConfig(epochs=2, lr=1e-5)}}
    out = json.loads(json.dumps(describe_methods(settings)))
    assert out["eul"]["epochs"] == 4 and out["eul"]["lr"] == 2e-3
    assert out["eul"]["layers"]["rank"] == 8 and out["eul"]["objective"]["gamma"] == 0.5
    assert out["npo"]["beta"] == 0.3 and out["npo"]["epochs"] == 2 and "layers" not in out["npo"]


def test_evaluate_for_report_loads_the_base_once_and_matches_fresh_loads(tmp_path):
    """Layer artifacts are attached to one loaded base in turn (and detached); each one's figures must equal
    those of a freshly loaded base with only its layers, so nothing of a previous method stays behind."""
    import dataclasses

    from unlearn_fast.api import unlearn
    from unlearn_fast.io.artifacts import load_layers
    from unlearn_fast.model.layers import LayerConfig, sites
    from unlearn_fast.eval.report import evaluate_for_report
    from unlearn_fast.train.trainer import TrainConfig

    tok = tokenizer_for("llama")
    artifacts = {}
    # different sites: b covers block 1 only, so a's leftover layers in block 0 would show
    for name, config in (("a", LayerConfig(rank=4)), ("b", LayerConfig(rank=2, blocks=[1]))):
        unlearn(make_model("llama"), tok, FORGET, RETAIN, out=tmp_path / name, layers=config, evaluate=False,
                training=TrainConfig(max_steps=2, lr=5e-2, progress=False), log=lambda *a: None)
        artifacts[name] = tmp_path / name
    retrained = save_model_dir("llama", tmp_path / "retrained", seed=5)
    sets = {**SETS, "forget": [dataclasses.replace(e, perturbed=(" Paris", " tea")) for e in FORGET]}
    loaded = []

    def load_base():
        loaded.append(make_model("llama"))
        return loaded[-1], tok

    results, _, gold = evaluate_for_report(load_base, sets, layers=artifacts["a"], compare={"b": artifacts["b"]},
                                           retrained=retrained, max_new_tokens=2, log=lambda m: None)
    assert len(loaded) == 1 and not sites(loaded[0])  # one base, left without layers
    assert list(results) == ["original", "eul", "b", "retrain"] and gold == "retrain"
    for name, artifact in (("original", None), ("eul", artifacts["a"]), ("b", artifacts["b"])):
        model = make_model("llama")
        if artifact is not None:
            load_layers(model, artifact)
        fresh = evaluate_model(model, tok, "causal", sets, max_new_tokens=2)
        assert results[name] == fresh, name
    assert "forget_truth_ratio" in results["b"]["figures"]
    losses = {name: results[name]["figures"]["forget_loss"] for name in ("original", "eul", "b")}
    assert len(set(losses.values())) == 3  # the three are different models
