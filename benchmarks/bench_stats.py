# Run: .venv/bin/python benchmarks/bench_stats.py   (smoke check: add --quick; more repeats: --rounds 5)
"""Side-by-side benchmark: `modalign.analysis.stats.paired_bootstrap` vs `scipy.stats.bootstrap`.

Work: k candidates x n examples x B resamples, paired bootstrap of the mean difference
candidate - baseline, 95% percentile interval. Full size: k=10, n=10,000, B=10,000.

Implementations (each measured in a fresh subprocess, so peak RSS is per measurement):
  ours           paired_bootstrap(baseline, candidates)           one call, all k candidates share resamples
                 (numpy's default BLAS threading for the count matmul)
  ours-1t        as ours, with OPENBLAS_NUM_THREADS=OMP_NUM_THREADS=MKL_NUM_THREADS=1 in the worker
  scipy          scipy.stats.bootstrap((diff,), np.mean, method="percentile", vectorized=True, batch=SCIPY_BATCH)
                 once per candidate on its per-example difference (a paired bootstrap of the mean
                 difference is a one-sample bootstrap of the differences); scipy has no
                 shared-resample multi-candidate mode, so k calls
  ours-k1        paired_bootstrap once per candidate (k calls), one BLAS thread: separates the
                 effect of shared resamples from the per-resample cost (compare with ours-1t)
  product        the product path: `modalign.analysis.compare.paired_comparison(baseline, candidates)`
                 as `modalign compare` and `modalign report --baseline` call it, on k+1 run
                 directories (one seed each) whose facts/scores.parquet hold the per-example scores:
                 reads the scores, bootstraps the candidates that share matched seeds in one call,
                 Holm-corrects. Writing the run directories is not timed; reading them is
  scipy-default  as scipy but batch=None (all B x n resampled values at once; skipped if it would
                 not fit in available memory)

Rounds alternate the implementations (ours, scipy, ours-1t, ours-k1, scipy-default, ours, ...) in one
run, because the machine is noisy; the table reports min and median wall time over rounds, the
ratio to `ours`, and the peak RSS of the measuring subprocess (ru_maxrss) plus how much of it was
added during the timed call (peak minus the high-water mark just before the call). Wall time covers
only the bootstrap calls, not interpreter start-up, imports or data generation.

Data (fixed seed): "binary" = R@1-like 0/1 hits, baseline Bernoulli(0.7), candidates made by flipping
baseline hits so the hit rate shifts by -0.02 .. +0.03; "real" = real-valued per-example scores
(baseline Beta(2, 2), candidates = baseline + shift + N(0, 0.15) noise). The CI check compares the
interval bounds of every implementation with `ours` (different RNG streams, so they agree only
within Monte Carlo error).

No torch import: workers import only numpy and either modalign.analysis.stats or scipy.stats.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

IMPLS = ("ours", "product", "scipy", "ours-1t", "ours-k1", "scipy-default")
# Workers of these implementations run with one BLAS thread (the count matmul is the only BLAS call).
ONE_BLAS_THREAD = ("ours-1t", "ours-k1")
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
VARIANTS = ("binary", "real")
DATA_SEED = 12345
OURS_SEED = 0  # ours and scipy use different RNG streams on purpose
SCIPY_SEED = 1
DEFAULT_SCIPY_BATCH = 25  # fastest of 5..2000 on the reference machine; ~2 MB of indices per batch
CONFIDENCE = 0.95
TOL = 3e-3  # |bound(ours) - bound(other)| allowed (raised to 5 expected Monte Carlo sd for small runs)


def make_data(variant: str, k: int, n: int, seed: int = DATA_SEED):
    """baseline [n], candidates [k, n] float64 with a fixed seed."""
    rng = np.random.default_rng(seed)
    shifts = np.linspace(-0.02, 0.03, k)  # candidate - baseline, in expectation
    if variant == "binary":
        p = 0.7
        base = (rng.random(n) < p).astype(np.float64)
        q10 = 0.10  # P(candidate misses | baseline hit)
        q01 = (q10 * p + shifts) / (1 - p)  # P(candidate hits | baseline missed) -> mean shift
        u = rng.random((k, n))
        cand = np.where(base == 1.0, u >= q10, u < q01[:, None]).astype(np.float64)
    elif variant == "real":
        base = rng.beta(2.0, 2.0, n)
        cand = base + shifts[:, None] + rng.normal(0.0, 0.15, (k, n))
    else:
        raise ValueError(variant)
    return base, cand


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def product_groups(base: np.ndarray, cand: np.ndarray, root: str):
    """k+1 run directories under root, each with facts/scores.parquet (id, m2t_r1) -> (baseline
    group, candidate groups), as modalign.analysis.groups builds them from run directories."""
    from pathlib import Path

    import pandas as pd

    from modalign.analysis.groups import Group
    from modalign.runs.index import RunRecord

    ids = np.array([f"s{i:06d}" for i in range(base.size)])
    groups = []
    for j, scores in enumerate([base, *cand]):
        path = Path(root) / f"run{j}"
        (path / "facts").mkdir(parents=True)
        pd.DataFrame({"id": ids, "m2t_r1": scores}).to_parquet(path / "facts" / "scores.parquet", index=False)
        record = RunRecord(path, {"status": "completed", "seed": 0}, {"test": {"m2t_R@1": float(scores.mean())}})
        groups.append(Group(f"config{j}", {}, [record], {}))
    return groups[0], groups[1:]


def worker(impl: str, variant: str, k: int, n: int, b: int, batch: int | None) -> dict:
    import tempfile

    base, cand = make_data(variant, k, n)
    tmp = tempfile.TemporaryDirectory()
    if impl == "product":
        from modalign.analysis.compare import paired_comparison

        baseline, candidates = product_groups(base, cand, tmp.name)
    elif impl.startswith("ours"):
        from modalign.analysis.stats import paired_bootstrap
    else:
        import scipy.stats
    assert "torch" not in sys.modules
    pre = _rss_mib()
    t0 = time.perf_counter()
    if impl == "product":
        rows = paired_comparison(baseline, candidates, "test/m2t_R@1", n_resamples=b, random_state=OURS_SEED)
        low = np.array([r["low"] for r in rows])
        high = np.array([r["high"] for r in rows])
    elif impl in ("ours", "ours-1t"):
        res = paired_bootstrap(base, cand, n_resamples=b, confidence=CONFIDENCE, random_state=OURS_SEED)
        low, high = res["low"], res["high"]
    elif impl == "ours-k1":
        rng = np.random.default_rng(OURS_SEED)
        rows = [paired_bootstrap(base, cand[j], n_resamples=b, confidence=CONFIDENCE, random_state=rng)
                for j in range(k)]
        low = np.array([r["low"][0] for r in rows])
        high = np.array([r["high"][0] for r in rows])
    else:
        rng = np.random.default_rng(SCIPY_SEED)
        cis = []
        for j in range(k):
            diff = cand[j] - base  # [n]
            r = scipy.stats.bootstrap((diff,), np.mean, n_resamples=b, method="percentile",
                                      confidence_level=CONFIDENCE, vectorized=True, batch=batch,
                                      random_state=rng)
            cis.append((r.confidence_interval.low, r.confidence_interval.high))
        low, high = np.array(cis).T
    seconds = time.perf_counter() - t0
    peak = _rss_mib()
    tmp.cleanup()
    return {"impl": impl, "variant": variant, "seconds": seconds, "peak_rss_mib": peak,
            "added_rss_mib": peak - pre, "low": [float(x) for x in low], "high": [float(x) for x in high]}


def run_one(impl, variant, k, n, b, batch) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--variant", variant,
           "--k", str(k), "--n", str(n), "--resamples", str(b)]
    if batch is not None:
        cmd += ["--scipy-batch", str(batch)]
    env = dict(os.environ)
    if impl in ONE_BLAS_THREAD:
        env.update({name: "1" for name in BLAS_ENV})
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mem_available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def expected_mc_sd(d: np.ndarray, b: int) -> float:
    """Monte Carlo sd of the difference of two independent B-resample estimates of a 2.5% bound."""
    a = (1 - CONFIDENCE) / 2
    z = 1.959963984540054
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    se_boot = d.std(ddof=1) / math.sqrt(d.size)  # sd of the bootstrap distribution of the mean
    return math.sqrt(2 * a * (1 - a) / b) / phi * se_boot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="repeats of each implementation (default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="small sizes (n=2000, B=2000) for a smoke check")
    ap.add_argument("--k", type=int, default=None, help="candidates (default 10)")
    ap.add_argument("--n", type=int, default=None, help="examples (default 10,000; --quick 2,000)")
    ap.add_argument("--resamples", type=int, default=None, help="bootstrap resamples B (default 10,000; --quick 2,000)")
    ap.add_argument("--scipy-batch", type=int, default=DEFAULT_SCIPY_BATCH, help="batch for the 'scipy' row")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    k = args.k or 10
    n = args.n or (2_000 if args.quick else 10_000)
    b = args.resamples or (2_000 if args.quick else 10_000)

    if args.worker:
        batch = None if args.worker == "scipy-default" else args.scipy_batch
        print(json.dumps(worker(args.worker, args.variant, k, n, b, batch)))
        return

    rounds = args.rounds or (1 if args.quick else 3)
    impls = [i for i in args.impls.split(",") if i]
    variants = [v for v in args.variants.split(",") if v]
    for name in impls:
        if name not in IMPLS:
            ap.error(f"unknown implementation {name!r}")
    # batch=None holds B x n int64 indices plus B x n float64 resampled values (~16 B n bytes).
    if "scipy-default" in impls and 16.0 * b * n > 0.5 * mem_available_bytes():
        print(f"skipping scipy-default: ~{16 * b * n / 2**30:.1f} GiB would not fit comfortably", file=sys.stderr)
        impls.remove("scipy-default")

    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for variant in variants:
            for impl in impls:
                batch = None if impl == "scipy-default" else (args.scipy_batch if impl == "scipy" else None)
                res = run_one(impl, variant, k, n, b, batch)
                results.setdefault((variant, impl), []).append(res)
                print(f"round {r + 1}/{rounds} {variant:6s} {impl:13s} {res['seconds']:7.3f} s "
                      f"peak {res['peak_rss_mib']:7.1f} MiB", file=sys.stderr, flush=True)

    blas_env = ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in BLAS_ENV)
    print(f"\nk={k} candidates x n={n:,} examples x B={b:,} resamples, 95% percentile CI, "
          f"{rounds} round(s) alternating, scipy batch={args.scipy_batch} ('scipy' row); "
          f"default BLAS threading for 'ours' rows: "
          f"{blas_env}, {os.cpu_count()} CPUs\n")
    print("| data | implementation | calls | wall min (s) | wall median (s) | x ours (median) "
          "| peak RSS (MiB) | added in call (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in variants:
        ours_med = statistics.median(x["seconds"] for x in results[(variant, "ours")]) \
            if (variant, "ours") in results else float("nan")
        for impl in impls:
            rs = results[(variant, impl)]
            secs = [x["seconds"] for x in rs]
            med = statistics.median(secs)
            calls = 1 if impl in ("ours", "ours-1t", "product") else k
            label = {"ours": "modalign paired_bootstrap (shared resamples)",
                     "ours-1t": "modalign paired_bootstrap (shared resamples), 1 BLAS thread",
                     "product": "modalign compare / report --baseline (paired_comparison on run dirs)",
                     "ours-k1": "modalign paired_bootstrap, one candidate per call, 1 BLAS thread",
                     "scipy": f"scipy.stats.bootstrap, batch={args.scipy_batch}",
                     "scipy-default": "scipy.stats.bootstrap, batch=None"}[impl]
            print(f"| {variant} | {label} | {calls} | {min(secs):.2f} | {med:.2f} | {med / ours_med:.2f} "
                  f"| {max(x['peak_rss_mib'] for x in rs):.0f} | {max(x['added_rss_mib'] for x in rs):.0f} |")

    print("\nCI agreement with ours (same data, different RNG streams; pass if max |bound difference| "
          f"< max({TOL:g}, 5 x expected Monte Carlo sd)):")
    all_ok = True
    for variant in variants:
        if (variant, "ours") not in results:
            continue
        base, cand = make_data(variant, k, n)
        mc = max(expected_mc_sd(cand[j] - base, b) for j in range(k))
        ref = results[(variant, "ours")][0]
        for impl in impls:
            rs = results[(variant, impl)]
            stable = all(x["low"] == rs[0]["low"] and x["high"] == rs[0]["high"] for x in rs)
            if impl == "ours":
                print(f"- {variant}: ours identical across rounds: {stable}")
                all_ok &= stable
                continue
            dl = np.abs(np.array(rs[0]["low"]) - ref["low"])
            dh = np.abs(np.array(rs[0]["high"]) - ref["high"])
            worst = max(dl.max(), dh.max())
            ok = bool(worst < max(TOL, 5 * mc)) and stable
            all_ok &= ok
            print(f"- {variant}: {impl:13s} max|dlow|={dl.max():.2e} max|dhigh|={dh.max():.2e} "
                  f"(~{worst / mc:.1f} x the expected Monte Carlo sd {mc:.1e}); "
                  f"identical across rounds: {stable}; {'PASS' if ok else 'FAIL'}")
        lo, hi = np.array(ref["low"]), np.array(ref["high"])
        print(f"  {variant}: ours CIs, candidate 0 / {k - 1}: [{lo[0]:+.4f}, {hi[0]:+.4f}] / "
              f"[{lo[-1]:+.4f}, {hi[-1]:+.4f}]")
    print(f"\nCI check: {'PASS' if all_ok else 'FAIL'}")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
