import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from modalign.analysis.stats import bootstrap_ci, holm, iqm, paired_bootstrap


def _se(x):
    return np.std(x, ddof=1) / np.sqrt(len(x))


# --- iqm -----------------------------------------------------------------------------------------

def test_iqm_hand_computed():
    # n=8: drop 2 from each end of sorted [1, 2, 3, 4, 5, 6, 7, 100] -> mean(3, 4, 5, 6) = 4.5
    assert iqm([7, 1, 100, 3, 2, 6, 5, 4]) == pytest.approx(4.5)
    # n=5: drop floor(5/4)=1 from each end of [1, 2, 3, 4, 50] -> mean(2, 3, 4) = 3
    assert iqm([50, 1, 2, 3, 4]) == pytest.approx(3.0)
    # n=3 < 4: nothing dropped -> the mean
    assert iqm([1.0, 2.0, 9.0]) == pytest.approx(4.0)


def test_iqm_matches_scipy_trim_mean():
    x = np.random.default_rng(0).standard_normal(37)
    assert iqm(x) == pytest.approx(sps.trim_mean(x, 0.25))


# --- bootstrap_ci --------------------------------------------------------------------------------

def test_bootstrap_ci_point_estimate_and_interval():
    x = np.array([0.61, 0.64, 0.58, 0.66, 0.63])
    est, low, high = bootstrap_ci(x)
    assert est == pytest.approx(x.mean())
    assert low < est < high
    assert x.min() <= low and high <= x.max()


def test_bootstrap_ci_narrows_with_more_data():
    rng = np.random.default_rng(1)
    _, lo_small, hi_small = bootstrap_ci(rng.normal(0.5, 0.1, 10))
    _, lo_big, hi_big = bootstrap_ci(rng.normal(0.5, 0.1, 1000))
    assert hi_big - lo_big < (hi_small - lo_small) / 3


def test_bootstrap_ci_deterministic_with_seed():
    x = np.random.default_rng(2).random(20)
    assert bootstrap_ci(x, random_state=3) == bootstrap_ci(x, random_state=3)
    assert bootstrap_ci(x, random_state=3) != bootstrap_ci(x, random_state=4)
    assert bootstrap_ci(x, random_state=np.random.default_rng(3)) == bootstrap_ci(x, random_state=3)


@pytest.mark.parametrize("statistic", ["mean", "iqm"])
def test_bootstrap_ci_agrees_with_scipy_percentile(statistic):
    x = np.random.default_rng(5).normal(0.7, 0.05, 50)
    est, low, high = bootstrap_ci(x, statistic=statistic, n_resamples=10_000, random_state=0)

    def scipy_stat(s, axis):
        return np.mean(s, axis=axis) if statistic == "mean" else sps.trim_mean(s, 0.25, axis=axis)

    ref = sps.bootstrap((x,), scipy_stat, n_resamples=10_000, method="percentile", random_state=1)
    # Monte Carlo error of a 2.5% quantile with B=10k is ~0.03 SE per run; 0.15 SE is ~4 sigma.
    tol = 0.15 * _se(x)
    assert low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert high == pytest.approx(ref.confidence_interval.high, abs=tol)


def test_bootstrap_ci_mean_coverage_simulation():
    # The 95% interval of a mean covers the true mean in 93-97% of 1,000 simulated data sets.
    # Percentile intervals are about mean +- 1.96 * sd(ddof=0) / sqrt(n), so for normal data they
    # under-cover for small n: coverage P(|t_{n-1}| < 1.96 * sqrt((n - 1) / n)) is 0.904 at n=10,
    # 0.942 at n=50, 0.946 at n=100. n=100 keeps that bias (~0.004) small next to the binomial sd of
    # the coverage over 1,000 trials (0.007), so the band is ~2.9 sd either side of 0.95 (nominal)
    # and ~2.2 sd below 0.946; confidence=0.8 gives 0.794 or n=10 gives 0.916 here, both outside.
    rng = np.random.default_rng(0)
    n, trials = 100, 1000
    covered = 0
    for _ in range(trials):
        x = rng.normal(0.0, 1.0, n)
        _, low, high = bootstrap_ci(x, n_resamples=2000, confidence=0.95, random_state=rng)
        covered += low <= 0.0 <= high
    assert 0.93 <= covered / trials <= 0.97


