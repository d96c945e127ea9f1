"""The Python API: the same verbs as the CLI.

    from unlearn_fast import unlearn, load_model, load_layers

    model, tokenizer, name = load_model("smollm2")
    result = unlearn(model, tokenizer, forget="forget.jsonl", retain="retain.jsonl", out="layers/")
    print(result.metrics)
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .errors import DataError, TrainingError, UnlearnFastError
from .eval.evaluation import (HELDOUT, evaluate_sets, forget_unmoved, mean_loss, over_forgetting, retain_damage,
                              row_losses)
from .eval.general_text import GENERAL_TEXT
from .eval.metrics import answer_found
from .fusion.grams import collect_grams
from .fusion.closed_form import request_records
from .io.artifacts import check_writable, load_layers, load_layers_together, model_fingerprint, write_artifact
from .io.base_model import load_model
from .io.quantised import base_quantisation
from .io.adapters_export import write_adapters
from .io.export import check_format, provenance_record, write_hf
from .model.family import detect_task
from .model.layers import LayerConfig, attach, describe, detach, layer_state, layers_disabled
from .train import checkpoint, distributed
from .train.checkpoint import data_fingerprint
from .train.data import Columns, Example, load_examples
from .train.set_checks import check_overlap, fingerprint, resolve_labels
from .train.encoding import (
    chat_template_record, check_chat_template_mode, encode, pad_token_id, truncation_note
)
from .train.objective import EULObjective, ObjectiveConfig, heldout_bounds, matched_bounds, matched_targets
from .train.selection import select_subject_tokens
from .train.routes import ForgetRoutes, context_probes
from .train.step_cache import StepCache
from .train.trainer import TrainConfig, TrainResult, train
from .version import __version__


@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns: the model (layers attached), figures, and the artifact."""

    model: nn.Module
    metrics: dict[str, Any]
    manifest: dict
    training: TrainResult
    out: Optional[Path] = None
    grams: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def example_labels(model, task, examples: Sequence[Example], name: str, required: bool) -> Optional[list[int]]:
    if task != "classification":
        return None
    if not required and all(e.label is None for e in examples):
        return None
    label2id = getattr(model.config, "label2id", None)
    return resolve_labels(examples, label2id, name=name)


