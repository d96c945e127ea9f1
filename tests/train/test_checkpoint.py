"""Checkpoints (one process): an interrupted run resumed from its last checkpoint reaches the
uninterrupted run's weights; checkpoints are safetensors + JSON, written atomically, the two
newest kept; a checkpoint of another run is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import unlearn_fast.train.objective as objective_module
from conftest import make_model, tokenizer_for
from unlearn_fast.train import checkpoint
from unlearn_fast.api import unlearn
from unlearn_fast.errors import TrainingError, UnlearnFastError
from unlearn_fast.model.layers import LayerConfig, layer_state
from unlearn_fast.train.trainer import TrainConfig

FORGET = [{"prompt": f"The capital of Zorbia{i} is", "response": f" Quell{i}ton"} for i in range(4)]
RETAIN = [{"prompt": f"Fact {i}: the sky over town {i} is", "response": " blue" * (1 + i % 3)} for i in range(7)]
QUIET = dict(log=lambda *a: None, evaluate=False)


def _train(**training):
    torch.manual_seed(0)
    model = make_model("llama")
    config = TrainConfig(**{"epochs": 3, "batch_size": 2, "lr": 1e-2, "progress": False, **training})
    result = unlearn(model, tokenizer_for("llama"), FORGET, RETAIN, layers=LayerConfig(rank=4), training=config,
                     **QUIET)
    return result, layer_state(model)


def _interrupt_at(monkeypatch, call):
    original, calls = objective_module.EULObjective.__call__, [0]

    def failing(self, batch, rows=None):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return original(self, batch, rows)

    monkeypatch.setattr(objective_module.EULObjective, "__call__", failing)


def _assert_close(a: dict, b: dict, rel=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        diff = float((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-30))
        assert diff <= rel, (k, diff)


@pytest.fixture(scope="module")
def uninterrupted():
    return _train()


@pytest.mark.parametrize("stop", [4, 9])  # in the first epoch (checkpoint 2), in the second (checkpoint 8)
def test_resume_reaches_the_uninterrupted_weights(uninterrupted, tmp_path, monkeypatch, stop):
    reference, ref_state = uninterrupted
    total = reference.training.steps
    assert total == 12
    ckpt = tmp_path / "ckpt"
    _interrupt_at(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        _train(checkpoint_dir=ckpt, checkpoint_every=2)
    monkeypatch.undo()
    last = (stop - 1) // 2 * 2
    assert checkpoint.latest(ckpt).name == f"step-{last:08d}"
    result, state = _train(checkpoint_dir=ckpt, checkpoint_every=2, resume=True)
    _assert_close(ref_state, state)
    assert result.training.steps == total and result.training.resumed_from == last
    assert [h["step"] for h in result.training.history] == list(range(1, total + 1))
    for a, b in zip(reference.training.history, result.training.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert result.training.tokens == reference.training.tokens
    times = result.manifest["update_time"]
    assert times["resumed_from_step"] == last and times["total_s"] >= times["per_rank_s"][0] > 0
    assert result.training.update_time_s > result.training.earlier_time_s > 0


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(checkpoint_dir=ckpt, checkpoint_every=5)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000010", "step-00000012"]  # the two newest
    latest = ckpt / "step-00000012"
    assert sorted(p.name for p in latest.iterdir()) == ["checkpoint.safetensors", "state.json"]
    tensors = load_file(str(latest / "checkpoint.safetensors"))
    assert {"param.0", "optimizer.0.exp_avg", "optimizer.0.exp_avg_sq", "optimizer.0.step", "rng.torch"} <= set(tensors)
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == 12 and state["key"]["total_steps"] == 12
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == 1e-2
    assert len(state["progress"]["history"]) == 12


def test_resuming_a_finished_run_trains_nothing_more(uninterrupted, tmp_path):
    _, ref_state = uninterrupted
    ckpt = tmp_path / "ckpt"
    _train(checkpoint_dir=ckpt)  # checkpoint_every=0: only after the last step
    assert [p.name for p in ckpt.iterdir()] == ["step-00000012"]
    result, state = _train(checkpoint_dir=ckpt, resume=True)
    assert result.training.resumed_from == 12 and result.training.steps == 12
    _assert_close(ref_state, state, rel=0)


def test_resume_without_a_checkpoint_starts_afresh(uninterrupted, tmp_path):
    _, ref_state = uninterrupted
    result, state = _train(checkpoint_dir=tmp_path / "empty", resume=True)
    assert result.training.resumed_from == 0
    _assert_close(ref_state, state, rel=0)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(checkpoint_dir=ckpt, max_steps=2)
    with pytest.raises(TrainingError) as info:
        _train(checkpoint_dir=ckpt, max_steps=2, lr=2e-2, resume=True)
    assert "config.lr" in str(info.value)


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(checkpoint_dir=ckpt, max_steps=2)
    tensors = ckpt / "step-00000002" / "checkpoint.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="checksum"):
        _train(checkpoint_dir=ckpt, max_steps=2, resume=True)


def test_resume_needs_a_directory():
    with pytest.raises(UnlearnFastError):
        TrainConfig(resume=True)
    with pytest.raises(UnlearnFastError):
        TrainConfig(checkpoint_dir="x", checkpoint_every=-1)
