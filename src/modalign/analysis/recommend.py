"""Recommendations: which configuration to take forward, with the numbers behind the sentence. No torch.

Two questions, answered differently:

- With a baseline named before looking (`--baseline GROUP`): every other comparable group against
  it, paired on the test examples, Holm-corrected over the candidates. A confirmatory comparison.
- Without one: the best group is chosen *after looking* at the results. Testing "best vs
  runner-up" as if the pair had been named in advance overstates the evidence (the best is best
  partly by luck: the winner's curse). So the best is compared with every other group, and the
  p-values are Holm-corrected over those K-1 comparisons, which controls the chance of calling it
  better than any group it does not beat; the sentence says the choice was made after looking,
  and that its lead over the runner-up is an optimistic estimate to confirm on fresh seeds or a
  held-out split.

All statistics honour `n_resamples` and `random_state`; candidates with the same matched seeds
share their bootstrap resamples in one call (`analysis.compare.paired_comparison`).
"""

from __future__ import annotations

import math

from modalign.analysis.compare import describe, has_scores, paired_comparison
from modalign.analysis.groups import Group, find_group
from modalign.errors import UserError


def ranked(groups: list[Group], metric: str, larger_is_better: bool, n_resamples: int,
           random_state=0) -> list[tuple[Group, dict]]:
    """Groups with a completed run, best first by their mean over runs, each with its stats."""
    scored = [(g, g.stats(metric, n_resamples, random_state)) for g in groups]
    scored = [(g, s) for g, s in scored if s["n"] > 0]
    return sorted(scored, key=lambda gs: -gs[1]["mean"] if larger_is_better else gs[1]["mean"])


def fmt_ci(st: dict) -> str:
    if math.isnan(st["ci_low"]):
        return f"{st['mean']:.3f} (1 run)"
    return f"{st['mean']:.3f} [{st['ci_low']:.3f}, {st['ci_high']:.3f}] over {st['n']} runs"


def flipped(row: dict) -> dict:
    """A comparison row read the other way round (candidate and baseline swapped)."""
    return {**row, "candidate": row["baseline"], "baseline": row["candidate"],
            "baseline_mean": row["candidate_mean"], "candidate_mean": row["baseline_mean"],
            "diff": -row["diff"], "low": -row["high"], "high": -row["low"], "effect_size": -row["effect_size"]}


def recommend(groups: list[Group], metric: str, larger_is_better: bool, baseline: str | None = None,
              n_resamples: int = 10_000, random_state=0) -> tuple[list[str], list[dict]]:
    """-> (recommendation sentences, comparison rows) over `groups` on `metric` (test/...)."""
    lines: list[str] = []
    comparisons: list[dict] = []
    direction = "higher" if larger_is_better else "lower"
    paired = metric.startswith("test/") and bool(groups) and all(has_scores(g, metric) for g in groups if g.completed)
    if baseline is not None:
        base = find_group(groups, baseline)
        if base is None:
            labels = "; ".join(g.label for g in groups)
            raise UserError(f"--baseline {baseline}: no such group or run (groups: {labels})")
        others = [g for g in groups if g is not base and g.comparable_set == base.comparable_set and g.completed]
        if others and paired:
            comparisons = paired_comparison(base, others, metric, n_resamples, random_state)
            for row in comparisons:
                lines.append(describe(row) + (f" (Holm-corrected over {len(comparisons)} candidates)"
                                              if len(comparisons) > 1 else ""))
    sets = sorted({g.comparable_set for g in groups})
    for s in sets:
        ranking = ranked([g for g in groups if g.comparable_set == s], metric, larger_is_better, n_resamples,
                         random_state)
        prefix = f"[set {s}] " if len(sets) > 1 else ""
        if not ranking:
            lines.append(f"{prefix}No completed run has {metric}: nothing to recommend.")
            continue
        best, st = ranking[0]
        if len(ranking) == 1:
            lines.append(f"{prefix}One configuration ({best.label}): {metric} {fmt_ci(st)}; nothing to compare it with.")
            continue
        runner, st2 = ranking[1]
        line = (f"{prefix}Best on {metric} ({direction} is better): {best.label}, {fmt_ci(st)}; "
                f"runner-up {runner.label}, {fmt_ci(st2)}.")
        if paired and baseline is None:
            rest = [g for g, _ in ranking[1:]]
            rows = [flipped(r) for r in paired_comparison(best, rest, metric, n_resamples, random_state)]
            for r in rows:
                r["selected_after_looking"] = True
            comparisons.extend(rows)
            row = rows[0]  # against the runner-up
            p = row["p_holm"]
            better = p < 0.05 and (row["diff"] > 0) == larger_is_better
            family = f", Holm-corrected over its {len(rows)} comparisons with the other groups" if len(rows) > 1 else ""
            verdict = ("It is significantly better than the runner-up" if better else
                       "It is not significantly better than the runner-up: treat them as tied until more "
                       "seeds or a larger test set separate them")
            line += (f" {verdict}: {describe(row)}. It was chosen after looking at these results (selection{family}): "
                     "its lead is an optimistic estimate; confirm it on fresh seeds or a held-out split, or name "
                     "the comparison in advance with --baseline.")
        elif not paired:
            line += " No per-example scores for this metric, so no paired test; "
            if math.isnan(st["ci_low"]) or math.isnan(st2["ci_low"]):
                line += "with a single run per group there is no CI either: add seeds to separate them."
            elif st["ci_low"] > st2["ci_high"] or st2["ci_low"] > st["ci_high"]:
                line += "the CIs over runs do not overlap."
            else:
                line += "the CIs over runs overlap: not separated."
        lines.append(line)
    return lines, comparisons
