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
from ..train.encoding import Row, collate, encode, fit_max_length, pad_token_id, truncation_note
from ..train.scoring import row_token_stats, target_text
from .metrics import (
    ATTACKS, TRUTH_RATIO_AGGREGATORS, answer_found, exact_match, extraction_strength, ks_test, mia_auc,
    mia_scores, model_utility, normalise_answer, privleak, probability, probability_w_options, rouge_l,
    truth_ratio, wilson_interval
)


@torch.no_grad()
def completions(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8,
                batch_size: int = 32) -> list[str]:
    """Greedy completions (the new text only).

    A prompt that would not leave room in the model's context for the new tokens keeps only its end.
    """
    device = next(model.parameters()).device
    limit = context_length(model.config, tokenizer)
    if limit is not None and not model.config.is_encoder_decoder:
        limit = max(1, limit - max_new_tokens)  # a decoder's context holds the prompt and the new tokens
    cut = {} if limit is None else {"truncation": True, "max_length": limit}
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    cut_side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    pad = pad_token_id(tokenizer)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True, **cut).to(device)
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad)
            if not model.config.is_encoder_decoder:
                generated = generated[:, enc["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(generated, skip_special_tokens=True)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, cut_side
    return out


def answer_hits(model: nn.Module, tokenizer, examples: Sequence[Example], max_new_tokens: int = 8,
                strict: bool = False) -> list[bool]:
    """For each prompt/response example: does the greedy completion contain the response or one of its
    other acceptable ``answers``? With ``strict``, the response only (see
    :func:`unlearn_fast.eval.metrics.answer_found` for the normalisation of each)."""
    return [s if strict else v for s, v in answer_matches(model, tokenizer, examples, max_new_tokens)]


def answer_matches(model: nn.Module, tokenizer, examples: Sequence[Example],
                   max_new_tokens: int = 8) -> list[tuple[bool, bool]]:
    """(strict, variant) hit of each prompt/response example's greedy completion, from one generation
    (:func:`unlearn_fast.eval.metrics.answer_found`)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = completions(model, tokenizer, [e.prompt for e in examples], max_new_tokens)
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
                  max_length: int = 256, log=None) -> dict[str, float]:
    """Accuracy and mean loss for each named set, plus general-text perplexity for causal LMs.

    Accuracy is answer accuracy for prompt/response sets (with ``<set>_accuracy_strict`` beside it
    where it differs: :func:`accuracy_figures`), classification accuracy for labelled sets (with
    their mean loss of the label); sets of plain text get only their loss. Prompt/response sets with perturbed answers get
    a truth-ratio figure too (:func:`aggregate_truth_ratios`, named by :func:`truth_ratio_figure`; the set
    named ``forget`` is the forget set).
    Rows are cut at ``max_length``, capped at the model's context; with ``log``, one line says how
    many were cut (:func:`unlearn_fast.train.encoding.truncation_note`).
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
            metrics.update(accuracy_figures(examples, answer_matches(model, tokenizer, examples), f"{name}_"))
        rows = encode(examples, tokenizer, task, forget=False, name=name, model_config=model.config,
                      max_length=max_length)
        encoded[f"{name} set"] = rows
        metrics[f"{name}_loss"] = mean_loss(model, task, rows, pad)
        ratios = [r["truth_ratio"] for r in truth_ratios(model, tokenizer, task, examples, max_length=max_length) if r]
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
                f"get more of them right. Try --forget-target heldout, or a lower --forget-lm-bound / "
                f"--forget-kl-bound / --gamma / --epochs")
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


# ---------------------------------------------------------------------------------------------
# Per-example statistics, membership inference, comparison with a retrained model (issue 4).
# Metric functions live in :mod:`unlearn_fast.eval.metrics`; here they meet a model.


@torch.no_grad()
def truth_ratios(model: nn.Module, tokenizer, task: str, examples: Sequence[Example],
                 response_losses: Optional[Sequence[float]] = None, max_length: int = 256,
                 batch_size: int = 16, vocab_chunk: int = 8192) -> list[Optional[dict]]:
    """TOFU's truth ratio of each prompt/response example that has perturbed answers (else None).

    Each answer (the paraphrased one, or the response when the example has none, and every perturbed
    one) is scored as the response to the example's prompt, by the same teacher-forced pass as
    :func:`example_stats`; all answers of all examples go through in shared batches. A record holds
    ``truth_ratio`` (:func:`unlearn_fast.eval.metrics.truth_ratio`), ``paraphrased_loss`` and
    ``perturbed_losses`` (mean per-token NLLs, nats). ``response_losses``: the examples' response
    losses when already known (they stand in for a missing paraphrase, saving its pass).
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
                      model_config=model.config, max_length=max_length)
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


@torch.no_grad()
def example_stats(model: nn.Module, tokenizer, task: str, examples: Sequence[Example],
                  labels: Optional[Sequence[int]] = None, max_length: int = 256, batch_size: int = 16,
                  k: float = 0.4, vocab_chunk: int = 8192) -> list[dict]:
    """Teacher-forced statistics of each example's target tokens, one dict per example.

    Keys: ``loss`` (mean NLL, nats), ``tokens``, ``exact_memorization`` (open-unlearning's: the share
    of target tokens that are the argmax prediction), ``extraction_strength``
    (:func:`unlearn_fast.eval.metrics.extraction_strength`) and the four membership-inference scores of
    :func:`unlearn_fast.eval.metrics.mia_scores` (loss-oriented: higher = less like a training member);
    for prompt/response examples with perturbed answers also ``truth_ratio``, ``paraphrased_loss`` and
    ``perturbed_losses`` (:func:`truth_ratios`).
    Uses :func:`unlearn_fast.model.family.output_states` and the output head in row and vocabulary chunks
    (:func:`unlearn_fast.train.scoring.token_stats`): no [tokens × vocab] logits are held.
    """

    was_training = model.training
    model.eval()
    rows = encode(examples, tokenizer, task, forget=False, name="evaluated set", model_config=model.config,
                  labels=labels, max_length=max_length)
    if len(rows) != len(examples):
        raise ValueError("per-example statistics need one row per example")
    out: list[dict] = []
    try:
        per_row = row_token_stats(model, task, rows, pad_token_id(tokenizer), batch_size, vocab_chunk)
        for example, stats in zip(examples, per_row):
            lp = stats.logprob.tolist()
            record = {"tokens": len(lp), "loss": -sum(lp) / len(lp),
                      "exact_memorization": float(stats.argmax_hit.float().mean()),
                      "extraction_strength": extraction_strength(stats.argmax_hit.tolist())}
            record.update(mia_scores(lp, target_text(example), stats.mean_logprob.tolist(),
                                     stats.var_logprob.tolist(), k))
            out.append(record)
        for record, tr in zip(out, truth_ratios(model, tokenizer, task, examples, [r["loss"] for r in out],
                                                max_length, batch_size, vocab_chunk)):
            if tr is not None:
                record.update(tr)
    finally:
        model.train(was_training)
    return out


def membership_inference(forget_stats: Sequence[dict], holdout_stats: Sequence[dict]) -> dict[str, float]:
    """AUC of every attack, forget set against held-out examples (0.5 = indistinguishable)."""

    return {a: mia_auc([s[a] for s in forget_stats], [s[a] for s in holdout_stats])
            for a in ATTACKS if forget_stats and a in forget_stats[0]}


def generation_scores(model: nn.Module, tokenizer, examples: Sequence[Example], max_new_tokens: int = 8) -> dict:
    """Greedy-completion figures of prompt/response examples, averaged over the set.

    ``accuracy``: the completion contains the response or another acceptable answer (as
    :func:`answer_hits`), and ``accuracy_strict`` the response alone where that differs or the set has
    answer variants (:func:`accuracy_figures`); ``exact_match``: the
    completion's first w words equal the response's w words after normalisation (greedy completions
    run on past the answer, so the whole completion is not compared); ``Q_A_ROUGE`` (open-unlearning's
    name for the ROUGE-L recall, :func:`unlearn_fast.eval.metrics.rouge_l`) and ``rougeL_f1`` of the whole
    completion against the response.
    """

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = completions(model, tokenizer, [e.prompt for e in examples], max_new_tokens)
    em = recall = f1 = 0.0
    matches = []
    for e, t in zip(examples, texts):
        ref = normalise_answer(e.response)
        matches.append(answer_found(t, e.response, e.answers))
        words = len(ref.split())
        em += exact_match(" ".join(normalise_answer(t).split()[:words]), ref)
        r = rouge_l(t, e.response)
        recall += r.recall
        f1 += r.fmeasure
    n = max(len(examples), 1)
    return {**accuracy_figures(examples, matches), "exact_match": em / n, "Q_A_ROUGE": recall / n, "rougeL_f1": f1 / n}


def aggregate_truth_ratios(ratios: Sequence[float], forget: bool) -> float:
    """One figure from per-example truth ratios, as open-unlearning aggregates them: on a forget set
    ``closer_to_1_better`` (mean min(R, 1/R): 1 = forgotten), on any other set ``true_better``
    (mean max(0, 1 − R): 1 = the right answers are clearly preferred). Higher is "better" for both."""

    return TRUTH_RATIO_AGGREGATORS["closer_to_1_better" if forget else "true_better"](ratios)


def truth_ratio_figure(name: str, forget: bool) -> str:
    """open-unlearning's name of a set's truth-ratio figure: ``forget_truth_ratio`` on the forget set,
    ``<set>_Truth_Ratio`` (``retain_Truth_Ratio``) on the others."""
    return f"{name}_truth_ratio" if forget else f"{name}_Truth_Ratio"


def utility_figures(figures: dict, sets: dict[str, Sequence[Example]], forget: str,
                    holdout: Optional[str]) -> list[float]:
    """The figures TOFU's model utility is the harmonic mean of, from every prompt/response set other
    than the forget and held-out sets: its probability (``retain_Q_A_Prob`` on the set named
    ``retain``; ``S_Q_A_Prob_normalised`` on other sets with perturbed answers, as TOFU scores its
    real-authors and world-facts sets), ``S_Q_A_ROUGE`` and ``S_Truth_Ratio`` where present."""
    out = []
    for name, examples in sets.items():
        if name in (forget, holdout) or not examples or examples[0].prompt is None:
            continue
        prob = figures.get(f"{name}_Q_A_Prob_normalised") if name != "retain" else None
        for key in (f"{name}_Q_A_Prob" if prob is None else None, f"{name}_Q_A_ROUGE", f"{name}_Truth_Ratio"):
            if key in figures:
                out.append(figures[key])
        if prob is not None:
            out.append(prob)
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def evaluate_model(model: nn.Module, tokenizer, task: str, sets: dict[str, Sequence[Example]],
                   labels: Optional[dict[str, Optional[Sequence[int]]]] = None, *, forget: str = "forget",
                   holdout: Optional[str] = "test", general_text: Optional[Sequence[str]] = None,
                   max_length: int = 256, max_new_tokens: int = 8, k: float = 0.4) -> dict:
    """Every figure of one model on named sets (forget / retain / test ...), for the report.

    Returns ``{"figures": {...}, "per_example": {set: [stats dict, ...]}}``. Figures, per set S:
    ``S_accuracy`` (answer or classification accuracy; for classifiers the argmax hit of the label,
    from the forward pass that also gives the per-example statistics), ``S_exact_match``,
    ``S_Q_A_ROUGE`` (ROUGE-L recall), ``S_rougeL_f1`` (prompt/response sets), ``S_loss`` (mean
    per-example target NLL), ``S_perplexity`` (exp of the token-weighted mean NLL),
    ``S_exact_memorization``; for language models ``S_Q_A_Prob`` (mean length-normalised probability
    of the answers), ``S_extraction_strength``, and where S's examples have perturbed answers
    ``S_Q_A_Prob_normalised`` and the truth ratio (TOFU's, aggregated as :func:`aggregate_truth_ratios`
    does: ``forget_truth_ratio`` = ``closer_to_1_better`` on the forget set, ``S_Truth_Ratio`` =
    ``true_better`` on the others; the per-example ratios are in ``per_example``); ``model_utility``
    (TOFU's harmonic mean of :func:`utility_figures`);
    ``forget_lm_loss`` (the paper's forget-set LM loss: the NLL of the forgotten answers / texts,
    i.e. ``forget_loss``); with a ``holdout`` set, ``mia`` = AUC per attack of forget against
    held-out (see :func:`membership_inference`);
    ``general_perplexity`` with ``general_text`` (causal LMs).
    """
    labels = labels or {}
    was_training = model.training
    model.eval()
    figures: dict = {}
    per_example: dict[str, list[dict]] = {}
    try:
        for name, examples in sets.items():
            if not examples:
                continue
            set_labels = labels.get(name)
            if task == "classification":
                if set_labels is None:
                    continue
                # accuracy below, from the same forward pass: one label position per example,
                # so its argmax hit is the prediction being right
            elif examples[0].prompt is not None:
                for key, value in generation_scores(model, tokenizer, examples, max_new_tokens).items():
                    figures[f"{name}_{key}"] = value
            stats = example_stats(model, tokenizer, task, examples, labels=set_labels, max_length=max_length, k=k)
            per_example[name] = stats
            figures[f"{name}_loss"] = _mean(s["loss"] for s in stats)
            tokens = sum(s["tokens"] for s in stats)
            figures[f"{name}_perplexity"] = math.exp(sum(s["loss"] * s["tokens"] for s in stats) / tokens)
            figures[f"{name}_exact_memorization"] = _mean(s["exact_memorization"] for s in stats)
            if task == "classification":
                figures[f"{name}_accuracy"] = figures[f"{name}_exact_memorization"]
            else:
                figures[f"{name}_Q_A_Prob"] = _mean(probability(s["loss"]) for s in stats)
                figures[f"{name}_extraction_strength"] = _mean(s["extraction_strength"] for s in stats)
            ratios = [s["truth_ratio"] for s in stats if "truth_ratio" in s]
            if ratios:
                figures[f"{name}_Q_A_Prob_normalised"] = _mean(probability_w_options(s["loss"], s["perturbed_losses"])
                                                               for s in stats if "perturbed_losses" in s)
                figures[truth_ratio_figure(name, name == forget)] = aggregate_truth_ratios(ratios, name == forget)
        utility = utility_figures(figures, sets, forget, holdout)
        if utility:
            figures["model_utility"] = model_utility(utility)
        if forget in per_example:
            figures["forget_lm_loss"] = figures[f"{forget}_loss"]
            if holdout and holdout in per_example:
                figures["mia"] = membership_inference(per_example[forget], per_example[holdout])
        if general_text and task == "causal":
            figures["general_perplexity"] = perplexity(model, tokenizer, general_text, max_length)
    finally:
        model.train(was_training)
    return {"figures": figures, "per_example": per_example}


FORGET_QUALITY_STATISTICS = ("truth_ratio", "loss")  # what forget quality is tested on, preferred first
PRIVLEAK_ATTACK = "mia_min_k"  # the attack open-unlearning's privleak (TOFU and MUSE) is computed on


def compare_to_retrained(result: dict, retrained: dict, forget: str = "forget", statistic: str = "auto") -> dict:
    """Figures that need the model retrained without the forget set (the gold standard).

    ``forget_quality``: KS-test p-value between the per-example ``statistic`` of this model and of the
    retrained model on the forget set (open-unlearning's ``forget_quality``); ``ks_statistic``;
    ``forget_quality_statistic``: which statistic that was. ``statistic="auto"`` takes TOFU's truth
    ratio where both results have it on the forget set (the examples carry perturbed answers), else the
    answer loss; any per-example key (``"loss"``, ``"truth_ratio"``, ``"mia_min_k"`` ...) can be named.
    Besides, ``forget_quality_<s>`` and ``ks_statistic_<s>`` for each of ``truth_ratio`` and ``loss``
    that both results have, so a report shows both. The test is ``scipy.stats.ks_2samp``
    (:func:`unlearn_fast.eval.metrics.ks_test`).
    ``gap``: every scalar figure minus the retrained model's (and per MIA attack);
    ``privleak``: MUSE's relative AUC difference (:func:`unlearn_fast.eval.metrics.privleak`) of the
    Min-K % attack, as open-unlearning reports it; ``privleak_by_attack``: the same for every attack.
    ``retrained`` may be a live evaluation or saved retain logs (:mod:`unlearn_fast.eval.logs`).
    """

    def values(res: dict, key: str) -> list[float]:
        return [s[key] for s in res["per_example"].get(forget, []) if key in s]

    mine, gold = result["figures"], retrained["figures"]
    out: dict = {}
    tests = {}
    for key in dict.fromkeys((*FORGET_QUALITY_STATISTICS, statistic)):  # "auto" is no key: it adds no test
        a, b = values(result, key), values(retrained, key)
        if a and b:
            tests[key] = ks_test(a, b)
    for key in FORGET_QUALITY_STATISTICS:
        if key in tests:
            out[f"forget_quality_{key}"] = tests[key].pvalue
            out[f"ks_statistic_{key}"] = tests[key].statistic
    if statistic == "auto":
        statistic = next((key for key in FORGET_QUALITY_STATISTICS if key in tests), "loss")
    if statistic in tests:
        out["forget_quality"] = tests[statistic].pvalue
        out["ks_statistic"] = tests[statistic].statistic
        out["forget_quality_statistic"] = statistic
    gap = {k: mine[k] - gold[k] for k in mine
           if k in gold and isinstance(mine[k], (int, float)) and isinstance(gold[k], (int, float))}
    if "mia" in mine and "mia" in gold:
        gap["mia"] = {k: mine["mia"][k] - gold["mia"][k] for k in mine["mia"] if k in gold["mia"]}
        out["privleak_by_attack"] = {k: privleak(mine["mia"][k], gold["mia"][k])
                                     for k in mine["mia"] if k in gold["mia"]}
        if PRIVLEAK_ATTACK in out["privleak_by_attack"]:
            out["privleak"] = out["privleak_by_attack"][PRIVLEAK_ATTACK]
    out["gap"] = gap
    return out
