"""Regenerate the tables of benchmarks/README.md and benchmarks/unlearning/README.md from benchmarks/results/*.json.

    python benchmarks/tables.py           # rewrite the tables between the READMEs' markers
    python benchmarks/tables.py --check   # exit 1 if the READMEs' tables differ from what results/ gives

One table per benchmark (the files' "benchmark" field), newest run first (by date, then file name;
undated runs last), a row per row of each file, with the run's date and machine; under the table, per
run: its file, command, versions, source and notes. The format of a results file is described in
results_io.py. Only the text between ``<!-- tables:begin -->`` and ``<!-- tables:end -->`` is rewritten.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))
from results_io import REQUIRED, RESULTS_DIR  # noqa: E402

BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
MAIN, UNLEARNING = "main", "unlearning"
READMES = {MAIN: HERE / "README.md", UNLEARNING: HERE / "unlearning" / "README.md"}

# benchmark -> (README, heading, what the columns mean). A benchmark missing here goes into the
# main README under its own name, after these.
BENCHMARKS = {
    "loss_head_cpu": (MAIN, "Fused loss head, CPU (`test_bench_loss_head.py`)",
                      "N = 2048, H = 576, V = 49152, fp32, forward + backward. min s: best of the interleaved "
                      "rounds (chunked = the op on the C++ backend); cpp/gemms, naive/cpp: their ratios; "
                      "peak mib: extra peak RSS of one step."),
    "loss_head_gpu": (MAIN, "Fused loss head, GPU (`gpu_loss_head.py`)",
                      "N = 8192, V = 128256, bf16, forward + backward to the student hidden states; TFLOP/s "
                      "and % peak count three GEMMs against the measured matmul rate; GiB: extra peak memory."),
    "unlearning_layer_cpu": (MAIN, "Unlearning-layer op, CPU (`test_bench_unlearning_layer.py`)",
                             "N = 2048, d = 576, r = 32, fp32, forward + backward; eager/cpp: eager time over "
                             "the C++ op's, from the minima and the medians of interleaved steps "
                             "(cpp-aten: the op with ATen's BLAS on its blocks). Target: ≥ 1.5."),
    "unlearning_layer_gpu": (MAIN, "Unlearning-layer op, GPU (`gpu_unlearning_layer.py`)",
                             "bf16 x, fp32 weights, forward + backward, medians; floor: max(FLOPs / matmul "
                             "rate, bytes / copy bandwidth). Targets: K = 1 ≥ 1.5× eager; K = 8 ≥ 3× eager "
                             "and ≤ 1.3× the floor."),
    "whole_step": (MAIN, "Whole training step (`gpu_step.py`)",
                   "s per step: mean over the timed steps, or the median with --interleave (s min: the "
                   "minimum); × naive: naive's time over the mode's. CPU shape: SmolLM2-135M, fp32, "
                   "8 × 128 tokens, rank 32 after every block. Target: fused+cache ≥ 2× naive."),
    "trunk_ops_cpu": (MAIN, "Trunk ops, CPU (`test_bench_trunk.py`)",
                      "1024 tokens, RMSNorm d = 576, SwiGLU product 1536 wide, fp32, forward + backward."),
    "padding": (MAIN, "Padding of the trainer's batches (`padding.py`)",
                "Share of the padded token slots that are padding over all training batches, "
                "without and with length bucketing."),
    "fusion_quality": (MAIN, "Fusion of sequential requests (`fusion_quality.py`)",
                       "Per configuration: accuracy (%) and answer loss per request's forget set, on the "
                       "retained and held-out facts, and general-text perplexity."),
    "multi_gpu": (MAIN, "Data parallel and FSDP2 (`multi_gpu_check.py`)",
                  "Per mode: update time, tokens/s, communication per GPU, relative difference to the "
                  "one-process reference."),
    "plan_shapes": (MAIN, "Memory plan of 1–8 B models at 8 × 1024 (`plan_shapes.py`)",
                    "Estimates of `unlearn-fast plan` from the configs, not measurements: peak GPU memory of one "
                    "step (GiB) by part, bf16 base, rank d/16 on every block, 16 rows × 1024 tokens per forward "
                    "(mixed schedule), 1000 rows cached; cache off device: the teacher cache kept in CPU memory; "
                    "tflop step: FLOPs per optimiser step (steady state); fits: within 40 / 80 GiB; the "
                    "`plan --memory` rows: the cheapest settings that fit."),
    "savings_cpu": (MAIN, "Memory savings measured on the CPU, SmolLM2-135M (`savings.py`)",
                    "One short `unlearn` run per configuration, each in a fresh process, in one run: fp32, the "
                    "demo's sets, rank 16 on the top 8 blocks. peak mib: measured peak RSS above the loaded model "
                    "during training; plan mib: `unlearn-fast plan`'s estimate for the same settings minus the "
                    "frozen base (at T = the longest row: an upper bound); s per step: mean ± sd over the steps "
                    "after the first, later epochs: after the first epoch (teacher cache and trunk replayed); "
                    "x base: ratio to the baseline of the same run; plan gflop step: the plan's FLOPs per "
                    "optimiser step."),
    "cpu_breakdown": (MAIN, "Breakdowns from scratch harnesses and profiles",
                      "Figures measured outside this folder's scripts (no command re-runs them)."),
    "fictitious_facts": (UNLEARNING, "Scenario 1: fictitious facts (`fictitious_facts.py`)",
                         "Columns of the newest run: open-unlearning's metric names (underscores shown as "
                         "spaces): forget quality: KS p-value (scipy ks_2samp) of the forget truth ratios "
                         "against the retrained model's; model utility: harmonic mean of the retain set's "
                         "Q_A_Prob, Q_A_ROUGE and Truth_Ratio and the test set's Q_A_Prob_normalised, "
                         "Q_A_ROUGE and Truth_Ratio (as TOFU scores its real-authors and world-facts sets); "
                         "forget truth ratio: closer_to_1_better; privleak: "
                         "relative Min-K % MIA AUC gap to the retrained model (%, 0 = as retraining); forget "
                         "Q A Prob / ROUGE: length-normalised answer probability, ROUGE-L recall (stemmed); "
                         "extraction strength: on the forget set. Accuracies in %; forget delta pts: forget "
                         "accuracy minus the retrained model's; time: update time in s (retrain: training the "
                         "gold standard). Undated runs: the earlier definitions (truth ratio averaged "
                         "arithmetically, hand-written KS; forget quality tr / loss, MIA AUCs, losses in nats)."),
    "fictitious_facts_sweep": (UNLEARNING, "Scenario 1: recipe sweeps",
                               "Means over 3 seeds: forget accuracy minus the retrained model's (points) "
                               "and retain accuracy (%)."),
    "real_capitals": (UNLEARNING, "Scenario 2: real capitals (`real_capitals.py`)",
                      "Accuracies in %; forget LM loss in nats; MIA AUC: forget vs test facts (both known "
                      "before); time: update time."),
    "real_capitals_seeds": (UNLEARNING, "Scenario 2: EUL across training seeds",
                            "Accuracies in %."),
    "forget_target": (UNLEARNING, "Scenario 2: forget target and collateral damage (`forget_target.py`)",
                      "Figures after unlearning: accuracies in %, answer losses in nats; target: previous = "
                      "bounds 5 / 5 nats only (the default before issue 27), default = + forget margin 1 nat "
                      "+ retained-output penalty 10; other kind: held-out facts of another kind (reverse "
                      "split: the forward capitals); paraphrase / fewshot: forget accuracy under 3 paraphrases "
                      "/ a 3-fact prefix; mia auc loss: forgotten vs held-out known facts, vs unknown: vs facts "
                      "the model never knew (0.5 = indistinguishable); lm / kl bound: the per-token forget "
                      "bounds (older runs); over forgetting: the warning fired (forget accuracy below the lower "
                      "end of the 95 % Wilson interval of held-out accuracy); time: update time."),
    "tradeoff": (UNLEARNING, "Scenario 2: trade-off curve (`tradeoff.py`, figure `tradeoff.png`)",
                 "One run per point from the original model; epochs: the forgetting strength (training epochs); "
                 "eul-bounds: the library default (bounds 5 / 5 nats, the old default of issue 27), "
                 "eul-margin-penalty: + forget margin 1 nat + retained-output penalty 10 (the demo's); "
                 "`-layers`: the baselines in the adapter variant (the same rank-16 layers on the top 8 blocks, "
                 "base frozen; `-lr`: another learning rate than EUL's 2e-3), not full-parameter; accuracies in "
                 "%; general ppl: general-text perplexity; damaged: the trainer's damage check fired; time: "
                 "update time."),
    "movie_sentiment": (UNLEARNING, "Scenario 3: movie sentiment (`movie_sentiment.py`)",
                        "Accuracies in %; forget delta pts: forget accuracy minus the retrained model's; "
                        "forget loss in nats; forget quality: KS p-value against the retrained model; "
                        "time: update time (retrain: fine-tuning the gold standard)."),
    "movie_sentiment_sweep": (UNLEARNING, "Scenario 3: recipe sweep", "Accuracies in %, one run each."),
    "product_sentiment": (UNLEARNING, "Scenario 3b: product-review sentiment (`movie_sentiment.py --data products`)",
                          "Every sentence of 3 reviews forgotten. Accuracies in %; forget delta pts: forget "
                          "accuracy minus the retrained model's; forget loss in nats; forget quality: KS p-value "
                          "against the retrained model; time: update time (retrain: fine-tuning the gold "
                          "standard)."),
}


class ResultsError(ValueError):
    """A results file that cannot be read or does not follow the format of results_io.py."""


def load_results(directory=RESULTS_DIR) -> list[dict]:
    """Every ``*.json`` in ``directory``, checked, each with its file name under "_file"."""
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ResultsError(f"{path}: not readable as JSON ({err})") from err
        problem = _problem(data)
        if problem:
            raise ResultsError(f"{path}: {problem} (see the format in benchmarks/results_io.py)")
        out.append(dict(data, _file=path.name))
    return out


def _problem(data) -> str:
    if not isinstance(data, dict):
        return "not a JSON object"
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)}"
    if not isinstance(data["benchmark"], str) or not data["benchmark"]:
        return "'benchmark' is not a name"
    if data["date"] is not None and not isinstance(data["date"], str):
        return "'date' is neither a string nor null"
    for key in ("machine", "versions"):
        if not isinstance(data[key], dict):
            return f"{key!r} is not an object"
    if not isinstance(data["rows"], list) or not all(isinstance(r, dict) for r in data["rows"]):
        return "'rows' is not a list of objects"
    return ""


def cell(value) -> str:
    """A value as a Markdown table cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    if isinstance(value, dict) and set(value) == {"mean", "sd"}:
        return f"{cell(value['mean'])} ± {cell(value['sd'])}"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False)
    return str(value).replace("|", "\\|").replace("\n", " ")


