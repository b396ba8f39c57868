"""card.md: one page that says what ran, on which data, how it differs from the defaults, what it
scored, and where it came from."""

from __future__ import annotations


def flatten(d, prefix: str = "") -> dict:
    """Nested dict -> {"a.b.c": value}; lists stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(defaults: dict, actual: dict) -> dict[str, list]:
    """{key: [default, actual]} for every leaf that differs (missing on one side = None)."""
    a, b = flatten(defaults), flatten(actual)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _cell(text: str) -> str:
    """Text for one markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def card_text(info: dict, summary: dict) -> str:
    """card.md of a run from its run.json and facts/summary.json."""
    data = info.get("data", {})
    ev = info.get("eval", {})
    lines = [f"# {info.get('id')}", "",
             f"Recipe `{info.get('recipe')}`, status **{info.get('status')}**, seed {info.get('seed')}, "
             f"{summary.get('steps')} steps ({summary.get('precision')}), "
             f"{summary.get('wall_seconds', 0):.0f} s wall.", ""]
    lines += ["## Data", "", f"`{data.get('name')}` from {data.get('source')}", "",
              "| split | n | fingerprint |", "|---|---:|---|"]
    for s, d in data.get("splits", {}).items():
        lines.append(f"| {s} | {d['n']} | `{d['fingerprint'][:16]}` |")
    diff = info.get("config_diff", {})
    lines += ["", "## Config (differences from the defaults)", ""]
    if diff:
        lines += ["| key | default | this run |", "|---|---|---|"]
        lines += [f"| `{k}` | {_fmt(a)} | {_fmt(b)} |" for k, (a, b) in diff.items()]
    else:
        lines.append("All defaults.")
    split = ev.get("split", "test")
    res = summary.get(split, {})
    lines += ["", f"## Results on {split} (relevance protocol `{ev.get('protocol')}`, version {ev.get('version')})", "",
              "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in res.items()]
    samples = summary.get("samples") or []
    if samples:  # captioning recipes: what the model says beside what the references say
        lines += ["", f"## Sample captions ({split})", "", "| id | prediction | reference |", "|---|---|---|"]
        lines += [f"| {s['id']} | {_cell(s['prediction'])} | {_cell((s.get('references') or [''])[0])} |"
                  for s in samples]
    checks = info.get("checks") or []
    if checks:
        failed = [c["name"] for c in checks if c["status"] == "fail"]
        lines += ["", "## Checks" + (f" — **{len(failed)} failed: {', '.join(failed)}**" if failed else ""), "",
                  "| phase | check | status | message |", "|---|---|---|---|"]
        lines += [f"| {c['phase']} | {c['name']} | {c['status'].upper() if c['status'] != 'pass' else 'pass'} | "
                  f"{_cell(c['message'])} |" for c in checks]
    missing = summary.get("unavailable") or {}
    if missing:
        lines += ["", "Not computed: " + "; ".join(f"{k} ({why})" for k, why in missing.items()) + "."]
    params = info.get("params") or {}
    code, env = info.get("code", {}), info.get("env", {})
    lines += ["", "## Provenance", "",
              f"- parameters: {params.get('total')} total, {params.get('trainable')} trainable, "
              f"by component {params.get('by_component')}",
              f"- text encoder: {info.get('text', {}).get('model')}",
              f"- code: modalign {code.get('package_version')}, commit {code.get('git_commit')}, "
              f"dirty {code.get('git_dirty')}",
              f"- environment: {env.get('host')}, python {env.get('python')}, torch {env.get('torch')}, "
              f"{env.get('device')}, {env.get('threads')} threads",
              f"- parents: {info.get('parents') or 'none'}", ""]
    return "\n".join(lines)
