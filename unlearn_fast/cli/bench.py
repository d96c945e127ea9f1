"""``unlearn-fast bench tofu``: a TOFU-shaped run (unlearn one forget split with one method, evaluate with the
field's figures, write the report); ``--make-data DIR`` writes a small TOFU-shaped fictitious set.

The file layout, the sets and the figures are :mod:`unlearn_fast.eval.tofu`'s; the unlearning goes through
:func:`unlearn_fast.api.unlearn` (``--method eul``) or :func:`unlearn_fast.eval.baselines.run_baseline`.
"""

from __future__ import annotations

import sys

from ..api import unlearn
from ..errors import UnlearnFastError
from ..eval.baselines import RMU_COEFFICIENT, BaselineConfig, run_baseline, save_baseline
from ..eval.logs import check_logs_path, check_sets, load_logs, save_logs
from ..eval.report import write_report
from ..eval.tofu import (
    FORGET, QUESTIONS_PER_AUTHOR, SPLITS, TEST, eval_sets, evaluate_tofu, make_tofu_data, read_tofu, summary_markdown,
    tofu_report, train_sets
)
from ..io.artifacts import check_writable, model_fingerprint
from ..io.atomic import ensure_directory
from ..model.family import detect_task
from ..model.layers import LayerConfig
from ..train import distributed
from ..train.trainer import MAX_LR, TrainConfig
from .common import add_chat_template_arg, block_spec, load_base, quiet_progress

