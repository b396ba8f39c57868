"""The metric registry (direction, per-example column, headline) and what reads it: the
recommendation logic (selection after looking, --resamples honoured) and the product path of
paired comparisons (candidates with matched seeds share resamples). No torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from modalign.analysis.compare import paired_comparison
from modalign.analysis.groups import Group
from modalign.analysis.metrics import default_metric, headline, larger_is_better, per_example_column, spec
from modalign.analysis.recommend import recommend
from modalign.analysis.stats import paired_bootstrap
from modalign.runs.index import RunRecord


@pytest.mark.parametrize("name, direction, column", [
    ("test/m2t_R@1", "max", "m2t_r1"),
    ("t2m_R@10", "max", "t2m_r10"),
    ("test/exact_text/t2m_R@5", "max", "exact_text/t2m_r5"),
    ("test/registers_2/m2t_mAP", "max", "registers_2/m2t_ap"),
    ("test/m2t_mean_rank", "min", "m2t_rank"),
    ("test/m2t_median_rank", "min", None),
    ("test/zeroshot_acc", "max", "zeroshot_correct"),
    ("test/total_loss", "min", "total_loss"),
    ("test/rec_globals", "min", "rec_globals"),
    ("test/token_acc", "max", "token_acc"),
    ("test/vq_perplexity", "max", None),
    ("train/loss", "min", None),
    ("val/eval_seconds", "min", None),
    ("train/grad_norm/encoder", "none", None),
    ("train/lr/heads", "none", None),
])
def test_every_metric_has_one_direction_and_column(name, direction, column):
    s = spec(name)
    assert (s.direction, s.column) == (direction, column)
    assert larger_is_better(name) == (direction != "min")
    assert per_example_column(name) == column


def test_recipe_headlines_and_defaults():
    assert headline("align")[0] == "m2t_R@1" and default_metric("align") == "test/m2t_R@1"
    assert default_metric("autoencode") == "test/total_loss" and not larger_is_better(default_metric("autoencode"))


def _groups(tmp_path, scores: list[np.ndarray], seeds=(0,)) -> list[Group]:
    """One group per score vector, one run per seed, each run's facts/scores.parquet on disk."""
    ids = [f"s{i:04d}" for i in range(len(scores[0]))]
    out = []
    for j, s in enumerate(scores):
        runs = []
        for seed in seeds:
            path = tmp_path / f"g{j}_{seed}"
            (path / "facts").mkdir(parents=True)
            pd.DataFrame({"id": ids, "m2t_r1": s}).to_parquet(path / "facts" / "scores.parquet", index=False)
            runs.append(RunRecord(path, {"status": "completed", "seed": seed}, {"test": {"m2t_R@1": float(s.mean())}}))
        out.append(Group(f"g{j}", {}, runs, {}))
    return out


def test_candidates_sharing_matched_seeds_share_resamples_with_the_numbers_of_separate_calls(tmp_path):
    rng = np.random.default_rng(0)
    base = (rng.random(500) < 0.6).astype(float)
    cands = [np.where(rng.random(500) < 0.1, 1 - base, base) for _ in range(4)]
    groups = _groups(tmp_path, [base, *cands])
    rows = paired_comparison(groups[0], groups[1:], "test/m2t_R@1", n_resamples=2_000, random_state=3)
    for row, c in zip(rows, cands):
        alone = paired_bootstrap(base, c, n_resamples=2_000, random_state=3)
        assert (row["low"], row["high"], row["p_value"]) == (alone["low"][0], alone["high"][0], alone["p_value"][0])
        assert row["diff"] == pytest.approx(c.mean() - base.mean())


def test_the_best_chosen_after_looking_is_tested_against_every_group_and_says_so(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.random(400)
    scores = [base, base + 0.05 + rng.normal(0, 0.01, 400), base + 0.01 + rng.normal(0, 0.01, 400)]
    groups = _groups(tmp_path, scores)
    lines, rows = recommend(groups, "test/m2t_R@1", True, n_resamples=1_000)
    assert len(lines) == 1 and "Best on test/m2t_R@1" in lines[0] and "g1" in lines[0].split(";")[0]
    assert "chosen after looking" in lines[0] and "Holm-corrected over its 2 comparisons" in lines[0]
    assert [(r["candidate"], r["baseline"]) for r in rows] == [("g1", "g2"), ("g1", "g0")]
    assert all(r["selected_after_looking"] and r["diff"] > 0 for r in rows)
    # a baseline named in advance: a confirmatory comparison, no selection caveat on its lines
    lines, rows = recommend(groups, "test/m2t_R@1", True, baseline="g0", n_resamples=1_000)
    assert rows[0]["baseline"] == "g0" and "selected_after_looking" not in rows[0]
    assert "Holm-corrected over 2 candidates" in lines[0]


def test_report_tables_and_recommendations_honour_resamples(tmp_path):
    """groups.csv's CIs and the comparisons use the report's --resamples, not a fixed count."""
    import modalign.report.build as build

    rng = np.random.default_rng(2)
    base = rng.random(300)
    groups = _groups(tmp_path, [base, base + rng.normal(0.02, 0.05, 300)], seeds=range(6))
    for g in groups:  # six different run-level values per group, so the CI depends on the resamples
        for k, r in enumerate(g.runs):
            r.summary["test"]["m2t_R@1"] += 0.013 * k * k
    m = "test/m2t_R@1"
    for n in (50, 5_000):
        rep = build.Report("t", [tmp_path], m, True, [r for g in groups for r in g.runs], groups, [m], n_resamples=n)
        table = build.groups_table(rep)
        assert list(table[f"{m} ci_low"]) == [g.stats(m, n)["ci_low"] for g in groups]
        _, rows = recommend(groups, m, True, n_resamples=n)
        assert rows[0]["n_resamples"] == n
    assert groups[0].stats(m, 50)["ci_low"] != groups[0].stats(m, 10_000)["ci_low"]


def test_registry_imports_no_torch():
    code = "import sys, modalign.analysis.metrics, modalign.analysis.recommend; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_same_configuration_on_two_devices_is_two_groups(tmp_path):
    from modalign.analysis.groups import group_runs

    config = {"head": {"kind": "mlp"}, "seed": 0, "env": {"device": "auto"}}
    records = [RunRecord(tmp_path / f"r{i}", {"status": "completed", "seed": i, "recipe": "align",
                                              "env": {"device": dev, "device_type": dev.split(":")[0]}},
                         None, config={**config, "seed": i}, overrides=["head=mlp"])
               for i, dev in enumerate(["cpu", "cuda:0", "cpu", "cuda:1"])]
    groups = group_runs(records)
    assert sorted(g.label for g in groups) == ["device=cpu", "device=cuda"]
    assert all(len(g.runs) == 2 for g in groups)
    old = RunRecord(tmp_path / "old", {"status": "completed", "seed": 9, "recipe": "align", "env": {"device": "cpu"}},
                    None, config=config, overrides=["head=mlp"])  # before GPU placement: no device_type
    assert len(group_runs([records[0], old])) == 1
