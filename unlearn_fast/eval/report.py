"""The evaluation report: one JSON file with every figure, a Markdown table shaped like Table 2 of the
EUL paper (method × test / retain / forget / forget LM loss / time), a truth-ratio table (where the
sets have perturbed answers), open-unlearning's headline figures under their names (forget_quality,
model_utility, privleak ...), a membership-inference and gold-standard table, and a PNG plot of the
forget metric against the retain metric per method.

A report is built from the output of :func:`unlearn_fast.eval.per_example.evaluate_model` for each method
(``original``, ``retrain``, ``eul``, baselines ...). When one method is the retrained gold standard,
every other method gets its forget quality, gap to it and privleak
(:func:`unlearn_fast.eval.per_example.compare_to_retrained`).

The plot needs matplotlib (``pip install unlearn-fast[report]``); without it the JSON and Markdown
are still written and the Markdown says why there is no plot.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..io.artifacts import MANIFEST_FILE, load_layers
from ..io.atomic import ensure_directory, output_errors
from ..io.base_model import load_model
from ..model.family import detect_task
from ..model.layers import detach
from .per_example import compare_to_retrained, evaluate_model

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
ATTACK_LABELS = {"mia_loss": "LOSS", "mia_zlib": "zlib", "mia_min_k": "Min-K%", "mia_min_k_plus_plus": "Min-K%++"}


def _clean(value):
    """JSON-safe: NaN / inf as null, tuples as lists, numpy / torch scalars as floats."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def build_report(results: dict[str, dict], *, times: Optional[dict[str, Optional[float]]] = None,
                 retrained: Optional[str] = None, primary_metric: str = "accuracy", title: str = "Unlearning report",
                 meta: Optional[dict] = None, include_per_example: bool = True) -> dict:
    """Assemble the report dict.

    ``results``: method name → ``evaluate_model`` output (``{"figures", "per_example"}``), in table
    order. ``times``: method name → update time in seconds (None where it does not apply).
    ``retrained``: the name of the gold-standard method in ``results``, if any.
    ``primary_metric``: the per-set figure the Table 2 columns show (``accuracy``, ``Q_A_ROUGE``, ...).
    """

    times = times or {}
    if retrained is not None and retrained not in results:
        raise KeyError(f"retrained method {retrained!r} is not among the results")
    methods: dict[str, dict] = {}
    for name, res in results.items():
        entry: dict[str, Any] = {"figures": res["figures"], "time_s": times.get(name)}
        if retrained is not None and name != retrained:
            entry["vs_retrained"] = compare_to_retrained(res, results[retrained])
        if include_per_example:
            entry["per_example"] = res.get("per_example", {})
        methods[name] = entry
    return _clean({
        "title": title,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "primary_metric": primary_metric,
        "retrained": retrained,
        "meta": meta or {},
        "methods": methods,
    })


def describe_methods(settings: dict[str, dict]) -> dict[str, dict]:
    """The settings of each compared method, as JSON-able values for a report's header.

    ``settings[name]`` holds ``training`` (a TrainConfig) and either ``config`` (a baseline's
    BaselineConfig) or ``layers`` + ``objective`` (EUL's LayerConfig and ObjectiveConfig)."""
    out = {}
    for name, s in settings.items():
        t = s["training"]
        d = {"epochs": t.epochs, "lr": t.lr, "batch_size": t.batch_size, "schedule": t.schedule}
        if "config" in s:
            d.update(params=s["config"].params, alpha=s["config"].alpha, gamma=s["config"].gamma,
                     beta=s["config"].beta)
        else:
            d.update(layers=s["layers"].to_dict(), objective=s["objective"].to_dict())
        out[name] = d
    return out


def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "p":
        return f"{value:.3g}"
    if kind == "s":
        return f"{value:.1f}"
    return f"{value:.3f}"


def _metric_kind(metric: str) -> str:
    return "pct" if metric in ("accuracy", "exact_match", "Q_A_ROUGE", "rougeL_f1", "exact_memorization", "Q_A_Prob",
                               "Q_A_Prob_normalised", "extraction_strength") else "f"


