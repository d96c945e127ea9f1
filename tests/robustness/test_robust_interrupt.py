"""SIGINT (Ctrl-C) during `unlearn` prints where the run stopped and how to resume; the resumed run
ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from conftest import save_model_dir
from safetensors.torch import load_file

from unlearn_fast.io.artifacts import WEIGHTS_FILE

FORGET = [{"prompt": "The code word is", "response": " pumpkin"}]
RETAIN = [{"prompt": "Bob plays", "response": " the violin"}, {"prompt": "Ann likes", "response": " tea"}]


def command(tmp_path, out, *extra):
    return [sys.executable, "-m", "unlearn_fast.cli", "unlearn", "--model", str(tmp_path / "model"),
            "--forget", str(tmp_path / "f.jsonl"), "--retain", str(tmp_path / "r.jsonl"), "--out", str(out),
            "--rank", "2", "--epochs", "400", "--batch-size", "2", "--no-progress", "--no-eval", *extra]


def test_sigint_says_where_the_run_stopped_and_resume_finishes_it(tmp_path):
    save_model_dir("llama", tmp_path / "model")
    for name, rows in (("f", FORGET), ("r", RETAIN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = tmp_path / "ckpt"
    # many steps after the first checkpoint: under load the run must not finish before the signal lands
    steps = "300"
    resumable = command(tmp_path, tmp_path / "out", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5",
                        "--max-steps", steps)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen(resumable, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (ckpt.exists() and any(p.name.startswith("step-") for p in ckpt.iterdir())):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted; nothing was written; the run stopped after step-"), err
    assert "--resume" in last and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    resumed = subprocess.run(resumable + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(command(tmp_path, tmp_path / "straight", "--max-steps", steps), capture_output=True,
                              text=True, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr
    a, b = load_file(tmp_path / "out" / WEIGHTS_FILE), load_file(tmp_path / "straight" / WEIGHTS_FILE)
    weights = [k for k in a if k.endswith(".weight") and not k.endswith(".gram")]
    assert weights and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in weights)