def test_bootstrap_ci_iqm_falls_back_to_mean_and_single_run():
    assert bootstrap_ci([1.0, 2.0, 6.0], statistic="iqm")[0] == pytest.approx(3.0)
    est, low, high = bootstrap_ci([0.42])
    assert est == 0.42 and np.isnan(low) and np.isnan(high)


@pytest.mark.parametrize("kwargs", [
    dict(values=[[1.0, 2.0], [3.0, 4.0]]),
    dict(values=[]),
    dict(values=[1.0, np.nan]),
    dict(values=[1.0, 2.0], statistic="median"),
    dict(values=[1.0, 2.0], confidence=1.5),
    dict(values=[1.0, 2.0], n_resamples=0),
])
def test_bootstrap_ci_bad_input_raises(kwargs):
    with pytest.raises(ValueError):
        bootstrap_ci(**kwargs)


# --- paired_bootstrap ----------------------------------------------------------------------------

def test_paired_identical_is_zero_with_p_one():
    base = np.random.default_rng(0).random(50)
    r = paired_bootstrap(base, base.copy(), n_resamples=2000)
    assert r["diff"].shape == (1,)
    assert r["diff"][0] == 0 and r["low"][0] == 0 and r["high"][0] == 0
    assert r["p_value"][0] == 1.0
    assert r["effect_size"][0] == 0.0
    assert r["n_examples"] == 50 and r["n_resamples"] == 2000


def test_paired_clearly_better_candidate():
    rng = np.random.default_rng(1)
    base = rng.random(100)
    cand = base + 0.2 + rng.normal(0, 0.05, 100)
    r = paired_bootstrap(base, cand)
    assert r["p_value"][0] < 0.01
    assert 0 < r["low"][0] < r["diff"][0] < r["high"][0]


def test_paired_detects_small_consistent_gain_unpaired_misses():
    # Examples differ a lot in difficulty (spread 0.29); the candidate is better by 0.01 on nearly
    # every one. Per-example differences have sd 0.005, so pairing sees it; the unpaired SE of the
    # difference of means is ~0.029, so an unpaired comparison cannot.
    rng = np.random.default_rng(2)
    base = rng.random(200)
    cand = base + 0.01 + rng.normal(0, 0.005, 200)
    r = paired_bootstrap(base, cand)
    assert r["p_value"][0] < 0.01 and r["low"][0] > 0

    assert sps.ttest_ind(cand, base).pvalue > 0.5
    unpaired = sps.bootstrap((cand, base), lambda a, b, axis: a.mean(axis) - b.mean(axis),
                             n_resamples=2000, method="percentile", random_state=0)
    assert unpaired.confidence_interval.low < 0 < unpaired.confidence_interval.high


def test_paired_ci_agrees_with_scipy_on_differences():
    rng = np.random.default_rng(3)
    base = rng.random(300)
    cands = base + rng.normal([[0.0], [0.02]], 0.1, (2, 300))
    r = paired_bootstrap(base, cands, n_resamples=10_000, random_state=0)
    for i in range(2):
        d = cands[i] - base
        assert r["diff"][i] == pytest.approx(d.mean())
        ref = sps.bootstrap((d,), np.mean, n_resamples=10_000, method="percentile", random_state=1)
        tol = 0.15 * _se(d)
        assert r["low"][i] == pytest.approx(ref.confidence_interval.low, abs=tol)
        assert r["high"][i] == pytest.approx(ref.confidence_interval.high, abs=tol)


def test_paired_p_values_uniform_under_null():
    # With no true difference, p-values are ~Uniform(0, 1): KS test against the uniform over 1,000
    # null trials, and the rate of p < 0.05 is ~5% (binomial sd 0.007; KS is weak in the tails).
    # Each trial is its own call on fresh data, so the p-values are independent (one call with
    # k=1000 candidates would tie them together through the shared resamples). Scores vary a lot by
    # example (uniform difficulty) and the candidate adds zero-mean noise, sd 0.1. n=100 examples:
    # like the percentile CI, the p-value is slightly anti-conservative for small n (~5.4% rejections
    # here). B=999 puts p on a grid of 2/1000, far finer than KS resolves with 1,000 p-values
    # (critical D ~0.043 at 5%). A true shift of 0.01 (d_z = 0.1) gives KS D=0.23, p < 1e-40.
    rng = np.random.default_rng(0)
    n, trials = 100, 1000
    p = np.empty(trials)
    for i in range(trials):
        base = rng.random(n)
        cand = base + rng.normal(0.0, 0.1, n)
        p[i] = paired_bootstrap(base, cand, n_resamples=999, random_state=rng)["p_value"][0]
    assert sps.kstest(p, "uniform").pvalue > 0.01
    assert 0.03 <= np.mean(p < 0.05) <= 0.07