def markdown(report: dict) -> str:
    """Table 2 of the paper (method × test / retain / forget / forget LM loss / time), the truth-ratio table
    (when any set had perturbed answers) and the MIA / gold-standard table."""
    metric = report.get("primary_metric", "accuracy")
    kind = _metric_kind(metric)
    unit = " (%)" if kind == "pct" else ""
    lines = [f"# {report.get('title', 'Unlearning report')}", ""]
    meta = report.get("meta") or {}
    for k, v in meta.items():
        lines.append(f"- {k}: {v}")
    if meta:
        lines.append("")
    for section in report.get("sections") or []:  # a caller's own Markdown sections (e.g. TOFU's headline table)
        lines += [section.rstrip("\n"), ""]
    # the reference columns (held-out set, general-text perplexity) where any method has them
    extra = [(head, key, k) for head, key, k in (("Held-out ↑", f"heldout_{metric}", kind),
                                                 ("General ppl", "general_perplexity", "f"))
             if any(key in m["figures"] for m in report["methods"].values())]
    lines += [f"## Task performance ({metric}{unit}) and update time", "",
              "| Method | Test ↑ | Retain ↑ | Forget | Forget LM loss | " + "".join(f"{h} | " for h, _, _ in extra)
              + "Time (s) |", "|---|---:|---:|---:|---:|" + "---:|" * len(extra) + "---:|"]
    for name, m in report["methods"].items():
        f = m["figures"]
        lines.append(f"| {name} | {_fmt(f.get(f'test_{metric}'), kind)} | {_fmt(f.get(f'retain_{metric}'), kind)} | "
                     f"{_fmt(f.get(f'forget_{metric}'), kind)} | {_fmt(f.get('forget_lm_loss'), 'f')} | "
                     + "".join(f"{_fmt(f.get(key), k)} | " for _, key, k in extra)
                     + f"{_fmt(m.get('time_s'), 's')} |")
    lines += ["", "Forget: the target is the retrained model's value (not the lowest); "
              "forget LM loss: mean NLL of the forgotten answers (nats), the higher the more forgotten."
              + (" Held-out: known examples nobody asked to delete (--heldout); general ppl: perplexity of "
                 "general text (--ppl-text, else the shipped text)." if extra else ""), ""]
    lines += _truth_ratio_table(report)
    lines += _open_unlearning_table(report)
    attacks = sorted({a for m in report["methods"].values() for a in (m["figures"].get("mia") or {})},
                     key=lambda a: list(ATTACK_LABELS).index(a) if a in ATTACK_LABELS else 99)
    retrained = report.get("retrained")
    # the truth-ratio column only where the forget set had perturbed answers
    statistics = [s for s in ("loss", "truth_ratio")
                  if any(f"forget_quality_{s}" in (m.get("vs_retrained") or {}) for m in report["methods"].values())]
    lines += ["## Membership inference (AUC, forget vs held-out; 0.5 = indistinguishable) and the gold standard", ""]
    head = ["Method"] + [f"AUC {ATTACK_LABELS.get(a, a)}" for a in attacks]
    if retrained:
        head += [f"Forget quality (KS p, {s.replace('_', ' ')})" for s in statistics] + \
            [f"Δ forget {metric}", f"Δ retain {metric}", f"Δ test {metric}", "Δ forget LM loss"]
    lines += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, m in report["methods"].items():
        f = m["figures"]
        cells = [name] + [_fmt((f.get("mia") or {}).get(a), "f") for a in attacks]
        if retrained:
            vs = m.get("vs_retrained")
            if vs is None:
                cells += ["(gold standard)"] + [""] * (len(statistics) + 3)
            else:
                gap = vs.get("gap", {})
                cells += [_fmt(vs.get(f"forget_quality_{s}"), "p") for s in statistics] + \
                    [_fmt(gap.get(f"{s}_{metric}"), kind) for s in ("forget", "retain", "test")] + \
                    [_fmt(gap.get("forget_lm_loss"), "f")]
        lines.append("| " + " | ".join(cells) + " |")
    if retrained:
        lines += ["", (f"Δ = method − {retrained} (percentage points for percentages). Forget quality: KS-test "
                       "p-value between the per-example forget-set statistics (answer loss; TOFU's truth ratio "
                       "where the forget set has perturbed answers) of the method and of the retrained model "
                       "(open-unlearning's `forget_quality`; high = indistinguishable).")]
    mach = report.get("machine") or {}
    if mach:
        lines += ["", f"Machine: {mach.get('platform')}, {mach.get('cpu_count')} CPUs "
                  f"({mach.get('torch_threads')} torch threads), torch {mach.get('torch')}"
                  + (f", {mach['cuda']}" if mach.get("cuda") else "") + "."]
    return "\n".join(lines) + "\n"


