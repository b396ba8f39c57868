"""A plan's report, its statistics, its graph and its status, from the plan directory alone. No torch.

    PLAN/report/
        index.html, report.md   phases (status, why each started, gate verdicts), triggers (what
                                fired, when, why), the timeline, the DAG, the statistics, the jobs
        summary.json            the same without wall-clock times: what a rerun must reproduce
        timeline.png            one bar per job on a clock from the plan's start, by phase; early
                                starts, gates and triggers marked
        graph.png               the plan's DAG
        phases/<phase>/         each phase's sweep report (modalign report over its runs)
        statistics/<phase>/     a statistics phase's report: seed tables, paired p-values vs its
                                baseline with Holm, Pareto, stability across seeds
        export/                 run cards, run.json, cfg.yaml and predictions of the statistics' runs
"""

from __future__ import annotations

import html
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

from modalign.errors import UserError


def read_state(plan_dir: Path) -> dict:
    f = Path(plan_dir) / "plan.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{plan_dir}: not a plan directory (no plan.json; run `modalign plan run NAME` first)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: cannot be read ({type(e).__name__})") from None


def find_plan_dir(target: str) -> Path:
    """A plan directory from its path, or from a plan's name under outputs/plans/."""
    p = Path(target)
    if (p / "plan.json").exists():
        return p
    if p.suffix in (".yaml", ".yml") or "/" not in target:
        from modalign.plans.spec import load_plan

        try:
            name = load_plan(target).name
        except UserError:
            name = p.stem
        for root in (Path("outputs"),):
            if (root / "plans" / name / "plan.json").exists():
                return root / "plans" / name
    raise UserError(f"{target}: no plan directory (give PLAN_DIR, e.g. outputs/plans/align_study, or run the plan first)")


def _match_group(groups, spec: str):
    """The group a baseline spec names: its exact label, a run directory in it, or the one group
    whose parameters include every key=value of the spec (head=linear among head x loss groups)."""
    from modalign.analysis.groups import find_group

    g = find_group(groups, spec)
    if g is not None:
        return g
    want = dict(x.strip().split("=", 1) for x in spec.split(",") if "=" in x)
    hits = [g for g in groups if want and all(str(g.params.get(k)) == v for k, v in want.items())]
    return hits[0] if len(hits) == 1 else None


def statistics_report(plan_dir: Path, plan, phase, jobs: list[dict], baseline: str | None) -> Path:
    """A statistics phase: modalign's report over the named results (jobs as plan.json holds
    them), its groups named by their plan steps, against the baseline (a group label such as
    head=linear, or a run directory of the baseline step)."""
    from modalign.analysis.metrics import full_name
    from modalign.report.build import _verdicts, collect, export_runs, write_report

    if not jobs:
        raise UserError("no runs to compare")
    dirs = [Path(j["dir"]) for j in jobs]
    names = {str(Path(j["dir"]).resolve()): f"{j['phase']}.{j['step']}" for j in jobs}
    metric = phase.statistics.metric or plan.metric
    rep = collect(dirs, metric=None if metric is None else full_name(metric), names=names)
    if baseline:
        g = _match_group(rep.groups, baseline)
        if g is None:
            raise UserError(f"statistics.baseline '{baseline}' names no single group (groups: "
                            f"{'; '.join(x.label for x in rep.groups)})")
        rep = collect(dirs, metric=rep.metric, baseline=g.label, names=names)
    if phase.statistics.criteria is not None:
        rep.criteria, rep.verdicts = phase.statistics.criteria, []
        _verdicts(rep, rep.n_resamples, rep.random_state)
    rep.title = f"{plan.name}: {phase.name}"
    out = Path(plan_dir) / "report" / "statistics" / phase.name
    write_report(rep, out)
    export_runs(rep, Path(plan_dir) / "report" / "export")
    return out / "index.html"


