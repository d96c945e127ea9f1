"""Figures that show what was forgotten and what was kept.

- answer accuracy (prompt + response examples): the greedy completion of the prompt contains
  the expected response or one of the example's other acceptable ``answers`` (case, punctuation,
  whitespace, accents and articles ignored: :func:`unlearn_fast.eval.metrics.answer_found`); where the
  strict score (the response alone, case / punctuation / whitespace ignored) differs, or the set has
  answer variants, it is reported beside it as ``<set>_accuracy_strict``;
- classification accuracy (text + label examples);
- mean per-token loss of the targets, and perplexity of general text;
- TOFU's truth ratio of prompts whose examples carry perturbed (wrong) answers.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..model.family import context_length, output_head, output_states
from ..ops import eul_loss_head
from ..ops.loss_head import IGNORE_INDEX
from ..train.data import Example
from ..train.encoding import (
    Row, chat_prompt, collate, encode, fit_max_length, pad_token_id, truncation_note, uses_chat_template
)
from ..train.scoring import row_token_stats
from .metrics import TRUTH_RATIO_AGGREGATORS, answer_found, truth_ratio, wilson_interval


@torch.no_grad()
def completions(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8,
                batch_size: int = 32, chat_template: str = "auto") -> list[str]:
    """Greedy completions (the new text only, special tokens left out).

    A prompt that would not leave room in the model's context for the new tokens keeps only its end.
    With ``chat_template="auto"`` and a tokenizer that has one, a decoder generates after the template's
    user turn and generation prompt (:func:`unlearn_fast.train.encoding.chat_prompt`), which are the
    tokens before the answer in training (:func:`unlearn_fast.train.encoding.chat_ids`).
    """
    device = next(model.parameters()).device
    limit = context_length(model.config, tokenizer)
    if limit is not None and not model.config.is_encoder_decoder:
        limit = max(1, limit - max_new_tokens)  # a decoder's context holds the prompt and the new tokens
    cut = {} if limit is None else {"truncation": True, "max_length": limit}
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    cut_side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    pad = pad_token_id(tokenizer)
    chat = not model.config.is_encoder_decoder and uses_chat_template(tokenizer, chat_template)
    if chat:  # the template writes its own special tokens
        prompts = [chat_prompt(tokenizer, p) for p in prompts]
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=not chat, **cut).to(device)
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad)
            if not model.config.is_encoder_decoder:
                generated = generated[:, enc["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(generated, skip_special_tokens=True)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, cut_side
    return out


def answer_hits(model: nn.Module, tokenizer, examples: Sequence[Example], max_new_tokens: int = 8,
                strict: bool = False, chat_template: str = "auto") -> list[bool]:
    """For each prompt/response example: does the greedy completion contain the response or one of its
    other acceptable ``answers``? With ``strict``, the response only (see
    :func:`unlearn_fast.eval.metrics.answer_found` for the normalisation of each)."""
    return [s if strict else v for s, v in answer_matches(model, tokenizer, examples, max_new_tokens, chat_template)]


def answer_matches(model: nn.Module, tokenizer, examples: Sequence[Example],
                   max_new_tokens: int = 8, chat_template: str = "auto") -> list[tuple[bool, bool]]:
    """(strict, variant) hit of each prompt/response example's greedy completion, from one generation
    (:func:`unlearn_fast.eval.metrics.answer_found`); the completion is the generated answer text (with a
    chat template: the assistant turn, see :func:`completions`)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = completions(model, tokenizer, [e.prompt for e in examples], max_new_tokens, chat_template=chat_template)
    return [answer_found(t, e.response, e.answers) for e, t in zip(examples, texts)]


def accuracy_figures(examples: Sequence[Example], matches: Sequence[tuple[bool, bool]], prefix: str = "") -> dict:
    """``<prefix>accuracy`` (variant scoring) and, where the strict score (the response alone) differs
    from it or the set has answer variants, ``<prefix>accuracy_strict``; ``matches`` as
    :func:`answer_matches` gives them."""
    n = max(len(matches), 1)
    strict, variant = sum(m[0] for m in matches) / n, sum(m[1] for m in matches) / n
    out = {f"{prefix}accuracy": variant}
    if strict != variant or any(e.answers for e in examples):
        out[f"{prefix}accuracy_strict"] = strict
    return out


