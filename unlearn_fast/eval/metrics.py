"""Unlearning metrics as pure functions (no model, no I/O), defined as the field computes them.

Names and formulas follow open-unlearning (github.com/locuslab/open-unlearning, ``src/evals/metrics``),
whose TOFU figures follow TOFU's own code (github.com/locuslab/tofu, ``aggregate_eval_stat.py``);
each docstring gives the formula and the open-unlearning name. Library code does the statistics:
the KS test is ``scipy.stats.ks_2samp``, the harmonic mean ``scipy.stats.hmean``, ROUGE is the
``rouge_score`` package with the Porter stemmer (nltk's, which needs no downloaded data). Both are
imported when first used: together they add seconds to every CLI start.

Conventions:

- A per-answer **loss** is the mean per-token negative log-likelihood of the answer (nats), and its
  **length-normalised probability** is exp(−loss) (open-unlearning's ``avg_loss`` and ``prob``).
- A **membership-inference score** is oriented like a loss: *higher = looks less like a training
  member* (LOSS, zlib, Min-K %, Min-K %++ all return "−log-prob-like" values). :func:`mia_auc` is
  open-unlearning's ``roc_auc_score(labels, scores)`` with label 0 for the forget set and 1 for the
  held-out set: 1.0 = the forget set is still recognisably memorised, 0.5 = indistinguishable.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
import zlib
from typing import NamedTuple, Optional, Sequence

import numpy as np

EPS = 1e-10  # open-unlearning's guard in every ratio below; kept so the figures agree with theirs

# ---------------------------------------------------------------------------------------------
# text similarity


class RougeL(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # heavy (nltk): only generation figures need it

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> RougeL:
    """ROUGE-L of a generation against the reference answer, as open-unlearning scores it:
    ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)``
    (lowercased alphanumeric tokens, Porter-stemmed; P = LCS/|prediction|, R = LCS/|reference|,
    F = 2PR/(P+R)). The recall is open-unlearning's ``rougeL_recall`` (TOFU's ``*_Q_A_ROUGE``), the
    F-measure its ``rougeL_f1`` (MUSE's knowledge-memorisation ROUGE)."""
    score = _rouge_scorer().score(reference, prediction)["rougeL"]
    return RougeL(score.precision, score.recall, score.fmeasure)


def normalise_answer(text: str) -> str:
    """Lowercase, punctuation replaced by spaces, whitespace collapsed (SQuAD-style, no article removal)."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


ARTICLES = ("a", "an", "the")  # dropped by normalise_variant


def normalise_variant(text: str) -> str:
    """The looser normalisation of answer-variant matching: :func:`normalise_answer` (case, punctuation,
    whitespace) plus accents folded (``São Tomé`` = ``Sao Tome``) and the English articles a / an / the
    dropped (``The Hague`` = ``Hague``)."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(w for w in normalise_answer(folded).split() if w not in ARTICLES)


def answer_found(completion: str, response: str, answers: Optional[Sequence[str]] = None) -> tuple[bool, bool]:
    """(strict, variant): does ``completion`` hold the answer?

    strict: the response, after :func:`normalise_answer`, is a substring of the completion (the one
    answer, case / punctuation / whitespace ignored). variant: strict, or the response or any of
    ``answers`` (other acceptable answers), after :func:`normalise_variant`, is a substring of the
    completion so normalised; a variant that normalises to nothing (``"The"``) never matches.
    """
    strict = normalise_answer(response) in normalise_answer(completion)
    text = normalise_variant(completion)
    variants = (normalise_variant(a) for a in (response, *(answers or ())))
    return strict, strict or any(v and v in text for v in variants)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised prediction equals the normalised reference, else 0.0.

    Generation exact match (SQuAD-style, see :func:`normalise_answer`). Not open-unlearning's
    ``exact_memorization``, which is the teacher-forced token figure of :func:`exact_memorization`.
    """
    return float(normalise_answer(prediction) == normalise_answer(reference))


def exact_memorization(predicted_ids: Sequence[int], target_ids: Sequence[int]) -> float:
    """open-unlearning's ``exact_memorization``: the fraction of target tokens that are the model's
    teacher-forced argmax prediction (1.0 = the whole answer is reproduced token by token)."""
    if len(predicted_ids) != len(target_ids):
        raise ValueError("predicted and target token lists must have the same length")
    if not target_ids:
        raise ValueError("no target tokens")
    return sum(int(p == t) for p, t in zip(predicted_ids, target_ids)) / len(target_ids)


def extraction_strength(argmax_hits: Sequence[bool]) -> float:
    """open-unlearning's ``extraction_strength`` (Carlini et al. 2021, as Wang et al. 2025 define it for
    unlearning) of one answer y from its teacher-forced argmax hits h_0 … h_{n−1}:
    ES = 1 − k/n, k = min{k : the model's argmax continuation of [x, y_<k] is y_≥k}, i.e. the start
    of the run of hits that ends the answer (k = n when the last token is missed: ES = 0).

    1 = the whole answer is extracted from the prompt alone. open-unlearning's loop looks at
    k ≤ n − 1 only, so where the last token is missed it reports 1/n instead of 0 (1 for a one-token
    answer); every other case agrees."""
    n = len(argmax_hits)
    if not n:
        raise ValueError("no target tokens")
    k = n
    while k > 0 and argmax_hits[k - 1]:
        k -= 1
    return 1.0 - k / n


# ---------------------------------------------------------------------------------------------
# probabilities, TOFU's truth ratio, model utility


def probability(loss: float) -> float:
    """Length-normalised probability of one answer from its mean per-token NLL: exp(−loss).
    open-unlearning's ``probability`` (``*_Q_A_Prob``) is the mean of this over a set."""
    return math.exp(-float(loss))


def probability_w_options(correct_loss: float, wrong_losses: Sequence[float]) -> float:
    """open-unlearning's ``probability_w_options`` (TOFU's ``*_Q_A_Prob_normalised``) of one question:
    p_c / (p_c + Σ_j p_j + 1e-10), p = exp(−loss) of the right answer and of each wrong answer."""
    if not len(wrong_losses):
        raise ValueError("probability_w_options needs at least one wrong answer")
    correct = probability(correct_loss)
    return correct / (correct + sum(probability(v) for v in wrong_losses) + EPS)


def truth_ratio(paraphrased_loss: float, perturbed_losses: Sequence[float]) -> float:
    """TOFU's per-question truth ratio, as open-unlearning (and TOFU's code) compute it:
    R = exp(−mean_j L_j) / (exp(−L_para) + 1e-10), L the mean per-token NLLs (nats) of the
    perturbed (wrong) answers and of the paraphrased (right) one.

    Averaging the wrong answers' *losses* makes the numerator the geometric mean of their normalised
    probabilities. R ≈ 1: the model cannot tell the right answer from the wrong ones (what a model that
    never saw the fact does); R → 0: it prefers the right answer. R ≤ 1e10 (losses are ≥ 0)."""
    if not len(perturbed_losses):
        raise ValueError("the truth ratio needs at least one perturbed answer")
    wrong = math.exp(-sum(float(v) for v in perturbed_losses) / len(perturbed_losses))
    return wrong / (math.exp(-float(paraphrased_loss)) + EPS)


def _ratios(ratios: Sequence[float]) -> np.ndarray:
    values = np.asarray([float(r) for r in ratios], dtype=np.float64)
    if not values.size:
        raise ValueError("no truth ratios")
    return values


def truth_ratio_closer_to_1(ratios: Sequence[float]) -> float:
    """open-unlearning's ``closer_to_1_better`` aggregation (``forget_truth_ratio``):
    mean min(R, 1/(R + 1e-10)). 1 = right and wrong answers equally likely (forgotten), → 0 = still
    known (or the wrong answers preferred)."""
    values = _ratios(ratios)
    return float(np.mean(np.minimum(values, 1.0 / (values + EPS))))


def truth_ratio_true_better(ratios: Sequence[float]) -> float:
    """open-unlearning's ``true_better`` aggregation (``retain_Truth_Ratio``; TOFU's max(0, 1 − 1/x),
    x = 1/R): mean max(0, 1 − R). 1 = the right answer is far likelier than the wrong ones (kept)."""
    return float(np.mean(np.maximum(0.0, 1.0 - _ratios(ratios))))


TRUTH_RATIO_AGGREGATORS = {"closer_to_1_better": truth_ratio_closer_to_1, "true_better": truth_ratio_true_better}


def model_utility(values: Sequence[float]) -> float:
    """TOFU's ``model_utility`` (open-unlearning's ``hm_aggregate``): ``scipy.stats.hmean`` of the
    retain-side figures (TOFU: Q_A_Prob, Q_A_ROUGE and Truth_Ratio of the retain, real-authors and
    world-facts sets; Prob_normalised for the latter two). Any figure at 0 makes it 0."""
    from scipy import stats  # heavy: imported where a figure needs it

    if not len(values):
        raise ValueError("model utility needs at least one figure")
    return float(stats.hmean([float(v) for v in values]))


# ---------------------------------------------------------------------------------------------
# the gold-standard comparisons: forget quality (KS test), AUC, privleak


class KSResult(NamedTuple):
    statistic: float
    pvalue: float


def ks_test(unlearned_stats: Sequence[float], retrained_stats: Sequence[float]) -> KSResult:
    """Two-sided two-sample Kolmogorov-Smirnov test, ``scipy.stats.ks_2samp`` (method ``auto``: exact
    p-value up to 10 000 examples per side), as open-unlearning's ``ks_test`` runs it."""
    from scipy import stats  # heavy: imported where a figure needs it

    if not len(unlearned_stats) or not len(retrained_stats):
        raise ValueError("the KS test needs two non-empty samples")
    res = stats.ks_2samp([float(v) for v in unlearned_stats], [float(v) for v in retrained_stats])
    return KSResult(float(res.statistic), float(res.pvalue))


def forget_quality(unlearned_stats: Sequence[float], retrained_stats: Sequence[float]) -> float:
    """open-unlearning / TOFU ``forget_quality``: the :func:`ks_test` p-value between per-example truth
    ratios (:func:`truth_ratio`; any per-example statistic works, e.g. the answer loss) of the unlearned
    model and of the model retrained without the forget set, on the forget set. High (→ 1) = the
    distributions are indistinguishable; TOFU counts p > 0.05 as forgotten."""
    return ks_test(unlearned_stats, retrained_stats).pvalue


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (``successes`` of ``n``; default 95 %).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 % and 100 % and for a
    few dozen trials: at 17 of 17 it is [0.816, 1]."""
    if n <= 0:
        raise ValueError("a binomial interval needs n >= 1 trials")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve = P(a positive scores above a negative), ties counting 1/2: the
    Mann-Whitney U over ``scipy.stats.rankdata`` average ranks, U / (n₊·n₋). Equals
    ``sklearn.metrics.roc_auc_score([1]*n₊ + [0]*n₋, positive + negative)`` (tested)."""
    from scipy import stats  # heavy: imported where a figure needs it

    positive, negative = [float(v) for v in positive], [float(v) for v in negative]
    if not positive or not negative:
        raise ValueError("AUC needs at least one positive and one negative score")
    if any(math.isnan(v) for v in positive + negative):
        raise ValueError("AUC of NaN scores")
    n_pos, n_neg = len(positive), len(negative)
    u = float(stats.rankdata(positive + negative)[:n_pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """Membership-inference AUC of one attack, forget set against held-out (never trained on) examples.

    Scores are loss-oriented (higher = less like a member), as every ``mia_*`` score here is; this is
    open-unlearning's ``mia_auc``: ``roc_auc_score([0]*n_forget + [1]*n_holdout, scores)``. 1.0: the
    forget set is still recognisably memorised; 0.5: indistinguishable from unseen data; < 0.5: the
    forget set looks *less* familiar than unseen data (over-forgetting is detectable too).
    """
    return auc(holdout_scores, forget_scores)


def privleak(auc_value: float, reference_auc: float) -> float:
    """MUSE's ``privleak`` as open-unlearning computes it: ((1−AUC) − (1−AUC_ref)) / (1−AUC_ref + 1e-10) · 100.

    ``reference_auc`` is the retrained model's MIA AUC on the same sets (open-unlearning: Min-K %,
    k = 0.4; 0.5 without retain logs). 0 = the unlearned model leaks as much as the retrained one;
    large negative = under-unlearning (the forget set is still recognisable), large positive =
    over-unlearning.
    """
    score, ref = 1.0 - auc_value, 1.0 - reference_auc
    return (score - ref) / (ref + EPS) * 100.0


def rel_diff(value: float, reference: float) -> float:
    """open-unlearning's ``rel_diff``: (value − reference) / (reference + 1e-10) · 100."""
    return (value - reference) / (reference + EPS) * 100.0


# ---------------------------------------------------------------------------------------------
# membership-inference scores of one example, from its per-token statistics


def zlib_length(text: str) -> int:
    """zlib-compressed length of the UTF-8 text in bytes (the zlib attack's entropy estimate)."""
    return len(zlib.compress(text.encode("utf-8")))


def mia_loss(token_logprobs: Sequence[float]) -> float:
    """open-unlearning's ``mia_loss`` score: mean negative log-likelihood of the target tokens."""
    if not len(token_logprobs):
        raise ValueError("no target tokens")
    return -sum(float(v) for v in token_logprobs) / len(token_logprobs)


def mia_zlib(token_logprobs: Sequence[float], text: str) -> float:
    """open-unlearning's ``mia_zlib`` score (Carlini et al. 2021): mean NLL / zlib length of the target text."""
    return mia_loss(token_logprobs) / zlib_length(text)


def _bottom_k_mean(values: Sequence[float], k: float) -> float:
    if not len(values):
        raise ValueError("no target tokens")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    count = max(1, int(len(values) * k))
    return sum(sorted(float(v) for v in values)[:count]) / count


def mia_min_k(token_logprobs: Sequence[float], k: float = 0.4) -> float:
    """open-unlearning's ``mia_min_k`` (Min-K % Prob, Shi et al. 2024): −mean of the lowest
    max(1, ⌊k·n⌋) token log-probs. k = 0.4 is open-unlearning's TOFU setting."""
    return -_bottom_k_mean(token_logprobs, k)


def min_k_plus_plus_z(token_logprobs: Sequence[float], mu: Sequence[float], var: Sequence[float]) -> list[float]:
    """Per-token Min-K %++ z-scores (log p(x_t) − μ_t) / σ_t, μ_t and σ_t² the mean and variance of
    log p(·) under the model's own next-token distribution at that position (σ² clamped at 1e-6, as
    open-unlearning does)."""
    if not (len(token_logprobs) == len(mu) == len(var)):
        raise ValueError("log-probs, means and variances must have one value per token")
    return [(float(lp) - float(m)) / math.sqrt(max(float(v), 1e-6)) for lp, m, v in zip(token_logprobs, mu, var)]


def mia_min_k_plus_plus(token_logprobs: Sequence[float], mu: Sequence[float], var: Sequence[float],
                        k: float = 0.4) -> float:
    """open-unlearning's ``mia_min_k_plus_plus`` (Min-K %++, Zhang et al. 2024): −mean of the lowest
    max(1, ⌊k·n⌋) per-token z-scores of :func:`min_k_plus_plus_z`."""
    return -_bottom_k_mean(min_k_plus_plus_z(token_logprobs, mu, var), k)


ATTACKS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")


def mia_scores(token_logprobs: Sequence[float], text: str, mu: Optional[Sequence[float]] = None,
               var: Optional[Sequence[float]] = None, k: float = 0.4) -> dict[str, float]:
    """Every attack's score for one example (``mia_min_k_plus_plus`` only with the moments μ, σ²)."""
    out = {"mia_loss": mia_loss(token_logprobs), "mia_zlib": mia_zlib(token_logprobs, text),
           "mia_min_k": mia_min_k(token_logprobs, k)}
    if mu is not None and var is not None:
        out["mia_min_k_plus_plus"] = mia_min_k_plus_plus(token_logprobs, mu, var, k)
    return out
