"""Padding fraction of the trainer's batches on the scenarios' data, with and without length bucketing.

    python benchmarks/padding.py            # scenarios 1 and 3 (no model run needed)
    python benchmarks/padding.py --capitals # also scenario 2 (asks SmolLM2 which capitals it knows)

For each scenario: its forget and retain rows encoded as the trainer encodes them, its batch size and
epochs, the batches ``batching.batches`` yields (mixed schedule: a retain group plus a forget group per
step), and the share of the padded token slots that are padding (``batching.padding_fraction``).
Prints a table; ``--json`` writes it, ``--results`` a results file (see results_io.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "unlearning"))
if HERE not in sys.path:
    sys.path.append(HERE)  # results_io

from unlearn_fast.train.encoding import encode  # noqa: E402
from unlearn_fast.train.batching import batches, padding_fraction  # noqa: E402
from unlearn_fast.train.trainer import TrainConfig  # noqa: E402
import results_io  # noqa: E402


def fractions(forget, retain, config: TrainConfig) -> dict:
    """Padding fraction of every batch of training, without and with bucketing."""
    out = {}
    for bucket in (False, True):
        groups = list(batches(forget, retain, dataclasses.replace(config, bucket_by_length=bucket)))
        out["bucketed" if bucket else "plain"] = padding_fraction(groups)
    return out


def fictitious_facts(chat_template: str = "none") -> tuple:
    import fictitious_facts as ff

    people = ff.make_people(240, seed=0)[:200]  # as the scenario: 200 training people of 240
    tokenizer = ff.make_tokenizer(people)
    order = random.Random(1).sample(range(len(people)), len(people))
    k = len(people) // 10  # the 10 % split
    forget = [e for i in order[:k] for e in people[i].facts()]
    retain = [e for i in order[k:] for e in people[i].facts()]
    enc = {name: encode(rows, tokenizer, "causal", forget=name == "forget", name=name, chat_template=chat_template)
           for name, rows in (("forget", forget), ("retain", retain))}
    return "1. fictitious facts (10 %)", enc["forget"], enc["retain"], ff.method_settings(False)["eul"]["training"]


def movie_sentiment() -> tuple:
    import movie_sentiment as ms

    sets = ms.split(ms.binarise(ms.read_snippets(ms.data_path())), n_retain=1500, n_test=500, seed=0)
    retain = random.Random(1).sample(sets["retain"], 500)[:200]  # what the unlearning methods train on
    tokenizer = ms.load_tokenizer()
    enc = {name: encode(rows, tokenizer, "classification", forget=name == "forget", name=name,
                        labels=ms.labels_of(rows), max_length=48)
           for name, rows in (("forget", sets["forget"]), ("retain", retain))}
    return "3. movie sentiment", enc["forget"], enc["retain"], ms.method_settings()["eul"]["training"]


def real_capitals(chat_template: str = "none") -> tuple:
    import real_capitals as rc

    from unlearn_fast.demo import build_sets
    from unlearn_fast.io.base_model import load_model

    model, tokenizer, _ = load_model("smollm2", device="cpu")
    sets = build_sets(model, tokenizer, log=lambda *a: None, chat_template=chat_template)
    enc = {name: encode(sets[name], tokenizer, "causal", forget=name == "forget", name=name,
                        chat_template=chat_template)
           for name in ("forget", "retain")}
    return "2. real capitals", enc["forget"], enc["retain"], rc.settings()["eul"]["training"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capitals", action="store_true", help="include scenario 2 (loads SmolLM2, ~1 min)")
    ap.add_argument("--json", default=None, help="write the table here")
    ap.add_argument("--chat-template", choices=["auto", "none"], default="none",
                    help="none (default): raw prompt + response, as the recorded results were measured; "
                         "auto: the tokenizer's chat template")
    results_io.add_argument(ap)
    args = ap.parse_args(argv)
    builders = [fictitious_facts, movie_sentiment] + ([real_capitals] if args.capitals else [])
    rows = []
    print("| Scenario | forget / retain rows | batch | epochs | padding, plain | padding, bucketed |")
    print("|---|---:|---:|---:|---:|---:|")
    for build in builders:
        try:
            # scenario 3 is a classifier: no prompt/response rows, no chat template
            name, forget, retain, config = (build() if build is movie_sentiment
                                            else build(chat_template=args.chat_template))
        except SystemExit as err:  # a scenario's optional package is missing: say so, go on
            print(f"| {build.__name__} | skipped: {err} |||||")
            continue
        f = fractions(forget, retain, config)
        rows.append({"scenario": name, "forget": len(forget), "retain": len(retain),
                     "batch_size": config.batch_size, "epochs": config.epochs, **f})
        print(f"| {name} | {len(forget)} / {len(retain)} | {config.batch_size} | {config.epochs} | "
              f"{100 * f['plain']:.1f} % | {100 * f['bucketed']:.1f} % |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    where = results_io.results_dir(args.results)
    if where and rows:
        table = [{"scenario": r["scenario"], "forget": r["forget"], "retain": r["retain"],
                  "batch_size": r["batch_size"], "epochs": r["epochs"], "padding_plain_pct": round(100 * r["plain"], 1),
                  "padding_bucketed_pct": round(100 * r["bucketed"], 1)} for r in rows]
        path = results_io.write_results(where, results_io.make_results(
            "padding", table, results_io.command_line(__file__, argv)))
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
