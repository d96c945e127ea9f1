"""benchmarks/whole_step.py and gpu_step.py (the whole-step benchmark of issue 8), on a tiny model:
every mode computes the same loss, and the interleaved timing gives each mode its own samples."""

import json
import os
import sys

import pytest
from conftest import REPO_ROOT, make_model

BENCH = str(REPO_ROOT / "benchmarks")
sys.path.insert(0, BENCH)
from whole_step import MODES, StepRunner, make_rows, prepare, time_interleaved  # noqa: E402


@pytest.fixture
def model():
    return prepare(make_model("llama"), rank=4)


def test_every_mode_computes_the_naive_loss(model):
    rows = make_rows(model.config.vocab_size, rows=4, length=9)
    losses = {}
    for mode in MODES:  # each runner's first step, from the same layer weights
        state = {k: v.clone() for k, v in model.state_dict().items()}
        runner = StepRunner(model, rows, mode)
        losses[mode] = runner.step()
        runner.close()
        model.load_state_dict(state)
    assert losses["naive"] != 0
    for mode, loss in losses.items():
        assert loss == pytest.approx(losses["naive"], rel=1e-5), (mode, losses)


def test_interleaved_timing_keeps_modes_apart(model):
    rows = make_rows(model.config.vocab_size, rows=4, length=9)
    runners = [StepRunner(model, rows, mode) for mode in ("naive", "fused+cache")]
    results = time_interleaved(runners, steps=3)
    assert [r["mode"] for r in results] == ["naive", "fused+cache"]
    for r in results:
        assert len(r["s_all"]) == 3 and r["s_min"] <= r["s_per_step"] <= max(r["s_all"])
        assert r["tokens"] == 4 * 9 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["s_per_step"])


def test_gpu_step_script_interleaved_dry_run(tmp_path, capsys):
    import gpu_step

    out = tmp_path / "step.json"
    gpu_step.main(["--dry-run", "--steps", "2", "--modes", "naive", "fused", "--interleave", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["results"]] == ["naive", "fused"]
    assert all(len(r["s_all"]) == 2 for r in report["results"])
    assert "× naive (min)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu_step.main(["--dry-run", "--modes", "fused+cache+compile", "--interleave", "--out", str(out)])


def test_trunk_ab_runs_each_fused_mode_without_the_fused_trunk(model, tmp_path, monkeypatch):
    """--trunk-ab adds a runner per fused mode with the fused trunk off; only the others call the trunk ops,
    and the loss is the same either way."""
    import gpu_step

    from unlearn_fast.ops import trunk

    rows = make_rows(model.config.vocab_size, rows=4, length=9)
    calls = []
    real = trunk.rms_norm
    monkeypatch.setattr(trunk, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr("unlearn_fast.model.fused_trunk.rms_norm", trunk.rms_norm)
    losses = {}
    for on in (False, True):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        runner = StepRunner(model, rows, "fused", fused_trunk=on)
        assert runner.label == ("fused" if on else "fused (no fused trunk)")
        calls.clear()
        losses[on] = runner.step()
        assert bool(calls) == on
        runner.close()
        model.load_state_dict(state)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)

    out = tmp_path / "step.json"
    gpu_step.main(["--dry-run", "--steps", "1", "--modes", "naive", "fused", "--interleave", "--trunk-ab",
                   "--out", str(out)])
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == ["naive", "fused", "fused (no fused trunk)"]


def test_a_failing_variant_leaves_the_rest_of_the_table(tmp_path, monkeypatch, capsys):
    """Sequential GPU-style run: when the fused trunk raises, the fused modes are reported as failed and
    rerun without it, and the other modes are still timed."""
    import gpu_step

    def broken(*args, **kwargs):
        raise RuntimeError("trunk kernel failed to compile")

    monkeypatch.setattr("unlearn_fast.model.fused_trunk.rms_norm", broken)
    out = tmp_path / "step.json"
    gpu_step.main(["--dry-run", "--steps", "1", "--modes", "naive", "fused", "fused+cache", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["naive", "fused", "fused (no fused trunk)", "fused+cache",
                                            "fused+cache (no fused trunk)"]
    failed = [r["mode"] for r in results if "error" in r]
    assert failed == ["fused", "fused+cache"]
    assert all(r["s_per_step"] > 0 for r in results if "error" not in r)
    assert "RuntimeError: trunk kernel failed to compile" in results[1]["error"]
    assert "fused (no fused trunk)" in capsys.readouterr().out


def test_sequential_run_checks_every_mode_against_the_naive_first_loss(tmp_path, capsys):
    """Without --interleave every variant starts from the same layer weights: the first steps' losses
    agree with naive's (the GPU run's correctness check of the fast paths)."""
    import gpu_step

    out = tmp_path / "step.json"
    gpu_step.main(["--dry-run", "--steps", "2", "--modes", *MODES, "--trunk-ab", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert len(results) == len(MODES) + 2
    naive = results[0]["first_loss"]
    assert naive > 0
    for r in results:
        assert r["first_loss_rel_diff"] == pytest.approx(abs(r["first_loss"] - naive) / naive)
        assert r["first_loss_rel_diff"] < 1e-3, r
    assert "rel. diff" in capsys.readouterr().out