TOFU_METHODS = ("eul", "graddiff", "npo", "simnpo", "rmu", "idk")
FULL_LR, LAYERS_LR = 1e-5, 1e-3  # the learning rate when none is given: full-parameter baselines / layers


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark runs: a TOFU-shaped unlearning run and its report",
                       description="Benchmark runs with the field's data layout and figures.")
    benches = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    t = benches.add_parser(
        "tofu", help="unlearn a TOFU forget split with one method and report TOFU's figures",
        description="Read TOFU's files (JSON lines, one per TOFU config: forgetNN, retainMM, forgetNN_perturbed, "
                    "retain_perturbed, and optionally real_authors_perturbed, world_facts_perturbed, holdoutNN) from "
                    "--data, evaluate --model, unlearn --split with --method, evaluate again, and write report.json, "
                    "report.md and report.png to --out. --make-data DIR writes a small TOFU-shaped fictitious set "
                    "instead (TOFU itself is not shipped). See docs/usage.md.")
    g = t.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="directory of TOFU's files, NAME.json (JSON lines) per config")
    g.add_argument("--split", choices=list(SPLITS), default="forget10",
                   help="forget split; its retain split is the complement (forget01 ↔ retain99, forget05 ↔ "
                        "retain95, forget10 ↔ retain90)")
    g.add_argument("--make-data", metavar="DIR",
                   help="write a TOFU-shaped fictitious set to DIR (every file a run reads, for each split; "
                        "deterministic from --seed) and stop")
    g.add_argument("--authors", type=int, default=20, help="--make-data: fictitious authors (TOFU has 200)")
    g.add_argument("--questions", type=int, default=QUESTIONS_PER_AUTHOR,
                   help="--make-data: questions per author, 1 to 5 (TOFU has 20)")
    g.add_argument("--max-length", type=int, default=512, help="tokens kept per question + answer")
    g.add_argument("--retain-sample", type=int, default=None, metavar="N",
                   help="retained questions trained on, drawn with --seed (default: none given, as many as the "
                        "forget split has, as open-unlearning pairs each forgotten question with a retained one; "
                        "0: all of the retain split)")
    g = t.add_argument_group("model and method")
    g.add_argument("--model", help="local transformers model directory, or 'smollm2' for the embedded default "
                                   "(required unless --make-data)")
    g.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="base model dtype (default: float32 on CPU, bfloat16 on GPU)")
    add_chat_template_arg(t)
    g.add_argument("--method", choices=list(TOFU_METHODS), default="eul",
                   help="eul: unlearning layers (unlearn-fast unlearn); the baselines as 'unlearn --method'")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --model as it is, without unlearning (with --save-logs: the retain logs of a "
                        "model retrained on the retain split)")
    g.add_argument("--train-params", choices=["full", "layers"], default="full",
                   help="baselines: train every weight (full, default, as TOFU's baselines) or unlearning "
                        "layers only")
    g.add_argument("--rank", type=int, help="unlearning layers' bottleneck width r (default: hidden size / 16)")
    g.add_argument("--blocks", type=block_spec, default="all",
                   help="unlearning layers: 'all' (default), 'top:K', or indices like 0,5,11")
    g.add_argument("--beta", type=float, default=0.1, help="NPO / SimNPO inverse temperature β (default 0.1)")
    g.add_argument("--retain-weight", type=float, default=1.0, help="baselines: retain term weight (default 1)")
    g.add_argument("--forget-weight", type=float, default=1.0, help="baselines: forget term weight (default 1)")
    g.add_argument("--simnpo-margin", type=float, default=0.0, help="SimNPO margin δ (default 0)")
    g.add_argument("--rmu-layer", type=int, default=None, help="RMU: the block steered (default: none, the middle one)")
    g.add_argument("--rmu-coefficient", type=float, default=RMU_COEFFICIENT,
                   help=f"RMU steering coefficient (default {RMU_COEFFICIENT:g})")
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5, help="passes over the larger training set (default 5)")
    g.add_argument("--batch-size", type=int, default=8, help="rows per step from each set (default 8)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate, at most {MAX_LR:g} (default: none given, {FULL_LR:g} for "
                        f"full-parameter baselines, {LAYERS_LR:g} for unlearning layers)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (default: none, all epochs)")
    g.add_argument("--seed", type=int, default=0, help="training seed; with --make-data the data's seed (default 0)")
    g.add_argument("--allow-damage", action="store_true", help="keep a damaged result (see unlearn --help)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = t.add_argument_group("report and logs")
    g.add_argument("--out", metavar="DIR",
                   help="report directory (default: tofu-SPLIT-METHOD); the unlearned layers or model are written "
                        "in DIR/METHOD unless --no-save")
    g.add_argument("--overwrite", action="store_true",
                   help="replace DIR/METHOD if it is an unlearn-fast output; with --make-data, existing TOFU files")
    g.add_argument("--no-save", action="store_true", help="do not write the unlearned layers / model")
    g.add_argument("--retain-logs", metavar="FILE",
                   help="the retrained model's statistics (written by bench tofu --eval-only --save-logs on the "
                        "model trained on the retain split): forget quality and privleak are measured against them")
    g.add_argument("--save-logs", metavar="FILE",
                   help="write the evaluated model's per-example statistics here (the unlearned model, or --model "
                        "with --eval-only), for --retain-logs")
    g.add_argument("--max-new-tokens", type=int, default=64, help="greedy answer length for ROUGE (default 64)")


def run(args) -> int:
    if args.bench == "tofu":
        return run_tofu(args)
    raise UnlearnFastError(f"unknown benchmark {args.bench!r}")  # pragma: no cover - argparse refuses it first


def method_label(args) -> str:
    if args.eval_only:
        return "original"
    if args.method == "eul":
        return "eul"
    return args.method if args.train_params == "full" else f"{args.method}-layers"


def run_tofu(args) -> int:
    if args.no_progress:
        quiet_progress()
    if args.make_data:
        paths = make_tofu_data(args.make_data, seed=args.seed, authors=args.authors, questions=args.questions,
                               overwrite=args.overwrite)
        print(f"TOFU-shaped set written to {args.make_data}: {', '.join(p.name for p in paths.values())}")
        return 0
    if not args.data or not args.model:
        raise UnlearnFastError("bench tofu needs --data DIR and --model M (or --make-data DIR to write a TOFU-shaped "
                               "set)")
    if distributed.launched_world_size() > 1:
        raise UnlearnFastError("bench tofu runs in one process: launch it without torchrun ('unlearn --method ...' "
                               "runs data parallel under torchrun)")
    # everything given is checked before the model is loaded
    data = read_tofu(args.data, args.split)
    logs = load_logs(args.retain_logs) if args.retain_logs else None
    if args.save_logs:
        check_logs_path(args.save_logs)
    label = method_label(args)
    out = ensure_directory(args.out or f"tofu-{args.split}-{label}")
    saved = None if args.eval_only or args.no_save else out / label
    if saved is not None:
        check_writable(saved, args.overwrite, [args.model, args.data])
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731

    model, tokenizer, name = load_base(args)
    task = detect_task(model)
    sets = eval_sets(data, tokenizer, args.chat_template)
    if logs is not None:
        check_sets(logs, sets, (FORGET, TEST), f"retain logs {args.retain_logs}")

    def evaluate(m):
        return evaluate_tofu(m, tokenizer, task, sets, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                             chat_template=args.chat_template)

    log(f"evaluating {name} on {', '.join(f'{k} ({len(v)})' for k, v in sets.items())} ...")
    results, times = {"original": evaluate(model)}, {"original": None}
    if not args.eval_only:
        forget, retain = train_sets(data, tokenizer, args.chat_template, args.retain_sample, args.seed)
        trained, seconds = unlearn_split(args, model, tokenizer, name, forget, retain, saved, log)
        log(f"evaluating {label} ...")
        results[label], times[label] = evaluate(trained), seconds
    if args.save_logs:
        path = save_logs(results[label], sets, args.save_logs,
                         meta={"model": args.model, "method": label, "benchmark": f"tofu {args.split}",
                               "chat_template": args.chat_template})
        log(f"retain logs written: {path}")
    report = tofu_report(results, data, sets, times=times, logs=logs, title=f"TOFU {args.split}: {label} on {name}",
                         meta={"model": name, "split": args.split, "method": label, "data": str(args.data),
                               "chat template": args.chat_template,
                               **({"unlearned output": str(saved)} if saved is not None else {}),
                               **{f"{k} set": f"{len(v)} questions" for k, v in sets.items()}})
    written = write_report(report, out)
    print(summary_markdown(report["tofu"]["summary"], report["tofu"]["absent"], args.split))
    print("report written: " + ", ".join(str(p) for p in written.values()))
    return 0


def unlearn_split(args, model, tokenizer, name, forget, retain, saved, log):
    """Unlearn ``forget`` from ``model`` keeping ``retain``, with ``--method``; write the result to ``saved``
    (unless None). Returns (the unlearned model, its update time in seconds)."""
    lr = args.lr if args.lr is not None else FULL_LR if args.method != "eul" and args.train_params == "full" \
        else LAYERS_LR
    training = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, max_steps=args.max_steps,
                           seed=args.seed, progress=not args.no_progress)
    layers = LayerConfig(rank=args.rank, blocks=args.blocks)
    if args.method == "eul":
        result = unlearn(model, tokenizer, forget, retain, out=saved, overwrite=args.overwrite, model_name=name,
                         layers=layers, training=training, max_length=args.max_length, evaluate=False,
                         allow_damage=args.allow_damage, chat_template=args.chat_template, log=log,
                         run_config={"bench": "tofu", "split": args.split, "data": str(args.data)})
        return result.model, result.training.update_time_s
    config = BaselineConfig(method=args.method, params=args.train_params, alpha=args.retain_weight,
                            gamma=args.forget_weight, beta=args.beta, simnpo_margin=args.simnpo_margin,
                            rmu_layer=args.rmu_layer, rmu_coefficient=args.rmu_coefficient, layers=layers)
    fingerprint = model_fingerprint(model)
    result = run_baseline(model, tokenizer, forget, retain, config, training, max_length=args.max_length,
                          allow_damage=args.allow_damage, log=log, chat_template=args.chat_template)
    if saved is not None:
        save_baseline(saved, result, tokenizer, base_fingerprint=fingerprint, model_name=name,
                      overwrite=args.overwrite, extra={"benchmark": {"name": "tofu", "split": args.split,
                                                                     "data": str(args.data)}})
    return result.model, result.training.update_time_s