def _truth_ratio_table(report: dict) -> list[str]:
    """Markdown lines of the truth-ratio table (none when no set had perturbed answers)."""
    # open-unlearning's names: forget_truth_ratio on the forget set, <set>_Truth_Ratio on the others
    keys = dict.fromkeys(k for m in report["methods"].values() for k in m["figures"]
                         if k.endswith(("_truth_ratio", "_Truth_Ratio")))
    sets = list(dict.fromkeys(k[:-len("_truth_ratio")] for k in keys))
    key_of = {k[:-len("_truth_ratio")]: k for k in keys}
    if not sets:
        return []
    sets.sort(key=lambda s: s != "forget")  # the forget set first; "forget" is what evaluate_model names it
    head = ["Method"] + [f"{s.capitalize()} {'(min(R, 1/R))' if s == 'forget' else '↑ (max(0, 1−R))'}" for s in sets]
    lines = ["## Truth ratio (TOFU; R = P(wrong answers) / P(right answer), length-normalised, geometric mean "
             "over the wrong answers)", "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * len(sets) + "|"]
    for name, m in report["methods"].items():
        lines.append("| " + " | ".join([name] + [_fmt(m["figures"].get(key_of[s]), "f") for s in sets]) + " |")
    return lines + ["", ("Forget set: open-unlearning's `closer_to_1_better` (1 = right and wrong answers equally "
                         "likely, as for a model that never saw them; compare with the retrained model); other "
                         "sets: `true_better` (1 = the right answers are clearly preferred)."), ""]


# open-unlearning's headline figures (TOFU / MUSE): (its name, our key, where the key is, format)
OPEN_UNLEARNING_COLUMNS = (
    ("forget_quality", "forget_quality", "vs", "p"), ("model_utility", "model_utility", "figures", "f"),
    ("forget_truth_ratio", "forget_truth_ratio", "figures", "f"),
    ("forget_Q_A_Prob", "forget_Q_A_Prob", "figures", "f"), ("forget_Q_A_ROUGE", "forget_Q_A_ROUGE", "figures", "f"),
    ("extraction_strength", "forget_extraction_strength", "figures", "f"), ("privleak", "privleak", "vs", "f"))


def _open_unlearning_table(report: dict) -> list[str]:
    """Markdown lines of open-unlearning's headline figures (the columns any method has)."""
    def value(m: dict, name: str, where: str):
        return (m.get("vs_retrained") or {}).get(name) if where == "vs" else m["figures"].get(name)

    methods = report["methods"].values()
    columns = [c for c in OPEN_UNLEARNING_COLUMNS if any(value(m, c[1], c[2]) is not None for m in methods)]
    if not columns:
        return []
    lines = ["## open-unlearning figures (TOFU / MUSE definitions and names)", "",
             "| Method | " + " | ".join(c[0] for c in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for name, m in report["methods"].items():
        lines.append("| " + " | ".join([name] + [_fmt(value(m, key, where), kind) for _, key, where, kind in columns])
                     + " |")
    return lines + ["", ("forget_quality: KS-test p-value against the retrained model (truth ratios where the forget "
                         "set has perturbed answers, else losses); model_utility: harmonic mean of the retain-side "
                         "Q_A_Prob, Q_A_ROUGE and Truth_Ratio; privleak: relative Min-K % AUC gap to the retrained "
                         "model (%, 0 = as private as retraining)."), ""]


def plot(report: dict, path: Union[str, Path]) -> Optional[str]:
    """Scatter of the forget metric (x) against the retain metric (y), one labelled point per method.

    Returns None when the PNG was written, else the reason it was not (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'unlearn-fast[report]')"
    metric = report.get("primary_metric", "accuracy")
    kind = _metric_kind(metric)
    scale = 100.0 if kind == "pct" else 1.0
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for i, (name, m) in enumerate(report["methods"].items()):
        f = m["figures"]
        x, y = f.get(f"forget_{metric}"), f.get(f"retain_{metric}")
        if x is None or y is None:
            continue
        gold = name == report.get("retrained")
        ax.scatter([x * scale], [y * scale], marker="*" if gold else "o", s=140 if gold else 50, zorder=3)
        # staggered label offsets, so methods at the same point stay readable
        ax.annotate(name, (x * scale, y * scale), textcoords="offset points", xytext=(5, 4 - 9 * (i % 3)), fontsize=8)
    unit = " (%)" if kind == "pct" else ""
    ax.set_xlabel(f"forget-set {metric}{unit}")
    ax.set_ylabel(f"retain-set {metric}{unit}")
    ax.set_title(report.get("title", "Unlearning report"), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
    return None


def write_report(report: dict, out_dir: Union[str, Path]) -> dict[str, Path]:
    """Write report.json, report.md and (with matplotlib) report.png into ``out_dir``; return the paths.

    A directory that cannot be written (check it first with :func:`~unlearn_fast.io.atomic.ensure_directory`)
    or a full disk raises OutputError.
    """
    out = ensure_directory(out_dir)
    with output_errors(out):
        return _write_report(report, out)


def _write_report(report: dict, out: Path) -> dict[str, Path]:
    written = {}
    note = plot(report, out / REPORT_PNG)
    if note is None:
        written["png"] = out / REPORT_PNG
    report = dict(report, plot=REPORT_PNG if note is None else None, plot_note=note)
    with open(out / REPORT_JSON, "w") as f:
        json.dump(_clean(report), f, indent=2, allow_nan=False)
    written["json"] = out / REPORT_JSON
    text = markdown(report)
    text += f"\n![forget vs retain]({REPORT_PNG})\n" if note is None else f"\n_{note}_\n"
    (out / REPORT_MD).write_text(text)
    written["md"] = out / REPORT_MD
    return written


def _time_of(path: Optional[Union[str, Path]]) -> Optional[float]:
    """The update time recorded next to a method's output (artifact manifest or baseline.json)."""
    if path is None:
        return None
    for name in ("manifest.json", "baseline.json"):
        p = Path(path) / name
        if p.is_file():
            try:
                value = json.loads(p.read_text()).get("update_time_s")
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            return float(value) if isinstance(value, (int, float)) else None
    return None


def _method_name(path: Union[str, Path], default: str) -> str:
    for name in ("manifest.json", "baseline.json"):
        p = Path(path) / name
        if p.is_file():
            try:
                return str(json.loads(p.read_text()).get("method") or default)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
    return default


def evaluate_for_report(load_base, sets: dict, *, layers: Optional[Union[str, Path]] = None,
                        retrained: Optional[Union[str, Path]] = None, compare: Optional[dict] = None,
                        labels_for=None, general_text=None, max_length: int = 256, max_new_tokens: int = 8,
                        log=print, chat_template: str = "auto") -> tuple[dict, dict, Optional[str]]:
    """Evaluate the original model, its unlearned versions and the retrained model on the same sets.

    ``load_base()`` returns a fresh (model, tokenizer) of the original model; it is called once: the
    original and every layer artifact are evaluated on that one model, each artifact's layers
    attached before its evaluation and detached after it. ``layers``: an artifact to attach (method
    named by its manifest, ``eul`` by default); ``compare``: name → artifact or model directory (a
    model directory, e.g. a full-model baseline, is loaded on its own); ``retrained``: a model
    directory (the gold standard). ``labels_for(model, task, name, examples)`` gives classification
    labels. Returns (results, times, retrained name). Every model is evaluated with the same
    ``chat_template`` (see :func:`unlearn_fast.eval.per_example.evaluate_model`).
    """

    candidates: list[tuple[str, Optional[Path], str]] = [("original", None, "base")]
    if layers:
        candidates.append((_method_name(layers, "eul"), Path(layers), "layers"))
    for name, path in (compare or {}).items():
        kind = "layers" if (Path(path) / MANIFEST_FILE).is_file() else "model"
        candidates.append((name, Path(path), kind))
    if retrained:
        candidates.append(("retrain", Path(retrained), "model"))
    names = [name for name, _, _ in candidates]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two methods are named {name!r}; name them with --compare NAME=PATH")
    results, times = {}, {}
    base = None  # (model, tokenizer) of the original, shared by the original and every layer artifact
    for name, path, kind in candidates:
        if kind == "model":
            model, tokenizer, _ = load_model(str(path))
        else:
            base = base or load_base()
            model, tokenizer = base
        try:
            if kind == "layers":
                load_layers(model, path)
            task = detect_task(model)
            labels = {s: labels_for(model, task, s, ex) for s, ex in sets.items()} if labels_for else None
            log(f"evaluating {name} ...")
            results[name] = evaluate_model(model, tokenizer, task, sets, labels, general_text=general_text,
                                           max_length=max_length, max_new_tokens=max_new_tokens,
                                           chat_template=chat_template)
        finally:
            if kind == "layers":
                detach(model)  # back to the original for the next artifact
        times[name] = _time_of(path)
    return results, times, ("retrain" if retrained else None)
