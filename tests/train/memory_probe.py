"""Measure the CPU memory of unlearning training steps in a fresh process (run as a script).

    python tests/train/memory_probe.py '{"config": {...LlamaConfig fields...}, "batch_size": 4, ...}'

prints one JSON line: ``start`` (RSS before the model exists), ``loaded`` (RSS with the model built),
``peak`` (the process's peak RSS during the steps; the kernel's high-water mark is reset after
loading by writing 5 to /proc/self/clear_refs, once glibc has returned the memory that building
the model freed, ``malloc_trim``), all in bytes. Linux with glibc only. Rows are random token ids of exactly
``max_length`` tokens (no padding), ``batch_size`` retained and ``batch_size`` forgotten ones per step (the mixed schedule), every
position with a target; ``steps`` steps, each on new rows (the teacher cache grows by 2 ×
``batch_size`` rows a step).
"""

from __future__ import annotations

import ctypes
import json
import re
import sys

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


def main(spec: dict) -> dict:
    torch.set_num_threads(spec.get("threads", 2))
    config = getattr(transformers, spec.get("config_class", "LlamaConfig"))(**spec["config"])
    b, t, vocab, steps = spec["batch_size"], spec["max_length"], config.vocab_size, spec.get("steps", 2)
    retain, forget = rows(b * steps, t, vocab, False, 0), rows(b * steps, t, vocab, True, 1)
    start = status("VmRSS")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    attach(model, LayerConfig(rank=spec.get("rank", 32), blocks=spec.get("blocks", "all")))
    cache = StepCache(model, "causal")
    objective = EULObjective(model, "causal", ObjectiveConfig(), cache)
    training = TrainConfig(epochs=1, batch_size=b // spec.get("accumulate", 1), accumulate=spec.get("accumulate", 1),
                           max_steps=steps, progress=False,
                           gradient_checkpointing=spec.get("gradient_checkpointing", False))
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what building the model freed
    loaded = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    result = train(model, objective, forget, retain, training, pad_id=0)
    return {"start": start, "loaded": loaded, "peak": status("VmHWM"), "steps": result.steps,
            "update_time_s": result.update_time_s}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