@torch.no_grad()
def classification_hits(model: nn.Module, tokenizer, examples: Sequence[Example], labels: Sequence[int],
                        batch_size: int = 32, max_length: int = 256) -> list[bool]:
    """For each labelled example: is the predicted class its label? (Texts cut at ``max_length``.)"""
    device = next(model.parameters()).device
    max_length = fit_max_length(max_length, model.config, tokenizer)
    hits = []
    for i in range(0, len(examples), batch_size):
        texts = [e.text for e in examples[i:i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(device)
        pred = model(**enc).logits.argmax(-1).tolist()
        hits += [p == y for p, y in zip(pred, labels[i:i + batch_size])]
    return hits


@torch.no_grad()
def row_losses(model: nn.Module, task: str, rows: Sequence[Row], pad_id: int, batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed target loss, target count) per row, teacher-forced, without full-vocab logits."""
    head = output_head(model, task)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id).items()}
        states = output_states(model, task, batch)
        has_target = batch["targets"] != IGNORE_INDEX
        n = int(has_target.sum())
        res = eul_loss_head(states[has_target], None, head.weight, batch["targets"][has_target],
                            torch.zeros(n, device=device), torch.zeros(n, device=device), bias=head.bias,
                            logit_scale=head.logit_scale, logit_softcap=head.logit_softcap)
        per_pos = torch.zeros(has_target.shape, dtype=torch.float64)
        per_pos[has_target.cpu()] = res.ce.double().cpu()
        counts = has_target.sum(1).tolist()
        out += list(zip(per_pos.sum(1).tolist(), counts))
    return out


def mean_loss(model, task, rows, pad_id) -> float:
    """Mean per-token target loss over rows (nats)."""
    pairs = row_losses(model, task, rows, pad_id)
    total, count = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return total / max(count, 1)


def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = 256) -> float:
    """Perplexity of a causal LM on plain texts: exp(mean next-token loss)."""
    rows = encode([Example(text=t) for t in texts], tokenizer, "causal", forget=False, name="general text",
                  model_config=model.config, max_length=max_length)
    return math.exp(mean_loss(model, "causal", rows, pad_token_id(tokenizer)))


def evaluate_sets(model: nn.Module, tokenizer, task: str, sets: dict[str, Sequence[Example]],
                  labels: Optional[dict[str, Sequence[int]]] = None, general_text: Optional[Sequence[str]] = None,
                  max_length: int = 256, log=None, chat_template: str = "auto") -> dict[str, float]:
    """Accuracy and mean loss for each named set, plus general-text perplexity for causal LMs.

    Accuracy is answer accuracy for prompt/response sets (with ``<set>_accuracy_strict`` beside it
    where it differs: :func:`accuracy_figures`), classification accuracy for labelled sets (with
    their mean loss of the label); sets of plain text get only their loss. Prompt/response sets with perturbed answers get
    a truth-ratio figure too (:func:`aggregate_truth_ratios`, named by :func:`truth_ratio_figure`; the set
    named ``forget`` is the forget set).
    Rows are cut at ``max_length``, capped at the model's context; with ``log``, one line says how
    many were cut (:func:`unlearn_fast.train.encoding.truncation_note`). ``chat_template``: how prompt/response
    rows are encoded and prompts generated from (:func:`unlearn_fast.train.encoding.encode`); general text
    never goes through a template.
    """
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    pad = pad_token_id(tokenizer)
    encoded: dict[str, list[Row]] = {}
    for name, examples in sets.items():
        if not examples:
            continue
        if task == "classification" and labels and name in labels:
            hits = classification_hits(model, tokenizer, examples, labels[name], max_length=max_length)
            metrics[f"{name}_accuracy"] = sum(hits) / len(hits)
            if name == HELDOUT:  # a classifier's test split: its loss too (forget / retain as before)
                rows = encode(examples, tokenizer, task, forget=False, name=name, model_config=model.config,
                              labels=labels[name], max_length=max_length)
                metrics[f"{name}_loss"] = mean_loss(model, task, rows, pad)
            continue
        if examples[0].prompt is not None:
            metrics.update(accuracy_figures(examples, answer_matches(model, tokenizer, examples,
                                                                     chat_template=chat_template), f"{name}_"))
        rows = encode(examples, tokenizer, task, forget=False, name=name, model_config=model.config,
                      max_length=max_length, chat_template=chat_template)
        encoded[f"{name} set"] = rows
        metrics[f"{name}_loss"] = mean_loss(model, task, rows, pad)
        ratios = [r["truth_ratio"] for r in truth_ratios(model, tokenizer, task, examples, max_length=max_length,
                                                         chat_template=chat_template) if r]
        if ratios:
            is_forget = name == "forget"
            metrics[truth_ratio_figure(name, is_forget)] = aggregate_truth_ratios(ratios, forget=is_forget)
    if general_text and task == "causal":
        metrics["general_perplexity"] = perplexity(model, tokenizer, general_text, max_length)
    model.train(was_training)
    note = truncation_note(encoded, max_length, model.config, tokenizer)
    if log is not None and note:
        log(note)
    return metrics


HELDOUT = "heldout"  # the name of the held-out reference set (--heldout) in figures: heldout_accuracy ...


def forget_unmoved(before: dict, after: dict) -> Optional[str]:
    """Why the figures after unlearning show nothing forgotten, or None: the forget-set loss after is
    not above its value before (the model is no further from the original on what it was to forget).
    None without a forget loss on both sides."""
    b, a = before.get("forget_loss"), after.get("forget_loss")
    if b is None or a is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    if a <= b:
        return (f"the forget-set loss did not rise (from {b:.3f} to {a:.3f} nats): the model has not moved "
                f"away from the original on the forget set; train longer (--epochs) or harder (--lr)")
    return None


OVER_FORGETTING_RULE = ("forget accuracy after < the lower end of the 95 % Wilson interval of the held-out "
                        "accuracy after")


def over_forgetting(after: dict, heldout_count: int) -> Optional[str]:
    """Why the figures after unlearning show over-forgetting, or None.

    The rule (:data:`OVER_FORGETTING_RULE`): the forget-set accuracy after is below the lower end of the
    95 % Wilson interval (:func:`unlearn_fast.eval.metrics.wilson_interval`) of the held-out accuracy after,
    over ``heldout_count`` rows. The held-out rows stand for what a model that never saw the forgotten rows
    would plausibly get right (for a classifier, its test split); forgetting to below that is detectable
    (the forgotten rows now stand out) and costs answers a retrained model keeps. None without both
    accuracies or held-out rows. The same rule for LMs and classifiers; note that for an LM's facts
    (which do not generalise the way a classifier's labels do) a held-out set of facts the model knows
    makes it strict.
    """
    f, h = after.get("forget_accuracy"), after.get(f"{HELDOUT}_accuracy")
    if f is None or h is None or heldout_count <= 0:
        return None
    low, high = wilson_interval(h * heldout_count, heldout_count)
    if f < low:
        return (f"over-forgetting: forget accuracy {f:.1%} is below {low:.1%}, the lower end of the 95 % Wilson "
                f"interval [{low:.1%}, {high:.1%}] of the held-out accuracy {h:.1%} ({heldout_count} rows) "
                f"(rule: {OVER_FORGETTING_RULE}); a model that never saw the forgotten rows would plausibly "
                f"get more of them right. Try --forget-target matched (a classifier: its test split as --heldout; "
                f"facts: facts of the same kind the model does not know as --target-reference), or a lower "
                f"--forget-lm-bound / --forget-kl-bound / --gamma / --epochs")
    return None


# How far the retain loss may rise over its value before unlearning: by max(1 nat, 50 %). A rise of
# 1 nat per token makes every retained token e (2.7) times less likely on average: the model has lost
# what it was to keep (a destroyed model sits near ln(vocab), 10+ nats for real vocabularies). The
# relative part leaves room to models whose retain loss is high to begin with (weak or tiny models).
RETAIN_LOSS_RISE_NATS = 1.0
RETAIN_LOSS_RISE_RATIO = 0.5


def retain_damage(before: dict, after: dict) -> Optional[str]:
    """Why the figures after unlearning show a damaged model, or None.

    Damaged: ``retain_loss`` after is not finite or above before + max(1 nat, 50 % of before).
    Without a retain loss on both sides (no evaluation; classification sets scored by accuracy)
    there is nothing to compare and the answer is None.
    """
    b, a = before.get("retain_loss"), after.get("retain_loss")
    if b is None or a is None or not math.isfinite(b):
        return None
    limit = b + max(RETAIN_LOSS_RISE_NATS, RETAIN_LOSS_RISE_RATIO * b)
    if not a <= limit:  # also catches NaN
        return (f"the retain loss rose from {b:.3f} to {a:.3f} nats (more than max(1 nat, 50 %) above "
                f"its value before)")
    return None


@torch.no_grad()
def truth_ratios(model: nn.Module, tokenizer, task: str, examples: Sequence[Example],
                 response_losses: Optional[Sequence[float]] = None, max_length: int = 256,
                 batch_size: int = 16, vocab_chunk: int = 8192, chat_template: str = "auto") -> list[Optional[dict]]:
    """TOFU's truth ratio of each prompt/response example that has perturbed answers (else None).

    Each answer (the paraphrased one, or the response when the example has none, and every perturbed
    one) is scored as the response to the example's prompt, by the same teacher-forced pass as
    :func:`example_stats`; all answers of all examples go through in shared batches. A record holds
    ``truth_ratio`` (:func:`unlearn_fast.eval.metrics.truth_ratio`), ``paraphrased_loss`` and
    ``perturbed_losses`` (mean per-token NLLs, nats). ``response_losses``: the examples' response
    losses when already known (they stand in for a missing paraphrase, saving its pass). ``chat_template``:
    as :func:`unlearn_fast.train.encoding.encode` (each answer is the assistant turn).
    """

    wanted = [i for i, e in enumerate(examples) if e.perturbed and e.prompt is not None]
    if not wanted or task == "classification":
        return [None] * len(examples)
    answers: list[Example] = []  # per wanted example: [paraphrase?] + perturbed answers
    for i in wanted:
        e = examples[i]
        if e.paraphrased is not None or response_losses is None:
            answers.append(Example(prompt=e.prompt, response=e.paraphrased or e.response))
        answers += [Example(prompt=e.prompt, response=a) for a in e.perturbed]
    was_training = model.training
    model.eval()
    try:
        rows = encode(answers, tokenizer, task, forget=False, name="paraphrased / perturbed answers",
                      model_config=model.config, max_length=max_length, chat_template=chat_template)
        if len(rows) != len(answers):
            raise ValueError("truth ratios need one row per answer")
        losses = iter([-float(s.logprob.sum()) / len(s.logprob)
                       for s in row_token_stats(model, task, rows, pad_token_id(tokenizer), batch_size, vocab_chunk)])
    finally:
        model.train(was_training)
    out: list[Optional[dict]] = [None] * len(examples)
    for i in wanted:
        e = examples[i]
        para = next(losses) if e.paraphrased is not None or response_losses is None else response_losses[i]
        pert = [next(losses) for _ in e.perturbed]
        out[i] = {"truth_ratio": truth_ratio(para, pert), "paraphrased_loss": para, "perturbed_losses": pert}
    return out


def aggregate_truth_ratios(ratios: Sequence[float], forget: bool) -> float:
    """One figure from per-example truth ratios, as open-unlearning aggregates them: on a forget set
    ``closer_to_1_better`` (mean min(R, 1/R): 1 = forgotten), on any other set ``true_better``
    (mean max(0, 1 − R): 1 = the right answers are clearly preferred). Higher is "better" for both."""

    return TRUTH_RATIO_AGGREGATORS["closer_to_1_better" if forget else "true_better"](ratios)


def truth_ratio_figure(name: str, forget: bool) -> str:
    """open-unlearning's name of a set's truth-ratio figure: ``forget_truth_ratio`` on the forget set,
    ``<set>_Truth_Ratio`` (``retain_Truth_Ratio``) on the others."""
    return f"{name}_truth_ratio" if forget else f"{name}_Truth_Ratio"
