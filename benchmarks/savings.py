"""Issue 26 (figures): the measured CPU peak memory and step time of SmolLM2-135M with each memory saving
on and off, in one run, beside the memory plan's estimate for the same settings.

    python benchmarks/savings.py [--steps 20] [--threads 1] [--configs baseline checkpointing ...]

SmolLM2-135M-Instruct in fp32 on the CPU, the demo's sets (:func:`unlearn_fast.demo.build_sets`, raw prompt +
response, split seed 0) and the demo's layers (rank 16 on the top 8 blocks), lr 2e-3, mixed schedule. Each
configuration is one short ``unlearn`` run (``--steps`` optimiser steps, no evaluation) in a fresh process,
so that its peak resident memory is its own:

- ``baseline``: the defaults (batch 8, teacher cache on the training device, no checkpointing, accumulate 1);
- ``checkpointing``: ``TrainConfig(gradient_checkpointing=True)`` (``--gradient-checkpointing``);
- ``cache-cpu`` / ``cache-disk`` / ``cache-off``: ``TrainConfig(teacher_cache=...)`` (``--teacher-cache``);
- ``accumulate-2``: ``TrainConfig(batch_size=4, accumulate=2)``: the same 8 rows per set and step, in two passes;
- ``checkpointing+cache-off``: both.

The child process (this script with ``--child``) runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc
hands every freed block of 128 KiB or more back to the system at once and the resident set follows what the
tensors hold (as tests/train/memory_probe.py does). It loads the model, runs one warm-up step of the same
configuration (the libraries' code pages and thread pools that a first step brings in are not part of the
measured peak), detaches the layers, and then trains the measured run. When training starts (layers attached,
rows encoded) the C heap is trimmed, the resident set recorded (``loaded``) and the kernel's high-water mark
reset (5 into /proc/self/clear_refs); when it ends the high-water mark is read: ``peak`` - ``loaded`` is the
memory the training steps added above the loaded model. Step times are the intervals between the starts of
consecutive optimiser steps (the last one: to the end of training).

Columns: ``peak_mib``: measured peak above the loaded model; ``plan_mib``: :func:`unlearn_fast.train.plan.estimate`
for the same settings (as ``unlearn-fast plan --model smollm2 --rank 16 --blocks top:8 ...`` computes it) minus
its frozen base, at T = the longest encoded row and ``rows`` = the training rows (an upper bound: most rows are
shorter, and the forget set has fewer than 8 rows); ``s_per_step``: mean ± sd over the steps after the first;
``s_per_step_later_epochs``: over the steps after the first epoch (where the teacher cache and the trunk are
replayed); ``*_x_base``: the ratio to the baseline of the same run; ``plan_gflop_step``: the plan's FLOPs
per optimiser step (steady state). Linux with glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.append(str(ROOT / "benchmarks"))  # results_io

import results_io  # noqa: E402

CHAT = "none"  # raw prompt + response, as the demo
RANK, BLOCKS, LR, MAX_LENGTH = 16, 8, 2e-3, 256  # the demo's layers and learning rate
MiB = 2 ** 20
# name -> the TrainConfig fields that differ from the baseline's
CONFIGS = {
    "baseline": {},
    "checkpointing": {"gradient_checkpointing": True},
    "cache-cpu": {"teacher_cache": "cpu"},
    "cache-disk": {"teacher_cache": "disk"},
    "cache-off": {"teacher_cache": "off"},
    "accumulate-2": {"batch_size": 4, "accumulate": 2},
    "checkpointing+cache-off": {"gradient_checkpointing": True, "teacher_cache": "off"},
}


# ---------------------------------------------------------------------------------------------
# the child: one configuration, in its own process
# ---------------------------------------------------------------------------------------------
def status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def trim() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def child(spec: dict) -> dict:
    """Load the model, warm up with one step, then train ``spec["steps"]`` measured steps; return the figures."""
    torch.set_num_threads(spec["threads"])
    from unlearn_fast import api
    from unlearn_fast.io.base_model import load_model
    from unlearn_fast.model.layers import LayerConfig, detach
    from unlearn_fast.train import trainer
    from unlearn_fast.train.batching import count_steps
    from unlearn_fast.train.trainer import TrainConfig

    model, tokenizer, name = load_model("smollm2", device="cpu")
    with open(spec["sets"], "rb") as f:
        sets = pickle.load(f)
    real_train, real_accumulate = api.train, trainer._accumulate
    figures: dict = {}
    step_starts: list[float] = []

    def accumulate(*args, **kwargs):  # the trainer calls it once per optimiser step, first thing
        step_starts.append(time.perf_counter())
        return real_accumulate(*args, **kwargs)

    def train(model, objective, forget, retain, config, *args, **kwargs):
        if not figures.get("measure"):
            return real_train(model, objective, forget, retain, config, *args, **kwargs)
        figures["rows"] = len(forget) + len(retain)
        figures["max_row_tokens"] = max(len(r.input_ids) for r in [*forget, *retain])
        figures["steps_per_epoch"] = count_steps(forget, retain, dataclasses.replace(config, epochs=1, max_steps=None))
        trim()  # hand back what loading and encoding freed
        figures["loaded"] = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS from here on
        step_starts.clear()
        try:
            return real_train(model, objective, forget, retain, config, *args, **kwargs)
        finally:
            figures["end"] = time.perf_counter()
            figures["peak"] = status("VmHWM")  # before the Gram matrices and the cache's release

    api.train, trainer._accumulate = train, accumulate
    fields = {"epochs": 1000, "batch_size": 8, "lr": LR, "progress": False, **spec["training"]}

    def run(steps: int):
        return api.unlearn(model, tokenizer, sets["forget"], sets["retain"], model_name=name, evaluate=False,
                           layers=LayerConfig(rank=RANK, blocks=BLOCKS), chat_template=CHAT, max_length=MAX_LENGTH,
                           training=TrainConfig(max_steps=steps, **fields), log=lambda *a, **k: None)

    run(1)  # warm-up: the same code, one step
    detach(model)
    trim()
    figures["measure"] = True
    result = run(spec["steps"])
    ends = step_starts[1:] + [figures["end"]]
    figures["step_s"] = [b - a for a, b in zip(step_starts, ends)]
    figures["steps"] = result.training.steps
    figures["update_time_s"] = result.training.update_time_s
    del figures["measure"], figures["end"]
    return figures


def measure(name: str, spec: dict, timeout: int = 900) -> dict:
    """Run :func:`child` in a fresh process, glibc returning every freed block of 128 KiB or more at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: the child process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the parent: the sets, one child per configuration, the plan, the table
