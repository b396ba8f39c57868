"""index.html (one self-contained page: styles and images inline, no script, nothing fetched) and
report.md (the same tables, for pasting into a paper or an issue)."""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime, timezone

import pandas as pd

CAPTIONS = {"curves": "Training loss and validation metric per group: mean over seeds with a 95% bootstrap band.",
            "by_group": "The optimized metric per group: mean, 95% bootstrap CI over seeds, each run a dot.",
            "heatmap": "The optimized metric over the two-dimensional grid (mean over seeds).",
            "pareto": "The optimized metric against cost (trainable parameters, wall time; for stage 3 also the LM's perplexity after / before, the retention frontier); circled points are on the Pareto front.",
            "registers": "Retrieval with only the first k registers kept (nested dropout orders them): "
                         "mean and 95% CI over seeds."}


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _ci(row, m: str) -> str:
    mean, lo, hi, n = row[f"{m} mean"], row[f"{m} ci_low"], row[f"{m} ci_high"], row[f"{m} n"]
    if not n:
        return "—"
    if isinstance(lo, float) and math.isnan(lo):
        return f"{mean:.3f} (n=1)"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}] (n={n})"


def group_rows(rep, groups: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The group table as text cells: group, set (when several), each metric as mean [CI] (n), std,
    IQM where n >= 4, not-completed runs."""
    several = len({g.comparable_set for g in rep.groups}) > 1
    head = ["group"] + (["set"] if several else []) + [f"{m} mean [95% CI] (n)" for m in rep.metrics] \
        + [f"{rep.metric} std", f"{rep.metric} IQM", "trainable params", "not completed"]
    rows = []
    for _, r in groups.iterrows():
        rows.append([r["group"]] + ([r["set"]] if several else []) + [_ci(r, m) for m in rep.metrics]
                    + [_num(r[f"{rep.metric} std"]), _num(r[f"{rep.metric} iqm"]),
                       _num(int(r["params_trainable"])) if pd.notna(r["params_trainable"]) else "—",
                       r["not completed"] or ""])
    return head, rows


def run_rows(rep, runs: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    metric_cols = [f"{m} final" for m in rep.metrics if f"{m} final" in runs]
    head = ["run", "group", "seed", "status", "checks"] + [c.removesuffix(" final") for c in metric_cols] + ["wall s", "error"]
    rows = []
    for _, r in runs.iterrows():
        seed = r.get("seed")
        checks = r.get("checks")
        rows.append([str(r["run"]), str(r.get("group") or ""), "" if pd.isna(seed) else str(int(seed)),
                     str(r["status"]), "" if checks is None or pd.isna(checks) else str(checks)]
                    + [_num(r[c]) for c in metric_cols]
                    + [_num(r.get("wall_seconds"), 0), "" if pd.isna(r.get("error")) else str(r.get("error"))])
    return head, rows


def comparison_rows(rep) -> tuple[list[str], list[list[str]]]:
    head = ["candidate", "baseline", "metric", "difference [95% CI]", "p", "p (Holm)", "effect d_z", "examples", "seeds"]
    rows = [[c["candidate"], c["baseline"], c["metric"], f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]",
             f"{c['p_value']:.4g}", f"{c['p_holm']:.4g}", f"{c['effect_size']:.2f}", str(c["n_examples"]),
             ", ".join(map(str, c["seeds"])) if c["matched"] else "unmatched (all seeds averaged)"]
            for c in rep.comparisons]
    return head, rows


def verdict_rows(rep) -> tuple[list[str], list[list[str]]]:
    head = ["group", "metric", "mean [95% CI]", "verdict", "next step", "note"]
    rows = []
    for v in rep.verdicts:
        ci = "—" if not v["n"] else (f"{v['estimate']:.3f}" + ("" if math.isnan(v["low"]) else
                                                               f" [{v['low']:.3f}, {v['high']:.3f}]"))
        rows.append([v["group"], v["metric"], ci, v["verdict"], v["next"], v["note"]])
    return head, rows


def variant_rows(rep) -> tuple[list[str], list[list[str]]]:
    head = ["group", "variant", "version", "created by", "model", "date", "experiment", "status", "approach",
            "source sha256"]
    return head, [[v["group"], f"{v['kind']}={v['name']}", v["version"], v["created_by"], v["model"], v["date"],
                   v["experiment_id"], v["status"], v["approach"], v["source_sha256"]] for v in rep.variants]


def register_rows(rep) -> tuple[list[str], list[list[str]]]:
    ks = sorted({r["k"] for rows in rep.registers.values() for r in rows})
    leaf = next(iter(rep.registers.values()))[0]["metric"].split("/", 2)[-1]
    head = ["group"] + [f"{leaf}, k={k} [95% CI]" for k in ks]
    rows = []
    for label, rs in rep.registers.items():
        by_k = {r["k"]: r for r in rs}
        rows.append([label] + [("—" if k not in by_k else
                                f"{by_k[k]['mean']:.3f}" + ("" if math.isnan(by_k[k]["ci_low"]) else
                                                            f" [{by_k[k]['ci_low']:.3f}, {by_k[k]['ci_high']:.3f}]"))
                               for k in ks])
    return head, rows


def sample_rows(rep, per_group: int = 4) -> tuple[list[str], list[list[str]]]:
    """Captioning runs: the first test predictions of each group's first completed run, beside the
    first reference (facts/predictions_<split>.jsonl)."""
    import json

    rows = []
    for g in rep.groups:
        runs = g.completed
        if not runs:
            continue
        split = (runs[0].summary or {}).get("split", "test")
        path = runs[0].path / "facts" / f"predictions_{split}.jsonl"
        if not path.exists():
            continue
        try:
            lines = path.read_text().splitlines()[:per_group]
            for line in lines:
                r = json.loads(line)
                rows.append([g.label, str(r.get("id")), str(r.get("prediction")) or "(empty)",
                             str((r.get("references") or [""])[0])])
        except (OSError, ValueError):
            continue
    return ["group", "id", "prediction", "first reference"], rows


def diff_rows(rep) -> tuple[list[str], list[list[str]]]:
    labels = [g.label for g in rep.groups]
    return ["config key", *labels], [[k, *[_num(vals.get(label)) for label in labels]]
                                     for k, vals in rep.config_diff.items()]


# markdown --------------------------------------------------------------------------------------
def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    def cell(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    return (["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows] + [""])


def render_markdown(rep, runs: pd.DataFrame, groups: pd.DataFrame) -> str:
    lines = [f"# Report: {rep.title}", "",
             f"Optimized metric `{rep.metric}` ({'higher' if rep.larger_is_better else 'lower'} is better); "
             f"{len(rep.records)} runs from {', '.join(f'`{s}`' for s in rep.sources)}.", ""]
    for w in rep.warnings:
        lines += [f"> **Warning:** {w}", ""]
    if rep.verdicts:
        lines += ["## Verdicts", ""] + _md_table(*verdict_rows(rep))
    lines += ["## Recommendations", ""] + [f"- {r}" for r in rep.recommendations] + [""]
    lines += ["## Groups (mean over seeds, 95% bootstrap CI)", ""] + _md_table(*group_rows(rep, groups))
    if rep.comparisons:
        lines += ["## Paired comparisons", ""] + _md_table(*comparison_rows(rep))
    if rep.registers:
        lines += ["## Retrieval by registers kept", ""] + _md_table(*register_rows(rep))
    head, samples = sample_rows(rep)
    if samples:
        lines += ["## Sample captions", ""] + _md_table(head, samples)
    if rep.variants:
        lines += ["## Variants", ""] + _md_table(*variant_rows(rep))
    if rep.config_diff:
        lines += ["## What differs between the groups", ""] + _md_table(*diff_rows(rep))
    lines += ["## Runs", ""] + _md_table(*run_rows(rep, runs))
    lines += [f"![{name}]({p.name})" for name, p in rep.figures.items()] + [""]
    return "\n".join(lines)


# html -------------------------------------------------------------------------------------------
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1f2328;background:#fff}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a;margin:0 0 12px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px;width:auto}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fff1f0}.warn{background:#fff8c5;border:1px solid #d4a72c;padding:8px 12px;border-radius:6px}
.verdict{font-weight:600;padding:1px 6px;border-radius:4px;background:#eef}
ul.rec li{margin:4px 0}figure{margin:10px 0 18px}figure img{max-width:100%;border:1px solid #eaeef2}
figcaption{color:#57606a;font-size:12.5px}details{margin:8px 0}.scroll{overflow-x:auto}
"""


def _h(s) -> str:
    return html.escape(str(s))


def _html_table(head: list[str], rows: list[list[str]], cls: str = "", bad_col: int | None = None) -> str:
    out = [f'<div class="scroll"><table class="{cls}"><thead><tr>'
           + "".join(f"<th>{_h(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        bad = bad_col is not None and r[bad_col] not in ("completed",)
        cells = "".join(f'<td class="num">{_h(c)}</td>' if _numeric(c) else f"<td>{_h(c)}</td>" for c in r)
        out.append(f'<tr class="bad">{cells}</tr>' if bad else f"<tr>{cells}</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _numeric(s: str) -> bool:
    s = str(s).split(" ")[0].lstrip("+-")
    return bool(s) and s.replace(".", "", 1).isdigit()


def _image(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(rep, runs: pd.DataFrame, groups: pd.DataFrame) -> str:
    status = runs["status"].value_counts().to_dict() if "status" in runs else {}
    counts = ", ".join(f"{n} {s}" for s, n in status.items())
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_h(rep.title)} — modalign report</title>",
             f"<style>{STYLE}</style></head><body><main>",
             f"<h1>{_h(rep.title)}</h1>",
             f'<p class="meta">{len(rep.records) + len(rep.missing)} runs ({_h(counts)}) from '
             f"{_h(', '.join(str(s) for s in rep.sources))}; optimized metric <b>{_h(rep.metric)}</b> "
             f"({'higher' if rep.larger_is_better else 'lower'} is better); made {made} by modalign report.</p>"]
    for w in rep.warnings:
        parts.append(f'<p class="warn">⚠ {_h(w)}</p>')
    if rep.verdicts:
        head, rows = verdict_rows(rep)
        parts.append("<h2>Verdicts</h2>" + _html_table(head, rows, "verdicts"))
    parts.append('<h2>Recommendations</h2><ul class="rec">' + "".join(f"<li>{_h(r)}</li>" for r in rep.recommendations)
                 + "</ul>")
    head, rows = group_rows(rep, groups)
    parts.append("<h2>Groups: mean over seeds, 95% bootstrap CI</h2>" + _html_table(head, rows, "groups"))
    if rep.registers:
        head, rows = register_rows(rep)
        parts.append("<h2>Retrieval by registers kept</h2>" + _html_table(head, rows, "registers"))
    for name in ("by_group", "registers", "curves", "heatmap", "pareto"):
        if name in rep.figures:
            parts.append(f'<figure><img alt="{name}" src="{_image(rep.figures[name])}">'
                         f"<figcaption>{_h(CAPTIONS[name])}</figcaption></figure>")
    if rep.comparisons:
        head, rows = comparison_rows(rep)
        parts.append("<h2>Paired comparisons on the same test examples</h2>" + _html_table(head, rows, "comparisons"))
    head, rows = sample_rows(rep)
    if rows:
        parts.append("<h2>Sample captions (test, seed of each group's first run)</h2>" + _html_table(head, rows, "samples"))
    if rep.variants:
        head, rows = variant_rows(rep)
        parts.append("<h2>Variants</h2>" + _html_table(head, rows, "variants"))
    if rep.config_diff:
        head, rows = diff_rows(rep)
        parts.append("<h2>What differs between the groups</h2>" + _html_table(head, rows, "config-diff"))
    head, rows = run_rows(rep, runs)
    parts.append("<h2>Runs</h2>" + _html_table(head, rows, "runs", bad_col=3))
    parts.append("<p class=meta>Tables as CSV: summary.csv (every metric, best and final), groups.csv, "
                 "comparisons.csv; the same page as markdown: report.md.</p></main></body></html>")
    return "\n".join(parts)
