"""The bench statistics on synthetic samples with known answers."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from vitc.bench import stats
from vitc.bench.gate import GateConfig, look


def test_median_ci_ranks_match_the_binomial_table():
    # n=10: the 95% CI of the median is [x(2), x(9)] (1-based), coverage 1 - 2*11/1024 = 0.9785.
    assert stats.order_stat_ranks(10, 0.5, 0.95) == (1, 8)
    from scipy.stats import binom

    lo, hi = stats.order_stat_ranks(10, 0.5, 0.95)
    assert binom.cdf(hi, 10, 0.5) - binom.cdf(lo, 10, 0.5) == pytest.approx(1 - 22 / 1024)
    # Too few samples for a 95% interval of the 90th percentile.
    assert stats.order_stat_ranks(10, 0.9, 0.95) is None
    ci = stats.quantile_ci(np.arange(10.0), 0.9)
    assert math.isnan(ci.lo) and math.isnan(ci.hi)


def test_quantile_ci_covers_the_true_quantile_at_the_stated_rate():
    rng = np.random.default_rng(0)
    for q, n in ((0.5, 40), (0.9, 120)):
        true = -math.log(1 - q)  # quantile of Exp(1), a skewed latency-like law
        hits = 0
        reps = 1500
        for _ in range(reps):
            ci = stats.quantile_ci(rng.exponential(size=n), q)
            hits += ci.lo <= true <= ci.hi
        # exact coverage is >= 95% (discrete); 1500 reps put the estimate within about +-1.2%
        assert 0.93 <= hits / reps <= 0.995, (q, n, hits / reps)


def test_blocked_median_ci_widens_with_drift_and_matches_iid_without_it():
    rng = np.random.default_rng(1)
    # a machine that switches from a 1.5 ms to a 2.1 ms state mid-run (as this VM does in episodes)
    drifting = np.concatenate([1.5 + 0.05 * rng.standard_normal(2000), 2.1 + 0.05 * rng.standard_normal(2000),
                               1.5 + 0.05 * rng.standard_normal(1000)])
    iid, blocked = stats.median_ci(drifting), stats.median_ci_blocked(drifting)
    assert blocked.value == iid.value
    assert iid.hi - iid.lo < 0.05  # the iid interval claims a precision the run does not have
    assert blocked.lo < 1.6 and blocked.hi > 2.0  # the blocked one spans both states
    # stationary samples: the blocked interval is about as tight as the iid one
    steady = 2.0 + 0.05 * rng.standard_normal(5000)
    a, b = stats.median_ci(steady), stats.median_ci_blocked(steady)
    assert (b.hi - b.lo) < 4 * (a.hi - a.lo) and b.lo <= b.value <= b.hi
    assert abs(b.value - 2.0) < 0.01
    # 20 blocks need 20 samples; fewer give no interval yet
    assert math.isnan(stats.median_ci_blocked(np.ones(5)).lo)


def test_blocked_median_ci_covers_a_stationary_median():
    rng = np.random.default_rng(2)
    reps, hits = 400, 0
    for _ in range(reps):
        ci = stats.median_ci_blocked(rng.exponential(size=400))
        hits += ci.lo <= math.log(2) <= ci.hi
    assert hits / reps >= 0.93


def test_relative_half_width():
    assert stats.relative_half_width(stats.Interval(10.0, 9.0, 11.0)) == pytest.approx(0.1)
    assert stats.relative_half_width(stats.Interval(10.0, float("nan"), 11.0)) == math.inf


def test_holm_matches_hand_computation():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1 -> max(0.06, 0.04)=0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_sign_tests():
    assert stats.sign_test_greater(np.ones(10), 0.0) == pytest.approx(1 / 1024)
    assert stats.sign_test_greater(-np.ones(10), 0.0) == 1.0
    # 7 of 10 above: P(Binom(10, .5) >= 7) = 176/1024
    assert stats.sign_test_greater([1] * 7 + [-1] * 3, 0.0) == pytest.approx(176 / 1024)
    assert stats.sign_test_less(-np.ones(10), 0.0) == pytest.approx(1 / 1024)


def test_paired_slowdown_recovers_a_known_slowdown():
    rng = np.random.default_rng(1)
    base = rng.lognormal(0, 0.3, 30)  # drifting machine: both arms share each round's level
    noise = rng.lognormal(0, 0.02, 30)
    d = stats.paired_slowdown(base, base * 1.25 * noise, max_slowdown=0.05)
    assert d.slowdown.lo <= 0.25 <= d.slowdown.hi
    assert d.slowdown.value == pytest.approx(0.25, abs=0.02)
    assert d.p_regression < 1e-6 and d.p_pass == 1.0
    same = stats.paired_slowdown(base, base * noise, max_slowdown=0.05)
    assert same.slowdown.hi < 0.05 and same.p_pass < 1e-6 and same.p_regression == 1.0


def test_bootstrap_ratio_and_block_medians():
    rng = np.random.default_rng(2)
    a = rng.lognormal(0, 0.05, 2000)
    b = 1.3 * rng.lognormal(0, 0.05, 2000)
    ua, ub = stats.block_medians(a, 10), stats.block_medians(b, 10)
    assert len(ua) == 10 and np.allclose(ua, 1.0, atol=0.05)
    ratio, dist = stats.bootstrap_ratio(ua, ub)
    assert ratio.lo <= 1.3 <= ratio.hi and ratio.lo > 1.2
    assert stats.bootstrap_p_greater(dist, 1.05) < 0.001
    assert stats.bootstrap_p_greater(-dist, -1.05) > 0.99


def test_summarize_fields():
    s = stats.summarize(np.linspace(1.0, 2.0, 101))
    assert s["n"] == 101 and s["p50"]["value"] == pytest.approx(1.5)
    assert s["p50"]["lo"] < 1.5 < s["p50"]["hi"]
    assert s["min"] == 1.0 and s["max"] == 2.0 and s["mean"] == pytest.approx(1.5)
    assert s["cv"] == pytest.approx(np.std(np.linspace(1, 2, 101), ddof=1) / 1.5)


def _replay(log_ratios_per_comparison, config: GateConfig):
    """Run the gate's look schedule over synthetic per-round log ratios (no timing)."""
    comps = [SimpleNamespace(base_medians=[], cand_medians=[], decided_at=None, decision="inconclusive",
                             p_regression=1.0, p_pass=1.0) for _ in log_ratios_per_comparison]
    for rounds in config.look_schedule():
        for c, r in zip(comps, log_ratios_per_comparison):
            if c.decided_at is None:
                c.base_medians = [1.0] * rounds
                c.cand_medians = list(np.exp(r[:rounds]))
        look(comps, config, rounds)
    return [c.decision for c in comps]