def header(key: str) -> str:
    return cell(key.replace("_pct", " %").replace("_", " "))


def machine_label(machine: dict) -> str:
    if machine.get("description"):
        return machine["description"]
    name = machine.get("gpu") or machine.get("cpu") or "unknown machine"
    return f"{name}, {machine['cores']} cores" if machine.get("cores") and not machine.get("gpu") else name


def _newest_first(runs: list[dict]) -> list[dict]:
    dated = sorted((r for r in runs if r["date"]), key=lambda r: (r["date"], r["_file"]), reverse=True)
    undated = sorted((r for r in runs if not r["date"]), key=lambda r: r["_file"], reverse=True)
    return dated + undated


def column_order(rows: list[list[str]]) -> list[str]:
    """Every key of the rows once, in an order that keeps each row's order where the rows agree
    (ties and conflicts: the key seen first comes first)."""
    first = {}
    after = {}  # key -> keys that some row puts before it
    for keys in rows:
        for i, key in enumerate(keys):
            first.setdefault(key, len(first))
            after.setdefault(key, set()).update(keys[:i])
    order, left = [], sorted(first, key=first.get)
    while left:
        ready = [k for k in left if not (after[k] & set(left))] or left  # a conflict: take the earliest
        order.append(ready[0])
        left.remove(ready[0])
    return order


