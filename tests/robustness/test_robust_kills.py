"""SIGKILL at random points while a writer runs: afterwards the output is the old complete state or
the new complete one, never a partial directory that loads as valid, and the next run cleans up.

Each writer runs in a forked child (torch is already imported, so a kill costs milliseconds); the
child writes in a loop, the parent kills it after a random delay, checks the output, and repeats.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, make_model, save_model_dir, tokenizer_for

from unlearn_fast.api import export, unlearn
from unlearn_fast.fusion.ledger import add_request, list_requests, remove_request
from unlearn_fast.io.artifacts import DONE_FILES, EXPORT_FILE, MANIFEST_FILE, read_artifact, sha256_file, write_artifact
from unlearn_fast.io.atomic import remove_stale
from unlearn_fast.model.layers import LayerConfig
from unlearn_fast.train import checkpoint
from unlearn_fast.train.trainer import TrainConfig

sys.path.insert(0, str(REPO_ROOT / "tests" / "fusion"))
from fusion_helpers import write_request  # noqa: E402  (synthetic ledger requests)

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


def add_and_remove_forever(ledger: str, sources: list) -> None:
    while True:
        for source in sources:
            record = add_request(ledger, source, log=lambda *a: None)
            remove_request(ledger, record["id"], log=lambda *a: None)


def test_killed_ledger_operations_never_corrupt_it_or_reuse_an_id(tmp_path):
    sources = []
    for seed in range(3):
        write_request(tmp_path / f"request{seed}", seed)
        sources.append(str(tmp_path / f"request{seed}"))
    ledger = tmp_path / "ledger"
    rng = random.Random(2)
    ids_seen: set[str] = set()
    for kill in range(KILLS):
        kill_at_random(add_and_remove_forever, (str(ledger), sources), rng)
        if not (ledger / "ledger.json").exists():
            continue  # killed before the first add finished
        records = list_requests(ledger)  # the ledger file is whole JSON
        for record in records:
            read_artifact(ledger / "requests" / record["id"])  # each listed request is complete
        for record in records:  # the next operation cleans what the kill left
            remove_request(ledger, record["id"], log=lambda *a: None)
        fresh = add_request(ledger, sources[0], log=lambda *a: None)
        assert fresh["id"] not in ids_seen | {r["id"] for r in records}, "an id was given twice"
        ids_seen |= {fresh["id"], *(r["id"] for r in records)}
        assert [p.name for p in (ledger / "requests").iterdir()] == [fresh["id"]]
        remove_request(ledger, fresh["id"], log=lambda *a: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-source")
    save_model_dir("llama", root / "model")
    torch.manual_seed(0)
    unlearn(make_model("llama"), tokenizer_for("llama"), [{"prompt": "The code word is", "response": " pumpkin"}],
            [{"prompt": "Bob plays", "response": " the violin"}], out=root / "layers", layers=LayerConfig(rank=4),
            training=TrainConfig(max_steps=1, progress=False), evaluate=False, log=lambda *a: None)
    return root


def export_forever(model_dir: str, layers: str, out: str) -> None:
    while True:
        export(model_dir, layers, out, overwrite=True, log=lambda *a: None)


def test_killed_exports_are_complete_or_absent(trained, tmp_path):
    rng = random.Random(3)
    out = tmp_path / "exported"
    for kill in range(KILLS):
        kill_at_random(export_forever, (str(trained / "model"), str(trained / "layers"), str(out)), rng)
        if out.exists():
            record = json.loads((out / EXPORT_FILE).read_text())
            assert {p.name for p in out.iterdir()} == {EXPORT_FILE, *record["files"]}
            for name, digest in record["files"].items():
                assert sha256_file(out / name) == digest, name
        remove_stale(out, DONE_FILES, lambda *a: None)
        assert all((left / EXPORT_FILE).is_file() for left in siblings(out))
