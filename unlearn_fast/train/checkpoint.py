"""Training checkpoints: resume an interrupted unlearning run to the same result.

A checkpoint is a directory ``<checkpoint dir>/step-00000012`` holding

- ``checkpoint.safetensors``: the trained parameters (``param.<i>``, in the trainer's order),
  every optimizer-state tensor (``optimizer.<i>.<name>``) and the RNG states (``rng.torch``,
  ``rng.cuda``);
- ``state.json``: the step reached (the data position: the batch order is a function of the
  seed, so the trainer regenerates it and skips the finished steps), the optimizer's
  hyper-parameters and scalar state, the LR scheduler's state, the loss history, the tokens
  and update time so far, a key that ties the checkpoint to its run (training settings, number
  of steps, parameter shapes, a hash of the encoded rows) and the sha256 of the tensor file.

Nothing is pickled. Each checkpoint is written to a temporary sibling and renamed into place
(``state.json`` last, inside it; :func:`unlearn_fast.io.atomic.atomic_directory`), so a directory
named ``step-*`` is always complete; the two newest are kept. :func:`prepare` checks the
directory before a run and removes the temporaries a killed run left there. Under data
parallelism rank 0 writes (the state is the same on every rank) and every rank reads: the
directory must be visible to all ranks. The world size may change on resume (the global batch
does not depend on it).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import TrainingError
from ..io.artifacts import sha256_file
from ..io.atomic import atomic_directory, ensure_directory, remove_stale

FORMAT = 1
TENSORS_FILE = "checkpoint.safetensors"
STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d+)$")
_TEMPORARY = re.compile(r"^\.(step-\d+)\.")  # a checkpoint being written (or left by a killed run)
# settings that may change between an interrupted run and its resumption
_FREE = ("progress", "checkpoint_dir", "checkpoint_every", "resume", "backend", "teacher_cache", "shared_trunk",
         "shard_base", "fused_trunk", "gradient_checkpointing", "report_to", "report_dir")


def data_fingerprint(*sets) -> str:
    """sha256 over the encoded rows of each set, in order."""
    digest = hashlib.sha256()
    for rows in sets:
        digest.update(b"|set|")
        for r in rows:
            digest.update(json.dumps([r.input_ids, r.targets, [bool(m) for m in r.kl_mask], bool(r.forget),
                                      r.decoder_input_ids]).encode())
    return digest.hexdigest()


def run_key(config, total_steps: int, params: Sequence[nn.Parameter], forget, retain) -> dict:
    """What must match for a checkpoint to continue this run."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _FREE}
    return {"config": settings, "total_steps": total_steps, "params": [list(p.shape) for p in params],
            "data": data_fingerprint(forget, retain)}


def checkpoints(directory: Union[str, Path]) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prepare(directory: Union[str, Path], log: Callable = print) -> Path:
    """Before a run: create ``directory`` and check that it can be written (OutputError if not),
    and remove the temporaries of checkpoints a killed run was writing (said through ``log``)."""
    directory = ensure_directory(directory)
    for name in sorted({m.group(1) for p in directory.iterdir() if (m := _TEMPORARY.match(p.name))}):
        remove_stale(directory / name, (STATE_FILE,), log)
    for p in sorted(directory.iterdir()):  # an old checkpoint whose deletion a kill interrupted
        if _NAME.match(p.name) and p.is_dir() and not (p / STATE_FILE).exists():
            shutil.rmtree(p)
            log(f"removed {p}, a checkpoint an interrupted run was deleting")
    return directory


def latest(directory: Union[str, Path]) -> Optional[Path]:
    found = checkpoints(directory)
    return found[-1] if found else None


def save(directory: Union[str, Path], step: int, params: Sequence[nn.Parameter], optimizer, scheduler,
         key: dict, progress: dict, keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` finished steps atomically; keep the ``keep`` newest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    opt = optimizer.state_dict()
    opt_state = {}
    for idx, entry in opt["state"].items():
        saved = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().cpu().contiguous()
                saved[name] = {"tensor": f"optimizer.{idx}.{name}"}
            else:
                saved[name] = value
        opt_state[str(idx)] = saved
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {"format": FORMAT, "step": step, "key": key,
             "optimizer": {"param_groups": opt["param_groups"], "state": opt_state},
             "scheduler": sched, "progress": progress}
    final = directory / f"step-{step:08d}"
    # an existing one (the same step saved again by a resumed run) is replaced
    with atomic_directory(final, done=(STATE_FILE,)) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        state["files"] = {TENSORS_FILE: sha256_file(tmp / TENSORS_FILE)}
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f)
    for old in checkpoints(directory)[:-keep]:
        (old / STATE_FILE).unlink()  # first: a kill mid-delete must not leave a "complete" partial one
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore(path: Union[str, Path], params: Sequence[nn.Parameter], optimizer, scheduler, key: dict) -> dict:
    """Load a checkpoint into the parameters, optimizer, scheduler and RNG; return its state
    (``step`` and ``progress``). Refuses (TrainingError) a checkpoint of another run."""
    path = Path(path)
    try:
        with open(path / STATE_FILE) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingError(f"{path}: cannot read the checkpoint state ({err})") from None
    if state.get("format") != FORMAT:
        raise TrainingError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
    saved_key = state.get("key", {})
    if saved_key != json.loads(json.dumps(key)):
        differs = sorted(k for k in set(saved_key) | set(key) if saved_key.get(k) != json.loads(json.dumps(key.get(k))))
        if "config" in differs:
            a, b = saved_key.get("config", {}), json.loads(json.dumps(key["config"]))
            differs = [f"config.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] + \
                      [d for d in differs if d != "config"]
        raise TrainingError(f"{path} belongs to another run (different {', '.join(differs)}); "
                            f"resume with the same data and settings, or use a new --checkpoint-dir")
    tensor_file = path / TENSORS_FILE
    if not tensor_file.is_file():
        raise TrainingError(f"{tensor_file} is missing; remove {path} to resume from the checkpoint before it")
    try:
        if state.get("files", {}).get(TENSORS_FILE) != sha256_file(tensor_file):
            raise TrainingError(f"{tensor_file}: checksum does not match the checkpoint state (corrupt); "
                                f"remove {path} to resume from the checkpoint before it")
        tensors = load_file(str(tensor_file))
    except (OSError, SafetensorError) as err:
        raise TrainingError(f"{tensor_file}: cannot read it ({err}); remove {path} to resume from the "
                            f"checkpoint before it") from None
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
    opt = state["optimizer"]
    opt_state = {}
    for idx, entry in opt["state"].items():
        opt_state[int(idx)] = {name: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                               for name, v in entry.items()}
    optimizer.load_state_dict({"state": opt_state, "param_groups": opt["param_groups"]})
    sched = dict(state["scheduler"])
    sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
