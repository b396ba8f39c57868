"""Statistics for comparing runs: seed aggregation and paired many-vs-baseline comparisons.

Small pure functions over numpy arrays in the style of rliable (`metrics.py`, `library.py`):
shapes in the docstrings, a `random_state` on everything random, no torch. `random_state` is
anything `np.random.default_rng` accepts (an int seed, a `np.random.Generator`, or None).

References: Efron & Tibshirani (1993), *An Introduction to the Bootstrap*, ch. 13 and 16;
Davison & Hinkley (1997), *Bootstrap Methods and their Application*, §4.2.1 (the +1 correction);
Agarwal et al. (2021), *Deep RL at the Edge of the Statistical Precipice* (IQM, rliable);
Holm (1979), *A simple sequentially rejective multiple test procedure*.
"""

from __future__ import annotations

import numpy as np

STATISTICS = ("mean", "iqm")

# Resampled count rows held at once in `paired_bootstrap`: chunk x n_examples float32 counts
# stay under ~10 MB, and small chunks keep `bincount` in cache (faster than 1,000-row chunks here).
_CHUNK_CELLS = 2_500_000


def _as_1d(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _trimmed_mean_sorted(x_sorted: np.ndarray) -> np.ndarray:
    """Mean of the middle 50% along the last axis of an already sorted array [..., n] -> [...].

    Cuts floor(n / 4) values from each end, as `scipy.stats.trim_mean(x, 0.25)` (used by rliable).
    """
    n = x_sorted.shape[-1]
    cut = n // 4
    return x_sorted[..., cut:n - cut].mean(axis=-1)


def iqm(values) -> float:
    """Interquartile mean of `values` [n]: the mean of the middle 50% of the sorted values.

    floor(n / 4) values are dropped from each end, as `scipy.stats.trim_mean(values, 0.25)`, the
    definition rliable uses. With n < 4 nothing is dropped, so the IQM is the plain mean.
    """
    x = _as_1d(values, "values")
    return float(_trimmed_mean_sorted(np.sort(x)))


def bootstrap_ci(values, statistic: str = "mean", n_resamples: int = 10_000, confidence: float = 0.95,
                 random_state=0) -> tuple[float, float, float]:
    """Point estimate and percentile-bootstrap confidence interval of one metric over runs.

    Args:
        values: [n_runs], e.g. one test metric over seeds.
        statistic: "mean" or "iqm" (interquartile mean, see `iqm`; with n_runs < 4 it is the mean).
        n_resamples: bootstrap resamples B.
        confidence: two-sided coverage of the interval.
        random_state: seed or `np.random.Generator`.

    Returns:
        (estimate, low, high): the statistic on `values`, and the (1 - confidence) / 2 and
        (1 + confidence) / 2 quantiles of the statistic over B resamples of the runs with
        replacement (percentile method, as `scipy.stats.bootstrap(..., method="percentile")`).
        With n_runs == 1 there is nothing to resample: (value, nan, nan).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    _check_bootstrap_args(n_resamples, confidence)
    x = _as_1d(values, "values")
    n = x.size
    estimate = float(x.mean()) if statistic == "mean" else iqm(x)
    if n == 1:
        return estimate, float("nan"), float("nan")

    rng = np.random.default_rng(random_state)
    chunk = max(1, min(n_resamples, _CHUNK_CELLS // n))
    stats = np.empty(n_resamples)  # [B]
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        sample = x[rng.integers(0, n, size=(b, n))]  # [b, n]
        if statistic == "mean":
            stats[start:start + b] = sample.mean(axis=1)
        else:
            stats[start:start + b] = _trimmed_mean_sorted(np.sort(sample, axis=1))
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return estimate, float(low), float(high)


def _resample_counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """Counts [b, n] float32: row r says how often each example appears in resample r.

    Same distribution as `rng.multinomial(n, [1/n] * n, size=b)`, but drawing b * n uniform indices
    and one `bincount` is several times faster than numpy's per-category binomial draws.
    """
    idx = rng.integers(0, n, size=(b, n))  # [b, n]
    idx += (np.arange(b) * n)[:, None]  # row r's indices go to bins r*n .. r*n + n - 1
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float32)


def paired_bootstrap(baseline, candidates, n_resamples: int = 10_000, confidence: float = 0.95,
                     random_state=0) -> dict:
    """Paired bootstrap of the mean per-example difference, candidate - baseline, for k candidates.

    Each resample draws n_examples example indices with replacement, and the same indices are used
    for every candidate, so the k intervals (and p-values) are computed on one shared set of
    resamples. Vectorised: a resample-count matrix C [chunk, n_examples] (multinomial counts) times
    the per-example differences D [k, n_examples] gives every resampled mean difference at once,
    C @ D.T / n_examples [chunk, k]; chunks bound memory.

    Args:
        baseline: [n_examples] per-example scores of the baseline (averaged over matched seeds).
        candidates: [k, n_examples] per-example scores of k candidates, or [n_examples] for one.
        n_resamples: bootstrap resamples B.
        confidence: two-sided coverage of the percentile intervals.
        random_state: seed or `np.random.Generator`.

    Returns:
        dict with
        "diff" [k]: mean(candidate - baseline) on the observed examples;
        "low", "high" [k]: percentile-bootstrap interval of the mean difference;
        "p_value" [k]: two-sided bootstrap p-value for "mean difference = 0" (unadjusted; see `holm`),
            p = min(1, 2 * (min(#{d* <= 0}, #{d* >= 0}) + 1) / (B + 1)), where d* are the B resampled
            mean differences. This is the p-value obtained by inverting the percentile interval
            (Efron & Tibshirani 1993, §16.4; the "achieved significance level" of the bootstrap
            distribution): 0 lies outside the (1 - a) interval exactly when p is about below a, so
            the p-value and the reported interval never disagree. The +1 in numerator and denominator
            (Davison & Hinkley 1997, eq. 4.11) counts the observed data as one of the resamples, so a
            Monte Carlo p-value is never 0 and stays valid; its floor is 2 / (B + 1). Resamples with
            d* exactly 0 count on both sides (conservative; matters for discrete scores).
        "effect_size" [k]: Cohen's d_z for paired data, mean(D) / std(D, ddof=1) over examples;
            0 where the differences have no spread (d_z is undefined there), including a constant
            shift whose differences vary only by float rounding.
        "n_examples": int, "n_resamples": int.

    Raises:
        ValueError: on mismatched shapes, fewer than 2 examples, NaN/inf scores, or bad arguments.
    """
    _check_bootstrap_args(n_resamples, confidence)
    base = _as_1d(baseline, "baseline")
    cand = np.asarray(candidates, dtype=np.float64)
    if cand.ndim == 1:
        cand = cand[None, :]
    if cand.ndim != 2 or cand.shape[1] != base.size or cand.shape[0] == 0:
        raise ValueError(f"candidates must be [k, {base.size}] or [{base.size}] to match baseline, "
                         f"got shape {np.shape(candidates)}")
    if not np.all(np.isfinite(cand)):
        raise ValueError("candidates contains NaN or inf")
    n = base.size
    if n < 2:
        raise ValueError("a paired bootstrap needs at least 2 examples")
    n_resamples = int(n_resamples)

    d = cand - base  # [k, n]
    diff = d.mean(axis=1)  # [k]
    sd = d.std(axis=1, ddof=1)  # [k]
    # Zero spread up to float noise (e.g. a constant shift stored inexactly) counts as zero.
    flat = sd <= 1e-12 * np.maximum(np.abs(d).max(axis=1), 1e-300)
    effect = np.where(flat, 0.0, diff / np.where(flat, 1.0, sd))

    # Resampled sums in float32 are exact for integer-valued differences (e.g. 0/1 hits), so exact
    # ties at 0 stay exact; for real-valued scores the float32 error is far below Monte Carlo error.
    d32 = d.T.astype(np.float32)  # [n, k]
    rng = np.random.default_rng(random_state)
    chunk = max(1, min(n_resamples, _CHUNK_CELLS // n))
    boot = np.empty((n_resamples, d.shape[0]))  # [B, k] resampled mean differences
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        boot[start:start + b] = _resample_counts(rng, b, n) @ d32  # sums [b, k]
    boot /= n

    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)  # [k] each
    below = (boot <= 0).sum(axis=0)
    above = (boot >= 0).sum(axis=0)
    p_value = np.minimum(1.0, 2.0 * (np.minimum(below, above) + 1) / (n_resamples + 1))
    return {"diff": diff, "low": low, "high": high, "p_value": p_value, "effect_size": effect,
            "n_examples": n, "n_resamples": n_resamples}


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values [k] for k tests (e.g. k candidates vs one baseline).

    With p sorted ascending, p_(1) <= ... <= p_(k), the adjusted value is
    max over j <= i of min(1, (k - j + 1) * p_(j)), returned in the input order. Rejecting where the
    adjusted p < a controls the family-wise error rate at a under any dependence between tests.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D, got shape {p.shape}")
    if p.size == 0:
        return p.copy()
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p_values must lie in [0, 1] (NaN is not allowed)")
    k = p.size
    order = np.argsort(p, kind="stable")
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate((k - np.arange(k)) * p[order]))
    adjusted = np.empty(k)
    adjusted[order] = adjusted_sorted
    return adjusted
