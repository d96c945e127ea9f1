"""``unlearn-fast eval``: forget / retain figures of a model with or without layers, and the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from ..api import example_labels
from ..errors import UnlearnFastError
from ..eval.evaluation import HELDOUT, evaluate_sets
from ..eval.logs import as_result, check_logs_path, check_sets, load_logs, save_logs
from ..eval.report import build_report, evaluate_for_report, write_report
from ..io.artifacts import (
    BASELINE_FILE, MANIFEST_FILE, WEIGHTS_FILE, LazyTensors, load_layers, load_layers_together, read_manifest
)
from ..io.atomic import ensure_directory
from ..model.family import detect_task
from ..train.data import load_examples
from ..train.encoding import mode_of_record, uses_chat_template
from ..train.trainer import weight_damage
from .common import add_chat_template_arg, data_columns, general_text, load_base, model_verb_parser, quiet_progress


def add_parser(sub) -> None:
    p = model_verb_parser(sub, "eval", help="measure forget / retain figures of a model, with or without layers",
                          description="Evaluate a base model, or the base with saved unlearning layers "
                                      "(--layers), on forget and retain sets.",
                          data_required=False)
    p.add_argument("--layers", metavar="DIR", nargs="+",
                   help="unlearning artifact(s) to attach; several are active together (summed in each "
                        "block), e.g. to compare K requests' layers with their fused layer")
    add_chat_template_arg(p, default=None,
                          default_help="default: as the --layers artifact's manifest records it was trained, a "
                                       "warning where the option differs from it; auto without --layers")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' loading bars)")
    g = p.add_argument_group("report (membership inference, gold standard, comparison of methods)")
    g.add_argument("--test", metavar="FILE", help="held-out examples the model never saw: the test column and "
                                                  "the non-members of the membership-inference attacks")
    g.add_argument("--retrained", metavar="DIR", help="model directory retrained without the forget set "
                                                      "(forget quality and gaps are measured against it; forget "
                                                      "quality on the loss, and on TOFU's truth ratio where the "
                                                      "forget set has perturbed answers)")
    g.add_argument("--retain-logs", metavar="FILE",
                   help="the retrained model's statistics saved by --save-logs, used instead of --retrained "
                        "(forget quality, privleak and gaps without loading that model)")
    g.add_argument("--save-logs", metavar="FILE",
                   help="write the evaluated model's (--model, with --layers if given) per-example forget-set "
                        "statistics and figures here, for --retain-logs; run it on the retrained model, with "
                        "--test for the membership-inference AUCs privleak needs")
    g.add_argument("--compare", nargs="+", metavar="NAME=PATH", default=[],
                   help="more methods to put in the report: artifact directories or model directories")
    g.add_argument("--report", metavar="DIR", help="write report.json, report.md (Table 2) and report.png here")
    g.add_argument("--metric", default=None,
                   help="figure shown in the table (default: accuracy; Q_A_ROUGE, Q_A_Prob, exact_match, "
                        "loss ...)")
    g.add_argument("--max-new-tokens", type=int, default=8, help="greedy completion length (default 8)")


def run(args) -> int:
    if args.no_progress:
        quiet_progress()
    if not (args.forget or args.retain or args.heldout):
        raise UnlearnFastError("eval needs --forget, --retain and/or --heldout data")
    reference_text = general_text(args)  # a bad --ppl-text fails before any model is loaded
    compared = (path for _, sep, path in (c.partition("=") for c in args.compare) if sep and path)
    artifacts = [*(args.layers or []), *compared]
    args.chat_template, trained = resolve_chat_template(args.chat_template, artifacts)
    if args.report or args.test or args.retrained or args.compare or args.retain_logs or args.save_logs:
        return _eval_report(args, reference_text)
    model, tokenizer, _ = load_base(args)
    if args.layers:
        if len(args.layers) == 1:
            load_layers(model, args.layers[0])
        else:
            load_layers_together(model, args.layers)
        for artifact in args.layers:
            warn_if_damaged(artifact)
    task = detect_task(model)
    if task == "causal" and args.chat_template == "auto" and "auto" in trained.values() \
            and not uses_chat_template(tokenizer, "auto"):
        warn("the layers were trained through a chat template, and this tokenizer has none: the figures use raw "
             "prompt + response")
    sets, labels = {}, {}
    for name, source in (("forget", args.forget), ("retain", args.retain), (HELDOUT, args.heldout)):
        if source:
            sets[name] = load_examples(source, data_columns(args, f"{name} set"), name=f"{name} set")
            labels[name] = example_labels(model, task, sets[name], f"{name} set", required=name == HELDOUT)
    figures = evaluate_sets(model, tokenizer, task, sets, labels, general_text=reference_text,
                            max_length=args.max_length, log=lambda m: print(m, file=sys.stderr),
                            chat_template=args.chat_template)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:24}{v:12.4f}")
    return 0


def _eval_report(args, reference_text) -> int:
    if args.report:  # a report directory that cannot be written fails now, not after the evaluation
        ensure_directory(args.report)
    sets = {}
    for name, source in (("forget", args.forget), ("retain", args.retain), ("test", args.test),
                         (HELDOUT, args.heldout)):
        if source:
            sets[name] = load_examples(source, data_columns(args, f"{name} set"), name=f"{name} set")
    compare = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UnlearnFastError(f"--compare takes NAME=PATH, got {item!r}")
        compare[name] = path
    for artifact in [*(args.layers or []), *compare.values()]:
        if (Path(artifact) / MANIFEST_FILE).is_file():  # (model directories have no unlearning layers)
            warn_if_damaged(artifact)
    logs = _retain_logs(args, sets, compare)
    results, times, retrained = evaluate_for_report(
        lambda: load_base(args)[:2], sets, layers=_single_layers(args), retrained=args.retrained, compare=compare,
        labels_for=lambda model, task, name, ex: example_labels(model, task, ex, f"{name} set", required=False),
        general_text=reference_text, max_length=args.max_length, max_new_tokens=args.max_new_tokens, log=lambda m: print(m, file=sys.stderr),
        chat_template=args.chat_template)
    if args.save_logs:  # the model under --model (with its --layers): the first one after "original" if any
        subject = list(results)[1] if args.layers else "original"
        path = save_logs(results[subject], sets, args.save_logs,
                         meta={"model": args.model, "layers": args.layers, "method": subject,
                               "chat_template": args.chat_template})
        print(f"retain logs written: {path}", file=sys.stderr)
    if logs is not None:
        results[RETRAINED], times[RETRAINED], retrained = as_result(logs), None, RETRAINED
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
                                                 if q.startswith("forget_quality") or q == "privleak"}}
                          for k, v in report["methods"].items()}, indent=2))
    return 0


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def trained_chat_template(path) -> Optional[str]:
    """How an artifact's (or a full-model baseline's) rows were encoded, as its manifest records it
    (:func:`unlearn_fast.train.encoding.mode_of_record`): ``auto`` / ``none``; ``?`` when unreadable; None
    for a directory this package did not train (no manifest)."""
    for name in (MANIFEST_FILE, BASELINE_FILE):
        file = Path(path) / name
        if file.is_file():
            try:
                record = json.loads(file.read_text()).get("chat_template")
            except (OSError, ValueError, AttributeError):
                return "?"
            return mode_of_record(record) or "?"
    return None


def resolve_chat_template(given: Optional[str], artifacts) -> tuple[str, dict]:
    """The chat-template mode to evaluate with, and each artifact's trained mode (:func:`trained_chat_template`).

    ``given`` (--chat-template) wins, with a warning for each artifact trained otherwise; without it, the
    artifacts' own mode where they agree, else ``auto`` with a warning; ``auto`` without artifacts."""
    trained = {str(a): m for a in artifacts if (m := trained_chat_template(a)) is not None}
    if given is not None:
        for artifact, mode in trained.items():
            if mode != given:
                how = {"auto": "through the chat template", "none": "without a chat template"}.get(mode, "(unknown)")
                warn(f"{artifact} was trained {how}; evaluating with --chat-template {given}, so the figures may "
                     f"see other tokens than training did")
        return given, trained
    modes = set(trained.values())
    if not modes:
        return "auto", trained
    if len(modes) == 1 and "?" not in modes:
        return modes.pop(), trained
    warn("the artifacts were trained with different or unknown chat-template settings ("
         + ", ".join(f"{a}: {m}" for a, m in trained.items()) + "); evaluating with auto: choose with --chat-template")
    return "auto", trained


