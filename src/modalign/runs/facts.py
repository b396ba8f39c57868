"""What a finished run's facts say: facts/summary.json built from its metrics. No torch, no writes
(the run writer writes them)."""

from __future__ import annotations

import math

from modalign.analysis.metrics import larger_is_better


def summarize_metrics(rows: list[dict], modes: dict[str, str] | None = None) -> dict[str, dict]:
    """metrics.jsonl rows -> {"split/name": {"final", "best", "best_step", "final_step", "n"}}.
    best is the max, except for metrics the registry says are lower-is-better (losses, ranks, seconds)."""
    out: dict[str, dict] = {}
    for r in rows:
        key = f"{r['split']}/{r['name']}"
        v = r["value"]
        e = out.setdefault(key, {"final": v, "final_step": r["step"], "best": v, "best_step": r["step"], "n": 0})
        e["n"] += 1
        if r["step"] >= e["final_step"]:
            e["final"], e["final_step"] = v, r["step"]
        lower = not larger_is_better(r["name"])
        if isinstance(v, float) and math.isnan(v):
            continue
        if (v < e["best"]) if lower else (v > e["best"]):
            e["best"], e["best_step"] = v, r["step"]
    return out


def build_summary(info: dict, rows: list[dict], split: str, metrics: dict, fit: dict, wall: float,
                  chance: dict[str, float]) -> dict:
    """facts/summary.json of a finished run. info: run.json; rows: its metrics.jsonl points so far
    (the test metrics are added here, at the last step); metrics: the test metrics."""
    rows = rows + [{"step": fit["steps"], "epoch": None, "split": split, "name": k, "value": v}
                   for k, v in metrics.items()]
    return {
        "recipe": info.get("recipe"),
        "protocol": info.get("eval", {}).get("protocol"),
        "split": split,
        split: {k: float(v) for k, v in metrics.items()},
        "chance": chance,
        "metrics": summarize_metrics(rows),
        "steps": fit["steps"],
        "best_step": fit["best_step"],
        "stopped_early": fit["stopped_early"],
        "precision": fit["precision"],
        "train_seconds": fit["train_seconds"],
        "wall_seconds": wall,
        "params": info.get("params"),
    }