def test_paired_candidates_share_resamples():
    # Candidate 1 = candidate 0 + 0.3 on every example. With the same resampled indices for both,
    # every resampled difference shifts by exactly 0.3, so the interval does too (up to float32);
    # independent resamples would differ by Monte Carlo error (~0.003 here).
    rng = np.random.default_rng(4)
    base = rng.random(40)
    c0 = base + rng.normal(0, 0.5, 40)
    r = paired_bootstrap(base, np.stack([c0, c0 + 0.3]), n_resamples=5000)
    assert r["low"][1] - r["low"][0] == pytest.approx(0.3, abs=1e-5)
    assert r["high"][1] - r["high"][0] == pytest.approx(0.3, abs=1e-5)


def test_paired_p_value_hand_computed():
    # Every difference positive -> no resampled mean <= 0 -> p = 2 * (0 + 1) / (B + 1).
    r = paired_bootstrap([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], n_resamples=999)
    assert r["p_value"][0] == pytest.approx(2 / 1000)
    # d = (-1, 1, 1): a resample's sum is 3 - 2m with m ~ Binomial(3, 1/3) copies of -1, never 0;
    # P(sum < 0) = P(m >= 2) = 6/27 + 1/27 = 7/27, so p = 2 * 7/27 = 0.5185 (MC sd ~0.009).
    r = paired_bootstrap([1.0, 0.0, 0.0], [0.0, 1.0, 1.0], n_resamples=10_000)
    assert r["p_value"][0] == pytest.approx(14 / 27, abs=0.04)


def test_paired_effect_size_hand_computed():
    base = np.array([0.5, 1.0, 0.0])
    # d = (1, 2, 3): mean 2, sample sd sqrt(((-1)^2 + 0 + 1^2) / 2) = 1 -> d_z = 2
    # d = (0.5, 0.5, 0.5): constant shift, no spread -> 0 by contract
    cands = np.stack([base + [1.0, 2.0, 3.0], base + 0.5])
    r = paired_bootstrap(base, cands, n_resamples=100)
    assert r["effect_size"] == pytest.approx([2.0, 0.0])
    assert r["diff"] == pytest.approx([2.0, 0.5])


def test_paired_deterministic_with_seed():
    rng = np.random.default_rng(6)
    base, cand = rng.random(30), rng.random(30)
    a = paired_bootstrap(base, cand, n_resamples=500, random_state=7)
    b = paired_bootstrap(base, cand, n_resamples=500, random_state=7)
    assert all(np.array_equal(a[key], b[key]) for key in ("low", "high", "p_value"))


@pytest.mark.parametrize("baseline, candidates", [
    (np.zeros(5), np.zeros(4)),
    (np.zeros(5), np.zeros((2, 4))),
    (np.zeros((2, 5)), np.zeros((2, 5))),
    (np.zeros(5), np.zeros((1, 2, 5))),
    (np.zeros(5), np.zeros((0, 5))),
    (np.zeros(1), np.zeros(1)),
    (np.zeros(5), np.full(5, np.nan)),
])
def test_paired_shape_errors_raise(baseline, candidates):
    with pytest.raises(ValueError):
        paired_bootstrap(baseline, candidates, n_resamples=10)


# --- holm ----------------------------------------------------------------------------------------

def test_holm_hand_computed():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, 1*0.04 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_holm_clipped_and_monotone():
    # sorted 0.001, 0.02, 0.6, 0.7 -> x4, x3, x2, x1 = 0.004, 0.06, 1.2 -> 1, 0.7 -> running max 1
    p = np.array([0.6, 0.001, 0.7, 0.02])
    adj = holm(p)
    assert adj == pytest.approx([1.0, 0.004, 1.0, 0.06])
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0) and np.all(adj >= p)
    assert holm([]).shape == (0,)


@pytest.mark.parametrize("p", [[[0.1, 0.2]], [0.1, 1.2], [0.1, np.nan], [-0.1]])
def test_holm_bad_input_raises(p):
    with pytest.raises(ValueError):
        holm(p)


# --- no torch ------------------------------------------------------------------------------------

def test_stats_does_not_import_torch():
    code = "import sys, modalign.analysis.stats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
