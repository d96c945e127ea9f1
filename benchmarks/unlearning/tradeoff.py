"""Issue 27: the trade-off curve, forget accuracy against held-out accuracy as the forgetting strength varies.

    python benchmarks/unlearning/tradeoff.py [--out DIR] [--seeds 0] [--eul-epochs 1 2 4 8 12]
        [--objectives bounds margin-penalty] [--baselines finetune npo graddiff] [--baseline-epochs 1 2 4]
        [--baseline-lrs 2e-3 ...]

Scenario 2's split (the demo's, :func:`forget_target.build_split`): SmolLM2-135M-Instruct forgets the capitals
of France, Japan, Italy, Germany and Spain; 35 known capitals retained, 17 held out (known, never trained on).
The forgetting strength is the number of training epochs (each point its own run, from the original model,
with its own warmup + linear-decay schedule):

- EUL with ``forget_target.py``'s recipe (rank 16 on the top 8 blocks, lr 2e-3, batch 8) and its objectives
  ``bounds`` (the library's default: bounds 5 / 5 nats, no margin, no penalty; the "old" default of issue 27)
  and ``margin-penalty`` (forget margin 1 nat + retained-output penalty 10, what the demo uses), at
  ``--eul-epochs`` (default 1 2 4 8 12: 12 is the demo's; doubling from one epoch, where EUL has barely
  moved, covers the rise of forgetting on a roughly even log scale for a cost linear in the epochs);
- the baselines finetune, NPO and GradDiff of :mod:`unlearn_fast.eval.baselines` in their **adapter
  variant** (``params="layers"``: the same rank-16 layers on the top 8 blocks, base frozen, lr 2e-3, batch
  8; as ``real_capitals.py``), at ``--baseline-epochs`` (default 1 2 4) and ``--baseline-lrs`` (default
  2e-3, EUL's; another learning rate is another, dashed, curve: ``<baseline>-layers-lr<lr>``). Full-parameter
  training of the 135 M model costs seconds a step on this CPU; the adapter variant trains what EUL trains.

Every point is measured by the same function (:func:`unlearn_fast.eval.evaluation.evaluate_sets`, what
``unlearn`` reports as "after"): greedy answer accuracy on the forget / retain / held-out facts and the
general-text perplexity. Writes ``tradeoff.json`` and ``tradeoff.png`` into ``--out``, the PNG also to
``--png`` (default: ``benchmarks/unlearning/tradeoff.png``, the committed figure) and a results file
(benchmark ``tradeoff``, a row per point) into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (ROOT, ROOT / "benchmarks", HERE):  # the package, results_io, forget_target
    if str(p) not in sys.path:
        sys.path.append(str(p))

import torch  # noqa: E402

import forget_target as ft  # noqa: E402
import results_io  # noqa: E402
from unlearn_fast.eval.baselines import BaselineConfig, run_baseline  # noqa: E402
from unlearn_fast.eval.evaluation import HELDOUT, evaluate_sets  # noqa: E402
from unlearn_fast.eval.general_text import GENERAL_TEXT  # noqa: E402
from unlearn_fast.model.layers import LayerConfig  # noqa: E402
from unlearn_fast.train.trainer import TrainConfig  # noqa: E402

PNG = HERE / "tradeoff.png"
DODGE = 0.6  # horizontal shift between the curves in the figure (accuracy points)
TITLE = ("SmolLM2-135M-Instruct: 5 capitals forgotten, 35 retained, 17 held out;\n"
         "numbers at the points: training epochs (the forgetting strength)")
LR, BATCH = 2e-3, ft.BATCH  # forget_target.py's recipe
LAYERS = dict(rank=16, blocks=8)
BASELINES = ("finetune", "npo", "graddiff")
# method (the rows' name) -> legend label
LABELS = {
    "eul-bounds": "EUL, bounds 5/5 nats (old default)",
    "eul-margin-penalty": "EUL, margin 1 + penalty 10 (the demo's before the forget routes)",
    "eul-margin-penalty-routes": "EUL, margin 1 + penalty 10 + forget routes 4 (the demo's now)",
    "finetune-layers": "finetune on retain (rank-16 layers, top 8 blocks, base frozen)",
    "npo-layers": "NPO (rank-16 layers, top 8 blocks, base frozen)",
    "graddiff-layers": "GradDiff (rank-16 layers, top 8 blocks, base frozen)",
}
STYLE = {"eul-bounds": ("tab:blue", "o"), "eul-margin-penalty": ("tab:green", "s"),
         "eul-margin-penalty-routes": ("tab:purple", "P"),
         "finetune-layers": ("tab:gray", "v"), "npo-layers": ("tab:orange", "^"),
         "graddiff-layers": ("tab:red", "D")}


def eul_method(objective: str) -> str:
    return f"eul-{objective}"


def baseline_method(baseline: str, lr: float = LR) -> str:
    """``<baseline>-layers``, with ``-lr<lr>`` when the learning rate is not EUL's."""
    return f"{baseline}-layers" + ("" if lr == LR else f"-lr{lr:g}")