RETRAINED = "retrain"  # the gold standard's name in a report, live (--retrained) or from --retain-logs


def _retain_logs(args, sets, compare):
    """The checked --retain-logs (None without), and a writable --save-logs path, before any evaluation."""
    if args.save_logs:
        if not args.forget:
            raise UnlearnFastError("--save-logs needs --forget: the logs hold the forget set's statistics")
        check_logs_path(args.save_logs)
    if not args.retain_logs:
        return None
    if args.retrained:
        raise UnlearnFastError("give --retrained or --retain-logs, not both")
    if RETRAINED in compare:
        raise UnlearnFastError(f"--compare names a method {RETRAINED!r}, the name of the retain logs' model")
    logs = load_logs(args.retain_logs)
    check_sets(logs, sets, ("forget", "test"), f"retain logs {args.retain_logs}")
    meta = logs.get("meta")
    logged = meta.get("chat_template") if isinstance(meta, dict) else None
    if logged is not None and logged != args.chat_template:
        warn(f"retain logs {args.retain_logs} were measured with --chat-template {logged}, this evaluation uses "
             f"{args.chat_template}: forget quality and privleak compare different encodings")
    return logs


def _single_layers(args):
    if args.layers and len(args.layers) > 1:
        raise UnlearnFastError("a report takes one --layers artifact; add others with --compare NAME=DIR")
    return args.layers[0] if args.layers else None


def warn_if_damaged(artifact) -> None:
    """One line on stderr when an artifact's manifest records damage (written with --allow-damage) or
    its layer weights are NaN / infinite / out of range (see :func:`unlearn_fast.train.trainer.weight_damage`)."""
    recorded = read_manifest(artifact).get("damage")
    tensors = LazyTensors(Path(artifact) / WEIGHTS_FILE)
    found = weight_damage([tensors[k] for k in tensors if k.endswith((".weight", ".bias"))])
    reasons = [*(recorded or []), *([found] if found else [])]
    if reasons:
        print(f"warning: {artifact} is damaged: {'; '.join(reasons)}", file=sys.stderr)
