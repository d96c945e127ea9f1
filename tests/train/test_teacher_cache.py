"""--teacher-cache gpu|cpu|disk|off (TrainConfig.teacher_cache, unlearn_fast.train.step_cache): the same
losses and weights in every mode, the disk mode's file removed afterwards, bad values refused, and the
plan counting the cache on the device only where it is kept there."""

import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from conftest import encode_sets, make_model, perturb, tokenizer_for
from unlearn_fast.api import unlearn
from unlearn_fast.cli import build_parser
from unlearn_fast.errors import UnlearnFastError
from unlearn_fast.model.layers import LayerConfig, attach, unlearning_parameters
from unlearn_fast.train import step_cache as step_cache_module
from unlearn_fast.train.data import Example
from unlearn_fast.train.encoding import pad_token_id
from unlearn_fast.train.objective import TERMS, EULObjective, ObjectiveConfig
from unlearn_fast.train.plan import PlanSettings, candidates, estimate, model_shape
from unlearn_fast.train.step_cache import TEACHER_CACHES, StepCache
from unlearn_fast.train.trainer import TrainConfig, train

FORGET = [Example(prompt=f"Secret {i} is", response=f"code{i * 7}") for i in range(4)]
# rows of different lengths: a row's cached states come from a batch padded differently from later ones
RETAIN = [Example(prompt=f"Public fact number {i} says", response=f"value {i}" * (1 + i % 3)) for i in range(10)]
MODES = list(TEACHER_CACHES)


def _run(mode: str, blocks, schedule="mixed", keep_open=False):
    """3 epochs of batch 3 on the tiny Llama; the losses, terms and final layer weights, and the cache."""
    torch.manual_seed(0)
    model = make_model("llama")
    forget, retain = encode_sets(model, "llama", FORGET, RETAIN)
    attach(model, LayerConfig(rank=4, blocks=blocks))
    perturb(model, scale=0.05)  # student != teacher from the start
    config = TrainConfig(epochs=3, batch_size=3, lr=1e-2, progress=False, schedule=schedule, teacher_cache=mode)
    # as unlearn_fast.api builds it
    cache = StepCache(model, "causal", trunk=config.shared_trunk, store=config.teacher_cache)
    objective = EULObjective(model, "causal", ObjectiveConfig(gamma=0.5), cache)
    result = train(model, objective, forget, retain, config, pad_token_id(tokenizer_for("llama")))
    weights = [p.detach().clone() for p in unlearning_parameters(model)]
    seen = {"teacher_rows": len(cache.teacher), "trunk_rows": len(cache.trunk),
            "lowest": cache.lowest, "path": getattr(cache.teacher, "path", None)}
    if keep_open:
        seen["file_bytes"] = seen["path"].stat().st_size if seen["path"] is not None else 0
    cache.close()
    return result, weights, seen


@pytest.mark.parametrize("blocks,schedule", [(1, "mixed"), ("all", "alternate")])
def test_every_mode_gives_the_same_losses_and_weights(blocks, schedule):
    """fp32, 3 epochs: the per-step loss and terms, and the final layer weights, within 1e-6 relative
    of the default (gpu: on the training device) in cpu, disk and off; the trunk replay (layers on the
    top block only) runs in every mode but off, where it lives within one step."""
    runs = {mode: _run(mode, blocks, schedule, keep_open=True) for mode in MODES}
    reference, reference_weights, cached = runs["gpu"]
    rows = len(FORGET) + len(RETAIN)
    assert reference.steps >= 9
    assert cached["teacher_rows"] == rows
    assert cached["lowest"] == (1 if blocks == 1 else 0)
    assert cached["trunk_rows"] == (rows if blocks == 1 else 0)
    for mode in ("cpu", "disk", "off"):
        result, weights, seen = runs[mode]
        assert result.steps == reference.steps
        for a, b in zip(reference.history, result.history):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-9), (mode, a, b)
            for term in TERMS:
                assert b[term] == pytest.approx(a[term], rel=1e-6, abs=1e-9, nan_ok=True), (mode, term)
        for a, b in zip(reference_weights, weights):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), (mode, float((a - b).abs().max()))
        if mode == "off":  # nothing kept between steps
            assert seen["teacher_rows"] == 0 and seen["trunk_rows"] == 0
        else:
            assert seen["teacher_rows"] == rows
    disk = runs["disk"][2]
    assert disk["file_bytes"] >= rows * 4 * 16  # every row's states went to the file (fp32, d = 16)
    assert not disk["path"].parent.exists()  # close() removed the temporary directory


def test_a_different_mode_changes_nothing_but_a_wrong_cache_would_show():
    """The comparison above can fail: a cache that hands back another row's teacher states gives
    other losses."""
    class Shuffled(StepCache):
        def cached_teacher(self, rows, width, device):
            return super().cached_teacher(list(reversed(rows)), width, device)

    torch.manual_seed(0)
    model = make_model("llama")
    forget, retain = encode_sets(model, "llama", FORGET, RETAIN)
    attach(model, LayerConfig(rank=4, blocks=1))
    perturb(model, scale=0.05)
    config = TrainConfig(epochs=3, batch_size=3, lr=1e-2, progress=False)
    objective = EULObjective(model, "causal", ObjectiveConfig(gamma=0.5), Shuffled(model, "causal", store="disk"))
    wrong = train(model, objective, forget, retain, config, pad_token_id(tokenizer_for("llama")))
    objective.cache.close()
    reference = _run("gpu", 1)[0]
    assert any(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(reference.history, wrong.history))


