"""Distribution-free statistics for latency samples and A/B rounds.

Latency samples are skewed, heavy-tailed and (on shared machines) drift, so nothing here
assumes a normal distribution:

* quantile confidence intervals come from order statistics: the number of samples below the
  true q-quantile is Binomial(n, q), so the interval between two order statistics has an
  exact, known coverage;
* the A/B slowdown is the median of paired per-round log ratios, with the same order
  statistic interval and a sign test, which is exact whenever each round's arm order is a
  fair coin (A/A rounds then have a symmetric sign, whatever the machine does);
* several comparisons in one call are corrected with Holm's step-down procedure;
* comparisons against stored results (no pairing possible) use a bootstrap of block medians.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    value: float
    lo: float
    hi: float

    def to_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}


def order_stat_ranks(n: int, q: float, confidence: float) -> tuple[int, int] | None:
    """0-based ranks (lo, hi) of the order statistics bracketing the q-quantile with coverage >= ``confidence``.

    With B ~ Binomial(n, q) the number of samples below the true quantile,
    P(x[lo] <= quantile <= x[hi]) = P(lo < B <= hi) = cdf(hi) - cdf(lo); each tail gets at
    most (1 - confidence) / 2. None when n is too small for that coverage.
    """
    if n < 1:
        return None
    from scipy.stats import binom

    tail = (1.0 - confidence) / 2
    hi = int(binom.ppf(1 - tail, n, q))
    lo = int(binom.ppf(tail, n, q))
    if binom.cdf(lo, n, q) > tail:
        lo -= 1
    if lo < 0 or hi > n - 1:
        return None
    return lo, hi


def quantile_ci(samples, q: float, confidence: float = 0.95) -> Interval:
    """The q-quantile of ``samples`` with a distribution-free confidence interval (NaN bounds if n is too small)."""
    x = np.sort(np.asarray(samples, dtype=float))
    n = len(x)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    value = float(np.quantile(x, q, method="inverted_cdf")) if q != 0.5 else float(np.median(x))
    ranks = order_stat_ranks(n, q, confidence)
    if ranks is None:
        return Interval(value, float("nan"), float("nan"))
    return Interval(value, float(x[ranks[0]]), float(x[ranks[1]]))


def median_ci(samples, confidence: float = 0.95) -> Interval:
    return quantile_ci(samples, 0.5, confidence)


# Blocks for the drift-aware median CI: enough for an order-statistic 95% interval (ranks 5..14 of 20).
CI_BLOCKS = 20


def median_ci_blocked(samples, confidence: float = 0.95, blocks: int = CI_BLOCKS) -> Interval:
    """The median of ``samples`` (in the order they were taken) with a CI from the medians of
    ``blocks`` consecutive chunks.

    Why not the plain order-statistic CI: that assumes independent samples, and on a VM they are
    not. Measured on this project's 2-core VM (no other job running), one ONNX Runtime session
    timed for 40 s moved between a 1.4-1.7 ms and a 2.1 ms state in episodes of 0.1-4 s, so two
    runs of a few seconds differed by up to 45% while each one's iid CI was +-0.5%. Block medians
    carry that drift into the interval (as the gate's unpaired comparison does), so a run whose
    blocks disagree reports a wide CI instead of a precise wrong number.
    """
    x = np.asarray(samples, dtype=float)
    if len(x) == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    value = float(np.median(x))
    ci = median_ci(block_medians(x, blocks), confidence)
    if not (np.isfinite(ci.lo) and np.isfinite(ci.hi)):
        return Interval(value, float("nan"), float("nan"))
    return Interval(value, min(ci.lo, value), max(ci.hi, value))


def relative_half_width(ci: Interval) -> float:
    """Half the CI width relative to the estimate (inf when the interval is not yet defined)."""
    if not np.isfinite(ci.lo) or not np.isfinite(ci.hi) or ci.value <= 0:
        return math.inf
    return (ci.hi - ci.lo) / 2 / ci.value


def sign_test_greater(diffs, threshold: float) -> float:
    """One-sided sign test p-value for H0: median(diffs) <= threshold against 'greater'.

    Values equal to the threshold count against the alternative (conservative).
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return 1.0
    k = int(np.sum(d > threshold))
    # P(B >= k), B ~ Binomial(n, 1/2), exactly in integers (the gate calls this at every look)
    return math.fsum(math.comb(n, i) for i in range(k, n + 1)) / 2.0**n if k > 0 else 1.0


def sign_test_less(diffs, threshold: float) -> float:
    """One-sided sign test p-value for H0: median(diffs) >= threshold against 'less'."""
    return sign_test_greater(-np.asarray(diffs, dtype=float), -threshold)


def holm(pvalues) -> list[float]:
    """Holm step-down adjusted p-values (monotone, capped at 1), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        adjusted[idx] = running
    return adjusted.tolist()


@dataclass(frozen=True)
class PairedDecision:
    slowdown: Interval  # candidate/base - 1, with its confidence interval
    p_regression: float  # H0: slowdown <= max_slowdown
    p_pass: float  # H0: slowdown >= max_slowdown
    rounds: int


def paired_slowdown(base_round_medians, cand_round_medians, max_slowdown: float, confidence: float = 0.95) -> PairedDecision:
    """Slowdown of the candidate from paired per-round medians (the round is the unit).

    The estimate is exp(median of per-round log ratios) - 1, the interval comes from order
    statistics of those log ratios, and the two one-sided sign tests give p-values for
    'slower than the threshold' and 'faster than the threshold'.
    """
    b = np.asarray(base_round_medians, dtype=float)
    c = np.asarray(cand_round_medians, dtype=float)
    if b.shape != c.shape or b.ndim != 1:
        raise ValueError("base and candidate need one median per round each")
    r = np.log(c / b)
    ci = median_ci(r, confidence)
    to_slowdown = lambda v: math.expm1(v) if np.isfinite(v) else v  # noqa: E731
    p_regression, p_pass = paired_p_values(r, max_slowdown)
    return PairedDecision(Interval(to_slowdown(ci.value), to_slowdown(ci.lo), to_slowdown(ci.hi)), p_regression, p_pass, len(r))


def paired_p_values(log_ratios, max_slowdown: float) -> tuple[float, float]:
    """Sign-test p-values of (slower than the threshold, faster than the threshold) from per-round log ratios."""
    limit = math.log1p(max_slowdown)
    return sign_test_greater(log_ratios, limit), sign_test_less(log_ratios, limit)


def block_medians(samples, blocks: int) -> np.ndarray:
    """Medians of ``blocks`` consecutive chunks: the unit for unpaired comparisons, so drift within a run is not mistaken for precision."""
    x = np.asarray(samples, dtype=float)
    blocks = max(1, min(blocks, len(x)))
    return np.array([np.median(chunk) for chunk in np.array_split(x, blocks)])


def bootstrap_ratio(base_units, cand_units, confidence: float = 0.95, resamples: int = 4000,
                    seed: int = 0) -> tuple[Interval, np.ndarray]:
    """Ratio of medians (cand/base) of two independent sets of units, with a percentile bootstrap interval.

    Returns the interval and the bootstrap distribution of the ratio (for p-values).
    """
    a = np.asarray(base_units, dtype=float)
    b = np.asarray(cand_units, dtype=float)
    rng = np.random.default_rng(seed)
    ra = np.median(a[rng.integers(0, len(a), (resamples, len(a)))], axis=1)
    rb = np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1)
    ratios = rb / ra
    alpha = 1 - confidence
    lo, hi = np.quantile(ratios, [alpha / 2, 1 - alpha / 2])
    return Interval(float(np.median(b) / np.median(a)), float(lo), float(hi)), ratios


def bootstrap_p_greater(ratios: np.ndarray, threshold: float) -> float:
    """Bootstrap p-value for H0: ratio <= threshold (share of resamples at or below it, with the +1 correction)."""
    return float((np.sum(ratios <= threshold) + 1) / (len(ratios) + 1))


def decide(p_regression: float, p_pass: float, alpha: float) -> str:
    if p_regression < alpha:
        return "regression"
    if p_pass < alpha:
        return "pass"
    return "inconclusive"


def summarize(samples_s, confidence: float = 0.95) -> dict:
    """p50/p90/p99 with confidence bounds, mean, min, max, std and coefficient of variation.

    ``samples_s`` in the order they were taken: the p50's interval is the drift-aware one
    (``median_ci_blocked``); the tail quantiles' are order-statistic intervals."""
    x = np.asarray(samples_s, dtype=float)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return {
        "n": int(len(x)),
        "p50": median_ci_blocked(x, confidence).to_dict(),
        "p90": quantile_ci(x, 0.90, confidence).to_dict(),
        "p99": quantile_ci(x, 0.99, confidence).to_dict(),
        "mean": mean,
        "min": float(x.min()),
        "max": float(x.max()),
        "std": std,
        "cv": std / mean if mean > 0 else float("nan"),
        "confidence": confidence,
    }
