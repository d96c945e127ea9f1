"""Measure the CPU memory of unlearning training steps in a fresh process (:func:`measure`, or as a script).

    python tests/train/memory_probe.py '{"config": {...LlamaConfig fields...}, "batch_size": 4, ...}'

prints one JSON line, in bytes: ``start`` (RSS before the model exists, after a warm-up step of a
tiny model of the same family), ``loaded`` (RSS with the model built and the layers attached) and
``peak`` (the peak RSS during the steps: the kernel's high-water mark is reset after loading by
writing 5 to /proc/self/clear_refs). Linux with glibc only.

Rows are random token ids of exactly ``max_length`` tokens (no padding), every position with a
target: ``batch_size`` retained and ``batch_size`` forgotten ones per step (the mixed schedule),
new rows at every one of the ``steps`` steps (the teacher cache holds 2 × ``batch_size`` × ``steps`` rows).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from unlearn_fast.model.layers import LayerConfig, attach
from unlearn_fast.train.encoding import Row
from unlearn_fast.train.objective import EULObjective, ObjectiveConfig
from unlearn_fast.train.step_cache import StepCache
from unlearn_fast.train.trainer import TrainConfig, train


def status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    text = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def rows(n: int, length: int, vocab: int, forget: bool, seed: int) -> list[Row]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (length + 1,), generator=g).tolist()
        out.append(Row(ids[:-1], ids[1:], [True] * length, forget))
    return out


def run(config, spec: dict, steps: int) -> float:
    """Build the model, attach the layers and train ``steps`` steps; return the update time."""
    b, t, vocab = spec["batch_size"], spec["max_length"], config.vocab_size
    retain, forget = rows(b * steps, t, vocab, False, 0), rows(b * steps, t, vocab, True, 1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    attach(model, LayerConfig(rank=spec.get("rank", 32), blocks=spec.get("blocks", "all")))
    objective = EULObjective(model, "causal", ObjectiveConfig(), StepCache(model, "causal"))
    accumulate = spec.get("accumulate", 1)
    training = TrainConfig(epochs=1, batch_size=b // accumulate, accumulate=accumulate, max_steps=steps,
                           progress=False, gradient_checkpointing=spec.get("gradient_checkpointing", False))
    if spec.get("measure"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what building the model freed
        spec["loaded"] = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
    return train(model, objective, forget, retain, training, pad_id=0).update_time_s


def main(spec: dict) -> dict:
    torch.set_num_threads(spec.get("threads", 2))
    config_class = getattr(transformers, spec.get("config_class", "LlamaConfig"))
    # first a tiny model of the same family through the same code: the imports, the libraries' code
    # pages and thread pools that the first step brings in are not part of the measured peak
    heads = spec["config"].get("num_attention_heads", 4)
    tiny = {**spec["config"], "hidden_size": 8 * heads, "intermediate_size": 64, "num_hidden_layers": 2,
            "vocab_size": 64}
    run(config_class(**tiny), {**spec, "batch_size": 2, "max_length": 8, "rank": 4, "blocks": 1, "measure": False}, 1)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = status("VmRSS")
    spec = {**spec, "measure": True}
    seconds = run(config_class(**spec["config"]), spec, spec.get("steps", 2))
    return {"start": start, "loaded": spec["loaded"], "peak": status("VmHWM"), "update_time_s": seconds}


def measure(spec: dict, timeout: int = 600) -> dict:
    """Run :func:`main` in a fresh process. glibc is told to hand every freed block of 128 KiB or more
    back to the system at once (MALLOC_MMAP_THRESHOLD_), so that the RSS follows what the tensors
    hold rather than what its heap keeps for reuse."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
