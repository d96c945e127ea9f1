"""``unlearn-fast unlearn``: train unlearning layers for one deletion request (or run a baseline method)."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from typing import Optional

from ..api import example_labels, unlearn
from ..errors import UnlearnFastError
from ..eval.baselines import METHODS, RMU_COEFFICIENT, BaselineConfig, run_baseline, save_baseline
from ..io.artifacts import check_writable, model_fingerprint
from ..io.quantised import BASE_QUANTISATIONS, check_quantised_base
from ..model.family import detect_task
from ..model.layers import LayerConfig
from ..train import checkpoint, distributed
from ..train.data import load_examples
from ..train.set_checks import check_overlap
from ..train.objective import FORGET_TARGETS, ObjectiveConfig
from ..train.reporting import REPORTERS, default_report_dir
from ..train.step_cache import TEACHER_CACHES
from ..train.trainer import MAX_LR, WEIGHT_LIMIT, TrainConfig
from .common import (
    add_chat_template_arg, block_spec, data_columns, general_text, load_base, model_verb_parser, quiet_progress
)
from .config_file import resolved


def margin_value(text: str) -> Optional[float]:
    """``--forget-margin``: a number of nats >= 0, or ``off``."""
    if text.strip().lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nats or 'off', got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of nats >= 0 or 'off', got {text!r}")
    return value


def add_parser(sub) -> None:
    p = model_verb_parser(sub, "unlearn", help="train unlearning layers for one deletion request",
                          description="Train unlearning layers so the model forgets --forget and keeps --retain; "
                                      "write the layers, Gram matrices and a manifest to --out.",
                          data_required=True)
    p.add_argument("--out", "--output_dir", dest="out", required=True, help="artifact directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an unlearn-fast artifact")
    add_chat_template_arg(p)
    p.add_argument("--drop-overlap", action="store_true",
                   help="drop retained examples that also appear in the forget set (default: error)")
    g = p.add_argument_group("unlearning layers")
    g.add_argument("--rank", type=int, help="bottleneck width r (default: hidden size / reduction factor)")
    g.add_argument("--reduction-factor", type=int, default=16, help="d / r when --rank is not given (default 16)")
    g.add_argument("--activation", default="relu", choices=["relu", "gelu", "silu"],
                   help="the layers' activation between down- and up-projection")
    g.add_argument("--blocks", type=block_spec, default="all",
                   help="'all' (default), 'top:K' for the top K blocks, or indices like 0,5,11")
    g = p.add_argument_group("objective: L = α·KL_retain − KL_forget + λ·task_retain − γ·LM_forget")
    g.add_argument("--alpha", type=float, default=0.8, help="retained-data KL weight (default 0.8)")
    g.add_argument("--lam", "--lambda", dest="lam", type=float, default=1.0, help="retained task-loss weight (default 1.0)")
    g.add_argument("--gamma", type=float, default=None,
                   help="forget LM-loss weight (default 0.2); for classification models the weight of the "
                        "negated task loss on the forgotten labels (default 0; 1 under --forget-target matched, "
                        "which --forget-target auto picks for a classifier given --heldout)")
    g.add_argument("--forget-kl-weight", type=float, default=1.0, help="forget KL weight (default 1; 0 turns it off)")
    g.add_argument("--forget-kl-bound", type=float, default=5.0, help="per-token cap on the maximised forget KL (nats)")
    g.add_argument("--forget-lm-bound", type=float, default=5.0, help="per-token cap on the maximised forget LM loss (nats)")
    g.add_argument("--target-reference", metavar="FILE", default=None,
                   help="rows to read --forget-target heldout / matched from instead of --heldout (default: "
                        "--heldout): for facts, facts of the same kind the model does not know, as a model that "
                        "never saw the forgotten ones would treat them; loaded like --heldout")
    g.add_argument("--forget-target", choices=list(FORGET_TARGETS), default="auto",
                   help="where a forgotten token stops being pushed: 'auto' (default): 'matched' for a "
                        "sequence classifier given --heldout (its test split) and for any model given "
                        "--target-reference, 'bound' otherwise; 'bound': at --forget-lm-bound / "
                        "--forget-kl-bound; 'heldout': at the held-out level (needs --heldout): before training "
                        "the LM bound becomes the original model's mean per-token loss on the held-out targets, "
                        "and the KL bound the least KL from the original at which a forgotten target is that "
                        "unlikely (the two given bounds are then ignored; see docs/design.md); 'matched': each "
                        "forgotten row is pushed until its mean loss reaches the held-out rows' loss of the same "
                        "rank (needs --heldout; the forgotten rows end with the held-out rows' loss "
                        "distribution; the bounds are set so they never stop a row first). With --heldout, a "
                        "warning reports over-forgetting: forget accuracy after below the lower end of the "
                        "95 %% Wilson interval of the held-out accuracy after")
    g.add_argument("--forget-margin", type=margin_value, default=None, metavar="NATS|off",
                   help="stop pushing a forgotten answer token once it is NATS below the model's most likely "
                        "other token, i.e. once the model would no longer give it, as a model that never saw "
                        "the fact would not (default off: push up to the bounds; the demo uses 1 with "
                        "--retain-output-weight 10: less damage to facts not forgotten, but fictitious facts "
                        "were barely forgotten with it; see docs/design.md)")
    g.add_argument("--retain-output-weight", type=float, default=0.0, metavar="MU",
                   help="weight of a penalty on the mean square of what the unlearning layers add on "
                        "retained inputs (default 0: off; the demo uses 10): the layers then act on the "
                        "forgotten facts rather than on every fact of their kind")
    g.add_argument("--forget-routes", type=int, default=ObjectiveConfig.forget_routes, metavar="N",
                   help="causal LMs: every epoch after the first, complete each forgotten prompt greedily with "
                        "the model being trained; where it still gives the answer further on (\"... the "
                        "country of Japan\"), train that completion as an extra forgotten row, up to N per "
                        "row (default %(default)s; 0: off; see docs/design.md)")
    g.add_argument("--paper-objective", action="store_true",
                   help="the paper's objective exactly: no sharpening guard, no forget margin, no "
                        "retained-output penalty, no forget routes, the fixed bounds (overrides --forget-margin, "
                        "--retain-output-weight and --forget-routes, and --forget-target auto)")
    g.add_argument("--subject-margin", type=float, default=1.0, metavar="NATS",
                   help="forgotten examples with generic prompts (--generic-prompts-column): forget only the "
                        "response tokens the real subject makes this many nats likelier than the generic "
                        "subjects do (default 1); what the model would answer about anyone is kept")
    g.add_argument("--temperature", type=float, default=1.0, help="KL softmax temperature")
    g = p.add_argument_group("training")
    g.add_argument("--schedule", choices=["mixed", "alternate"], default="mixed",
                   help="'alternate': the paper's retain epoch / forget epoch; 'mixed': both in every batch")
    g.add_argument("--epochs", type=int, default=3, help="passes over the larger set (mixed) or over both (alternate)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="rows per forward pass (per set in the mixed schedule; default 8)")
    g.add_argument("--accumulate", type=int, default=1, metavar="N",
                   help="micro-batches per optimiser step: each step makes the update of one batch of "
                        "N x --batch-size rows, holding --batch-size rows at a time (default 1)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the activations of the blocks above the lowest unlearning layer in the "
                        "backward pass instead of keeping them: less memory, about one more forward of "
                        "those blocks per step, the same losses (default: off); see `unlearn-fast plan`")
    g.add_argument("--teacher-cache", choices=list(TEACHER_CACHES), default="gpu",
                   help="where the teacher's outputs for each training row (and, with --blocks above block 0, "
                        "the frozen trunk's) are kept after their first step: 'gpu' (default): on the training "
                        "device, whatever it is; 'cpu': in CPU memory (pinned with CUDA), copied back each step; "
                        "'disk': a memory-mapped file in a temporary directory ($TMPDIR), removed after "
                        "training; 'off': nothing is kept, the teacher runs every step. The same losses in "
                        "every mode; see `unlearn-fast plan --teacher-cache`")
    g.add_argument("--report-to", choices=list(REPORTERS), default="none",
                   help="log every optimiser step's loss and terms (the effective forget-KL coefficient "
                        "too), learning rate, tokens/s and memory to tensorboard or wandb (optional packages: "
                        "pip install tensorboard / wandb; wandb honours WANDB_MODE=offline and WANDB_PROJECT) "
                        "(default: none)")
    g.add_argument("--report-dir", metavar="DIR",
                   help="where --report-to writes (default: runs/<--out's name>-<YYYYmmdd-HHMMSS> in the "
                        "current directory, beside the artifact rather than in it: --out is written whole at "
                        "the end); view with tensorboard --logdir runs")
    g.add_argument("--lr", type=float, default=1e-3,
                   help=f"AdamW learning rate (default 1e-3; at most {MAX_LR:g}: AdamW moves every weight by about "
                        "lr per step)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (default: none, all epochs)")
    g.add_argument("--seed", type=int, default=0, help="seed of the layers' initial weights and the batch order")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the trainer's, and transformers' loading / writing bars)")
    g.add_argument("--no-eval", action="store_true",
                   help="skip the before/after evaluation (the damage check then sees only a NaN / infinite "
                        "loss and out-of-range weights, not the retain loss)")
    g.add_argument("--allow-damage", action="store_true",
                   help="write the result even when it is damaged (default: off: stop with an error and write "
                        "nothing when the loss or the weights become NaN / infinite, a weight exceeds "
                        f"{WEIGHT_LIMIT:g}, or the retain loss after is above before + max(1 nat, 50 %%)); the "
                        "damage is recorded in the manifest")
    g = p.add_argument_group("several processes and checkpoints",
                             "under torchrun (torchrun --nproc_per_node N -m unlearn_fast.cli unlearn ...) every "
                             "rank trains on its share of each global batch (the batch of one process), the "
                             "layers' gradients and Gram matrices are summed, and rank 0 writes the artifact; "
                             "the baselines (--method) run the same way, with --train-params full or layers")
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
    g = p.add_argument_group("method (baselines to compare EUL with; see unlearn_fast.eval.baselines)")
    g.add_argument("--method", choices=list(METHODS), default="eul",
                   help="eul (default): unlearning layers; retrain: fresh model trained on --retain only (gold "
                        "standard, small models); finetune: train on --retain only; ga: gradient ascent on "
                        "--forget; graddiff: ga + retain loss; npo: negative preference optimisation + retain loss; "
                        "simnpo: length-normalised, reference-free NPO with a margin + retain loss; rmu: steer a "
                        "block's hidden states on --forget towards a scaled random vector, keep them on --retain "
                        "(causal LMs); idk: train the --forget prompts to answer with a shipped refusal + retain loss")
    g.add_argument("--train-params", choices=["full", "layers"], default="full",
                   help="baselines: train every weight (full, default; --out becomes a model directory) or "
                        "unlearning layers only (layers; --out is an artifact)")
    g.add_argument("--beta", type=float, default=0.1, help="NPO / SimNPO inverse temperature β (default 0.1)")
    g.add_argument("--retain-weight", type=float, default=1.0,
                   help="graddiff / npo / simnpo / rmu / idk: retain term weight (default 1)")
    g.add_argument("--forget-weight", type=float, default=1.0,
                   help="ga / graddiff / npo / simnpo / rmu / idk: forget term weight (default 1)")
    g.add_argument("--simnpo-margin", type=float, default=0.0, metavar="DELTA",
                   help="simnpo: margin δ subtracted from each forget answer's mean per-token loss, "
                        "L_forget = -(2/β)·log σ(β·(loss - δ)) (default 0)")
    g.add_argument("--rmu-layer", type=int, default=None, metavar="BLOCK",
                   help="rmu: index of the block whose output is steered (default: none, the middle block, "
                        "n_blocks // 2)")
    g.add_argument("--rmu-coefficient", type=float, default=RMU_COEFFICIENT, metavar="C",
                   help=f"rmu: steering coefficient c, the length of the random target vector (default {RMU_COEFFICIENT:g}; "
                        "it depends on the model's activation scale)")


def run(args) -> int:
    options = resolved(args)  # as given (the run adjusts args.device below), for the manifest
    if args.no_progress:
        quiet_progress()
    if args.dtype in BASE_QUANTISATIONS:  # before the data or any weight is read
        if args.shard_base:
            raise UnlearnFastError(f"--dtype {args.dtype} quantises the frozen base, which --shard-base cannot "
                                   "shard: leave one of them out")
        if args.method != "eul" and args.train_params == "full":
            raise UnlearnFastError(f"--dtype {args.dtype} quantises the base's weights, which --method {args.method} "
                                   "cannot then train (--train-params full, the default): add --train-params "
                                   "layers, or use --dtype bfloat16")
        check_quantised_base(args.dtype, args.device)
    if args.method != "eul":
        if args.shard_base or args.checkpoint_dir:
            # under torchrun they run data parallel (every rank a share of each batch), with their whole
            # model on every rank: a sharded base would leave a full-parameter baseline nothing to train
            raise UnlearnFastError("the baselines run without checkpoints and with the whole model on every rank: "
                                   "leave out --shard-base / --checkpoint-dir (under torchrun they run data "
                                   "parallel)")
        if args.heldout or args.ppl_text:
            raise UnlearnFastError("the baselines do not evaluate: leave out --heldout / --ppl-text, and evaluate "
                                   "the output with 'unlearn-fast eval --heldout FILE'")
        if args.target_reference:
            raise UnlearnFastError("--target-reference sets EUL's forget target: the baselines have none")
        return _cmd_baseline(args)
    check_outputs(args)
    layers = LayerConfig(rank=args.rank, reduction_factor=args.reduction_factor, activation=args.activation,
                         blocks=args.blocks)
    objective = ObjectiveConfig(alpha=args.alpha, lam=args.lam, gamma=args.gamma,
                                forget_kl_weight=args.forget_kl_weight, forget_kl_bound=args.forget_kl_bound,
                                forget_lm_bound=args.forget_lm_bound, temperature=args.temperature,
                                subject_margin=args.subject_margin, forget_target=args.forget_target,
                                forget_margin=args.forget_margin, retain_output_weight=args.retain_output_weight,
                                forget_routes=args.forget_routes)
    if args.paper_objective:
        objective = replace(objective, sharpening_guard=False, forget_margin=None, retain_output_weight=0.0,
                            forget_routes=0,
                            forget_target="bound" if args.forget_target == "auto" else args.forget_target)
    training = TrainConfig(epochs=args.epochs, schedule=args.schedule, batch_size=args.batch_size, lr=args.lr,
                           max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress,
                           checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                           resume=args.resume, shard_base=args.shard_base, compile_blocks=args.compile,
                           accumulate=args.accumulate, gradient_checkpointing=args.gradient_checkpointing,
                           teacher_cache=args.teacher_cache, **report_options(args))

    # the user's data is checked before a model is loaded (which can take a while)
    forget = load_examples(args.forget, data_columns(args, "forget set"), name="forget set")
    retain = load_examples(args.retain, data_columns(args, "retain set"), name="retain set")
    check_overlap(forget, retain, drop=args.drop_overlap)
    heldout = load_examples(args.heldout, data_columns(args, "heldout set"), name="heldout set") if args.heldout else None
    reference = (load_examples(args.target_reference, data_columns(args, "target reference set"),
                               name="target reference set") if args.target_reference else None)
    reference_text = general_text(args)
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
        model, tokenizer, name = load_base(args)
        result = unlearn(model, tokenizer, forget, retain, out=args.out, overwrite=args.overwrite,
                         model_name=name, columns=data_columns(args, "forget set"), drop_overlap=args.drop_overlap, layers=layers,
                         objective=objective, training=training, max_length=args.max_length,
                         chat_template=args.chat_template,
                         evaluate=not args.no_eval, allow_damage=args.allow_damage, heldout=heldout,
                         target_reference=reference, general_text=reference_text, run_config=options)
        if distributed.is_main():
            _print_figures(result.metrics)
            print(f"artifact written to {result.out}")
    finally:
        distributed.shutdown()
    return 0


def report_options(args) -> dict:
    """TrainConfig's report_to / report_dir from --report-to / --report-dir (see train.reporting)."""
    if args.report_to == "none":
        return {"report_to": "none"}
    return {"report_to": args.report_to, "report_dir": str(args.report_dir or default_report_dir(args.out))}