# ---------------------------------------------------------------------------------------------
def plan_for(training: dict, rows: int, length: int):
    from unlearn_fast.cli.plan import load_config
    from unlearn_fast.model.layers import LayerConfig
    from unlearn_fast.train.plan import PlanSettings, estimate, model_shape

    shape = model_shape(load_config("smollm2"), LayerConfig(rank=RANK, blocks=BLOCKS))
    settings = PlanSettings(batch_size=training.get("batch_size", 8), max_length=length, device="cpu",
                            accumulate=training.get("accumulate", 1), rows=rows,
                            gradient_checkpointing=training.get("gradient_checkpointing", False),
                            teacher_cache=training.get("teacher_cache", "gpu"))
    return estimate(shape, settings)


def mean_sd(values: list[float]):
    if not values:
        return None
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": results_io.sig(statistics.fmean(values), 3), "sd": results_io.sig(sd, 2)}


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    a, b = (x["mean"] if isinstance(x, dict) else x for x in (a, b))
    return round(a / b, 2)


def make_row(name: str, figures: dict, plan) -> dict:
    steps = figures["step_s"]
    later = steps[figures["steps_per_epoch"]:]
    return {"config": name, "flags": plan.settings.flags(),
            "peak_mib": round((figures["peak"] - figures["loaded"]) / MiB, 1),
            "plan_mib": round((plan.total - plan.parts["frozen base"]) / MiB, 1),
            "s_per_step": mean_sd(steps[1:]), "s_per_step_later_epochs": mean_sd(later),
            "plan_gflop_step": round(plan.flops["step"] / 1e9, 1)}


