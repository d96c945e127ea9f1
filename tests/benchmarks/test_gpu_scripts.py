"""The GPU scripts of issues 6 and 7 run end to end in their --dry-run (tiny shapes, the CPU, Triton
interpreted), each in its own process (they set TRITON_INTERPRET before importing triton): a GPU lease
is too short to find a broken script there. gpu_step.py is covered in test_whole_step.py."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

BENCH = str(REPO_ROOT / "benchmarks")


def run_script(name, out, timeout=300):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "UNLEARN_FAST_BACKEND"}
    proc = subprocess.run([sys.executable, os.path.join(BENCH, name), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_loss_head_script_dry_run(tmp_path):
    result, stdout = run_script("gpu_loss_head.py", tmp_path / "lh.json")
    methods = {r["method"] for r in result["speed"]}
    assert {"naive", "reference", "triton", "triton-8w"} <= methods
    assert all("error" not in r for r in result["accuracy"] + result["speed"]), result
    assert all(r["ok"] for r in result["accuracy"] if r["method"] != "naive"), result["accuracy"]
    assert "triton-8w" not in {r["method"] for r in result["accuracy"]}  # a timing variant only
    assert "% peak" in stdout


def test_unlearning_layer_script_dry_run(tmp_path):
    result, stdout = run_script("gpu_unlearning_layer.py", tmp_path / "ul.json")
    assert all(r["passed"] for r in result["correctness"])
    rows = result["timings"]
    assert [(r["d"], r["K"]) for r in rows] == [(48, 1), (48, 8), (72, 1), (72, 8)]
    assert all("error" not in r and r["triton_ms"] > 0 for r in rows), rows
    assert "forward + backward timings" in stdout