def statistics_jobs(state: dict, phase) -> tuple[list[dict], str | None]:
    """The jobs a statistics phase compares, and its baseline, from plan.json."""
    def of(name: str) -> list[dict]:
        keys = [name] if "." in name else [k for k in state.get("steps") or {} if k.split(".")[0] == name]
        return [state["jobs"][i] for k in keys for i in (state.get("steps") or {}).get(k, [])]

    jobs = [j for r in phase.statistics.results for j in of(r)]
    baseline = phase.statistics.baseline
    if baseline and "=" not in baseline:  # a phase.step: its runs are the baseline group
        base = of(baseline)
        baseline = base[0]["dir"] if base else None
    return jobs, baseline


def _epoch(iso) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def job_rows(state: dict) -> list[dict]:
    """One row per job of the plan in the order the plan lists them, with what its run says."""
    from modalign.analysis.metrics import default_metric, full_name

    order = {p: i for i, p in enumerate(state.get("order") or [])}
    step_order = {k: i for i, k in enumerate(state.get("steps") or {})}
    rows = []
    for jid, j in (state.get("jobs") or {}).items():
        run = Path(j["dir"])
        try:
            info = json.loads((run / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        try:
            summary = json.loads((run / "facts" / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = {}
        plan_recipe = (state.get("recipe") or j["recipe"])
        metric = full_name(state.get("metric") if state.get("metric") and j["recipe"] == plan_recipe
                           else default_metric(j["recipe"]))
        value = (summary.get("test") or {}).get(metric.split("/", 1)[1]) if metric.startswith("test/") else \
            ((summary.get("metrics") or {}).get(metric) or {}).get("best")
        start = j.get("started_at") or _epoch(info.get("created_at"))
        end = j.get("finished_at") or _epoch(info.get("finished_at"))
        label = f"{j['phase']}.{j['step']}" + (f".{j['index']}" if j.get("index") else "")
        rows.append({"id": jid, "label": label, "phase": j["phase"], "step": j["step"], "status": j["status"],
                     "recipe": j["recipe"], "dir": j["dir"], "run": run.name, "seed": info.get("seed"),
                     "metric": metric, "value": value, "steps": summary.get("steps"),
                     "stopped_early": summary.get("stopped_early"), "trigger": j.get("trigger"),
                     "parent": j.get("parent"), "start": start, "end": end, "error": j.get("error"),
                     "launches": [x.get("mode") for x in j.get("launches") or []],
                     "checks": [c["name"] for c in info.get("checks") or [] if c.get("status") == "fail"],
                     "order": (order.get(j["phase"], 99), step_order.get(f"{j['phase']}.{j['step']}", 99),
                               j.get("index", 0))})
    rows.sort(key=lambda r: r["order"])
    return rows


def plot_timeline(state: dict, rows: list[dict], path: Path) -> Path | None:
    """A Gantt chart: each job a bar from its first start to its end, coloured by phase; a phase's
    span shaded; an early start, a gate and a fired trigger marked where they happened."""
    from modalign.report.figures import _plt

    timed = [r for r in rows if r["start"] is not None]
    if not timed:
        return None
    plt = _plt()
    t0 = min(r["start"] for r in timed)
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(phases)}
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * len(timed)))
    now = time.time()
    for y, r in enumerate(timed):
        end = r["end"] if r["end"] is not None else now
        hatch = "//" if r["status"] not in ("completed",) else None
        ax.barh(y, (end - r["start"]) / 60, left=(r["start"] - t0) / 60, color=colors[r["phase"]],
                edgecolor="black" if hatch else None, hatch=hatch, height=0.7)
        tag = " (trigger)" if r["trigger"] else (" (resumed)" if "resumed" in r["launches"] else "")
        ax.text((end - t0) / 60, y, f" {r['status']}{tag}", va="center", fontsize=7)
    for p, st in (state.get("phases") or {}).items():
        start = st.get("started_at")
        if start is None:
            continue
        if str(st.get("why_started", "")).startswith("early start"):
            ax.axvline((start - t0) / 60, color=colors.get(p, "grey"), ls="--", lw=1)
            ax.text((start - t0) / 60, len(timed) - 0.45, f" {p} starts early", fontsize=7, color=colors.get(p, "grey"))
    for t in (state.get("triggers") or {}).values():
        for f in t.get("fired") or []:
            ax.axvline((f["at"] - t0) / 60, color="red", ls=":", lw=1)
    ax.set_yticks(range(len(timed)), [r["label"] for r in timed], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("minutes since the plan's first job started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in phases]
    ax.legend(handles, phases, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlim(0, ax.get_xlim()[1] * 1.12)  # room for the status after the last bar
    ax.set_title(f"plan {state.get('name')}: timeline (dashed: an early start; dotted red: a trigger fired)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# the DAG -------------------------------------------------------------------------------------------
def edges(plan) -> list[tuple[str, str, str]]:
    """(from phase, to phase, kind) for after, gate, early start, references, replicate, statistics."""
    out = []
    for p in plan.phases.values():
        for a in p.after:
            out.append((a.split(".")[0], p.name, "after" if p.start_when is None else "after (or early start)"))
        if p.start_when is not None:
            out.append((p.start_when.run.split(".")[0], p.name, f"early: {p.start_when.describe()}"))
        if p.gate is not None:
            for r in p.gate.results:
                out.append((r.split(".")[0], p.name, f"gate on {r}"))
        waits = {a.split(".")[0] for a in p.after} | {r.split(".")[0] for r in (p.gate.results if p.gate else ())}
        for n in sorted(p.needs()):
            if n.split(".")[0] not in waits | {p.name}:
                out.append((n.split(".")[0], p.name, f"uses {n}"))
    seen, uniq = set(), []
    for e in out:
        if e not in seen:
            seen.add(e)
            uniq.append(e)
    return uniq


def graph_text(plan) -> str:
    lines = [f"plan {plan.name} ({plan.file})"]
    incoming: dict[str, list[str]] = {}
    for a, b, kind in edges(plan):
        incoming.setdefault(b, []).append(f"{a} [{kind}]")
    for name in plan.order():
        p = plan.phases[name]
        lines.append(f"{name}")
        for src in incoming.get(name, []):
            lines.append(f"  <- {src}")
        if p.gate is not None:
            crit = f"{p.gate.criteria.metric} in {', '.join(p.gate.passing)}" if p.gate.criteria else ""
            chk = "checks pass" if p.gate.checks else ""
            lines.append(f"  gate: {' and '.join(x for x in (crit, chk) if x)} on {', '.join(p.gate.results)}")
        for s in p.steps:
            n = len(s.points())
            grid = f" grid {' x '.join(f'{k}[{len(v)}]' for k, v in s.grid)}" if s.grid else ""
            lines.append(f"  {'sweep' if s.grid else 'run'} {s.name}: {s.recipe}, {n} job{'s' if n != 1 else ''}{grid}"
                         + (f"  {' '.join(s.overrides)}" if s.overrides else ""))
        for t in p.triggers:
            lines.append(f"  trigger {t.name}: when {t.describe()} -> start {t.start.recipe} "
                         f"{' '.join(t.start.overrides)}")
        if p.replicate is not None:
            top = f"top {p.replicate.top} of " if p.replicate.top else ""
            lines.append(f"  replicate {top}{', '.join(p.replicate.results)} with {' '.join(p.replicate.overrides)}")
        if p.statistics is not None:
            lines.append(f"  statistics on {', '.join(p.statistics.results)}"
                         + (f" vs {p.statistics.baseline}" if p.statistics.baseline else ""))
    return "\n".join(lines)


def plot_graph(plan, path: Path) -> Path:
    """The DAG drawn in layers: a phase sits one layer below the deepest phase it depends on."""
    from modalign.report.figures import _plt

    plt = _plt()
    es = edges(plan)
    depth: dict[str, int] = {}
    for name in plan.order():
        depth[name] = 1 + max((depth[a] for a, b, _ in es if b == name and a in depth and a != name), default=-1)
    layers: dict[int, list[str]] = {}
    for n, d in depth.items():
        layers.setdefault(d, []).append(n)
    pos = {n: (i - (len(ns) - 1) / 2, -d) for d, ns in layers.items() for i, n in enumerate(ns)}
    fig, ax = plt.subplots(figsize=(8, 1.6 + 1.5 * len(layers)))
    merged: dict[tuple[str, str], list[str]] = {}
    for a, b, kind in es:
        if a != b:
            merged.setdefault((a, b), []).append(kind.split(":")[0].split(" (")[0].replace(" on ", " "))
    for (a, b), kinds in merged.items():
        (x0, y0), (x1, y1) = pos[a], pos[b]
        style = "--" if any(k.startswith("early") for k in kinds) else "-"
        ax.annotate("", xy=(x1, y1 + 0.18), xytext=(x0, y0 - 0.18),
                    arrowprops={"arrowstyle": "->", "ls": style, "color": "grey"})
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, ", ".join(dict.fromkeys(k.split()[0] for k in kinds)), fontsize=7,
                color="dimgrey", ha="center", bbox={"fc": "white", "ec": "none", "pad": 0.5})
    for n, (x, y) in pos.items():
        p = plan.phases[n]
        inner = [s.name for s in p.steps] + [f"⚡{t.name}" for t in p.triggers]
        inner += ["replicate"] if p.replicate else []
        inner += ["statistics"] if p.statistics else []
        gate = " [gate]" if p.gate else ""
        ax.text(x, y, f"{n}{gate}\n{', '.join(inner)}", ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "fc": "#eef3fb", "ec": "#4a6fa5"})
    xs = [x for x, _ in pos.values()]
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(-len(layers), 0.6)
    ax.axis("off")
    ax.set_title(f"plan {plan.name}: phases (solid: after / gate / uses; dashed: early start)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# the report -----------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def plan_summary(state: dict, rows: list[dict]) -> dict:
    """What a rerun must reproduce: statuses, decisions and results, without wall-clock times."""
    out = {"name": state.get("name"), "status": state.get("status"), "phases": {}, "triggers": {}, "jobs": []}
    for name in state.get("order") or []:
        st = (state.get("phases") or {}).get(name, {})
        gate = st.get("gate") or {}
        out["phases"][name] = {"status": st.get("status"), "why": st.get("why"), "gate": gate.get("line"), "gate_passed": gate.get("passed")}
    labels = {r["id"]: r["label"] for r in rows}
    for key, t in (state.get("triggers") or {}).items():
        out["triggers"][key] = {"status": t.get("status"),
                                "fired": [{"source": labels.get(f["source"]), "job": labels.get(f["job"])}
                                          for f in t.get("fired") or []]}
    for r in rows:
        out["jobs"].append({"label": r["label"], "id": r["id"], "status": r["status"], "seed": r["seed"],
                            "metric": r["metric"], "value": r["value"], "steps": r["steps"],
                            "trigger": r["trigger"], "parent": Path(r["parent"]).name if r["parent"] else None})
    stats = {}
    for name, st in (state.get("phases") or {}).items():
        if st.get("statistics"):
            try:
                s = json.loads((Path(st["statistics"]).parent / "summary.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            stats[name] = {"metric": s.get("metric"), "comparisons": s.get("comparisons"),
                           "verdicts": s.get("verdicts"), "recommendations": s.get("recommendations")}
    out["statistics"] = stats
    return out


def write_plan_report(plan_dir: Path) -> Path:
    from modalign.plans.spec import parse_plan
    from modalign.report.build import collect, write_report
    from modalign.runs.rundir import atomic_write_json, atomic_write_text

    import yaml

    plan_dir = Path(plan_dir)
    state = read_state(plan_dir)
    out = plan_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = job_rows(state)
    try:
        text = (plan_dir / "plan.yaml").read_text(encoding="utf-8")
        plan = parse_plan(yaml.safe_load(text), Path(state.get("file") or plan_dir / "plan.yaml"), text)
    except (OSError, UserError, yaml.YAMLError):
        plan = None
    figures = {}
    if plot_timeline(state, rows, out / "timeline.png"):
        figures["timeline"] = out / "timeline.png"
    if plan is not None:
        figures["graph"] = plot_graph(plan, out / "graph.png")
    phase_reports = {}
    for name in state.get("order") or []:
        dirs = [Path(r["dir"]) for r in rows if r["phase"] == name and (Path(r["dir"]) / "run.json").exists()]
        if not dirs:
            continue
        try:
            names = {str(Path(r["dir"]).resolve()): f"{r['phase']}.{r['step']}" for r in rows}
            rep = collect(dirs, metric=state.get("metric"), names=names)
            rep.title = f"{state.get('name')}: {name}"
            write_report(rep, out / "phases" / name)
            phase_reports[name] = out / "phases" / name / "index.html"
        except UserError:
            continue
    if plan is not None:  # the statistics again, from the runs as they are now
        for name, st in (state.get("phases") or {}).items():
            phase = plan.phases.get(name)
            if phase is not None and phase.statistics is not None and st.get("status") == "completed":
                try:
                    statistics_report(plan_dir, plan, phase, *statistics_jobs(state, phase))
                except UserError:
                    pass  # plan.json keeps the reason the executor met
    summary = plan_summary(state, rows)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", _markdown(state, rows, summary, phase_reports))
    atomic_write_text(out / "index.html", _html(state, rows, summary, phase_reports, figures, plan))
    return out / "index.html"


def _cost(rows: list[dict]) -> str:
    spans = [r["end"] - r["start"] for r in rows if r["start"] and r["end"]]
    starts = [r["start"] for r in rows if r["start"]]
    ends = [r["end"] for r in rows if r["end"]]
    if not spans:
        return "no job has run"
    return (f"{len(rows)} jobs, {sum(spans) / 60:.1f} job-minutes, {(max(ends) - min(starts)) / 60:.1f} minutes "
            "from the first start to the last end")


def _phase_lines(state: dict, summary: dict) -> list[tuple[str, str, str, str]]:
    out = []
    for name in state.get("order") or []:
        st = (state.get("phases") or {}).get(name, {})
        gate = st.get("gate") or {}
        g = "" if not gate else ("open: " if gate.get("passed") else "closed: ") + str(gate.get("line"))
        if gate and not gate.get("passed"):
            g += f" -> next: {gate.get('next')}"
        out.append((name, st.get("status", "?"), st.get("why_started") or st.get("why") or "", g))
    return out


def _trigger_lines(state: dict, rows: list[dict]) -> list[str]:
    labels = {r["id"]: r["label"] for r in rows}
    out = []
    for key, t in (state.get("triggers") or {}).items():
        for f in t.get("fired") or []:
            at = datetime.fromtimestamp(f["at"], timezone.utc).strftime("%H:%M:%S UTC")
            out.append(f"{key}: fired at {at}: {f['why']} -> {labels.get(f['job'], f['job'])}")
        for f in t.get("not_fired") or []:
            out.append(f"{key}: not fired: {f['why']}")
        if t.get("status") == "waiting":
            out.append(f"{key}: waiting")
    return out


def _markdown(state, rows, summary, phase_reports) -> str:
    lines = [f"# Plan {state.get('name')}: {state.get('status')}", "", _cost(rows), "", "## Phases", "",
             "| phase | status | started because | gate |", "|---|---|---|---|"]
    for name, status, why, gate in _phase_lines(state, summary):
        lines.append(f"| {name} | {status} | {why} | {gate} |".replace("\n", " "))
    trig = _trigger_lines(state, rows)
    if trig:
        lines += ["", "## Triggers", ""] + [f"- {t}" for t in trig]
    for name, s in summary.get("statistics", {}).items():
        lines += ["", f"## Statistics: {name} ({s.get('metric')})", ""]
        for r in s.get("recommendations") or []:
            lines.append(f"- {r}")
        lines.append(f"\nFull report: statistics/{name}/report.md")
    lines += ["", "## Jobs", "", "| job | status | seed | metric | value | steps | run |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['status']} | {r['seed']} | {r['metric']} | {_fmt(r['value'])} | "
                     f"{r['steps']} | {r['run']} |")
    if phase_reports:
        lines += ["", "Phase reports: " + ", ".join(f"phases/{n}/report.md" for n in phase_reports)]
    return "\n".join(lines) + "\n"


def _html(state, rows, summary, phase_reports, figures, plan) -> str:
    from modalign.report.html import STYLE, _html_table, _image

    h = html.escape
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>plan {h(str(state.get('name')))}"
             f" — modalign</title><style>{STYLE}</style></head><body><main>",
             f"<h1>Plan {h(str(state.get('name')))}: {h(str(state.get('status')))}</h1>",
             f"<p class=meta>{h(_cost(rows))}; plan file {h(str(state.get('file')))}; overrides "
             f"{h(' '.join(state.get('overrides') or []) or 'none')}.</p>"]
    for name, st in (state.get("phases") or {}).items():
        if st.get("status") in ("blocked", "failed"):
            parts.append(f'<p class="warn">⚠ {h(name)} {h(st["status"])}: {h(str(st.get("why")))}</p>')
    parts.append("<h2>Phases</h2>" + _html_table(["phase", "status", "started because", "gate"],
                                                   [list(x) for x in _phase_lines(state, summary)]))
    if "timeline" in figures:
        parts.append(f'<figure><img alt="timeline" src="{_image(figures["timeline"])}"><figcaption>Each job from its '
                     "first start to its end, by phase; hatched: not completed; dashed line: a phase started early "
                     "(start_when); dotted red: a trigger fired.</figcaption></figure>")
    trig = _trigger_lines(state, rows)
    if trig:
        parts.append("<h2>Triggers</h2><ul>" + "".join(f"<li>{h(t)}</li>" for t in trig) + "</ul>")
    for name, s in summary.get("statistics", {}).items():
        parts.append(f"<h2>Statistics: {h(name)} ({h(str(s.get('metric')))})</h2>")
        comp = s.get("comparisons") or []
        if comp:
            keys = [k for k in ("candidate", "baseline", "diff", "low", "high", "p_value", "p_holm", "n_examples")
                    if k in comp[0]]
            parts.append(_html_table(keys, [[_fmt(c.get(k)) for k in keys] for c in comp]))
        if s.get("recommendations"):
            parts.append("<ul>" + "".join(f"<li>{h(r)}</li>" for r in s["recommendations"]) + "</ul>")
        parts.append(f'<p><a href="statistics/{h(name)}/index.html">the full statistics report</a> (seed tables, '
                     "Pareto, curves per group); run cards and predictions in export/.</p>")
    parts.append("<h2>Jobs</h2>" + _html_table(
        ["job", "status", "seed", "metric", "value", "steps", "launches", "failed checks", "run"],
        [[r["label"], r["status"], _fmt(r["seed"]), r["metric"], _fmt(r["value"]), _fmt(r["steps"]),
          ", ".join(r["launches"]), ", ".join(r["checks"]) or "—", r["run"]] for r in rows], bad_col=1))
    if phase_reports:
        parts.append("<p>Phase reports: " + ", ".join(f'<a href="phases/{h(n)}/index.html">{h(n)}</a>'
                                                      for n in phase_reports) + "</p>")
    if "graph" in figures:
        parts.append(f'<h2>The plan</h2><figure><img alt="graph" src="{_image(figures["graph"])}"></figure>')
    parts.append("</main></body></html>")
    return "\n".join(parts)


def status_text(plan_dir: Path) -> str:
    """`modalign plan status`: phases, jobs (with live progress), gates, triggers, the last events."""
    state = read_state(plan_dir)
    rows = job_rows(state)
    from modalign.plans.executor import last_step

    lines = [f"plan {state.get('name')} ({plan_dir}): {state.get('status')}; {_cost(rows)}", "", "phases:"]
    for name, status, why, gate in _phase_lines(state, {}):
        lines.append(f"  {name:<14} {status:<10} {why}")
        if gate:
            lines.append(f"  {'':<14} gate {gate}")
    lines += ["", "jobs:"]
    for r in rows:
        prog = ""
        if r["status"] == "running":
            prog = f" step {last_step(Path(r['dir']))}"
        val = f" {r['metric']}={_fmt(r['value'])}" if r["value"] is not None else ""
        err = f" ({r['error']})" if r["error"] else ""
        lines.append(f"  {r['label']:<24} {r['status']:<11}{prog}{val} {r['run']}{err}")
    trig = _trigger_lines(state, rows)
    if trig:
        lines += ["", "triggers:"] + [f"  {t}" for t in trig]
    ev = state.get("events") or []
    if ev:
        lines += ["", "last events:"]
        for e in ev[-8:]:
            at = datetime.fromtimestamp(e["time"], timezone.utc).strftime("%H:%M:%S")
            lines.append(f"  {at} [{e['kind']}] {e['what']}")
    return "\n".join(lines)