def check_outputs(args) -> None:
    """Check every output path (created, written in) before any data or model is loaded; --out may
    hold neither the inputs nor the checkpoints (--overwrite would delete them)."""
    if args.checkpoint_dir:
        checkpoint.prepare(args.checkpoint_dir)
    check_writable(args.out, args.overwrite, [args.model, args.forget, args.retain, args.checkpoint_dir])


def _cmd_baseline(args) -> int:
    check_outputs(args)
    config = BaselineConfig(method=args.method, params=args.train_params, alpha=args.retain_weight,
                            gamma=args.forget_weight, beta=args.beta, simnpo_margin=args.simnpo_margin,
                            rmu_layer=args.rmu_layer, rmu_coefficient=args.rmu_coefficient,
                            layers=LayerConfig(rank=args.rank, reduction_factor=args.reduction_factor,
                                               activation=args.activation, blocks=args.blocks))
    training = TrainConfig(epochs=args.epochs, schedule=args.schedule, batch_size=args.batch_size, lr=args.lr,
                           max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress,
                           compile_blocks=args.compile, accumulate=args.accumulate,
                           gradient_checkpointing=args.gradient_checkpointing, **report_options(args))
    forget = load_examples(args.forget, data_columns(args, "forget set"), name="forget set")
    retain = load_examples(args.retain, data_columns(args, "retain set"), name="retain set")
    retain, _ = check_overlap(forget, retain, drop=args.drop_overlap)
    # under torchrun: join the process group (data parallel, as EUL); this rank's device
    device = distributed.init_from_env(args.device)
    try:
        if device is not None:
            args.device = device
        model, tokenizer, name = load_base(args)
        task = detect_task(model)
        fingerprint = model_fingerprint(model)
        result = run_baseline(model, tokenizer, forget, retain, config, training, max_length=args.max_length,
                              forget_labels=example_labels(model, task, forget, "forget set", required=False),
                              retain_labels=example_labels(model, task, retain, "retain set", required=False),
                              allow_damage=args.allow_damage, chat_template=args.chat_template)
        out = save_baseline(args.out, result, tokenizer, base_fingerprint=fingerprint, model_name=name,
                            overwrite=args.overwrite)
        t = result.training
        if distributed.is_main():
            world = distributed.world_size()
            print(f"{config.label}: {t.steps} steps in {t.update_time_s:.1f} s ({_rate(t.tokens, t.update_time_s)}"
                  f"{f', {world} ranks' if world > 1 else ''}); written to {out}")
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
        print(f"update time: {metrics['update_time_s']:.1f} s over {metrics['steps']} steps "
              f"({_rate(metrics.get('train_tokens', 0), metrics['update_time_s'])})")


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:,.0f} tokens/s" if seconds > 0 else f"{tokens:,} tokens"