def unlearn(
    model: nn.Module,
    tokenizer,
    forget: Union[str, Path, Sequence],
    retain: Union[str, Path, Sequence],
    *,
    out: Union[str, Path, None] = None,
    overwrite: bool = False,
    model_name: Optional[str] = None,
    columns: Optional[Columns] = None,
    drop_overlap: bool = False,
    layers: Optional[LayerConfig] = None,
    objective: Optional[ObjectiveConfig] = None,
    training: Optional[TrainConfig] = None,
    max_length: int = 256,
    chat_template: str = "auto",
    evaluate: bool = True,
    heldout: Union[str, Path, Sequence, None] = None,
    target_reference: Union[str, Path, Sequence, None] = None,
    general_text: Optional[Sequence[str]] = GENERAL_TEXT,
    allow_damage: bool = False,
    run_config: Optional[dict] = None,
    log=print,
) -> UnlearnResult:
    """Train unlearning layers on ``model`` so it forgets ``forget`` and keeps ``retain``.

    ``forget`` / ``retain`` are CSV / JSONL / JSON paths, lists of strings or dicts, or
    ``datasets.Dataset`` objects. The base stays frozen; one unlearning layer is attached per
    selected block. With ``out``, the artifact (layers + Gram matrices + manifest) is written
    atomically there. Returns the model with its layers attached (active) and the figures.

    Forgotten prompt/response examples with ``generic_prompts`` are forgotten only where the subject
    matters: see :mod:`unlearn_fast.train.selection` and ``ObjectiveConfig.subject_margin``.

    Rows are cut at ``max_length`` tokens, capped at the model's context (one logged line says how
    many were cut). A damaged result raises TrainingError and writes nothing: a NaN / infinite loss,
    weights out of range (:func:`unlearn_fast.train.trainer.weight_damage`), or, when ``evaluate``,
    a retain loss far above its value before (:func:`unlearn_fast.eval.evaluation.retain_damage`).
    With ``allow_damage=True`` the result is kept (and written) anyway, the damage recorded in the
    manifest's ``damage`` list. ``run_config`` (the command line passes its resolved options, see
    :mod:`unlearn_fast.cli.config_file`) is stored in the manifest as it is.

    The reference figures beside forget and retain (when ``evaluate``): ``heldout``, examples like the
    forget set that the model knows and nobody asked to delete (for a classifier, a labelled test
    split; loaded like ``forget``), gives ``heldout_accuracy`` and ``heldout_loss``; ``general_text``
    (default: the shipped :data:`unlearn_fast.eval.general_text.GENERAL_TEXT`; None for none) gives
    ``general_perplexity`` (causal LMs). A forget-set loss that did not rise is logged as a warning
    (:func:`unlearn_fast.eval.evaluation.forget_unmoved`) and kept in the manifest's ``warnings``; so is
    over-forgetting, with ``heldout``: forget accuracy after below the lower end of the 95 % Wilson interval
    of the held-out accuracy after (:func:`unlearn_fast.eval.evaluation.over_forgetting`).
    ``ObjectiveConfig(forget_target="heldout")`` (needs ``heldout``) sets the per-token forget bounds from
    the model's loss on the held-out set before training
    (:func:`unlearn_fast.train.objective.heldout_bounds`); the manifest's objective records them.
    ``forget_target="matched"`` (needs ``heldout``) gives each forgotten row its own loss target, the
    held-out rows' loss of the same rank (:func:`unlearn_fast.train.objective.matched_targets`).
    ``target_reference`` (loaded like ``heldout``): the rows those two targets are read from instead of
    ``heldout`` — for facts, rows of the same kind the model does *not* know, which is how a model that
    never saw the forgotten facts would treat them; ``heldout`` then only gives the reported figures.
    The default ``forget_target="auto"`` is ``"matched"`` for a sequence classifier given ``heldout``
    and for any model given ``target_reference``, ``"bound"`` otherwise
    (:meth:`unlearn_fast.train.objective.ObjectiveConfig.resolved_forget_target`); the manifest's
    objective records the target used and ``forget_target_requested``.

    ``chat_template`` (causal LMs, prompt/response examples): ``"auto"`` encodes each example through the
    tokenizer's chat template where it has one (user turn = prompt, assistant turn = response; targets on
    the answer's tokens), for training and the figures alike, and generates answers after the template's
    generation prompt; ``"none"``: raw prompt + response. The manifest's ``chat_template`` records it
    (:func:`unlearn_fast.train.encoding.chat_template_record`); ``eval --layers`` follows it.
    """
    layers = layers or LayerConfig()
    objective = objective or ObjectiveConfig()
    if not distributed.is_main():  # under torchrun, rank 0 speaks for the job
        log = lambda *args, **kwargs: None  # noqa: E731
    training = training or TrainConfig()
    check_chat_template_mode(chat_template)
    # every output is checked (and what a killed run left cleaned) before any work is spent on it
    if training.checkpoint_dir:
        checkpoint.prepare(training.checkpoint_dir, log)
    if out is not None:
        inputs = [forget, retain, training.checkpoint_dir, model_name or getattr(model.config, "_name_or_path", None)]
        check_writable(out, overwrite, [p for p in inputs if isinstance(p, (str, Path)) and str(p)], log)
    task = detect_task(model)
    objective.resolved_gamma(task)  # a γ the task refuses fails here, before any work
    requested_target = objective.forget_target
    forget_set = load_examples(forget, columns, name="forget set")
    retain_set = load_examples(retain, columns, name="retain set")
    heldout_set = load_examples(heldout, columns and columns.for_set("heldout set"), name="heldout set") \
        if heldout is not None else []
    reference_set = heldout_set if target_reference is None else load_examples(
        target_reference, columns and columns.for_set("target reference set"), name="target reference set")
    retain_set, dropped = check_overlap(forget_set, retain_set, drop=drop_overlap)
    if dropped:
        log(f"dropped {dropped} retained example(s) that are also in the forget set")
    if not retain_set:
        raise DataError("retain set: empty after dropping the examples it shares with the forget set")
    forget_labels = example_labels(model, task, forget_set, "forget set", required=False)
    retain_labels = example_labels(model, task, retain_set, "retain set", required=objective.lam != 0)
    heldout_labels = example_labels(model, task, heldout_set, "heldout set", required=True) if heldout_set else None
    enc = dict(model_config=model.config, max_length=max_length, chat_template=chat_template)
    forget_rows = encode(forget_set, tokenizer, task, forget=True, name="forget set", labels=forget_labels, **enc)
    retain_rows = encode(retain_set, tokenizer, task, forget=False, name="retain set", labels=retain_labels, **enc)
    note = truncation_note({"forget set": forget_rows, "retain set": retain_rows}, max_length, model.config, tokenizer)
    if note:
        log(note)
    # where forgotten examples carry generic prompts, train only on their subject-specific tokens;
    # the Gram matrices still cover every forgotten row (the layer inputs do not change)
    train_forget_rows, selection = select_subject_tokens(model, tokenizer, task, forget_set, forget_rows,
                                                         objective.subject_margin, max_length,
                                                         training.batch_size, chat_template=chat_template)
    if selection.rows:
        log(selection.describe())
        if not train_forget_rows:
            raise DataError("forget set: no response token is specific to the forgotten subjects (every one is "
                            "as likely after the generic prompts); nothing to forget: lower the subject "
                            "margin or check the generic prompts")
    levels = None
    objective = replace(objective, forget_target=objective.resolved_forget_target(
        task, heldout=bool(heldout_set), reference=target_reference is not None))
    if requested_target == "auto" and objective.forget_target != "bound":
        log(f"forget target: {objective.forget_target} (the default for "
            f"{'a classifier with a held-out set' if target_reference is None else 'a target reference'}; "
            f"--forget-target bound for the fixed per-token bounds)")
    if objective.forget_target != "bound":  # the targets come from the held-out set (see objective.py)
        if not reference_set:
            raise DataError(f"forget_target={objective.forget_target!r} (--forget-target {objective.forget_target}) "
                            f"needs a held-out set (--heldout FILE) or a target reference (--target-reference FILE)")
        reference_labels = heldout_labels if reference_set is heldout_set else example_labels(
            model, task, reference_set, "target reference set", required=True)
        heldout_rows = encode(reference_set, tokenizer, task, forget=False, labels=reference_labels, **enc,
                              name="heldout set" if reference_set is heldout_set else "target reference set")
        if objective.forget_target == "heldout":
            objective, levels = _heldout_target(model, task, objective, train_forget_rows, heldout_rows,
                                                pad_token_id(tokenizer))
            log(f"forget target: the held-out level, {levels['heldout_loss']:.3f} nats per token (the forgotten "
                f"targets: {levels['forget_loss']:.3f}): forget LM bound {objective.forget_lm_bound:.3f}, "
                f"forget KL bound {objective.forget_kl_bound:.3f} nats")
        else:
            objective, train_forget_rows, levels = _matched_target(model, task, objective, train_forget_rows,
                                                                   heldout_rows, pad_token_id(tokenizer))
            log(f"forget target: matched to the {'held-out' if reference_set is heldout_set else 'reference'} "
                f"rows' losses (median {levels['heldout_median']:.3f}, "
                f"mean {levels['heldout_loss']:.3f} nats per token); {levels['pushed_rows']} of "
                f"{len(train_forget_rows)} forgotten rows are below their target (forgotten rows now: mean "
                f"{levels['forget_loss']:.3f})")
    base_fingerprint = model_fingerprint(model)
    sets = {"forget": forget_set, "retain": retain_set, **({HELDOUT: heldout_set} if heldout_set else {})}
    eval_labels = {"forget": forget_labels, "retain": retain_labels,
                   **({HELDOUT: heldout_labels} if heldout_labels is not None else {})}
    world = distributed.world_size()  # > 1 under torchrun: data parallel (see unlearn_fast.train.distributed)
    if world > 1:
        distributed.check_same(base_fingerprint + data_fingerprint(train_forget_rows, retain_rows), "base model and data")
    if training.shard_base:
        _check_shardable(objective, task)
    else:
        before = evaluate_sets(model, tokenizer, task, sets, eval_labels, general_text, max_length,
                               chat_template=chat_template) if evaluate else {}

    torch.manual_seed(training.seed)  # the layers' initial weights are part of a reproducible run
    attach(model, layers)
    if training.shard_base:  # every rank evaluates the same rows: the sharded forwards run in lockstep
        distributed.shard_base(model, task)
        with layers_disabled(model):
            before = evaluate_sets(model, tokenizer, task, sets, eval_labels, general_text, max_length,
                                   chat_template=chat_template) if evaluate else {}
    cache = None
    if (training.teacher_cache != "off" or training.shared_trunk) and not training.shard_base:
        # where it keeps the rows: training.teacher_cache (gpu / cpu / disk / off; see train.step_cache)
        cache = StepCache(model, task, trunk=training.shared_trunk, store=training.teacher_cache)
    loss = EULObjective(model, task, objective, cache)
    pad = pad_token_id(tokenizer)
    routes = _forget_routes(tokenizer, task, objective, training, forget_set, forget_rows, train_forget_rows,
                            retain_set, pad, log, **enc)
    try:
        result = train(model, loss, train_forget_rows, retain_rows, training, pad, allow_damage=allow_damage, log=log,
                       routes=routes)
    finally:
        if cache is not None:  # frees the cached rows before the figures after; removes the disk mode's file
            cache.close()
    # with several ranks each takes a share of the batches and the Gram matrices are summed
    grams, gram_tokens = collect_grams(model, task, forget_rows, pad, training.batch_size,
                                       lockstep=training.shard_base)
    after = evaluate_sets(model, tokenizer, task, sets, eval_labels, general_text, max_length,
                          chat_template=chat_template) if evaluate else {}
    damage = [d for d in (result.damage, retain_damage(before, after)) if d]
    if damage and not allow_damage:  # (the trainer has raised already for its own findings)
        raise TrainingError(f"{damage[0]}; the model is damaged and nothing was written. Try a lower learning "
                            "rate (--lr), or pass --allow-damage (allow_damage=True) to write it anyway.")
    for d in damage:
        log(f"warning: {d}; kept anyway (allow_damage), and recorded in the manifest")
    warnings = [w for w in (forget_unmoved(before, after),
                            over_forgetting(after, len(heldout_set)) if heldout_set else None) if w]
    for w in warnings:
        log(f"warning: {w}")
    times = distributed.all_gather_floats(result.update_time_s - result.earlier_time_s)

    metrics = {"before": before, "after": after, "update_time_s": result.update_time_s,
               "steps": result.steps, "train_tokens": result.tokens,
               "tokens_per_s": result.tokens / result.update_time_s if result.update_time_s > 0 else None,
               "final_terms": result.history[-1] if result.history else {}}
    manifest = {
        "package": {"name": "unlearn_fast", "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"name_or_path": model_name or getattr(model.config, "_name_or_path", ""),
                       "class": model.__class__.__name__, "fingerprint": base_fingerprint,
                       "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                       "quantization": base_quantisation(model)},  # int8 / nf4: the fingerprint is of that base
        "task": task,
        "chat_template": chat_template_record(tokenizer, chat_template, task),  # how prompt/response rows were encoded
        "layers": {"config": layers.to_dict(), "sites": describe(model)},
        # with forget_target "heldout" / "matched": the bounds as derived, and the teacher losses they came from
        # (forget_target as resolved; forget_target_requested: as given, e.g. "auto")
        "objective": {**objective.to_dict(), "gamma": objective.resolved_gamma(task), "forget_target_levels": levels,
                      "forget_target_requested": requested_target},
        "subject_selection": selection.to_dict() if selection.rows else None,
        "forget_routes_found": None if routes is None else routes.found,  # the student's detours trained on
        "training": training.to_dict(),
        "forget_set": fingerprint(forget_set),
        "retain_set": fingerprint(retain_set),
        "heldout_set": fingerprint(heldout_set) if heldout_set else None,
        "target_reference_set": fingerprint(reference_set) if reference_set is not heldout_set else None,
        "general_text": ({"shipped": general_text is GENERAL_TEXT, **fingerprint([Example(text=t) for t in general_text])}
                         if general_text and evaluate and task == "causal" else None),
        "grams": {"tokens": gram_tokens, "augmented_with_bias_column": True, "dtype": "float64"},
        "metrics": metrics,
        "damage": damage,  # what allow_damage let through (empty: none found); eval --layers warns on it
        "run_config": run_config,  # the command line's resolved options (None from the Python API)
        "warnings": warnings,  # e.g. a forget-set loss that did not rise, over-forgetting
        "update_time_s": result.update_time_s,
        # per rank: the interrupted runs' update time (if resumed) + this run's; total: rank-seconds
        "update_time": {"per_rank_s": [result.earlier_time_s + t for t in times],
                        "total_s": result.earlier_rank_time_s + sum(times),
                        "resumed_from_step": result.resumed_from},
        "distributed": {"world_size": world, "shard_base": training.shard_base,
                        "sharded_params": distributed.sharded_params(model),
                        "backend": distributed.backend_name(),
                        "teacher_cache_rows_per_rank": distributed.all_gather_floats(
                            cache.teacher_rows if cache is not None else 0)},
    }
    written = None
    if out is not None:
        # one artifact, from rank 0, once every rank has finished (a rank that failed never gets
        # here, and its peers fail in a collective before it): nothing partial is left behind
        distributed.barrier()
        if distributed.is_main():
            written = write_artifact(out, {**layer_state(model), **grams}, manifest, overwrite, log)
        distributed.barrier()
        written = Path(out) if written is None else written
    return UnlearnResult(model, metrics, manifest, result, written, grams)


@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode (no dropout) inside, back in its own mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _heldout_target(model, task, objective: ObjectiveConfig, forget_rows, heldout_rows, pad: int):
    """The objective with its forget bounds at the held-out level, and the teacher losses (nats per
    target token, the model without layers, in eval mode) they were derived from."""
    with _eval_mode(model):
        levels = {"forget_loss": mean_loss(model, task, forget_rows, pad),
                  "heldout_loss": mean_loss(model, task, heldout_rows, pad)}
    return heldout_bounds(objective, levels["forget_loss"], levels["heldout_loss"]), levels


def _teacher_row_losses(model, task, rows, pad: int) -> list[float]:
    """The model's (without layers, in eval mode) mean loss per target token of each row, in nats."""
    with _eval_mode(model):
        return [total / max(count, 1) for total, count in row_losses(model, task, rows, pad)]


def _forget_routes(tokenizer, task: str, objective: ObjectiveConfig, training: TrainConfig,
                   forget_set: Sequence[Example], forget_rows, train_rows, retain_set: Sequence[Example], pad: int,
                   log, **encoding) -> Optional[ForgetRoutes]:
    """The forget routes the objective asks for (None: off, or not a causal LM's prompt / response
    rows). A trained row gets routes when its example has a prompt (with generic prompts: when the
    subject selection kept it); its answer is found in a completion as the forget accuracy finds it
    (:func:`answer_found`, variants too). Each is also looked for after a few retained facts
    (:func:`context_probes`)."""
    if not objective.forget_routes or task != "causal":
        return None
    if training.shard_base:
        log("forget routes: off with a sharded base (the sharded forwards cannot generate)")
        return None
    example_of = {tuple(r.input_ids): e for e, r in zip(forget_set, forget_rows) if e.prompt is not None}
    examples = [example_of.get(tuple(r.input_ids)) for r in train_rows]
    if not any(examples):
        return None
    probes = context_probes(examples, train_rows, retain_set, tokenizer, training.seed, **encoding)
    return ForgetRoutes(tokenizer, train_rows, examples, lambda text, e: answer_found(text, e.response, e.answers)[1],
                        objective.forget_routes, pad, probes)


def _matched_target(model, task, objective: ObjectiveConfig, forget_rows, heldout_rows, pad: int):
    """forget_target="matched": the forgotten rows, each with its own loss target
    (:func:`unlearn_fast.train.objective.matched_targets`), the objective with bounds that leave the
    stopping to those targets, and the levels they came from (for the log and the manifest)."""
    forget_losses = _teacher_row_losses(model, task, forget_rows, pad)
    heldout_losses = _teacher_row_losses(model, task, heldout_rows, pad)
    targets = matched_targets(forget_losses, heldout_losses)
    rows = [replace(r, loss_target=t) for r, t in zip(forget_rows, targets)]
    ordered = sorted(heldout_losses)
    levels = {"forget_loss": sum(forget_losses) / len(forget_losses),
              "heldout_loss": sum(heldout_losses) / len(heldout_losses),
              "heldout_median": ordered[len(ordered) // 2],
              "pushed_rows": sum(t > f for f, t in zip(forget_losses, targets)),
              "mean_target": sum(targets) / len(targets)}
    return matched_bounds(objective, forget_losses, targets), rows, levels


def _check_shardable(objective: ObjectiveConfig, task: str) -> None:
    if not distributed.is_distributed():
        raise UnlearnFastError("--shard-base needs torch.distributed: launch with torchrun "
                               "(torchrun --nproc_per_node N -m unlearn_fast.cli unlearn ... --shard-base)")
    if objective.alpha == 0 or objective.forget_kl_weight == 0:
        # the teacher runs only on ranks whose rows have a KL term: the ranks' forwards would differ
        raise UnlearnFastError("--shard-base needs both KL terms on (alpha > 0 and forget KL weight > 0)")


def export(model: Union[str, Path, nn.Module], layers: Union[str, Path, Sequence[Union[str, Path]]],
           out: Union[str, Path], *, format: str = "hf", tokenizer=None, overwrite: bool = False,
           dtype: Optional[torch.dtype] = None, log=print) -> Path:
    """Write ``model`` with the unlearning layers of ``layers`` as a directory that loads without this package.

    ``model``: a model directory (or ``smollm2``), loaded on the CPU in ``dtype`` (default: the
    checkpoint's own), or a loaded base model without layers (then pass ``tokenizer``; the layers
    are detached again afterwards). ``layers``: one artifact directory, or several (their layers
    run summed, as ``eval --layers`` runs them), or a fused one. ``format="hf"``: a transformers
    directory, see :mod:`unlearn_fast.io.export`; ``format="adapters"``: an AdapterHub ``adapters``
    bottleneck adapter of the layers alone (no tokenizer needed), see :mod:`unlearn_fast.io.adapters_export`,
    refused for a family it cannot express. An existing ``out`` is refused unless
    ``overwrite`` (and then only an output of this package that holds no input); layers trained on
    another base model are refused (fingerprint) before anything is written. Returns ``out``.
    """
    check_format(format)
    paths = [Path(layers)] if isinstance(layers, (str, Path)) else [Path(p) for p in layers]
    if not paths:
        raise UnlearnFastError("export needs at least one unlearning artifact (--layers DIR)")
    given_path = isinstance(model, (str, Path))
    inputs = [model if given_path else None, *paths]
    check_writable(out, overwrite, inputs=inputs, log=log)  # before anything is loaded
    if given_path:
        model, tokenizer, _ = load_model(str(model), dtype=dtype or "auto", device="cpu")
    elif tokenizer is None and format == "hf":
        raise UnlearnFastError("export: pass the base model's tokenizer (tokenizer=...) with a loaded model")
    manifests = [load_layers(model, paths[0])] if len(paths) == 1 else load_layers_together(model, paths)
    try:
        requests = [r for m in manifests for r in request_records(m)]
        provenance = provenance_record(manifests, [str(p) for p in paths], requests)
        if format == "adapters":
            return write_adapters(model, out, provenance=provenance, overwrite=overwrite, inputs=inputs, log=log)
        return write_hf(model, tokenizer, out, provenance=provenance, overwrite=overwrite, inputs=inputs, log=log)
    finally:
        if not given_path:
            detach(model)  # leave the caller's model as it was given
