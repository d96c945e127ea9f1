"""Results files of the benchmarks: one JSON file per run, in benchmarks/results/.

A results file is one JSON object:

    {
      "benchmark": "whole_step",              # which table it belongs to (see tables.py)
      "date": "2026-12-07T02:10:12Z",         # when it ran (UTC; a day alone for transcribed runs; null if unknown)
      "machine": {"cpu": ..., "cores": ..., "gpu": ..., "platform": ..., "description": ...},
      "versions": {"python": ..., "torch": ..., "triton": ..., "transformers": ..., "unlearn_fast": ...},
      "command": "python benchmarks/gpu_step.py --cpu --steps 5",   # what produced it (null if none)
      "rows": [{"mode": "naive", "s_per_step": 4.8}, ...],          # the table's rows: column -> value
      "notes": "short, optional",
      "source": "transcribed from ... as of <commit>"               # optional: figures copied, not measured
    }

``machine.description`` (optional) names the machine in the tables where cpu / gpu do not say enough.

Unknown values are null, never guessed. A cell is a number, a string, null, or {"mean": m, "sd": s}.
``python benchmarks/tables.py`` turns these files into the README tables.

The scripts write with :func:`write_results`. The pytest-benchmark suites write their own JSON
(``--benchmark-json FILE``); turn one or more such files (repeats of one suite) into a results file with

    python benchmarks/results_io.py pytest-benchmark --benchmark unlearning_layer_cpu run1.json run2.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
REQUIRED = ("benchmark", "date", "machine", "versions", "command", "rows")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """Short hash of the checkout's HEAD, with "-dirty" when it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    """This machine: CPU model, logical cores, GPU (if torch sees one), OS."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
            "description": None}


def versions() -> dict:
    """Versions of what the benchmarks run on (null where a package is not installed)."""
    package = _version("unlearn_fast")
    commit = _git_commit()
    if package and commit:
        package = f"{package} (git {commit})"
    return {"python": platform.python_version(), "torch": _version("torch"), "triton": _version("triton"),
            "transformers": _version("transformers"), "unlearn_fast": package}


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """``python <script relative to the repo> <args>``; ``argv`` defaults to this process's arguments."""
    path = Path(script).resolve()
    try:
        path = path.relative_to(ROOT)
    except ValueError:
        pass
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(a) for a in ["python", str(path), *args])


def sig(value, digits: int = 4):
    """``value`` rounded to ``digits`` significant digits (None stays None): for table cells."""
    return None if value is None else float(f"{value:.{digits}g}")


def add_argument(parser: argparse.ArgumentParser) -> None:
    """The scripts' ``--results DIR`` option (see :func:`results_dir`)."""
    parser.add_argument("--results", metavar="DIR", default=None,
                        help="write a results file (benchmarks/results_io.py) into DIR; default "
                             "benchmarks/results for a real run, none for a dry / quick run; '' for none")


def results_dir(option: Optional[str], dry_run: bool = False) -> Optional[Path]:
    """Where ``--results`` says to write: the option's folder, none for '', and when not given,
    benchmarks/results unless the run is a dry / quick run whose numbers mean nothing."""
    if option is None:
        return None if dry_run else RESULTS_DIR
    return Path(option) if option else None


def results_name(benchmark: str, date: str, machine_info: dict) -> str:
    """``<date>_<hhmmss>_<machine>_<benchmark>.json``, letters, digits, '.', '_' and '-' only."""
    who = machine_info.get("gpu") or machine_info.get("cpu") or "unknown"
    slug = re.sub(r"[^a-z0-9]+", "-", who.lower()).strip("-")[:32].strip("-")
    stamp = re.sub(r"[^0-9T-]", "", date or "").replace("T", "_")[:17] or "undated"  # 2026-12-07_021012
    return f"{stamp}_{slug}_{benchmark}.json"


def make_results(benchmark: str, rows: list, command: Optional[str], notes: Optional[str] = None, *,
                 date: Optional[str] = "now", machine_info: Optional[dict] = None,
                 version_info: Optional[dict] = None, **extra) -> dict:
    """A results object; date, machine and versions default to now and this machine (date=None: unknown)."""
    if date == "now":
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = {"benchmark": benchmark, "date": date, "machine": machine() if machine_info is None else machine_info,
           "versions": versions() if version_info is None else version_info, "command": command,
           "rows": list(rows)}
    if notes:
        out["notes"] = notes
    out.update(extra)
    return out


def write_results(directory, results: dict, name: Optional[str] = None) -> Path:
    """Write ``results`` (see :func:`make_results`) into ``directory`` atomically, NaN / inf as null;
    returns the path. The name defaults to :func:`results_name`, so a script that writes its results
    after every measured row (a run cut short keeps what it measured) replaces one file."""
    from unlearn_fast.io.atomic import write_json

    missing = [k for k in REQUIRED if k not in results]
    if missing:
        raise ValueError(f"results lack {', '.join(missing)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or results_name(results["benchmark"], results["date"] or "undated", results["machine"]))
    write_json(path, _clean(results), indent=1, ensure_ascii=False, allow_nan=False, default=_jsonable)
    return path


def _finite(value):
    """NaN and ±inf (the scripts' "not applicable") as None: JSON has no such numbers."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _finite(obj)


def _jsonable(value):
    """For json.dump: numpy / torch scalars as numbers, anything else as its string."""
    if hasattr(value, "item"):
        return _finite(value.item())
    return str(value)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark JSON -> results file
# ---------------------------------------------------------------------------------------------
def from_pytest_benchmark(paths: Sequence, benchmark: str, command: Optional[str] = None) -> dict:
    """One results file from the ``--benchmark-json`` files of one or more runs of a suite: a row per
    test and run (``repeat``), with min / median in ms and the test's ``extra_info``. Machine and
    versions are this machine's: convert on the machine that ran the suite."""
    rows, date = [], None
    for repeat, path in enumerate(paths, 1):
        data = json.loads(Path(path).read_text())
        date = date or data.get("datetime")
        for b in data.get("benchmarks", []):
            row = {"test": b["name"]}
            if len(paths) > 1:
                row["repeat"] = repeat
            stats = b.get("stats") or {}
            if stats.get("rounds", 0) > 1:  # the ratio tests time a no-op once: their figures are in extra_info
                row.update(min_ms=round(1e3 * stats["min"], 3), median_ms=round(1e3 * stats["median"], 3),
                           rounds=stats["rounds"])
            row.update(b.get("extra_info") or {})
            rows.append(row)
    if date:  # pytest-benchmark's ISO time, as UTC like the scripts' dates
        when = datetime.datetime.fromisoformat(date.replace("Z", "+00:00"))
        if when.tzinfo is not None:
            when = when.astimezone(datetime.timezone.utc)
        date = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return make_results(benchmark, rows, command, date=date or "now")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Turn pytest-benchmark JSON files into a results file.")
    sub = ap.add_subparsers(dest="what", required=True)
    pb = sub.add_parser("pytest-benchmark", help="--benchmark-json files of repeats of one suite")
    pb.add_argument("files", nargs="+")
    pb.add_argument("--benchmark", required=True, help="results name, e.g. loss_head_cpu (see tables.py)")
    pb.add_argument("--command", default=None, help="the pytest command that produced the files")
    pb.add_argument("--results", default=str(RESULTS_DIR), help="folder to write into")
    args = ap.parse_args(argv)
    path = write_results(args.results, from_pytest_benchmark(args.files, args.benchmark, args.command))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