def table(benchmark: str, runs: list[dict]) -> str:
    """The Markdown section of one benchmark."""
    _, title, about = BENCHMARKS.get(benchmark, (MAIN, f"`{benchmark}`", ""))
    runs = _newest_first(runs)
    columns = column_order([list(row) for run in runs for row in run["rows"]])
    lines = [f"### {title}", ""] + ([about, ""] if about else [])
    lines.append("| run | date | machine | " + " | ".join(header(c) for c in columns) + " |")
    lines.append("|---|---|---|" + "---|" * len(columns))
    for number, run in enumerate(runs, 1):
        date = (run["date"] or "–")[:10]
        for row in run["rows"]:
            lines.append(f"| {number} | {date} | {cell(machine_label(run['machine']))} | "
                         + " | ".join(cell(row.get(c)) for c in columns) + " |")
    lines.append("")
    for number, run in enumerate(runs, 1):
        versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items() if v) or "versions not recorded"
        parts = [f"`results/{run['_file']}`", f"`{run['command']}`" if run["command"] else "no command", versions]
        parts += [run[k] for k in ("source", "notes") if run.get(k)]
        lines.append(f"{number}. " + "; ".join(str(p) for p in parts) + ("" if parts[-1].endswith(".") else "."))
    return "\n".join(lines)


def render(results: list[dict], readme: str = MAIN) -> str:
    """The generated text for ``readme``: the tables of its benchmarks, in BENCHMARKS' order, then any
    benchmark BENCHMARKS does not name (main README only)."""
    by_name: dict[str, list] = {}
    for r in results:
        by_name.setdefault(r["benchmark"], []).append(r)
    names = [n for n, (where, _, _) in BENCHMARKS.items() if where == readme and n in by_name]
    if readme == MAIN:
        names += sorted(n for n in by_name if n not in BENCHMARKS)
    sections = [table(n, by_name[n]) for n in names] or ["(no results yet)"]
    note = "<!-- generated by `python benchmarks/tables.py` from benchmarks/results/*.json: edit those, not this -->"
    return "\n\n".join([note, *sections])


def replace_tables(text: str, tables: str, where: str = "README") -> str:
    """``text`` with everything between the markers replaced by ``tables``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ResultsError(f"{where}: needs one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{tables}\n{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a README's tables are out of date")
    ap.add_argument("--results", default=str(RESULTS_DIR), help="folder of results files")
    args = ap.parse_args(argv)
    try:
        results = load_results(args.results)
        texts = {path: path.read_text() for path in READMES.values()}
        new = {path: replace_tables(text, render(results, which), str(path))
               for (which, path), text in zip(READMES.items(), texts.values())}
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stale = [path for path in texts if new[path] != texts[path]]
    if args.check and stale:
        print(f"out of date with {args.results}: " + ", ".join(map(str, stale))
              + "; run python benchmarks/tables.py", file=sys.stderr)
        return 1
    if not args.check:
        for path in stale:
            path.write_text(new[path])
    print(("updated " + ", ".join(map(str, stale))) if stale else "tables up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
