"""The report's plots, from run directories: curves per group with CI bands, the metric by group
with CI error bars, a heatmap for two-dimensional grids, and Pareto plots. matplotlib only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from modalign.analysis.pareto import pareto_front
from modalign.analysis.stats import bootstrap_ci
from modalign.report.figures import _plt



def _save(fig, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():  # long group labels: the layout does what it can, said once is enough
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _curve(run_path: Path, split: str, name: str) -> dict[int, float]:
    out = {}
    try:
        with open(run_path / "metrics.jsonl", encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a torn last line of a killed run
                if r.get("split") == split and r.get("name") == name and isinstance(r.get("value"), (int, float)):
                    out[int(r["step"])] = float(r["value"])
    except OSError:
        pass
    return out


def _band(curves: list[dict[int, float]], n_resamples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> steps, mean, low, high over the steps every run logged (low = high = mean for one run)."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    mean, low, high = [], [], []
    for s in steps:
        vals = np.array([c[s] for c in curves])
        if not np.all(np.isfinite(vals)):
            mean.append(np.nan), low.append(np.nan), high.append(np.nan)
            continue
        m, lo, hi = bootstrap_ci(vals, n_resamples=n_resamples, random_state=s)
        mean.append(m), low.append(m if math.isnan(lo) else lo), high.append(m if math.isnan(hi) else hi)
    return np.array(steps), np.array(mean), np.array(low), np.array(high)


def plot_curves(rep, path: Path) -> Path | None:
    """Training loss and the validation metric over steps, one line per group, 95% CI bands."""
    leaf = rep.metric.split("/", 1)[1]
    loss = "loss" if any(_curve(r.path, "train", "loss") for g in rep.groups for r in g.completed[:1]) else "total_loss"
    panels = [("train", loss, "training loss"), ("val", leaf, f"validation {leaf}")]
    data = {}
    for split, name, _ in panels:
        for g in rep.groups:
            curves = [c for c in (_curve(r.path, split, name) for r in g.completed) if c]
            if curves:
                data[(split, name, g.label)] = _band(curves, rep.n_resamples)
    if not data:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (split, name, title) in zip(axes, panels):
        for i, g in enumerate(rep.groups):
            if (split, name, g.label) not in data:
                continue
            steps, mean, low, high = data[(split, name, g.label)]
            color = f"C{i % 10}"
            ax.plot(steps, mean, color=color, lw=1.4, label=f"{g.label} (n={len(g.completed)})")
            ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
        ax.set(xlabel="step", title=f"{title} (mean, 95% CI over seeds)")
        if ax.has_data():
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_by_group(rep, path: Path) -> Path | None:
    """The optimized metric by group: mean with 95% CI error bars, each run as a dot."""
    groups = [g for g in rep.groups if g.values(rep.metric).size]
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(groups) + 2), 3.8))
    for i, g in enumerate(groups):
        st = g.stats(rep.metric, rep.n_resamples, rep.random_state)
        lo = st["mean"] - st["ci_low"] if not math.isnan(st["ci_low"]) else 0
        hi = st["ci_high"] - st["mean"] if not math.isnan(st["ci_high"]) else 0
        ax.errorbar(i, st["mean"], yerr=[[lo], [hi]], fmt="D", color=f"C{i % 10}", ms=7, capsize=6, lw=1.5)
        vals = g.values(rep.metric)
        ax.scatter(np.full(vals.size, i + 0.18), vals, s=14, color="black", alpha=0.7, zorder=3)
    # chance as text: a line at chance would squash the differences the plot is for
    chance = next((r.summary.get("chance", {}).get(rep.metric.split("/", 1)[1]) for g in groups
                   for r in g.completed if r.summary), None)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xticks(range(len(groups)), [g.label for g in groups], rotation=15 if len(groups) > 3 else 0, fontsize=8)
    ax.set(ylabel=rep.metric, title=f"{rep.metric}: mean, 95% CI, runs as dots"
           + (f" (chance {chance:.3g})" if chance is not None else ""))
    ax.title.set_fontsize(10)
    return _save(fig, path)


def grid_axes(rep) -> tuple[str, str] | None:
    """The two varied parameters of a two-dimensional grid (each with 2+ values), or None."""
    keys = [k for k in dict.fromkeys(k for g in rep.groups for k in g.params)
            if len({str(g.params.get(k)) for g in rep.groups}) > 1]
    return (keys[0], keys[1]) if len(keys) == 2 and len({g.comparable_set for g in rep.groups}) == 1 else None


def plot_heatmap(rep, path: Path) -> Path | None:
    axes = grid_axes(rep)
    if axes is None:
        return None
    a, b = axes
    rows = list(dict.fromkeys(str(g.params.get(a)) for g in rep.groups))
    cols = list(dict.fromkeys(str(g.params.get(b)) for g in rep.groups))
    mat = np.full((len(rows), len(cols)), np.nan)
    for g in rep.groups:
        x = g.values(rep.metric)
        if x.size:
            mat[rows.index(str(g.params.get(a))), cols.index(str(g.params.get(b)))] = x.mean()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 3, 0.8 * len(rows) + 2))
    im = ax.imshow(mat, cmap="viridis" if rep.larger_is_better else "viridis_r", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.3f}", ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel=b, ylabel=a, title=f"{rep.metric} (mean over seeds)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_pareto(rep, path: Path) -> Path | None:
    """The metric against trainable parameters and against wall time; the Pareto front joined."""
    points = []
    for g in rep.groups:
        x = g.values(rep.metric)
        if not x.size:
            continue
        params = [(r.info.get("params") or {}).get("trainable") for r in g.completed]
        walls = [(r.summary or {}).get("wall_seconds") for r in g.completed]
        ppl = g.values("test/retention/ppl_ratio")  # stage 3: what the LM lost (the retention frontier)
        points.append((g.label, float(np.mean([p for p in params if p is not None] or [np.nan])),
                       float(np.mean([w for w in walls if w is not None] or [np.nan])), float(x.mean()),
                       float(ppl.mean()) if ppl.size else np.nan))
    if len(points) < 2:
        return None
    plt = _plt()
    panels = [(1, "trainable parameters"), (2, "wall time per run (s)")]
    if any(np.isfinite(p[4]) for p in points):
        panels.append((4, "LM perplexity after / before (retention)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8))
    value = np.array([p[3] for p in points])
    for ax, (col, xlabel) in zip(axes, panels):
        cost = np.array([p[col] for p in points])
        front = pareto_front(cost, value, rep.larger_is_better)
        for i, p in enumerate(points):
            ax.scatter(cost[i], value[i], color=f"C{i % 10}", s=40, edgecolor="black" if front[i] else "none",
                       label=p[0])
        order = np.argsort(cost[front])
        ax.plot(cost[front][order], value[front][order], color="black", lw=1, ls=":", label="Pareto front")
        ax.set(xlabel=xlabel, ylabel=rep.metric, title=f"{rep.metric} vs {xlabel}")
        if col == 1:
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_registers(rep, path: Path) -> Path | None:
    """Retrieval vs the number of registers kept (heads with ordered registers): mean and 95% CI."""
    if not rep.registers:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = [g.label for g in rep.groups]
    for label, rows in rep.registers.items():
        i = labels.index(label)
        k = np.array([r["k"] for r in rows])
        mean = np.array([r["mean"] for r in rows])
        lo = np.array([r["mean"] - r["ci_low"] if not math.isnan(r["ci_low"]) else 0 for r in rows])
        hi = np.array([r["ci_high"] - r["mean"] if not math.isnan(r["ci_high"]) else 0 for r in rows])
        ax.errorbar(k, mean, yerr=[lo, hi], marker="o", capsize=4, color=f"C{i % 10}", label=label)
    leaf = rows[0]["metric"].split("/", 2)[-1]
    ax.set(xlabel="registers kept (k)", ylabel=f"test {leaf}", title=f"{leaf} vs registers kept (mean, 95% CI)")
    ax.set_xticks(sorted({r["k"] for rows in rep.registers.values() for r in rows}))
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_report(rep, out: Path) -> dict[str, Path]:
    figures = {}
    for name, fn in (("curves", plot_curves), ("by_group", plot_by_group), ("heatmap", plot_heatmap),
                     ("pareto", plot_pareto), ("registers", plot_registers)):
        p = fn(rep, Path(out) / f"{name}.png")
        if p is not None:
            figures[name] = p
    return figures
