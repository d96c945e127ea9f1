"""--report-to tensorboard|wandb|none (TrainConfig.report_to, unlearn_fast.train.reporting): every step's loss,
terms, effective forget-KL coefficient, learning rate, tokens/s and memory, read back from the event file;
a missing package is a one-line error before anything is loaded."""

import datetime
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import encode_sets, make_model, perturb, tokenizer_for
from unlearn_fast import cli
from unlearn_fast.cli.unlearn import report_options
from unlearn_fast.errors import UnlearnFastError
from unlearn_fast.model.layers import LayerConfig, attach, layers_disabled
from unlearn_fast.ops.loss_head import IGNORE_INDEX
from unlearn_fast.train import reporting
from unlearn_fast.train.data import Example
from unlearn_fast.train.encoding import collate, pad_token_id
from unlearn_fast.train.objective import FORGET_KL_COEF, TERMS, EULObjective, ObjectiveConfig
from unlearn_fast.train.step_cache import StepCache
from unlearn_fast.train.trainer import TrainConfig, train

FORGET = [Example(prompt=f"Secret {i} is", response=f"code{i * 7}") for i in range(4)]
RETAIN = [Example(prompt=f"Public fact number {i} says", response=f"value {i}") for i in range(8)]
LR = 1e-2


def _train(config: TrainConfig, guard: bool = True):
    torch.manual_seed(0)
    model = make_model("llama")
    forget, retain = encode_sets(model, "llama", FORGET, RETAIN)
    attach(model, LayerConfig(rank=4))
    perturb(model, scale=0.3)
    objective = EULObjective(model, "causal", ObjectiveConfig(gamma=0.5, sharpening_guard=guard),
                             StepCache(model, "causal"))
    lines = []
    result = train(model, objective, forget, retain, config, pad_token_id(tokenizer_for("llama")), log=lines.append)
    return result, lines


def _scalars(directory: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def _expected_lr(step: int, total: int, warmup_ratio: float) -> float:
    """The trainer's schedule, written out: linear warmup, then linear decay to 0 (step counts from 0)."""
    warmup = math.ceil(warmup_ratio * total)
    return LR * ((step + 1) / warmup if step < warmup else (total - step) / (total - warmup))


def test_tensorboard_event_file_holds_the_trainers_per_step_figures(tmp_path):
    pytest.importorskip("tensorboard")
    where = tmp_path / "runs" / "tb"
    config = TrainConfig(epochs=2, batch_size=4, lr=LR, warmup_ratio=0.25, progress=False,
                         report_to="tensorboard", report_dir=where)
    result, lines = _train(config)
    assert f"reporting to tensorboard in {where}" in lines
    scalars = _scalars(where)
    total = result.steps
    assert total == 4
    steps = list(range(1, total + 1))
    # the loss and every term the objective reported, as the trainer reported them (event files hold fp32)
    assert [e.step for e in scalars["train/loss"]] == steps
    assert [e.value for e in scalars["train/loss"]] == [float(np.float32(h["loss"])) for h in result.history]
    for term in TERMS + (FORGET_KL_COEF,):
        logged = {e.step: e.value for e in scalars[f"train/{term}"]}
        reported = {h["step"]: float(np.float32(h[term])) for h in result.history if not math.isnan(h[term])}
        assert reported and logged == reported, term
    # mixed batches all hold forgotten rows: the coefficient is there at every step, within [0, weight 1]
    assert all(0.0 <= e.value <= 1.0 for e in scalars["train/forget_kl_coef"])
    lrs = [e.value for e in scalars["train/lr"]]
    assert lrs == pytest.approx([_expected_lr(s, total, 0.25) for s in range(total)], rel=1e-6)
    assert all(e.value > 0 for e in scalars["train/tokens_per_s"])
    assert [e.step for e in scalars["train/tokens_per_s"]] == steps
    rss = [e.value for e in scalars["memory/rss_gib"]]  # a CPU run: the process's resident memory
    assert len(rss) == total and all(0.01 < v < 1024 for v in rss)


def test_the_effective_forget_kl_coefficient_is_the_share_the_guard_kept():
    """Against the guard's rule applied to full logits: a forgotten KL position keeps its term unless
    the student gives its target a higher probability than the teacher; without the guard it is the
    weight itself."""
    torch.manual_seed(0)
    model = make_model("llama")
    forget, retain = encode_sets(model, "llama", FORGET, RETAIN)
    attach(model, LayerConfig(rank=4))
    perturb(model, scale=0.5)
    batch = collate(forget + retain[:4], pad_token_id(tokenizer_for("llama")))
    weight = 0.7
    _, terms = EULObjective(model, "causal", ObjectiveConfig(forget_kl_weight=weight))(batch)
    _, unguarded = EULObjective(model, "causal", ObjectiveConfig(forget_kl_weight=weight, sharpening_guard=False))(batch)
    with torch.no_grad():
        student = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        with layers_disabled(model):
            teacher = torch.log_softmax(model(input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]).logits, -1)
    positions = batch["kl_mask"] & batch["forget"].unsqueeze(1)
    targets = batch["targets"].clamp(min=0).unsqueeze(-1)
    sharper = (student.gather(-1, targets) > teacher.gather(-1, targets)).squeeze(-1) & (batch["targets"] != IGNORE_INDEX)
    share = float((~sharper[positions]).double().mean())
    assert 0.0 < share < 1.0  # the guard dropped some positions and kept others: the check means something
    assert terms[FORGET_KL_COEF] == pytest.approx(weight * share, rel=1e-9)
    assert unguarded[FORGET_KL_COEF] == pytest.approx(weight)
    _, retained_only = EULObjective(model, "causal", ObjectiveConfig())(collate(retain[:4], 0))
    assert math.isnan(retained_only[FORGET_KL_COEF])  # no forgotten position: absent, like the term


