"""Unlearning metrics as pure functions (no model, no I/O): text similarity, ranking, the two-sample
Kolmogorov-Smirnov test, TOFU's truth ratio and its aggregations, and per-example membership-inference
scores from per-token log-probs.

Names follow open-unlearning (github.com/locuslab/open-unlearning, ``src/evals/metrics``) where the
figure is the same; each docstring says which one. Conventions used throughout:

- A **membership-inference score** is oriented like a loss: *higher = looks less like a training
  member* (open-unlearning's orientation: LOSS, zlib, Min-K %, Min-K %++ all return "−log-prob-like"
  values). :func:`mia_auc` then is open-unlearning's ``roc_auc_score(labels, scores)`` with label 0 for
  the forget set and 1 for the held-out set: 1.0 = the forget set is still recognisably memorised,
  0.5 = forget and held-out examples are indistinguishable.
- scipy is not a dependency: the KS test is implemented here (see :func:`ks_2samp`).
"""

from __future__ import annotations

import math
import re
import zlib
from typing import NamedTuple, Optional, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# text similarity


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


class RougeL(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


def rouge_l(prediction: str, reference: str) -> RougeL:
    """ROUGE-L on lowercased whitespace tokens: LCS precision, recall and F-measure (β = 1).

    P = LCS / |prediction|, R = LCS / |reference|, F = 2PR / (P + R) (0 when LCS = 0). Unlike the
    ``rouge_score`` package, punctuation is not stripped and no stemming is done: "Paris." and
    "paris" differ. open-unlearning's ``forget_Q_A_ROUGE`` / ``retain_Q_A_ROUGE`` report the *recall*
    (``rougeL_recall``) of ``rouge_score``'s tokenisation; the recall here is that figure up to
    tokenisation.
    """
    p, r = prediction.lower().split(), reference.lower().split()
    lcs = _lcs_length(p, r)
    if lcs == 0:
        return RougeL(0.0, 0.0, 0.0)
    precision, recall = lcs / len(p), lcs / len(r)
    return RougeL(precision, recall, 2 * precision * recall / (precision + recall))


def rouge_l_f(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of :func:`rouge_l`."""
    return rouge_l(prediction, reference).fmeasure


def normalise_answer(text: str) -> str:
    """Lowercase, punctuation replaced by spaces, whitespace collapsed (SQuAD-style, no article removal)."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


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


# ---------------------------------------------------------------------------------------------
# ranking


def _average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve = P(a positive scores above a negative), ties counting 1/2.

    Computed as the Mann-Whitney U statistic over average ranks, U / (n₊·n₋); O(n log n). Equals
    ``sklearn.metrics.roc_auc_score([1]*n₊ + [0]*n₋, positive + negative)``.
    """
    positive, negative = [float(v) for v in positive], [float(v) for v in negative]
    if not positive or not negative:
        raise ValueError("AUC needs at least one positive and one negative score")
    if any(math.isnan(v) for v in positive + negative):
        raise ValueError("AUC of NaN scores")
    ranks = _average_ranks(positive + negative)
    n_pos, n_neg = len(positive), len(negative)
    u = sum(ranks[:n_pos]) - n_pos * (n_pos + 1) / 2
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
    """MUSE's ``privleak`` as open-unlearning computes it: ((1−AUC) − (1−AUC_ref)) / (1−AUC_ref) · 100.

    ``reference_auc`` is the retrained model's MIA AUC on the same sets (MUSE reports AUCs as 1−x,
    hence the flips). 0 = the unlearned model leaks as much as the retrained one; large negative values
    = under-unlearning (the forget set is still recognisable), large positive = over-unlearning.
    """
    score, ref = 1.0 - auc_value, 1.0 - reference_auc
    return (score - ref) / (ref + 1e-10) * 100.0


def rel_diff(value: float, reference: float) -> float:
    """open-unlearning's ``rel_diff``: (value − reference) / reference · 100."""
    return (value - reference) / (reference + 1e-10) * 100.0


# ---------------------------------------------------------------------------------------------
# two-sample Kolmogorov-Smirnov test


class KSResult(NamedTuple):
    statistic: float
    pvalue: float
    method: str  # "exact" or "asymp"


MAX_EXACT_N = 10_000  # scipy's MAX_AUTO_N: method="auto" is exact up to this sample size


def ks_statistic(x: Sequence[float], y: Sequence[float]) -> float:
    """D = sup_t |F_x(t) − F_y(t)| of the two empirical CDFs (ties handled: evaluated at every value)."""
    xs, ys = sorted(float(v) for v in x), sorted(float(v) for v in y)
    if not xs or not ys:
        raise ValueError("the KS test needs two non-empty samples")
    n, m = len(xs), len(ys)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        t = min(xs[i], ys[j])
        while i < n and xs[i] <= t:
            i += 1
        while j < m and ys[j] <= t:
            j += 1
        d = max(d, abs(i / n - j / m))
    return d


def kolmogorov_sf(lam: float) -> float:
    """Survival function of the Kolmogorov distribution, Q(λ) = P(K > λ) = 2 Σ_{k≥1} (−1)^{k−1} e^{−2k²λ²}.

    For small λ (where that series converges slowly) the equivalent Jacobi-theta form
    1 − (√(2π)/λ) Σ_{k≥1} e^{−(2k−1)²π²/(8λ²)} is used. Q(1.3581) ≈ 0.05, Q(1.6276) ≈ 0.01.
    """
    if lam <= 0:
        return 1.0
    if lam < 1.18:
        s = sum(math.exp(-((2 * k - 1) ** 2) * math.pi ** 2 / (8 * lam * lam)) for k in range(1, 8))
        return min(1.0, max(0.0, 1.0 - math.sqrt(2 * math.pi) / lam * s))
    total = 0.0
    for k in range(1, 101):
        term = math.exp(-2 * k * k * lam * lam)
        total += term if k % 2 else -term
        if term < 1e-300:
            break
    return min(1.0, max(0.0, 2 * total))


def _log_binom(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _exact_prob_equal_n(n: int, h: int) -> float:
    """P(D ≥ h/n) for two samples of size n: 2 Σ_{k≥1} (−1)^{k−1} C(2n, n−kh) / C(2n, n)."""
    total = 0.0
    for k in range(1, n // h + 1):
        term = math.exp(_log_binom(2 * n, n - k * h) - _log_binom(2 * n, n))
        total += term if k % 2 else -term
    return 2 * total


def _band(i: int, m: int, n: int, bound: int) -> tuple[int, int]:
    """The j range [lo, hi] of lattice points (i, j) strictly inside |i·n − j·m| < bound."""
    return max(0, (i * n - bound) // m + 1), min(n, (i * n + bound - 1) // m)


def _exact_prob_inside(m: int, n: int, bound: int) -> float:
    """1 − P(a uniformly random monotone lattice path (0,0)→(m,n) stays strictly inside the band).

    Fast (one numpy cumsum per row, counts rescaled per row so nothing overflows) but it subtracts
    from 1, so its absolute error is ~1e-15: used only where the p-value is not tiny.
    """
    row = np.zeros(n + 1)
    log_scale = 0.0
    for i in range(m + 1):
        lo, hi = _band(i, m, n, bound)
        new = np.zeros(n + 1)
        if lo <= hi:
            if i == 0:
                new[lo:hi + 1] = 1.0 if lo == 0 else 0.0
            else:
                new[lo:hi + 1] = np.cumsum(row[lo:hi + 1])
        top = new.max()
        if top <= 0:
            return 1.0
        new /= top
        log_scale += math.log(top)
        row = new
    if row[n] <= 0:
        return 1.0
    return 1.0 - math.exp(math.log(row[n]) + log_scale - _log_binom(m + n, m))


def _exact_prob_outside(m: int, n: int, bound: int) -> float:
    """P(a uniformly random monotone lattice path (0,0)→(m,n) leaves the band), computed directly.

    B(i, j) = 1 outside the band, B(0, 0) = 0, and inside B(i, j) = (i·B(i−1, j) + j·B(i, j−1)) / (i + j)
    (a random path reaches (i, j) from the left with probability i/(i+j)): no subtraction from 1, so
    tiny p-values keep their relative precision (the recursion of Viehmann 2021, arXiv:2102.08037,
    which scipy also uses). Pure Python over the band's cells.
    """
    prev = [1.0] * (n + 1)
    for i in range(m + 1):
        lo, hi = _band(i, m, n, bound)
        cur = [1.0] * (n + 1)
        for j in range(lo, hi + 1):
            if i == 0 and j == 0:
                cur[j] = 0.0
            else:
                left = cur[j - 1] if j > 0 else 0.0
                up = prev[j] if i > 0 else 0.0
                cur[j] = (i * up + j * left) / (i + j)
        prev = cur
    return prev[n]


def _exact_prob_lattice(m: int, n: int, h: int, g: int) -> float:
    """P(D ≥ d), d = h·g/(m·n), for sample sizes m ≠ n (Hodges' lattice-path method)."""
    bound = h * g
    p = _exact_prob_inside(m, n, bound)
    if p < 1e-3:  # the fast form has lost relative precision here: recompute the complement directly
        p = _exact_prob_outside(m, n, bound)
    return p


def ks_2samp(x: Sequence[float], y: Sequence[float], method: str = "auto") -> KSResult:
    """Two-sided two-sample Kolmogorov-Smirnov test: (D, p-value, method used).

    ``method="auto"`` follows scipy's ``ks_2samp`` default: the exact p-value (Hodges; the alternating
    binomial series for equal sizes, the lattice-path count otherwise) when max(n, m) ≤ 10 000, else the
    asymptotic one. The asymptotic p-value here is the Kolmogorov limit Q(√(nm/(n+m))·D)
    (:func:`kolmogorov_sf`; scipy ≥ 1.5 instead uses the finite-n one-sample distribution at
    n = round(nm/(n+m)), which is slightly smaller for small samples; both agree as n grows).
    The exact p-value assumes no ties across samples, as scipy's does.

    This is what open-unlearning's ``ks_test`` (TOFU ``forget_quality``) reports as the p-value.
    """
    d = ks_statistic(x, y)
    n1, n2 = len(x), len(y)
    if method not in ("auto", "exact", "asymp"):
        raise ValueError(f"method must be auto, exact or asymp, got {method!r}")
    if method == "auto":
        method = "exact" if max(n1, n2) <= MAX_EXACT_N else "asymp"
    if method == "exact":
        g = math.gcd(n1, n2)
        lcm = (n1 // g) * n2
        h = int(round(d * lcm))
        if h == 0:
            return KSResult(d, 1.0, "exact")
        if n1 == n2:
            p = _exact_prob_equal_n(n1, h)
        else:
            p = _exact_prob_lattice(n1, n2, h, g)
        return KSResult(d, min(1.0, max(0.0, p)), "exact")
    en = n1 * n2 / (n1 + n2)
    return KSResult(d, kolmogorov_sf(math.sqrt(en) * d), "asymp")


def forget_quality(unlearned_stats: Sequence[float], retrained_stats: Sequence[float]) -> float:
    """open-unlearning / TOFU ``forget_quality``: the KS-test p-value between a per-example statistic
    (TOFU: the truth ratio, :func:`truth_ratio`; any per-example statistic works, e.g. the answer loss)
    of the unlearned model and of the model retrained without the forget set, on the forget set. High
    (→ 1) = the distributions are indistinguishable; TOFU counts p > 0.05 as forgotten. (open-unlearning
    tests 1/R rather than R: the KS statistic is unchanged by a monotone map, so is the p-value.)"""
    return ks_2samp(unlearned_stats, retrained_stats).pvalue


# ---------------------------------------------------------------------------------------------
# TOFU's truth ratio


def truth_ratio(paraphrased_loss: float, perturbed_losses: Sequence[float]) -> float:
    """TOFU's per-example truth ratio from mean per-token NLLs (nats) of the answers to one prompt.

    R = mean_j P(perturbed_j)^(1/len_j) / P(paraphrased)^(1/len_p), where a length-normalised
    probability is exp(−mean token NLL). R ≈ 1: the model cannot tell the right answer from the wrong
    ones (what a model that never saw the fact does); R → 0: it prefers the right answer.

    The numerator is the arithmetic mean of the wrong answers' normalised probabilities, as the TOFU
    paper defines it. open-unlearning (and TOFU's own code) average the *losses* before exponentiating,
    i.e. take the geometric mean, which is ≤ this one; with one perturbed answer both agree. Computed
    in log space, so no ε is added to the denominator; an overflow gives ``inf``.
    """
    if not len(perturbed_losses):
        raise ValueError("the truth ratio needs at least one perturbed answer")
    neg = [-float(v) for v in perturbed_losses]
    top = max(neg)
    log_mean = top + math.log(sum(math.exp(v - top) for v in neg) / len(neg))
    try:
        return math.exp(log_mean + float(paraphrased_loss))
    except OverflowError:
        return math.inf


def truth_ratio_closer_to_1(ratios: Sequence[float]) -> float:
    """open-unlearning's ``closer_to_1_better`` aggregation (its ``forget_truth_ratio``): mean of
    min(R, 1/R). 1 = right and wrong answers equally likely (forgotten), → 0 = still known (or the
    wrong answers preferred). R = 0 or inf counts 0."""
    values = [min(r, 1.0 / r) if 0 < r < math.inf else 0.0 for r in (float(v) for v in ratios)]
    if not values:
        raise ValueError("no truth ratios")
    return sum(values) / len(values)


def truth_ratio_true_better(ratios: Sequence[float]) -> float:
    """open-unlearning's ``true_better`` aggregation (its ``retain_Truth_Ratio``): mean of max(0, 1 − R).
    1 = the right answer is far likelier than the wrong ones (kept), 0 = no preference."""
    values = [max(0.0, 1.0 - float(r)) for r in ratios]
    if not values:
        raise ValueError("no truth ratios")
    return sum(values) / len(values)


TRUTH_RATIO_AGGREGATORS = {"closer_to_1_better": truth_ratio_closer_to_1, "true_better": truth_ratio_true_better}


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
