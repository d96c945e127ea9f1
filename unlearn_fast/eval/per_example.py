"""Per-example statistics (TOFU / MUSE style: truth ratio, probabilities, ROUGE, membership-inference
scores), a whole model's figures on several sets (:func:`evaluate_model`, what ``eval --report`` and
the scenarios use), and the comparison with a retrained model (forget quality, privleak). The
metric formulas live in :mod:`unlearn_fast.eval.metrics`; here they meet a model."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..train.data import Example
from ..train.encoding import encode, pad_token_id
from ..train.scoring import row_token_stats, target_text
from .evaluation import (
    accuracy_figures, aggregate_truth_ratios, completions, perplexity, truth_ratio_figure, truth_ratios
)
from .metrics import (
    ATTACKS, answer_found, exact_match, extraction_strength, ks_test, mia_auc, mia_scores, model_utility,
    normalise_answer, privleak, probability, probability_w_options, rouge_l
)


@torch.no_grad()
def example_stats(model: nn.Module, tokenizer, task: str, examples: Sequence[Example],
                  labels: Optional[Sequence[int]] = None, max_length: int = 256, batch_size: int = 16,
                  k: float = 0.4, vocab_chunk: int = 8192, chat_template: str = "auto") -> list[dict]:
    """Teacher-forced statistics of each example's target tokens, one dict per example.

    Keys: ``loss`` (mean NLL, nats), ``tokens``, ``exact_memorization`` (open-unlearning's: the share
    of target tokens that are the argmax prediction), ``extraction_strength``
    (:func:`unlearn_fast.eval.metrics.extraction_strength`) and the four membership-inference scores of
    :func:`unlearn_fast.eval.metrics.mia_scores` (loss-oriented: higher = less like a training member);
    for prompt/response examples with perturbed answers also ``truth_ratio``, ``paraphrased_loss`` and
    ``perturbed_losses`` (:func:`truth_ratios`).
    Uses :func:`unlearn_fast.model.family.output_states` and the output head in row and vocabulary chunks
    (:func:`unlearn_fast.train.scoring.token_stats`): no [tokens × vocab] logits are held.
    ``chat_template``: how prompt/response rows are encoded (:func:`unlearn_fast.train.encoding.encode`).
    """

    was_training = model.training
    model.eval()
    rows = encode(examples, tokenizer, task, forget=False, name="evaluated set", model_config=model.config,
                  labels=labels, max_length=max_length, chat_template=chat_template)
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
                                                max_length, batch_size, vocab_chunk, chat_template)):
            if tr is not None:
                record.update(tr)
    finally:
        model.train(was_training)
    return out


def membership_inference(forget_stats: Sequence[dict], holdout_stats: Sequence[dict]) -> dict[str, float]:
    """AUC of every attack, forget set against held-out examples (0.5 = indistinguishable)."""

    return {a: mia_auc([s[a] for s in forget_stats], [s[a] for s in holdout_stats])
            for a in ATTACKS if forget_stats and a in forget_stats[0]}


def generation_scores(model: nn.Module, tokenizer, examples: Sequence[Example], max_new_tokens: int = 8,
                      chat_template: str = "auto") -> dict:
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
    texts = completions(model, tokenizer, [e.prompt for e in examples], max_new_tokens, chat_template=chat_template)
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
                   max_length: int = 256, max_new_tokens: int = 8, k: float = 0.4,
                   chat_template: str = "auto") -> dict:
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
    ``chat_template``: how prompt/response rows are encoded and generated from (``auto``: through the
    tokenizer's chat template where it has one; :func:`unlearn_fast.train.encoding.encode`).
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
                for key, value in generation_scores(model, tokenizer, examples, max_new_tokens,
                                                    chat_template).items():
                    figures[f"{name}_{key}"] = value
            stats = example_stats(model, tokenizer, task, examples, labels=set_labels, max_length=max_length, k=k,
                                  chat_template=chat_template)
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
