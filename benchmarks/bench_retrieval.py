# .venv/bin/python benchmarks/bench_retrieval.py --rounds 2      (smoke check: --quick)
"""Evaluation at scale: `modalign.eval.retrieval.bidirectional_retrieval` on 50,000 x 50,000 pairs
(d = 256) against the matmul-bound time and a full-matrix computation, side by side.

Data (fixed seed): N sensor embeddings m, unit-normalised Gaussian; their texts t = normalise(m + noise),
cosine(m_i, t_i) ~ 0.32, so R@1 is neither 0 nor 1; groups = 0..N-1 (every pair its own group).

A second data set, "groups of 5", is the same-facts kind of protocol: 5 pairs share a group (relevant to
each other), built around a shared centre with noise so that R@1 ~ 0.6 and mAP ~ 0.4 (a middling model:
the hard case for counting, many scores reach the lowest relevant one).

Implementations, each measured in a fresh subprocess (wall time of the call; peak RSS = ru_maxrss of
the worker; "added in call" = peak minus the high-water mark just before the call):
  ours        bidirectional_retrieval(m, t, groups, block_size=2048): R@1/5/10, median and mean rank and
              mAP in both directions, from one N x N score product computed in 2,048 x 2,048 tiles,
              counting per query the gallery items that score >= each relevant item (exact ties)
  ours, groups of 5   the same call on the grouped data
  matmul      the matmul-bound time: one N x N x d float32 product, 2,048 query rows at a time into a
              reused buffer (`np.matmul(m[b], t.T, out=buf)`), nothing else. Every exact method needs at
              least this (the t2m scores are the transpose of the m2t ones).
  blocked     a bare-bones bounded-memory count for the one-relevant-item case, the floor for what
              ours does: per block of 2,048 rows one product S_b = m_b t^T, then m2t rank =
              #(S_b[i] >= S_ii) and the t2m counts #(S_b[i, j] >= S_jj, i != j) accumulated over
              blocks (S_jj as a separate dot product, so a tie within one rounding may count
              differently from ours); metrics from the ranks (AP = 1 / rank)
  sort        the sorting path ours falls back to (groups larger than MAX_COUNTED_RELEVANT), which
              was ours until this benchmark showed it at 9.8x: `retrieval_ranks` per direction, a
              product and a full sort of every query's row each. Run at the small N only.
  full        the full matrix where it fits: S = m t^T (N x N float32, 1.6 GB at N = 20k), ranks by
              comparing with diag(S) along rows and columns. Run at the small N only.
Every worker uses 1 BLAS thread (OPENBLAS/OMP/MKL_NUM_THREADS=1) unless --blas-threads says otherwise:
numpy's sort and comparisons are single-threaded anyway, and 1-thread matmuls are stable on a shared
2-core machine. Rounds alternate the implementations (order reversed every other round). The metrics
of every implementation are checked against ours at the small N.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/bench_retrieval.py --rounds 2"
DIM = 256
BLOCK = 2048
KS = (1, 5, 10)


def data(n: int, grouped: bool = False):
    import numpy as np

    rng = np.random.default_rng(12345)
    if grouped:
        groups = np.arange(n) // 5
        centre = rng.standard_normal((groups[-1] + 1, DIM), dtype=np.float32)[groups]
        m = centre + 2.0 * rng.standard_normal((n, DIM), dtype=np.float32)
        t = centre + 2.0 * rng.standard_normal((n, DIM), dtype=np.float32)
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        return m, t, groups
    m = rng.standard_normal((n, DIM), dtype=np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    t = m + 3.0 * rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM, dtype=np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    return m, t, np.arange(n)


def metrics_from_ranks(r_m2t, r_t2m) -> dict:
    import numpy as np

    out = {}
    for d, r in (("m2t", r_m2t), ("t2m", r_t2m)):
        for k in KS:
            out[f"{d}_R@{k}"] = float(np.mean(r <= k))
        out[f"{d}_median_rank"] = float(np.median(r))
        out[f"{d}_mean_rank"] = float(np.mean(r))
        out[f"{d}_mAP"] = float(np.mean(1.0 / r))
    return out


def run_impl(impl: str, m, t, g) -> dict:
    import numpy as np

    n = len(m)
    if impl in ("ours", "ours-g5"):
        from modalign.eval.retrieval import bidirectional_retrieval

        metrics, _ = bidirectional_retrieval(m, t, g, block_size=BLOCK)
        return metrics
    if impl == "sort":
        from modalign.eval.retrieval import retrieval_metrics, retrieval_ranks

        metrics = {}
        for d, q, gal in (("m2t", m, t), ("t2m", t, m)):
            r = retrieval_ranks(q, gal, g, g, block_size=BLOCK)
            metrics.update(retrieval_metrics(r["rank"], r["ap"], prefix=f"{d}_", ks=KS))
        return metrics
    if impl == "matmul":
        buf = np.empty((BLOCK, n), np.float32)
        tt = t.T
        for s in range(0, n, BLOCK):
            e = min(s + BLOCK, n)
            np.matmul(m[s:e], tt, out=buf[: e - s])
        return {}
    if impl == "blocked":
        diag = np.einsum("ij,ij->i", m, t)  # (N,) the positive pair's score
        r_m2t = np.empty(n, np.int64)
        r_t2m = np.zeros(n, np.int64)
        buf = np.empty((BLOCK, n), np.float32)
        tt = t.T
        for s in range(0, n, BLOCK):
            e = min(s + BLOCK, n)
            sb = np.matmul(m[s:e], tt, out=buf[: e - s])
            rows, cols = np.arange(e - s), np.arange(s, e)
            pos = sb[rows, cols].copy()  # the block's own positives, as this product computed them
            r_m2t[s:e] = (sb >= pos[:, None]).sum(1)
            sb[rows, cols] = -np.inf  # the positive itself: counted once below, whatever its rounding
            r_t2m += (sb >= diag[None, :]).sum(0)
        return metrics_from_ranks(r_m2t, r_t2m + 1)
    if impl == "full":
        s = m @ t.T  # (N, N)
        d = np.diagonal(s).copy()
        r_m2t = (s >= d[:, None]).sum(1)
        r_t2m = (s >= d[None, :]).sum(0)
        return metrics_from_ranks(r_m2t, r_t2m)
    raise ValueError(impl)


class _Timed:
    """Stands in for a module attribute (numpy, or a function of modalign.eval.retrieval) and adds
    the wall time of each call to `spent[label]`."""

    def __init__(self, target, spent: dict, label: str, attr: str | None = None):
        self.target, self.spent, self.label, self.attr = target, spent, label, attr

    def __getattr__(self, name):
        value = getattr(self.target, name)
        if name != self.attr:
            return value

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return value(*a, **k)
            finally:
                self.spent[self.label] += time.perf_counter() - t0
        return timed

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.target(*a, **k)
        finally:
            self.spent[self.label] += time.perf_counter() - t0


def breakdown(n: int, grouped: bool) -> dict:
    """Where ours spends its time at N, from one whole call with its internal steps timed: the
    module's `np.matmul` (the tile products: thresholds pass and counting pass), its counting
    function, its de-duplication and tiling set-up, and its ranks-from-counts; the rest is the
    pairing, gathers and the Python loop over tiles."""
    from modalign.eval import retrieval as R

    m, t, g = data(n, grouped)
    spent = {"tile products (np.matmul, both passes)": 0.0, "compare and count (rows and columns)": 0.0,
             "sides: duplicate check, group order, tile edges": 0.0, "ranks and AP from the counts": 0.0}
    keys = list(spent)
    saved = (R.np, R._count_at_least, R._Side, R._ranks_from_counts)
    R.np = _Timed(R.np, spent, keys[0], "matmul")
    R._count_at_least = _Timed(saved[1], spent, keys[1])
    R._Side = _Timed(saved[2], spent, keys[2])
    R._ranks_from_counts = _Timed(saved[3], spent, keys[3])
    try:
        t0 = time.perf_counter()
        R.bidirectional_retrieval(m, t, g, block_size=BLOCK)
        total = time.perf_counter() - t0
    finally:
        R.np, R._count_at_least, R._Side, R._ranks_from_counts = saved
    spent["the rest: pairs, thresholds, gathers, loop"] = total - sum(spent.values())
    return {"parts": spent, "total": total}


def worker(impl: str, n: int) -> dict:
    if impl in ("ours", "ours-g5", "sort"):
        __import__("modalign.eval.retrieval")  # imported outside the timed call
    m, t, g = data(n, grouped=impl == "ours-g5")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    metrics = run_impl(impl, m, t, g)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": secs, "peak_mib": peak, "added_mib": peak - base, "metrics": metrics}


def blas_env(threads: int) -> dict:
    v = str(threads)
    return {"OPENBLAS_NUM_THREADS": v, "OMP_NUM_THREADS": v, "MKL_NUM_THREADS": v}


def main() -> None:
    p = common.bench_args(__doc__.split("\n")[0], default_rounds=2)
    p.add_argument("--n", type=int, default=None, help="the large N (default 50,000; --quick 8,000)")
    p.add_argument("--n-small", type=int, default=None, help="the small N, where the full matrix runs (default 20,000)")
    p.add_argument("--blas-threads", type=int, default=1)
    p.add_argument("--worker", help=__import__("argparse").SUPPRESS)
    p.add_argument("--worker-n", type=int, help=__import__("argparse").SUPPRESS)
    args = p.parse_args()
    if args.worker in ("breakdown", "breakdown-g5"):
        print(json.dumps(breakdown(args.worker_n, grouped=args.worker == "breakdown-g5")))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.worker_n)))
        return
    if args.quick:
        args.rounds = min(args.rounds, 1)
    big = args.n or (8_000 if args.quick else 50_000)
    small = args.n_small or (4_000 if args.quick else 20_000)
    plan = [("ours", big), ("matmul", big), ("blocked", big), ("ours-g5", big),
            ("ours", small), ("full", small), ("matmul", small), ("blocked", small), ("sort", small)]
    res = {k: [] for k in plan}
    for r in range(args.rounds):
        for impl, n in (plan if r % 2 == 0 else plan[::-1]):
            out = common.run_worker([__file__, "--worker", impl, "--worker-n", str(n)], blas_env(args.blas_threads))
            res[(impl, n)].append(out)
            print(f"  round {r + 1}/{args.rounds} {impl:8s} N={n:,}: {out['seconds']:.2f} s, "
                  f"peak {out['peak_mib']:,.0f} MiB", file=sys.stderr)
    parts = {kind: common.run_worker([__file__, "--worker", kind, "--worker-n", str(big)], blas_env(args.blas_threads))
             for kind in ("breakdown", "breakdown-g5")}

    common.header("Evaluation at scale: retrieval metrics over N x N pairs", COMMAND,
                  f"{args.blas_threads} BLAS thread(s)")
    print(f"d = {DIM}, block_size = {BLOCK}, {args.rounds} rounds alternating, each measurement a fresh "
          "subprocess. Groups: one per pair, except \"groups of 5\" (5 pairs relevant to each other).\n")
    labels = {"ours": "modalign `bidirectional_retrieval` (both directions, all metrics)",
              "ours-g5": "modalign `bidirectional_retrieval`, groups of 5",
              "matmul": "matmul-bound: one N x N x d product in blocks, nothing else",
              "blocked": "bare blocked rank count (one relevant item only)",
              "sort": "sorting path (`retrieval_ranks` per direction; the fallback for groups > 32)",
              "full": "full matrix: N x N scores in memory, rank by comparison with the diagonal"}
    rows = []
    for n in (big, small):
        mm = common.med([o["seconds"] for o in res[("matmul", n)]])
        for impl in ("ours", "ours-g5", "matmul", "blocked", "sort", "full"):
            if (impl, n) not in res:
                continue
            outs = res[(impl, n)]
            secs = [o["seconds"] for o in outs]
            rows.append([f"{n:,}", labels[impl], f"{min(secs):.2f}", f"{common.med(secs):.2f}",
                         f"{common.med(secs) / mm:.2f}", f"{max(o['peak_mib'] for o in outs):,.0f}",
                         f"{max(o['added_mib'] for o in outs):,.0f}"])
    common.table(["N", "implementation", "wall min (s)", "wall median (s)", "x matmul-bound (median)",
                  "peak RSS (MiB)", "added in call (MiB)"], rows)
    ours_big = max(o["added_mib"] for o in res[("ours", big)])
    ours_small = max(o["added_mib"] for o in res[("ours", small)])
    print(f"Memory of ours: {ours_small:,.0f} MiB added at N = {small:,} and {ours_big:,.0f} MiB at N = {big:,}: "
          f"x{ours_big / ours_small:.2f} for x{big / small:.2f} in N (x{(big / small) ** 2:.2f} in N²); "
          f"an N x N float32 score matrix would be {big * big * 4 / 2**30:.1f} GiB at N = {big:,}.\n")
    ref = res[("ours", small)][0]["metrics"]
    worst = {}
    for impl in ("full", "sort", "blocked"):
        other = res[(impl, small)][0]["metrics"]
        worst[impl] = max(abs(other[k] - ref[k]) for k in other)
    ours_b, blk_b = res[("ours", big)][0]["metrics"], res[("blocked", big)][0]["metrics"]
    worst_big = max(abs(blk_b[k] - ours_b[k]) for k in blk_b)
    g5 = res[("ours-g5", big)][0]["metrics"]
    print(f"Agreement: at N = {small:,} the largest |metric difference| from ours is {worst['full']:.2e} (full), "
          f"{worst['sort']:.2e} (sort) and {worst['blocked']:.2e} (blocked); at N = {big:,}, {worst_big:.2e} (blocked). "
          f"Ours at N = {big:,}: m2t R@1 {ours_b['m2t_R@1']:.4f}, t2m R@1 {ours_b['t2m_R@1']:.4f}, "
          f"m2t mAP {ours_b['m2t_mAP']:.4f}; groups of 5: m2t R@1 {g5['m2t_R@1']:.4f}, m2t mAP {g5['m2t_mAP']:.4f}.\n")
    print(f"Where ours spends its time at N = {big:,}: one whole call per data set in a separate worker, with "
          "the module's tile products, its counting function, its set-up and its ranks-from-counts timed "
          "(seconds, share of the call):\n")
    kinds = {"breakdown": "one group per pair", "breakdown-g5": "groups of 5"}
    steps = list(parts["breakdown"]["parts"])
    common.table(["step"] + [kinds[k] for k in kinds],
                 [[step] + [f"{parts[k]['parts'][step]:.1f} ({parts[k]['parts'][step] / parts[k]['total']:.0%})"
                            for k in kinds] for step in steps]
                 + [["whole call"] + [f"{parts[k]['total']:.1f}" for k in kinds]])


if __name__ == "__main__":
    main()
