"""SIGKILL at random points while a writer runs: afterwards the output is the old complete state or
the new complete one, never a partial directory that loads as valid, and the next run cleans up.

Each writer runs in a forked child (torch is already imported, so a kill costs milliseconds); the
child writes in a loop, the parent kills it after a random delay, checks the output, and repeats.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from unlearn_fast.io.artifacts import DONE_FILES, MANIFEST_FILE, read_artifact, write_artifact
from unlearn_fast.io.atomic import remove_stale
from unlearn_fast.train import checkpoint

KILLS = 20
fork = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
pytestmark = pytest.mark.skipif(fork is None, reason="needs fork")


def kill_at_random(target, args, rng: random.Random) -> None:
    child = fork.Process(target=target, args=args, daemon=True)
    child.start()
    time.sleep(rng.uniform(0.0, 0.25))
    os.kill(child.pid, signal.SIGKILL)
    child.join()


def siblings(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def artifact_generation(step: int) -> tuple[dict, dict]:
    torch.manual_seed(step)
    tensors = {"site.0.down.weight": torch.randn(256, 512), "site.0.up.weight": torch.randn(512, 256)}
    return tensors, {"generation": step, "base_model": {"fingerprint": "x"}}


def write_artifacts_forever(out: str, first: int) -> None:
    step = first
    while True:
        tensors, manifest = artifact_generation(step)
        write_artifact(out, tensors, manifest, overwrite=True, log=lambda *a: None)
        step += 1


def test_killed_artifact_writes_leave_old_or_new_never_partial(tmp_path):
    rng = random.Random(0)
    out = tmp_path / "artifact"
    seen = set()
    for kill in range(KILLS):
        kill_at_random(write_artifacts_forever, (str(out), 1000 * kill), rng)
        if out.exists():
            manifest, tensors = read_artifact(out)  # complete: checksum and manifest agree
            expected, _ = artifact_generation(manifest["generation"])
            assert torch.equal(tensors["site.0.up.weight"], expected["site.0.up.weight"])
            seen.add(manifest["generation"])
        messages = []
        remove_stale(out, DONE_FILES, messages.append)
        for left in siblings(out):  # only a finished, never-renamed output may stay (and is reported)
            assert (left / MANIFEST_FILE).is_file(), left
            assert any(str(left) in m for m in messages)
    assert len(seen) >= 2, "the kills never landed between two complete writes; widen the delay"


def save_checkpoints_forever(directory: str, first: int) -> None:
    layer = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = first
    while True:
        layer(torch.randn(4, 256)).sum().backward()
        optimizer.step()
        checkpoint.save(directory, step, list(layer.parameters()), optimizer, scheduler, key={"run": 1},
                        progress={"step": step})
        step += 1


def test_killed_checkpoint_writes_resume_from_a_complete_one(tmp_path):
    rng = random.Random(1)
    directory = tmp_path / "ckpt"
    for kill in range(KILLS):
        kill_at_random(save_checkpoints_forever, (str(directory), 100 * kill), rng)
        checkpoint.prepare(directory, log=lambda *a: None)  # what --resume does first
        for done in checkpoint.checkpoints(directory):
            layer = torch.nn.Linear(256, 256)
            optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            state = checkpoint.restore(done, list(layer.parameters()), optimizer, scheduler, key={"run": 1})
            assert state["progress"]["step"] == state["step"]
        leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".")]
        assert all(checkpoint.STATE_FILE in os.listdir(directory / name) for name in leftovers), leftovers