def parse_method(method: str) -> tuple[str, float]:
    """(the baseline's or EUL objective's name, lr) of a method name."""
    if method.startswith("eul-"):
        return method[len("eul-"):], LR
    base, _, lr = method.partition("-layers")
    return base, float(lr[len("-lr"):]) if lr else LR


def label(method: str) -> str:
    """The legend's label of a method."""
    if method in LABELS:
        return LABELS[method]
    base, lr = parse_method(method)
    return f"{LABELS.get(baseline_method(base), method)}, lr {lr:g}"


def style(method: str) -> tuple:
    """(colour, marker, line style): a baseline at another learning rate dashed, in its colour."""
    if method in STYLE:
        return (*STYLE[method], "-")
    base, _ = parse_method(method)
    return (*STYLE.get(baseline_method(base), (None, "o")), "--")


def point_row(method: str, epochs: int, seed, figures: dict, time_s=None, damaged: bool = False) -> dict:
    """One results row from :func:`evaluate_sets`' figures (fractions) : accuracies in %, perplexity."""
    ppl = figures.get("general_perplexity")
    return {"method": method, "epochs": epochs, "seed": seed,
            "forget_acc_pct": ft.pct(figures["forget_accuracy"]),
            "heldout_acc_pct": ft.pct(figures[f"{HELDOUT}_accuracy"]),
            "retain_acc_pct": ft.pct(figures["retain_accuracy"]),
            "general_ppl": None if ppl is None else round(ppl, 2),
            "damaged": damaged, "time_s": None if time_s is None else round(time_s, 1)}


def merged_rows(files: list[list[dict]]) -> list[dict]:
    """The rows of several runs as one list: every run's points, the original model's row only once (the
    first run's; every run starts from the same original and split)."""
    rows = [r for r in files[0] if r["method"] == "original"][:1]
    return rows + [r for run in files for r in run if r["method"] != "original"]


def curve_points(rows: list[dict]) -> dict[str, list[dict]]:
    """method -> its points ordered by strength (epochs), each the mean over its seeds:
    {"epochs", "forget", "heldout", "retain", "n"}. The original's row (epochs 0) is no curve's point."""
    groups: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        if r["method"] == "original":
            continue
        groups.setdefault(r["method"], {}).setdefault(r["epochs"], []).append(r)
    out = {}
    for method, by_epochs in groups.items():
        out[method] = [{"epochs": e, "n": len(rs),
                        **{k: statistics.fmean(r[f"{k}_acc_pct"] for r in rs) for k in ("forget", "heldout", "retain")}}
                       for e, rs in sorted(by_epochs.items())]
    return out


