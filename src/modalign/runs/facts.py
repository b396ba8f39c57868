"""What a finished run leaves behind: facts/summary.json, facts/scores.parquet, facts/embeddings.npz,
figures and card.md. No torch: callers pass numpy arrays."""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from modalign.runs.rundir import RunDir, atomic_write_json

if TYPE_CHECKING:
    from modalign.data.paired import PairedData


def summarize_metrics(rows: list[dict], modes: dict[str, str] | None = None) -> dict[str, dict]:
    """metrics.jsonl rows -> {"split/name": {"final", "best", "best_step", "final_step", "n"}}.
    best is the max, except for names that are smaller-is-better (losses, ranks, seconds)."""
    out: dict[str, dict] = {}
    for r in rows:
        key = f"{r['split']}/{r['name']}"
        v = r["value"]
        e = out.setdefault(key, {"final": v, "final_step": r["step"], "best": v, "best_step": r["step"], "n": 0})
        e["n"] += 1
        if r["step"] >= e["final_step"]:
            e["final"], e["final_step"] = v, r["step"]
        lower = smaller_is_better(r["name"])
        if isinstance(v, float) and math.isnan(v):
            continue
        if (v < e["best"]) if lower else (v > e["best"]):
            e["best"], e["best_step"] = v, r["step"]
    return out


def smaller_is_better(name: str) -> bool:
    leaf = name.rsplit("/", 1)[-1]
    return ("loss" in name or leaf.startswith(("clip", "siglip", "queue", "mlm", "rec_", "vq_commit", "vq_codebook"))
            or "rank" in leaf
            or "seconds" in leaf or leaf == "temperature")


def per_example_column(metric: str) -> str | None:
    """The facts/scores.parquet column whose mean over examples is `metric` (test/ prefix
    optional), or None when the metric is not a mean over examples (median rank, logit scale):
    R@k -> r{k} (0/1 hits), mAP -> ap, mean_rank -> rank, zeroshot_acc -> zeroshot_correct, and a
    per-example reconstruction error keeps its name."""
    leaf = metric.split("/", 1)[1] if metric.startswith(("test/", "val/", "train/")) else metric
    prefix, _, name = leaf.rpartition("/")
    prefix = prefix + "/" if prefix else ""
    direction, _, kind = name.partition("_")
    if direction in ("m2t", "t2m"):
        if kind.startswith("R@"):
            return f"{prefix}{direction}_r{kind[2:]}"
        return {"mAP": f"{prefix}{direction}_ap", "mean_rank": f"{prefix}{direction}_rank"}.get(kind)
    if name == "zeroshot_acc":
        return "zeroshot_correct"
    if name in ("median_rank", "logit_scale", "temperature") or name.startswith("vq_"):
        return None
    return leaf


def write_scores(path, data: PairedData, per_example: dict[str, np.ndarray]) -> None:
    import pandas as pd  # not at import time: `modalign runs` needs only this module's helpers

    cols = {"id": data.ids.astype(str)}
    if data.labels is not None:
        cols["label"] = data.labels
    for k, v in per_example.items():
        cols[k] = v
    pd.DataFrame(cols).to_parquet(path, index=False)


def write_run_facts(run: RunDir, split: str, metrics: dict, per_example: dict, data: PairedData,
                    modality: np.ndarray | None, text: np.ndarray | None, export_embeddings: bool, fit: dict,
                    wall: float, chance: dict[str, float]) -> dict:
    from modalign.report.figures import plot_run_curves, plot_similarity
    from modalign.runs.card import write_card

    info = run.info()
    rows = run.read_metrics()
    for k, v in metrics.items():
        rows.append({"step": fit["steps"], "epoch": None, "split": split, "name": k, "value": v})
    # test metrics go into metrics.jsonl too, so every number in the summary has a line behind it
    with open(run.metrics_path, "a", encoding="utf-8") as f:
        t = round(time.time(), 3)
        for k, v in metrics.items():
            f.write(json.dumps({"step": fit["steps"], "epoch": None, "split": split, "name": k,
                                "value": float(v), "time": t}) + "\n")
    summary = {
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
    atomic_write_json(run.facts / "summary.json", summary)
    write_scores(run.facts / "scores.parquet", data, per_example)
    if export_embeddings and modality is not None:
        np.savez(run.facts / "embeddings.npz", ids=data.ids.astype(str), modality=modality, text=text)
    plot_run_curves(rows, run.figures)
    if modality is not None and text is not None:
        plot_similarity(modality[:32], text[:32], run.figures / "similarity.png",
                        title=f"{split}: first {min(32, len(modality))} pairs (cosine)")
    write_card(run, summary)
    return summary