def test_sequential_looks_keep_false_alarms_under_alpha():
    # A/A: each round's log ratio is symmetric (the gate randomises arm order per round),
    # here with heavy tails and a large spread, the hard case for a 5% threshold.
    rng = np.random.default_rng(3)
    config = GateConfig()
    trials = 2000
    alarms = 0
    for _ in range(trials):
        r = rng.standard_t(2, config.look_schedule()[-1]) * 0.05
        alarms += _replay([r], config)[0] == "regression"
    assert alarms / trials <= config.alpha


def test_sequential_looks_detect_a_25_percent_slowdown_and_ignore_2_percent():
    rng = np.random.default_rng(4)
    config = GateConfig()
    n = config.look_schedule()[-1]
    big = [_replay([math.log(1.25) + rng.normal(0, 0.05, n)], config)[0] for _ in range(200)]
    small = [_replay([math.log(1.02) + rng.normal(0, 0.05, n)], config)[0] for _ in range(200)]
    assert big.count("regression") >= 195
    assert small.count("regression") == 0


def test_holm_across_comparisons_controls_the_family():
    # Ten A/A comparisons at once: the chance that any one of them alarms stays under alpha.
    rng = np.random.default_rng(5)
    config = GateConfig()
    n = config.look_schedule()[-1]
    families = 300
    any_alarm = sum("regression" in _replay([rng.normal(0, 0.05, n) for _ in range(10)], config) for _ in range(families))
    assert any_alarm / families <= config.alpha