def test_the_disk_file_is_removed_after_unlearn(monkeypatch):
    """unlearn() with teacher_cache="disk": the temporary directory exists during training, and is gone
    afterwards, also when training fails."""
    made = []
    original = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(Path(original(*args, **kwargs)))
        return str(made[-1])

    monkeypatch.setattr(step_cache_module.tempfile, "mkdtemp", mkdtemp)
    model = make_model("llama")
    tokenizer = tokenizer_for("llama")
    forget = [{"prompt": "The capital of Zorbia is", "response": " Quellton"}]
    retain = [{"prompt": "The sky is", "response": " blue"}, {"prompt": "Bob plays", "response": " the violin"}]
    training = TrainConfig(epochs=2, batch_size=2, progress=False, teacher_cache="disk")
    during = []
    original_train = train

    def watching_train(*args, **kwargs):
        result = original_train(*args, **kwargs)
        during.extend(p.exists() and any(p.iterdir()) for p in made)
        return result

    monkeypatch.setattr("unlearn_fast.api.train", watching_train)
    result = unlearn(model, tokenizer, forget, retain, layers=LayerConfig(rank=4, blocks=1), training=training,
                     evaluate=False, log=lambda *a: None)
    assert len(made) == 2 and during == [True, True]  # the teacher's and the trunk's files
    assert not any(p.exists() for p in made)
    assert result.manifest["training"]["teacher_cache"] == "disk"
    assert result.manifest["distributed"]["teacher_cache_rows_per_rank"] == [3.0]

    def failing_train(*args, **kwargs):
        original_train(*args, **kwargs)
        raise RuntimeError("killed after training")

    made.clear()
    monkeypatch.setattr("unlearn_fast.api.train", failing_train)
    with pytest.raises(RuntimeError, match="killed"):
        unlearn(make_model("llama"), tokenizer, forget, retain, layers=LayerConfig(rank=4, blocks=1),
                training=training, evaluate=False, log=lambda *a: None)
    assert made and not any(p.exists() for p in made)


def test_bad_values_are_refused_and_the_option_reaches_the_config(capsys):
    with pytest.raises(UnlearnFastError, match="teacher cache must be one of gpu, cpu, disk, off.*'ssd'"):
        TrainConfig(teacher_cache="ssd")
    with pytest.raises(UnlearnFastError, match="teacher cache must be one of"):
        StepCache(make_model("llama"), "causal", store="vram")
    assert TrainConfig().teacher_cache == "gpu"  # today's behaviour stays the default
    assert TrainConfig(teacher_cache=False).teacher_cache == "off"  # the former boolean
    assert TrainConfig(teacher_cache=True).teacher_cache == "gpu"
    base = ["unlearn", "--model", "m", "--forget", "f", "--retain", "r", "--out", "o"]
    assert build_parser().parse_args(base).teacher_cache == "gpu"
    assert build_parser().parse_args(base + ["--teacher-cache", "disk"]).teacher_cache == "disk"
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--teacher-cache", "ssd"])
    assert "invalid choice: 'ssd'" in capsys.readouterr().err


# SmolLM2-135M's shape with 6 of its 30 blocks, layers on the top 3 (the trunk is cached too)
SMOLLM2_6 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def test_the_plan_counts_the_cache_on_the_device_only_where_it_is_kept():
    shape = model_shape(transformers.LlamaConfig(**SMOLLM2_6), LayerConfig(rank=32, blocks=3))
    kw = dict(batch_size=8, max_length=512, rows=1000, device="cuda")
    plans = {mode: estimate(shape, PlanSettings(teacher_cache=mode, **kw)) for mode in MODES}
    table = 1000 * 512 * 576 * 2  # rows × length × d, bf16
    assert plans["gpu"].parts["teacher cache"] == 2 * table  # the teacher's states and the trunk's
    assert plans["cpu"].parts["teacher cache"] == 0 and plans["cpu"].elsewhere == {"CPU memory": 2 * table}
    assert plans["disk"].parts["teacher cache"] == 0 and plans["disk"].elsewhere == {"disk": 2 * table}
    assert plans["off"].parts["teacher cache"] == 16 * 512 * 576 * 2 and not plans["off"].elsewhere
    for mode in ("cpu", "disk", "off"):
        assert plans["gpu"].total - plans[mode].total == 2 * table - plans[mode].parts["teacher cache"]
    assert plans["off"].flops["step"] == plans["off"].flops["first_epoch"] > plans["gpu"].flops["step"]
    assert plans["cpu"].flops == plans["gpu"].flops
    # on a CPU the cpu mode is the same memory; the savings the planner tries move it off the device
    on_cpu = estimate(shape, PlanSettings(teacher_cache="cpu", **{**kw, "device": "cpu"}))
    assert on_cpu.parts["teacher cache"] == 2 * 1000 * 512 * 576 * 4
    tried = [p.settings.teacher_cache for p in candidates(shape, PlanSettings(**kw))[:2]]
    assert tried == ["gpu", "cpu"]
    assert PlanSettings(teacher_cache="off", **kw).flags().endswith("--teacher-cache off")


def test_plan_cli_takes_the_flag(tmp_path, capsys):
    from unlearn_fast import cli

    transformers.LlamaConfig(**SMOLLM2_6).save_pretrained(tmp_path)
    args = ["plan", "--model", str(tmp_path), "--device", "cuda", "--max-length", "512", "--blocks", "top:3"]
    assert cli.main(args) == 0
    on_device = capsys.readouterr().out
    assert cli.main(args + ["--teacher-cache", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "teacher cache (1000 rows)" in on_device and "1.10 GiB" in on_device
    assert "teacher cache (CPU memory)" in out and "not on the device: teacher cache" in out
    assert "1.10 GiB in CPU memory" in out