def add_ratios(rows: list[dict]) -> list[dict]:
    base = next((r for r in rows if r["config"] == "baseline"), None)
    out = []
    for r in rows:
        pairs = [("peak_mib", "peak_x_base"), ("plan_mib", "plan_x_base"), ("s_per_step", "step_x_base"),
                 ("s_per_step_later_epochs", "later_x_base"), ("plan_gflop_step", "plan_flops_x_base")]
        row = {}
        for key, value in r.items():
            row[key] = value
            for source, target in pairs:
                if key == source:
                    row[target] = ratio(value, base[source]) if base else None
        row["plan_over_measured"] = ratio(r["plan_mib"], r["peak_mib"])
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20,
                    help="measured optimiser steps per configuration (default 20: four epochs of the demo's sets)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, parent and children (default 1)")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                    help="configurations (default: all; ratios need baseline)")
    ap.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    results_io.add_argument(ap)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from unlearn_fast.demo import build_sets
    from unlearn_fast.io.base_model import load_model

    model, tokenizer, _ = load_model("smollm2", device="cpu")
    sets = build_sets(model, tokenizer, chat_template=CHAT, log=lambda *a, **k: None)
    del model
    trim()
    sizes = {k: len(v) for k, v in sets.items()}
    print(f"sets: {sizes} ({time.perf_counter() - started:.0f} s)", flush=True)
    where = results_io.results_dir(args.results)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # one file per run
    rows, path, loaded = [], None, {}
    with tempfile.TemporaryDirectory(prefix="savings-") as tmp:
        sets_file = Path(tmp) / "sets.pkl"
        sets_file.write_bytes(pickle.dumps(sets))
        for name in args.configs:
            spec = {"training": CONFIGS[name], "steps": args.steps, "threads": args.threads, "sets": str(sets_file)}
            t0 = time.perf_counter()
            figures = measure(name, spec)
            plan = plan_for(CONFIGS[name], figures["rows"], figures["max_row_tokens"])
            rows.append(make_row(name, figures, plan))
            loaded[name] = round(figures["loaded"] / MiB)
            print(json.dumps(rows[-1]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if where:
                notes = (f"Other jobs shared the machine's 2 cores during the run: compare the timings only as ratios "
                         f"within it. fp32, {args.threads} torch thread(s), MALLOC_MMAP_THRESHOLD_=131072 in each "
                         f"configuration's process; {args.steps} steps per configuration after a warm-up step, "
                         f"{figures['steps_per_epoch']} steps per epoch; the demo's sets (forget {sizes['forget']}, "
                         f"retain {sizes['retain']} facts; {figures['rows']} training rows, longest "
                         f"{figures['max_row_tokens']} tokens: the plan's T), rank {RANK} on the top {BLOCKS} blocks, "
                         f"lr {LR}; RSS of the loaded model (with the layers) by configuration, MiB: "
                         f"{json.dumps(loaded)[1:-1]}; whole run {time.perf_counter() - started:.0f} s")
                path = results_io.write_results(where, results_io.make_results(
                    "savings_cpu", add_ratios(rows), results_io.command_line(__file__, argv), notes, date=date))
    print(f"{'config':26}{'peak MiB':>10}{'x base':>8}{'plan MiB':>10}{'x base':>8}{'s/step':>9}{'x base':>8}"
          f"{'later':>9}{'x base':>8}")
    for r in add_ratios(rows):
        step, later = r["s_per_step"] or {}, r["s_per_step_later_epochs"] or {}
        print(f"{r['config']:26}{r['peak_mib']:>10}{r['peak_x_base'] or '':>8}{r['plan_mib']:>10}"
              f"{r['plan_x_base'] or '':>8}{step.get('mean', ''):>9}{r['step_x_base'] or '':>8}"
              f"{later.get('mean', ''):>9}{r['later_x_base'] or '':>8}")
    print(f"whole run {time.perf_counter() - started:.0f} s")
    if path:
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
