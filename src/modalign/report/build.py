"""`modalign report PATH...`: tables, plots, verdicts and recommendations from run directories alone.

    report/
        summary.csv, summary.json   one row per run: varied parameters, status, best and final value
                                    of every metric, parameters, wall time
        groups.csv                  runs grouped by configuration over seeds: mean, std, n, 95% CI
        comparisons.csv             paired comparisons (best vs runner-up, or each vs --baseline)
        curves.png, by_group.png, heatmap.png, pareto.png
        index.html                  one self-contained page (images inlined, no network)
        report.md                   the same tables in markdown

No torch: a report builds in a light environment, and fast.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from modalign.analysis.compare import mismatches
from modalign.analysis.criteria import Criteria, judge, parse_criteria
from modalign.analysis.groups import Group, group_runs
from modalign.errors import UserError
from modalign.analysis.metrics import default_metric, full_name, headline, larger_is_better
from modalign.analysis.recommend import recommend
from modalign.runs.index import RunRecord, find_runs


@dataclass
class Report:
    title: str
    sources: list[Path]
    metric: str
    larger_is_better: bool
    records: list[RunRecord]
    groups: list[Group]
    metrics: list[str]  # the group table's metrics, the optimized one first
    missing: list[dict] = field(default_factory=list)  # sweep jobs that left no run.json
    criteria: Criteria | None = None
    verdicts: list[dict] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config_diff: dict = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    variants: list[dict] = field(default_factory=list)  # one row per group: its variant's metadata
    registers: dict[str, list[dict]] = field(default_factory=dict)  # group -> stats per registers kept
    n_resamples: int = 10_000  # every bootstrap of the report: tables, verdicts, comparisons, plots
    random_state: int = 0

    def display(self, record: RunRecord) -> str:
        return _relative(record.path, self.sources)


def _relative(path: Path, sources: list[Path]) -> str:
    roots = [s.resolve() for s in sources]
    common = Path(os.path.commonpath(roots)) if roots else Path(".")
    if len(roots) == 1 and roots[0] == path.resolve():
        return path.name
    try:
        rel = path.resolve().relative_to(common if common != path.resolve() else common.parent)
    except ValueError:
        return str(path)
    return str(rel) or path.name


def _sweep_info(path: Path) -> dict | None:
    import yaml

    f = path / "sweep.yaml"
    if not f.exists():
        return None
    try:
        return yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{f}: not valid YAML ({str(e).splitlines()[0]})") from None


def collect(paths: list[Path], metric: str | None = None, baseline: str | None = None,
            n_resamples: int = 10_000, random_state: int = 0, names: dict[str, str] | None = None) -> Report:
    """Read the runs under `paths`, group them, and compute every number the report shows.
    `names` ({run directory: name}, e.g. a plan's step names) labels each group whose runs share
    one name; a name several groups share keeps their own labels after it."""
    sources = [Path(p) for p in paths]
    records: list[RunRecord] = []
    seen: set[Path] = set()
    sweeps, missing = [], []
    for src in sources:
        found = find_runs(src)
        info = _sweep_info(src)
        if info is not None:
            sweeps.append((src, info))
            have = {r.path.name for r in found}
            for job in info.get("jobs") or []:
                if str(job.get("dir")) not in have:
                    missing.append({"run": str(src / str(job.get("dir"))), "status": job.get("status") or "missing",
                                    "error": job.get("error") or "the job left no run directory"})
        for r in found:
            if r.path.resolve() not in seen:
                seen.add(r.path.resolve())
                records.append(r)
    if not records and not missing:
        raise UserError(f"{', '.join(map(str, sources))}: no run directories (run.json) found")
    recipes = sorted({str(r.info.get("recipe")) for r in records if r.info.get("recipe")})
    recipe = recipes[0] if len(recipes) == 1 else "align"

    criteria = None
    for src, info in sweeps:
        crit = (info.get("experiment_config") or {}).get("criteria")
        if crit is not None:
            criteria = parse_criteria(crit, str(src / "sweep.yaml"))
            break
    if criteria is None:
        for r in records:
            if r.config.get("criteria") is not None:
                criteria = parse_criteria(r.config["criteria"], str(r.path / "cfg.yaml"))
                break

    sweep_metric = next((info.get("metric") for _, info in sweeps if info.get("metric")), None)
    chosen = full_name(metric or sweep_metric or (criteria.metric if criteria else default_metric(recipe)))
    completed = [r for r in records if r.status == "completed"]
    if metric is not None and completed and all(r.metric(chosen) is None for r in completed):
        known = sorted({k for r in completed for k in (r.summary or {}).get("test", {})})
        raise UserError(f"--metric {metric}: no completed run has it (test metrics: {', '.join(known[:12])}...)")
    mode_max = larger_is_better(chosen)
    for _, info in sweeps:
        if info.get("metric") and full_name(info["metric"]) == chosen and info.get("mode") in ("max", "min"):
            mode_max = info["mode"] == "max"

    title = " + ".join(str(info.get("name") or src.name) for src, info in sweeps) or ", ".join(s.name for s in sources)
    groups = group_runs(records)
    if names:
        _name_groups(groups, names)
    metrics = [chosen] + [full_name(m) for m in headline(recipe) if full_name(m) != chosen]
    if criteria is not None and full_name(criteria.metric) not in metrics:
        metrics.append(full_name(criteria.metric))
    metrics = [m for m in metrics if any(r.metric(m) is not None for r in completed)] or [chosen]
    rep = Report(title, sources, chosen, mode_max, records, groups, metrics, missing, criteria,
                 n_resamples=n_resamples, random_state=random_state)

    from modalign.analysis.comparability import config_diff

    rep.config_diff = config_diff({g.label: g.config for g in groups}) if len(groups) > 1 else {}
    sets = sorted({g.comparable_set for g in groups})
    if len(sets) > 1:
        first = {s: next(g for g in groups if g.comparable_set == s) for s in sets}
        for s in sets[1:]:
            why = "; ".join(mismatches(first[sets[0]], first[s]))
            rep.warnings.append(f"runs fall into {len(sets)} comparable sets; set {sets[0]} and set {s} are never "
                                f"compared with each other: {why}")
    failed = [(r, [c["name"] for c in r.info.get("checks") or [] if c.get("status") == "fail"]) for r in records]
    failed = [(r, names) for r, names in failed if names]
    if failed:
        shown = "; ".join(f"{r.path.name} ({', '.join(names)})" for r, names in failed[:5])
        rep.warnings.append(f"{len(failed)} of {len(records)} runs failed a health check: {shown}"
                            + (" ..." if len(failed) > 5 else "") + "; `modalign check RUN` shows why (docs/checks.md)")
    _verdicts(rep, n_resamples, random_state)
    rep.recommendations, rep.comparisons = recommend(groups, chosen, mode_max, baseline, n_resamples, random_state)
    _variants(rep)
    _registers(rep, n_resamples, random_state)
    return rep


def _variants(rep: Report) -> None:
    """Each group's variant metadata (run.json `variant`), when runs record one with provenance."""
    for g in rep.groups:
        v = next((r.info.get("variant") for r in g.runs if (r.info.get("variant") or {}).get("source_sha256")), None)
        if v:
            rep.variants.append({"group": g.label, **{k: v.get(k) for k in (
                "kind", "name", "version", "created_by", "model", "date", "experiment_id", "status", "approach")},
                "key_features": "; ".join(v.get("key_features") or []), "source_sha256": (v.get("source_sha256") or "")[:12]})


def register_counts(record: RunRecord) -> list[int]:
    """The k of `registers_{k}/...` test metrics a run has (a head with ordered registers)."""
    test = (record.summary or {}).get("test", {})
    return sorted({int(k.split("/")[0].removeprefix("registers_")) for k in test if k.startswith("registers_")})


def _registers(rep: Report, n_resamples: int, random_state: int) -> None:
    """Retrieval as a function of the number of registers kept, per group (mean, CI over seeds)."""
    leaf = rep.metric.split("/", 1)[1]
    if "/" in leaf or not leaf.startswith(("m2t_", "t2m_")):
        leaf = "m2t_R@1"
    for g in rep.groups:
        ks = sorted({k for r in g.completed for k in register_counts(r)})
        rows = []
        for k in ks:
            st = g.stats(f"test/registers_{k}/{leaf}", n_resamples, random_state)
            if st["n"]:
                rows.append({"k": k, "metric": f"test/registers_{k}/{leaf}", **st})
        if rows:
            rep.registers[g.label] = rows


def _verdicts(rep: Report, n_resamples: int, random_state: int) -> None:
    if rep.criteria is None:
        return
    m = full_name(rep.criteria.metric)
    for g in rep.groups:
        st = g.stats(m, n_resamples, random_state)
        if st["n"] == 0:
            rep.verdicts.append({"group": g.label, "metric": m, "n": 0, "estimate": math.nan, "low": math.nan,
                                 "high": math.nan, "verdict": "no result", "next": "no completed run: see the runs table",
                                 "note": "", "line": f"{m}: no completed run"})
            continue
        v = judge(rep.criteria, st["mean"], st["ci_low"], st["ci_high"])
        row = {"group": g.label, "metric": m, "n": st["n"], "estimate": st["mean"],
               "low": st["ci_low"], "high": st["ci_high"], "verdict": v.verdict, "next": v.next,
               "note": v.note, "line": v.line(m, st["mean"], st["ci_low"], st["ci_high"])}
        rep.verdicts.append(row)
    if rep.criteria.relative is not None:
        _relative_verdicts(rep, m, n_resamples, random_state)
    if rep.criteria.require:
        _required(rep)


def _required(rep: Report) -> None:
    """criteria.require: a group whose runs miss a requirement gets its verdict, whatever the metric says."""
    base = rep.criteria.relative.baseline if rep.criteria.relative is not None else None
    rows = {v["group"]: v for v in rep.verdicts}
    for g in rep.groups:
        v = rows.get(g.label)
        if v is None or g.label == base or not g.completed:
            continue
        unmet = rep.criteria.unmet(g.completed)
        if unmet is None:
            v["note"] = "; ".join(x for x in (v["note"], "meets every requirement") if x)
            continue
        req, why = unmet
        v.update(verdict=req.verdict, next=req.next)
        v["note"] = "; ".join(x for x in (v["note"], f"requires {req.describe()}: {why}") if x)
        v["line"] = f"{v['metric']} {v['estimate']:.3f} → {req.verdict} → {req.next} (requires {req.describe()}: {why})"


def _relative_verdicts(rep: Report, m: str, n_resamples: int, random_state: int) -> None:
    """criteria.relative: each group against the baseline group, paired (see analysis.criteria)."""
    from modalign.analysis.compare import paired_comparison
    from modalign.analysis.criteria import clears

    rel = rep.criteria.relative
    base = next((g for g in rep.groups if g.label == rel.baseline), None)
    rows = {v["group"]: v for v in rep.verdicts}
    if base is None or not base.completed:
        why = (f"baseline group '{rel.baseline}' is not in this report (groups: "
               f"{', '.join(g.label for g in rep.groups)})" if base is None else
               f"baseline group '{rel.baseline}' has no completed run")
        for v in rep.verdicts:
            v["note"] = "; ".join(x for x in (v["note"], why) if x)
            v["line"] += f" ({why})"
        return
    rows[base.label].update(verdict="baseline", next="the floor the other groups are judged against",
                            note="criteria.relative baseline")
    rows[base.label]["line"] = f"{m} {rows[base.label]['estimate']:.3f}: the baseline of criteria.relative"
    cands = [g for g in rep.groups if g is not base and g.completed and g.comparable_set == base.comparable_set]
    for g in rep.groups:
        if g is not base and g.completed and g not in cands:
            rows[g.label]["note"] = "; ".join(x for x in (rows[g.label]["note"], "not comparable with the baseline") if x)
    if not cands:
        return
    try:
        compared = paired_comparison(base, cands, m, n_resamples, random_state)
    except UserError as e:
        for g in cands:
            rows[g.label]["note"] = "; ".join(x for x in (rows[g.label]["note"], str(e)) if x)
        return
    for c in compared:
        v = rows[c["candidate"]]
        summary = (f"vs {rel.baseline}: {c['diff']:+.3f} (95% CI [{c['low']:+.3f}, {c['high']:+.3f}], "
                   f"p={c['p_value']:.2g}, paired over {c['n_examples']} examples)")
        if clears(rel, c, rep.criteria.smaller_is_better):
            v["note"] = "; ".join(x for x in (v["note"], f"clears the baseline {summary}") if x)
            v["line"] += f"; clears {summary}"
        else:
            v.update(verdict=rel.verdict, next=rel.next)
            v["note"] = "; ".join(x for x in (v["note"], f"does not clear the baseline {summary}, alpha {rel.alpha:g}") if x)
            v["line"] = f"{m} {v['estimate']:.3f} → {rel.verdict} → {rel.next} (does not clear {summary})"


# tables ----------------------------------------------------------------------------------------
def runs_table(rep: Report) -> pd.DataFrame:
    """One row per run (and per sweep job that left no run directory)."""
    from modalign.analysis.checks import cell as checks_cell

    label = {id(r): g.label for g in rep.groups for r in g.runs}
    cset = {id(r): g.comparable_set for g in rep.groups for r in g.runs}
    params = sorted({k for g in rep.groups for k in g.params})
    param_of = {id(r): g.params for g in rep.groups for r in g.runs}
    rows = []
    for r in rep.records:
        s = r.summary or {}
        p = r.info.get("params") or {}
        row = {"run": rep.display(r), "group": label.get(id(r), ""), "set": cset.get(id(r), ""),
               **{k: param_of.get(id(r), {}).get(k) for k in params},
               "seed": r.info.get("seed"), "status": r.status, "checks": checks_cell(r.info.get("checks")),
               "error": r.info.get("error"),
               "variant": (r.info.get("variant") or {}).get("name"),
               "steps": s.get("steps"), "wall_seconds": s.get("wall_seconds"),
               "params_total": p.get("total"), "params_trainable": p.get("trainable")}
        for key, e in sorted((s.get("metrics") or {}).items()):
            row[f"{key} best"] = e.get("best")
            row[f"{key} final"] = e.get("final")
        rows.append(row)
    for m in rep.missing:
        rows.append({"run": _relative(Path(m["run"]), rep.sources), "status": m["status"], "error": m["error"]})
    return pd.DataFrame(rows)


def groups_table(rep: Report, n_resamples: int | None = None, random_state: int | None = None) -> pd.DataFrame:
    """One row per group: each metric's mean, std, n, bootstrap CI and IQM (the report's --resamples)."""
    n_resamples = rep.n_resamples if n_resamples is None else n_resamples
    random_state = rep.random_state if random_state is None else random_state
    rows = []
    for g in rep.groups:
        row = {"group": g.label, "set": g.comparable_set, **{k: v for k, v in g.params.items()},
               "runs": len(g.runs), "completed": len(g.completed),
               "not completed": ", ".join(f"{r.path.name} {r.status}" for r in g.runs if r.status != "completed")}
        for m in rep.metrics:
            st = g.stats(m, n_resamples, random_state)
            row.update({f"{m} mean": st["mean"], f"{m} std": st["std"], f"{m} n": st["n"],
                        f"{m} ci_low": st["ci_low"], f"{m} ci_high": st["ci_high"], f"{m} iqm": st["iqm"]})
        trainable = [(r.info.get("params") or {}).get("trainable") for r in g.completed]
        walls = [(r.summary or {}).get("wall_seconds") for r in g.completed]
        row["params_trainable"] = float(np.mean([t for t in trainable if t is not None])) if any(trainable) else np.nan
        row["wall_seconds"] = float(np.mean([w for w in walls if w is not None])) if any(walls) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _name_groups(groups: list[Group], names: dict[str, str]) -> None:
    given = []
    for g in groups:
        found = {names.get(str(r.path.resolve())) for r in g.runs}
        given.append(found.pop() if len(found) == 1 and None not in found else None)
    for g, name in zip(groups, given):
        if name is not None:
            g.label = name if given.count(name) == 1 else f"{name} ({g.label})"


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


def write_report(rep: Report, out: Path, quiet: bool = True) -> Path:
    """Write every file of the report into `out`; -> the path of index.html."""
    from modalign.report.html import render_html, render_markdown
    from modalign.report.plots import plot_report
    from modalign.runs.rundir import atomic_write_json, atomic_write_text

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the report directory ({e.strerror})") from None
    runs = runs_table(rep)
    groups = groups_table(rep)
    runs.to_csv(out / "summary.csv", index=False)
    atomic_write_json(out / "summary.json", _json_safe({
        "title": rep.title, "metric": rep.metric, "larger_is_better": rep.larger_is_better,
        "sources": [str(s) for s in rep.sources], "warnings": rep.warnings,
        "runs": [{"run": rep.display(r), "path": str(r.path), "status": r.status, "error": r.info.get("error"),
                  "seed": r.info.get("seed"), "overrides": r.overrides, "variant": r.info.get("variant"),
                  "params": r.info.get("params"), "wall_seconds": (r.summary or {}).get("wall_seconds"),
                  "checks": r.info.get("checks"),
                  "metrics": (r.summary or {}).get("metrics", {})} for r in rep.records] + rep.missing,
        "verdicts": rep.verdicts, "recommendations": rep.recommendations, "comparisons": rep.comparisons,
        "variants": rep.variants, "registers": rep.registers}))
    groups.to_csv(out / "groups.csv", index=False)
    if rep.comparisons:
        pd.DataFrame(rep.comparisons).to_csv(out / "comparisons.csv", index=False)
    rep.figures = plot_report(rep, out)
    atomic_write_text(out / "report.md", render_markdown(rep, runs, groups))
    atomic_write_text(out / "index.html", render_html(rep, runs, groups))
    return out / "index.html"


def export_runs(rep: Report, dest: Path) -> int:
    """Copy each run's card.md and run.json, and its per-example scores as predictions.jsonl, into
    dest/<run>/ for archiving. -> the number of runs exported."""
    import shutil

    n = 0
    for r in rep.records:
        target = Path(dest) / rep.display(r).replace(os.sep, "__")
        target.mkdir(parents=True, exist_ok=True)
        for name in ("card.md", "run.json", "cfg.yaml", "facts/summary.json"):
            if (r.path / name).exists():
                shutil.copyfile(r.path / name, target / Path(name).name)
        scores = r.path / "facts" / "scores.parquet"
        if scores.exists():
            frame = pd.read_parquet(scores)
            with open(target / "predictions.jsonl", "w", encoding="utf-8") as f:
                for rec in frame.to_dict(orient="records"):
                    f.write(json.dumps(_json_safe(rec), ensure_ascii=False) + "\n")
        n += 1
    return n
