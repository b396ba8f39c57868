"""Paired comparison of groups of runs on the same test examples. No torch.

For a baseline group and each candidate group: the per-example scores of the metric
(facts/scores.parquet; the metric registry, `analysis.metrics`, names the column) are averaged
over the seeds both groups ran (matched seeds; all seeds of each when they share none), joined on
the sample id, and the mean difference candidate - baseline goes through `stats.paired_bootstrap`.
Candidates that share their matched seeds with the baseline are bootstrapped in one call, on one
shared set of resamples (the same numbers as one call each with the same seed, in a fraction of
the time). With several candidates the p-values are Holm-corrected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modalign.analysis.comparability import differences
from modalign.analysis.groups import Group
from modalign.analysis.stats import holm, paired_bootstrap
from modalign.errors import UserError
from modalign.analysis.metrics import per_example_column


def _read_scores(run_path: Path, column: str):
    import pandas as pd

    path = run_path / "facts" / "scores.parquet"
    try:
        frame = pd.read_parquet(path, columns=["id", column])
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the run has no per-example scores") from None
    except (KeyError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read column '{column}' ({msg})") from None
    return frame.set_index("id")[column].astype(np.float64)


def group_scores(group: Group, column: str, seeds: list) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids [n] sorted, per-example score [n] averaged over the group's runs with these seeds)."""
    runs = [r for r in group.completed if r.info.get("seed") in seeds]
    series = [_read_scores(r.path, column) for r in runs]
    ids = series[0].index
    for s, r in zip(series[1:], runs[1:]):
        if len(s.index) != len(ids) or not s.index.sort_values().equals(ids.sort_values()):
            raise UserError(f"{r.path}: its scores cover other examples than {runs[0].path}'s")
    ids = np.sort(ids.to_numpy().astype(str))
    values = np.mean([s.reindex(ids).to_numpy() for s in series], axis=0)
    return ids, values


def has_scores(group: Group, metric: str) -> bool:
    """Whether the group's completed runs all store per-example scores for `metric`."""
    import pyarrow.parquet as pq

    column = per_example_column(metric)
    if column is None or not group.completed:
        return False
    for r in group.completed:
        try:
            if column not in pq.read_schema(r.path / "facts" / "scores.parquet").names:
                return False
        except (OSError, ValueError):
            return False
    return True


def mismatches(a: Group, b: Group) -> list[str]:
    return differences(a.fingerprint, b.fingerprint, (a.label, b.label))


def paired_comparison(baseline: Group, candidates: list[Group], metric: str, n_resamples: int = 10_000,
                      random_state=0) -> list[dict]:
    """Each candidate against the baseline on the per-example scores of `metric`.

    -> one dict per candidate: candidate, baseline, metric, seeds (matched), matched (bool),
    n_examples, baseline_mean, candidate_mean, diff, low, high, p_value, p_holm, effect_size.
    Raises UserError when the metric has no per-example scores or a group has no completed run.
    """
    column = per_example_column(metric)
    if column is None:
        raise UserError(f"metric '{metric}' is not a mean over test examples (no per-example scores); "
                        "compare e.g. m2t_R@1, t2m_R@5, m2t_mAP or zeroshot_acc")
    for g in (baseline, *candidates):
        if not g.completed:
            raise UserError(f"{g.label}: no completed run to compare")
    by_seeds: dict[tuple, list[int]] = {}  # matched seed set -> the candidates that share it
    for i, cand in enumerate(candidates):
        common = tuple(sorted(set(baseline.seeds) & set(cand.seeds), key=str))
        by_seeds.setdefault(common, []).append(i)
    rows: list[dict] = [{} for _ in candidates]
    for common, members in by_seeds.items():
        matched = bool(common)
        b_ids, b = group_scores(baseline, column, list(common) if matched else baseline.seeds)
        scores = []
        for i in members:
            cand = candidates[i]
            c_ids, c = group_scores(cand, column, list(common) if matched else cand.seeds)
            if not np.array_equal(b_ids, c_ids):
                raise UserError(f"{cand.label} and {baseline.label} were scored on different examples "
                                f"({len(c_ids)} vs {len(b_ids)} ids, {len(set(c_ids) ^ set(b_ids))} not shared)")
            scores.append(c)
        res = paired_bootstrap(b, np.stack(scores), n_resamples=n_resamples, random_state=random_state)
        for j, i in enumerate(members):
            rows[i] = {"candidate": candidates[i].label, "baseline": baseline.label, "metric": metric,
                       "column": column, "seeds": list(common) if matched else None, "matched": matched,
                       "n_examples": int(res["n_examples"]), "n_resamples": int(res["n_resamples"]),
                       "baseline_mean": float(b.mean()), "candidate_mean": float(scores[j].mean()),
                       "diff": float(res["diff"][j]), "low": float(res["low"][j]), "high": float(res["high"][j]),
                       "p_value": float(res["p_value"][j]), "effect_size": float(res["effect_size"][j])}
    adjusted = holm([r["p_value"] for r in rows])
    for r, p in zip(rows, adjusted):
        r["p_holm"] = float(p)
    return rows


def describe(row: dict, alpha: float = 0.05) -> str:
    """One sentence with the numbers: the difference, its CI, the p-value and what it means."""
    p = row["p_holm"] if "p_holm" in row else row["p_value"]
    sig = "significant" if p < alpha else "not significant"
    seeds = (f"matched seeds {', '.join(map(str, row['seeds']))}" if row["matched"]
             else "no common seeds: each group averaged over all its seeds")
    return (f"{row['candidate']} vs {row['baseline']}: {row['metric']} {row['diff']:+.4f} "
            f"(95% CI [{row['low']:+.4f}, {row['high']:+.4f}], p={p:.4g}, d_z={row['effect_size']:.2f}; "
            f"{sig} at {alpha:g}; paired bootstrap over {row['n_examples']} test examples, {seeds})")