def plot(rows: list[dict], paths, title: str = "forget vs held-out accuracy; numbers at the points: training epochs"
         ) -> None:
    """The trade-off figure: x = forget accuracy (%), y = held-out accuracy (%), a line per method through
    its strengths (labelled with the epochs), the original and the ideal corner (forget 0 %, held-out as
    the original's) marked. Written to every path in ``paths``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    original = next((r for r in rows if r["method"] == "original"), None)
    fig, ax = plt.subplots(figsize=(9.5, 7))
    ax.add_patch(Rectangle((-7, 95), 12, 10, color="gold", alpha=0.15, label="forget ≤ 5 %, held-out ≥ 95 %"))
    offsets = [(6, 4), (6, -10), (-14, 4), (-14, -10), (4, 8), (-12, 8)]
    curves = curve_points(rows)
    counts = {p["n"] for points in curves.values() for p in points}
    if len(counts) == 1 and counts != {1}:  # every point the mean of the same number of seeds: say it once
        title += f"; each point the mean of {counts.pop()} training seeds"
    for i, (method, points) in enumerate(curves.items()):
        color, marker, line = style(method)
        dodge = (i - (len(curves) - 1) / 2) * DODGE  # so that equal points do not hide each other
        xs, ys = [p["forget"] + dodge for p in points], [p["heldout"] for p in points]
        seeds = max(p["n"] for p in points)
        text = label(method) + (f", mean of {seeds} seeds" if seeds > 1 and " seeds" not in title else "")
        ax.plot(xs, ys, marker=marker, color=color, label=text, alpha=0.85, markersize=7, linewidth=1.5,
                linestyle=line, markerfacecolor=color if line == "-" else "white")
        for p, x in zip(points, xs):
            ax.annotate(str(p["epochs"]), (x, p["heldout"]), textcoords="offset points",
                        xytext=offsets[i % len(offsets)], fontsize=8, color=color)
    if original is not None:
        ax.plot([original["forget_acc_pct"]], [original["heldout_acc_pct"]], "kx", markersize=10, mew=2,
                label="original model")
        ax.plot([0], [original["heldout_acc_pct"]], "*", color="gold", markeredgecolor="k", markersize=18,
                label="ideal: forget 0 %, held-out as the original", zorder=1, alpha=0.8)
    ax.set_xlim(-7, 105)
    ax.set_ylim(-5, 105)
    shift = (len(curves) - 1) / 2 * DODGE
    ax.set_xlabel(f"forget accuracy (%)  — lower is more forgotten (curves shifted by up to ±{shift:.1f} "
                  "points so that equal points stay visible)", fontsize=9)
    ax.set_ylabel("held-out accuracy (%)  — known capitals never trained on")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    for path in paths:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="unlearning_results/tradeoff")
    ap.add_argument("--png", default=str(PNG), help=f"also write the figure here (default {PNG.relative_to(ROOT)}; "
                                                     "'' for none)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    ap.add_argument("--objectives", nargs="+", default=["bounds", "margin-penalty"], choices=list(ft.OBJECTIVES))
    ap.add_argument("--eul-epochs", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    ap.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES))
    ap.add_argument("--baseline-epochs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--baseline-lrs", type=float, nargs="+", default=[LR],
                    help=f"baseline learning rates, a curve each (default {LR:g}, EUL's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--replot", metavar="JSON", nargs="+", default=None,
                    help="only redraw the figure from results files (or tradeoff.json) into --out and --png; "
                         "the rows of several files are drawn together (the original's row of the first)")
    results_io.add_argument(ap)
    args = ap.parse_args(argv)
    pngs = [Path(args.out) / "tradeoff.png"] + ([Path(args.png)] if args.png else [])
    if args.replot:
        plot(merged_rows([json.loads(Path(f).read_text())["rows"] for f in args.replot]), pngs, TITLE)
        print(f"figure: {', '.join(map(str, pngs))}")
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    original, tokenizer, name = ft.load_model("smollm2", device="cpu")
    sets, _, _, _ = ft.build_split("capitals", original, tokenizer)
    eval_sets = {"forget": sets["forget"], "retain": sets["retain"], HELDOUT: sets["held_out"]}
    print({k: len(v) for k, v in sets.items()}, flush=True)

    def figures(model) -> dict:
        return evaluate_sets(model, tokenizer, "causal", eval_sets, general_text=GENERAL_TEXT, chat_template=ft.CHAT)

    rows = [point_row("original", 0, None, figures(original))]
    print(rows[0], flush=True)
    jobs = [(eul_method(o), e, s) for s in args.seeds for o in args.objectives for e in args.eul_epochs]
    jobs += [(baseline_method(b, lr), e, s) for s in args.seeds for lr in args.baseline_lrs for b in args.baselines
             for e in args.baseline_epochs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = results_io.results_dir(args.results)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # one file per run
    for method, epochs, seed in jobs:
        model = copy.deepcopy(original)
        if method.startswith("eul-"):
            r = ft.run_eul(model, tokenizer, sets, name, ft.OBJECTIVES[method[len("eul-"):]], epochs, seed,
                           evaluate=False, allow_damage=True)
            seconds, damaged = r.training.update_time_s, bool(r.training.damage)
        else:
            base, lr = parse_method(method)
            config = BaselineConfig(method=base, params="layers", layers=LayerConfig(**LAYERS))
            r = run_baseline(model, tokenizer, sets["forget"], sets["retain"], config,
                             TrainConfig(epochs=epochs, batch_size=BATCH, lr=lr, seed=seed, progress=False),
                             allow_damage=True, log=lambda *a, **k: None, chat_template=ft.CHAT)
            seconds, damaged = r.training.update_time_s, bool(r.training.damage)
        rows.append(point_row(method, epochs, seed, figures(model), seconds, damaged))
        print(rows[-1], flush=True)
        del model
        total = time.perf_counter() - started
        (out / "tradeoff.json").write_text(json.dumps({"rows": rows, "whole_run_s": round(total)}, indent=1))
        if where:
            o = rows[0]
            notes = (f"strength = training epochs, each point its own run from the original; EUL: "
                     f"forget_target.py's recipe (rank 16 on the top 8 blocks, lr {LR:g}, batch {BATCH}), "
                     f"eul-bounds = the library default (bounds 5 / 5 nats, the old default of issue 27), "
                     f"eul-margin-penalty = forget margin 1 nat + retained-output penalty 10 (the demo's until the "
                     f"forget routes), eul-margin-penalty-routes = those two + forget routes 4 (the demo's now); "
                     f"baselines in the adapter variant (params='layers': the same rank-16 layers on the top 8 "
                     f"blocks, base frozen, batch {BATCH}, lr {LR:g} unless the name says -lr), not "
                     f"full-parameter; original: forget "
                     f"{o['forget_acc_pct']} %, retain {o['retain_acc_pct']} %, held-out {o['heldout_acc_pct']} %, "
                     f"general ppl {o['general_ppl']}; split capitals: forget {len(sets['forget'])} / retain "
                     f"{len(sets['retain'])} / held out {len(sets['held_out'])}; {args.threads} threads; "
                     f"whole run {total:.0f} s; figure: tradeoff.png")
            path = results_io.write_results(where, results_io.make_results(
                "tradeoff", rows, results_io.command_line(__file__, argv), notes, date=date))
        plot(rows, pngs, TITLE)  # after every point: a run cut short keeps its figure
    print(f"figure: {', '.join(map(str, pngs))}")
    if where:
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
