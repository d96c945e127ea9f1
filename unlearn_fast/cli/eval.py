"""``unlearn-fast eval``: forget / retain figures of a model with or without layers, and the report."""

from __future__ import annotations

import json
import sys

from ..api import example_labels
from ..errors import UnlearnFastError
from ..eval.evaluation import evaluate_sets
from ..eval.report import build_report, evaluate_for_report, write_report
from ..io.artifacts import load_layers, load_layers_together
from ..model.family import detect_task
from ..train.data import load_examples
from .common import add_data_args, add_model_args, data_columns, load_base


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure forget / retain figures of a model, with or without layers",
                       description="Evaluate a base model, or the base with saved unlearning layers "
                                   "(--layers), on forget and retain sets.")
    add_model_args(p)
    add_data_args(p, required=False)
    p.add_argument("--layers", metavar="DIR", nargs="+",
                   help="unlearning artifact(s) to attach; several are active together (summed in each "
                        "block), e.g. to compare K requests' layers with their fused layer")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    g = p.add_argument_group("report (membership inference, gold standard, comparison of methods)")
    g.add_argument("--test", metavar="FILE", help="held-out examples the model never saw: the test column and "
                                                  "the non-members of the membership-inference attacks")
    g.add_argument("--retrained", metavar="DIR", help="model directory retrained without the forget set "
                                                      "(forget quality and gaps are measured against it; forget "
                                                      "quality on the loss, and on TOFU's truth ratio where the "
                                                      "forget set has perturbed answers)")
    g.add_argument("--compare", nargs="+", metavar="NAME=PATH", default=[],
                   help="more methods to put in the report: artifact directories or model directories")
    g.add_argument("--report", metavar="DIR", help="write report.json, report.md (Table 2) and report.png here")
    g.add_argument("--metric", default=None,
                   help="figure shown in the table (default: accuracy; rougeL_recall, exact_match, loss ...)")
    g.add_argument("--max-new-tokens", type=int, default=8, help="greedy completion length (default 8)")


def run(args) -> int:
    if not (args.forget or args.retain):
        raise UnlearnFastError("eval needs --forget and/or --retain data")
    if args.report or args.test or args.retrained or args.compare:
        return _eval_report(args)
    model, tokenizer, _ = load_base(args)
    if args.layers:
        if len(args.layers) == 1:
            load_layers(model, args.layers[0])
        else:
            load_layers_together(model, args.layers)
    task = detect_task(model)
    sets, labels = {}, {}
    for name, source in (("forget", args.forget), ("retain", args.retain)):
        if source:
            sets[name] = load_examples(source, data_columns(args, f"{name} set"), name=f"{name} set")
            labels[name] = example_labels(model, task, sets[name], f"{name} set", required=False)
    figures = evaluate_sets(model, tokenizer, task, sets, labels, max_length=args.max_length)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:24}{v:12.4f}")
    return 0


def _eval_report(args) -> int:
    sets = {}
    for name, source in (("forget", args.forget), ("retain", args.retain), ("test", args.test)):
        if source:
            sets[name] = load_examples(source, data_columns(args, f"{name} set"), name=f"{name} set")
    compare = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UnlearnFastError(f"--compare takes NAME=PATH, got {item!r}")
        compare[name] = path
    results, times, retrained = evaluate_for_report(
        lambda: load_base(args)[:2], sets, layers=_single_layers(args), retrained=args.retrained, compare=compare,
        labels_for=lambda model, task, name, ex: example_labels(model, task, ex, f"{name} set", required=False),
        max_length=args.max_length, max_new_tokens=args.max_new_tokens, log=lambda m: print(m, file=sys.stderr))
    metric = args.metric or "accuracy"
    report = build_report(results, times=times, retrained=retrained, primary_metric=metric,
                          title=f"unlearn-fast eval: {args.model}",
                          meta={"model": args.model, **{f"{k} set": f"{len(v)} examples" for k, v in sets.items()}})
    if args.report:
        written = write_report(report, args.report)
        print("report written: " + ", ".join(str(p) for p in written.values()))
    if args.json or not args.report:
        # each method's figures, with its forget quality against the retrained model where there is one
        print(json.dumps({k: {**v["figures"], **{q: x for q, x in (v.get("vs_retrained") or {}).items()
                                                 if q.startswith("forget_quality")}}
                          for k, v in report["methods"].items()}, indent=2))
    return 0


def _single_layers(args):
    if args.layers and len(args.layers) > 1:
        raise UnlearnFastError("a report takes one --layers artifact; add others with --compare NAME=DIR")
    return args.layers[0] if args.layers else None