def test_no_reporter_by_default_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrainConfig().report_to == "none"
    result, lines = _train(TrainConfig(epochs=1, batch_size=4, progress=False))
    assert result.steps > 0 and not any("reporting" in line for line in lines)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_package_is_a_one_line_error_before_anything_is_loaded(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(reporting.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    with pytest.raises(UnlearnFastError, match=r"^--report-to tensorboard needs `pip install tensorboard`$"):
        TrainConfig(report_to="tensorboard")
    with pytest.raises(UnlearnFastError, match="must be one of none, tensorboard, wandb, got 'mlflow'"):
        TrainConfig(report_to="mlflow")
    # the data files do not exist: the reporter's error comes first, before any data or model is read
    code = cli.main(["unlearn", "--model", str(tmp_path / "no-model"), "--forget", str(tmp_path / "f.jsonl"),
                     "--retain", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "out"), "--report-to", "wandb"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --report-to wandb needs `pip install wandb`\n"
    assert not (tmp_path / "out").exists()


def test_the_default_report_dir_is_beside_the_current_directory_named_after_out():
    now = datetime.datetime(2026, 3, 4, 5, 6, 7)
    assert reporting.default_report_dir("some/where/layers-req1", now) == Path("runs/layers-req1-20260304-050607")
    assert reporting.default_report_dir(None, now) == Path("runs/unlearn-20260304-050607")
    args = cli.build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f", "--retain", "r",
                                          "--out", "out/req7", "--report-to", "tensorboard"])
    options = report_options(args)
    assert options["report_to"] == "tensorboard"
    assert Path(options["report_dir"]).parent == Path("runs")
    assert Path(options["report_dir"]).name.startswith("req7-")
    args = cli.build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f", "--retain", "r",
                                          "--out", "o", "--report-to", "tensorboard", "--report-dir", "logs/x"])
    assert report_options(args) == {"report_to": "tensorboard", "report_dir": "logs/x"}
    assert report_options(cli.build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f",
                                                         "--retain", "r", "--out", "o"])) == {"report_to": "none"}


def test_wandb_offline_run_gets_the_steps(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (an optional dependency, not in the test extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    import wandb

    original_init = wandb.init

    def init(*args, **kwargs):
        run = original_init(*args, **kwargs)
        original_log = run.log
        run.log = lambda values, step=None, **kw: (logged.append((step, dict(values))), original_log(values, step=step, **kw))
        return run

    monkeypatch.setattr(wandb, "init", init)
    where = tmp_path / "wb"
    result, _ = _train(TrainConfig(epochs=1, batch_size=4, lr=LR, progress=False, report_to="wandb", report_dir=where))
    assert [s for s, _ in logged] == [h["step"] for h in result.history]
    assert [v["train/loss"] for _, v in logged] == [h["loss"] for h in result.history]
    assert (where / "wandb").is_dir()
