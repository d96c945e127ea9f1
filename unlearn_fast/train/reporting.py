"""Training progress for TensorBoard or Weights & Biases (``--report-to``; optional dependencies).

Per optimiser step the trainer logs, under the step's number (1, 2, ...):

- ``train/loss`` and ``train/<term>`` for every term the objective reports (the EUL objective's
  ``retain_kl``, ``forget_kl``, ``task_loss``, ``forget_lm_loss``, and ``forget_kl_coef``: the forget
  KL's weight as applied, after the sharpening guard); a term absent from the step (NaN) is left out;
- ``train/lr``: the learning rate the step used;
- ``train/tokens_per_s``: the step's tokens over its wall time;
- ``memory/cuda_max_allocated_gib``: the step's peak CUDA allocation (training on a GPU), or
  ``memory/rss_gib``: the process's resident memory after the step (on a CPU).

``tensorboard`` writes event files into the report directory (``tensorboard --logdir runs``);
``wandb`` starts a run there (project ``$WANDB_PROJECT``, default ``unlearn-fast``; ``WANDB_MODE=offline``
keeps it on disk). The packages are imported only when asked for: :func:`check_reporter` says, before
anything is loaded, which one is missing and how to install it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import math
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from ..errors import UnlearnFastError

try:  # optional: the resident memory on a CPU (else read from /proc on Linux)
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

REPORTERS = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # reporter -> what to pip install
WANDB_PROJECT = "unlearn-fast"  # the default project ($WANDB_PROJECT overrides it)


def check_reporter(name: str) -> str:
    """``name`` if it is one of :data:`REPORTERS` and its package is installed, else a one-line error."""
    if name not in REPORTERS:
        raise UnlearnFastError(f"--report-to must be one of {', '.join(REPORTERS)}, got {name!r}")
    package = PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UnlearnFastError(f"--report-to {name} needs `pip install {package}`")
    return name


def default_report_dir(out: Optional[Union[str, Path]] = None, now: Optional[datetime.datetime] = None) -> Path:
    """``runs/<name of out>-<YYYYmmdd-HHMMSS>`` in the current directory (``unlearn`` without ``out``)."""
    name = Path(out).name if out else ""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name or 'unlearn'}-{stamp}"


class Reporter:
    """Where the step figures go; this base class drops them (``--report-to none``)."""

    kind = "none"

    def __init__(self, directory: Optional[Path] = None):
        self.directory = directory

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter(Reporter):
    kind = "tensorboard"

    def __init__(self, directory: Path, config: dict):
        super().__init__(directory)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    kind = "wandb"

    def __init__(self, directory: Path, config: dict):
        super().__init__(directory)
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), dir=str(directory),
                              name=directory.name, config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_reporter(name: str, directory: Optional[Union[str, Path]], config: dict) -> Reporter:
    """The reporter ``name`` (see :data:`REPORTERS`) writing into ``directory`` (default:
    :func:`default_report_dir`); ``config`` (the run's settings) is stored with the run."""
    check_reporter(name)
    if name == "none":
        return Reporter()
    directory = Path(directory) if directory else default_report_dir()
    return (TensorBoardReporter if name == "tensorboard" else WandbReporter)(directory, config)


@contextlib.contextmanager
def reporting(name: str, directory, config: dict, enabled: bool = True, log=None) -> Iterator[Optional[Reporter]]:
    """An open reporter for a training run (None for ``none`` or when not ``enabled``, e.g. on a
    rank other than 0), closed afterwards; ``log`` hears where it writes."""
    if name == "none" or not enabled:
        yield None
        return
    reporter = open_reporter(name, directory, config)
    if log is not None:
        log(f"reporting to {name} in {reporter.directory}")
    try:
        yield reporter
    finally:
        reporter.close()


def step_values(loss: float, terms: dict[str, float], lr: float, tokens: int, seconds: float,
                device: torch.device) -> dict[str, float]:
    """The figures of one optimiser step, by tag (see the module docstring)."""
    out = {"train/loss": float(loss)}
    for name, value in terms.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"train/{name}"] = float(value)
    out["train/lr"] = float(lr)
    if seconds > 0:
        out["train/tokens_per_s"] = tokens / seconds
    out.update(memory_values(device))
    return out


def start_step(device: torch.device) -> None:
    """Before a step: on CUDA, reset the peak so that the step's own peak is reported."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_values(device: torch.device) -> dict[str, float]:
    """The step's peak CUDA allocation on a GPU, else the process's resident memory, in GiB."""
    if device.type == "cuda":
        return {"memory/cuda_max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}
    rss = resident_bytes()
    return {} if rss is None else {"memory/rss_gib": rss / 2 ** 30}


def resident_bytes() -> Optional[int]:
    """The process's resident set size in bytes (None where it cannot be read)."""
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
