"""Health checks of a run, from its directory alone: before (the model as built), during (the
training curves of metrics.jsonl) and after (the test metrics). No torch.

Each check gives {name, phase, status, value, threshold, message}; status is pass, warn or fail.
The recipes evaluate them when a run finishes (run.json `checks`, run.log, card.md), and
`modalign check RUN` evaluates them again, e.g. with other thresholds. The thresholds are the run's
config group `checks` (conf/checks/default.yaml; `checks.loss_falls.min_drop=0.1` on the command line):

    trainable_components  before  every component the optimizer trains (lr > 0, not frozen by the
                                  config) has trainable parameters
    loss_falls            during  the training loss fell by min_drop of its first value within the
                                  first `within` of the steps
    gradients_flow        during  every trainable component's gradient norm is finite and non-zero
                                  at some logged step
    temperature_free      during  the learned temperature is not pinned at its clamp (contrastive)
    no_nonfinite_steps    during  no step was skipped for a non-finite loss or gradient
    gates_move            during  (fuse, gated fusion, trainer.optim.gates.lr > 0) some gate moved from
                                  its initial value
    norm_ratio            during  (fuse) the soft tokens' norm over the LM's token-embedding norm
                                  stays within [low, high] at the last evaluation
    beats_baseline        after   the headline metric against checks.baseline.value (when set)
    generic_captions      after   (fuse) the test captions are not all the same: distinct-n (unique
                                  n-grams over all n-grams) at least min_ratio of the first
                                  references' distinct-n (min_distinct where there are none)
    modality_used         after   (fuse, with a modality input) the test reliance gap (caption
                                  cross-entropy with another sample's modality minus with its own,
                                  nats/token) is at least min_gap
    metric_stable         after   the monitored validation metric did not collapse after its best
                                  point: the mean of the last two evaluations keeps at least
                                  1 - max_drop of the best
                                  (warn: the test metric is the best checkpoint's, but the training is
                                  unstable; at least `min_evals` evaluations)
"""

from __future__ import annotations

import math
from typing import Any

from modalign.analysis.metrics import larger_is_better

DEFAULTS: dict[str, dict[str, Any]] = {
    "loss_falls": {"within": 0.5, "min_drop": 0.05},
    "temperature_free": {"margin": 0.02, "last": 3},
    "baseline": {"metric": None, "value": None, "run": None},
    "gates_move": {"min_change": 1.0e-4},
    "norm_ratio": {"low": 0.25, "high": 4.0},
    "generic_captions": {"n": 2, "min_distinct": 0.1, "min_ratio": 0.5},
    "modality_used": {"min_gap": 0.02},
    "metric_stable": {"max_drop": 0.5, "min_evals": 3},
}
PHASES = ("before", "during", "after")


def _check(name: str, phase: str, status: str, message: str, value=None, threshold=None) -> dict:
    return {"name": name, "phase": phase, "status": status, "value": value, "threshold": threshold,
            "message": message}


ON_FAIL = ("warn", "stop")  # checks.on_fail: what a failed "during" check does to a training run


def validate(node) -> None:
    """The config group `checks`, checked before a run starts: one line naming a bad key or value."""
    from modalign.errors import UserError

    if node is None:
        return
    if not isinstance(node, dict):
        raise UserError(f"config: 'checks' must be a config section (a mapping), got {node!r}")
    for key, values in node.items():
        if key == "on_fail":
            if values not in ON_FAIL:
                raise UserError(f"config: 'checks.on_fail'={values!r} must be one of {', '.join(ON_FAIL)}")
            continue
        if key not in DEFAULTS:
            raise UserError(f"config: unknown check 'checks.{key}' (known: {', '.join(DEFAULTS)})")
        if not isinstance(values, dict):
            raise UserError(f"config: 'checks.{key}' must be a mapping of thresholds, got {values!r}")
        for name, value in values.items():
            if name not in DEFAULTS[key]:
                raise UserError(f"config: unknown threshold 'checks.{key}.{name}' (known: {', '.join(DEFAULTS[key])})")
            if key == "baseline" and name in ("metric", "run"):
                if value is not None and not isinstance(value, str):
                    what = "a metric name, e.g. m2t_R@1" if name == "metric" else "a run directory"
                    raise UserError(f"config: 'checks.baseline.{name}'={value!r} must be {what}")
                continue
            if value is None and key == "baseline":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserError(f"config: 'checks.{key}.{name}'={value!r} must be a number >= 0")
    base = node.get("baseline") or {}
    if (base.get("metric") is None) != (base.get("value") is None and base.get("run") is None):
        raise UserError("config: 'checks.baseline' needs a metric and a value or a run (e.g. "
                        "checks.baseline.metric=m2t_R@1 checks.baseline.value=0.18, or checks.baseline.run=RUN_DIR)")


def settings_of(cfg: dict | None) -> dict[str, dict[str, Any]]:
    """The thresholds: the defaults, updated by a run's config group `checks`."""
    out = {k: dict(v) for k, v in DEFAULTS.items()}
    for key, values in ((cfg or {}).get("checks") or {}).items():
        if isinstance(values, dict):
            out.setdefault(key, {}).update(values)
    return out


def evaluate(info: dict, cfg: dict | None, rows: list[dict], summary: dict | None,
             predictions: list[str] | None = None) -> list[dict]:
    """Every check that applies to a run: run.json, its resolved config, metrics.jsonl rows,
    facts/summary.json (None while it has none) and, for a captioning run, its test captions."""
    st = settings_of(cfg)
    train = [r for r in rows if r.get("split") == "train"]
    checks = [_trainable_components(info, cfg or {})]
    if st["baseline"].get("run"):
        checks.append(_config_vs_baseline(cfg or {}, st["baseline"]["run"]))
    checks.append(_loss_falls(train, info, cfg or {}, st["loss_falls"]))
    checks.append(_gradients_flow(train, info, cfg or {}))
    temp = _temperature_free(train, cfg or {}, st["temperature_free"])
    if temp is not None:
        checks.append(temp)
    skips = [r["value"] for r in train if r["name"] == "nonfinite_skips"]
    checks.append(_check("no_nonfinite_steps", "during", "warn" if skips else "pass",
                         f"{int(max(skips))} steps skipped for a non-finite loss or gradient" if skips
                         else "no step was skipped", value=int(max(skips)) if skips else 0, threshold=0))
    val = [r for r in rows if r.get("split") == "val"]
    floor = ((cfg or {}).get("fusion") or {}).get("kind") == "none"  # no modality input by design
    for extra in (_gates_move(val, cfg or {}, st["gates_move"]), None if floor else _norm_ratio(val, st["norm_ratio"])):
        if extra is not None:
            checks.append(extra)
    base = _beats_baseline(info, summary, st["baseline"])
    if base is not None:
        checks.append(base)
    if predictions is not None and not floor:  # the floor's captions cannot depend on the input
        preds = [p if isinstance(p, str) else p["prediction"] for p in predictions]
        refs = [p["references"][0] for p in predictions if not isinstance(p, str) and p.get("references")]
        checks.append(_generic_captions(preds, refs if len(refs) == len(preds) else None, st["generic_captions"]))
    used = None if floor else _modality_used(summary, st["modality_used"])
    if used is not None:
        checks.append(used)
    if summary is not None:
        stable = _metric_stable(val, cfg or {}, st["metric_stable"])
        if stable is not None:
            checks.append(stable)
    return checks


def read_predictions(run_dir, info: dict) -> list[dict] | None:
    """A captioning run's test captions with their references (facts/predictions_<split>.jsonl):
    [{"prediction", "references"}], or None."""
    import json
    from pathlib import Path

    split = (info.get("eval") or {}).get("split", "test")
    f = Path(run_dir) / "facts" / f"predictions_{split}.jsonl"
    if not f.exists():
        return None
    out = []
    with open(f, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                out.append({"prediction": str(row["prediction"]), "references": list(row.get("references") or [])})
            except (ValueError, KeyError, TypeError):
                continue
    return out


def _gates_move(val: list[dict], cfg: dict, st: dict) -> dict | None:
    series: dict[str, list[float]] = {}
    for r in val:
        if r["name"].startswith("gate/") and _finite(r["value"]):
            series.setdefault(r["name"], []).append(r["value"])
    optim = (cfg.get("trainer") or {}).get("optim") or {}
    group = "gates" if "gates" in optim else "adapter"  # runs from before the gates' own group: the adapter's
    lr = float((optim.get(group) or {}).get("lr", 0) or 0)
    if not series or lr <= 0:
        return None  # no gates (prefix, none), or gates the config keeps fixed
    moved = {k: max(abs(x - v[0]) for x in v) for k, v in series.items()}
    threshold = float(st["min_change"])
    if max(len(v) for v in series.values()) < 2:
        return _check("gates_move", "during", "warn", "fewer than two evaluations: nothing to compare",
                      threshold=threshold)
    top = max(moved, key=moved.get)
    if moved[top] < threshold:
        return _check("gates_move", "during", "fail",
                      f"no gate moved by {threshold:g} or more ({len(moved)} gates; largest change {moved[top]:.3g} "
                      f"at {top}) though trainer.optim.{group}.lr={lr:g}: the adapters receive no signal",
                      value=round(moved[top], 6), threshold=threshold)
    return _check("gates_move", "during", "pass", f"{top} moved by {moved[top]:.3g}", value=round(moved[top], 6),
                  threshold=threshold)


def _norm_ratio(val: list[dict], st: dict) -> dict | None:
    ratios = [r["value"] for r in val if r["name"] == "soft_norm_ratio" and _finite(r["value"])]
    if not ratios:
        return None
    low, high = float(st["low"]), float(st["high"])
    last = ratios[-1]
    ok = low <= last <= high
    return _check("norm_ratio", "during", "pass" if ok else "fail",
                  f"soft tokens / LM token embeddings norm ratio {last:.3g} at the last evaluation" + (
                      "" if ok else f", outside [{low:g}, {high:g}]: the LM sees inputs of another scale than its "
                                    "own tokens (projector.scale, projector.output)"),
                  value=round(last, 4), threshold=[low, high])


def _distinct(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams of a corpus (0 when it has none)."""
    grams, total = set(), 0
    for p in texts:
        words = p.lower().split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i:i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def _generic_captions(preds: list[str], refs: list[str] | None, st: dict) -> dict:
    """Distinct-n of a corpus falls as the corpus grows and is low for templated captions, so where
    the references are at hand the test is relative: the captions' distinct-n against the first
    references' of the same samples (min_ratio); else the absolute min_distinct."""
    n = int(st["n"])
    distinct = _distinct(preds, n)
    unique = len(set(preds))
    if refs:
        ref = _distinct(refs, n)
        ratio = distinct / ref if ref > 0 else 0.0
        low = float(st["min_ratio"])
        generic = unique <= 1 or ratio < low
        value, what = ratio, f"distinct-{n} {distinct:.3f}, {ratio:.2f} of the references' {ref:.3f}"
    else:
        low = float(st["min_distinct"])
        generic = unique <= 1 or distinct < low
        value, what = distinct, f"distinct-{n} {distinct:.3f}"
    msg = (f"{unique} different captions of {len(preds)}; {what}" +
           ("; the captions are generic: the LM ignores the modality (compare with fusion=none)" if generic else ""))
    return _check("generic_captions", "after", "fail" if generic else "pass", msg, value=round(value, 4),
                  threshold=low)


def _modality_used(summary: dict | None, st: dict) -> dict | None:
    split = (summary or {}).get("split")
    gap = ((summary or {}).get(split) or {}).get("reliance_gap") if split else None
    if not _finite(gap):
        return None  # not a captioning run, or one from before the reliance gap
    low = float(st["min_gap"])
    ok = gap >= low
    msg = (f"reliance gap {gap:.4f} nats/token on {split}: the captions' cross-entropy with another sample's "
           f"modality minus with their own" +
           ("" if ok else f"; below {low:g}: the LM ignores the modality (see docs/stage3.md, the gates and "
                          "the soft tokens' norm)"))
    return _check("modality_used", "after", "pass" if ok else "fail", msg, value=round(gap, 5), threshold=low)


def _metric_stable(val: list[dict], cfg: dict, st: dict) -> dict | None:
    trainer = cfg.get("trainer") or {}
    monitor = str(trainer.get("monitor") or "")
    leaf = monitor.removeprefix("val/")
    series = sorted((r["step"], r["value"]) for r in val if r.get("name") == leaf and _finite(r.get("value")))
    if not monitor or len(series) < max(2, int(st["min_evals"])):
        return None
    larger = trainer.get("monitor_mode", "max") != "min"
    best_step, best = (max if larger else min)(series, key=lambda sv: sv[1])
    last_step = series[-1][0]
    last = (series[-1][1] + series[-2][1]) / 2  # the last two evaluations: one noisy point is not a collapse
    drop = float(st["max_drop"])
    if best <= 0:
        return None
    kept = last / best
    # larger is better: keep at least 1 - max_drop of the best; smaller (a loss): exceed it by at most max_drop
    ok = kept >= 1 - drop if larger else kept <= 1 + drop
    msg = (f"{monitor} {last:.4g} over the last two evaluations (to step {last_step}), best {best:.4g} at step {best_step}" +
           ("" if ok else f": it collapsed after its best point (more than {drop:.0%} lost); the test metric is the "
                          "best checkpoint's, but the training is unstable (a lower lr, fewer steps, or the gates' "
                          "curves: docs/stage3.md)"))
    return _check("metric_stable", "after", "pass" if ok else "warn", msg, value=round(kept, 4),
                  threshold=1 - drop if larger else 1 + drop)


def decision_step(cfg: dict | None) -> int:
    """The step at which the "during" checks are decided while training: the end of loss_falls'
    window (checks.loss_falls.within of trainer.max_steps)."""
    st = settings_of(cfg)
    max_steps = int((((cfg or {}).get("trainer") or {}).get("max_steps")) or 1)
    return max(2, int(float(st["loss_falls"]["within"]) * max_steps))


def during(info: dict, cfg: dict | None, rows: list[dict]) -> list[dict]:
    """The "during" checks on the curves so far (conclusive from decision_step on)."""
    return [c for c in evaluate(info, cfg, rows, None) if c["phase"] == "during"]


def _optim_groups(cfg: dict) -> dict[str, dict]:
    optim = ((cfg.get("trainer") or {}).get("optim") or {})
    return {k: v for k, v in optim.items() if isinstance(v, dict) and "lr" in v}


def _intended(info: dict, cfg: dict) -> list[str]:
    """The components the run means to train: parameters, a learning rate > 0, not frozen by the
    config (encoder.freeze)."""
    params = info.get("params") or {}
    groups = _optim_groups(cfg)
    frozen_by_config = {"encoder"} if (cfg.get("encoder") or {}).get("freeze") else set()
    return [k for k, n in (params.get("by_component") or {}).items()
            if n > 0 and float((groups.get(k) or {}).get("lr", 0) or 0) > 0 and k not in frozen_by_config]


def _trainable_components(info: dict, cfg: dict) -> dict:
    params = info.get("params") or {}
    trainable = params.get("trainable_by_component")
    if trainable is None:
        return _check("trainable_components", "before", "warn",
                      "run.json has no trainable_by_component (a run from before the checks)")
    groups = _optim_groups(cfg)
    frozen = [k for k in _intended(info, cfg) if trainable.get(k, 0) == 0]
    if frozen:
        k = frozen[0]
        return _check("trainable_components", "before", "fail",
                      f"component '{k}' has no trainable parameters, but trainer.optim.{k}.lr="
                      f"{groups[k]['lr']}: it cannot train" + (f" (also: {', '.join(frozen[1:])})" if frozen[1:] else ""),
                      value=frozen, threshold="trainable parameters > 0")
    return _check("trainable_components", "before", "pass",
                  "every component with a learning rate has trainable parameters",
                  value={k: int(v) for k, v in trainable.items()})


def _loss_falls(train: list[dict], info: dict, cfg: dict, st: dict) -> dict:
    losses = [(r["step"], r["value"]) for r in train if r["name"] == "loss" and _finite(r["value"])]
    within, min_drop = float(st["within"]), float(st["min_drop"])
    threshold = f"-{min_drop:.0%} within the first {within:.0%} of the steps"
    if len(losses) < 2:
        return _check("loss_falls", "during", "warn", "fewer than two logged losses: nothing to compare",
                      threshold=threshold)
    max_steps = int(((cfg.get("trainer") or {}).get("max_steps")) or losses[-1][0])
    first = losses[0][1]
    early = [v for s, v in losses[1:] if s <= max(losses[1][0], within * max_steps)]
    drop = (first - min(early)) / abs(first) if first else 0.0
    status = "pass" if drop >= min_drop else "fail"
    return _check("loss_falls", "during", status,
                  f"loss {first:.4g} at step {losses[0][0]} -> {min(early):.4g} by step "
                  f"{int(within * max_steps)} ({-drop:+.1%})" + ("" if status == "pass" else
                                                                 "; the loss does not fall: check the learning rates and the data"),
                  value=round(drop, 4), threshold=threshold)


def _gradients_flow(train: list[dict], info: dict, cfg: dict) -> dict:
    norms: dict[str, list[float]] = {}
    for r in train:
        if r["name"].startswith("grad_norm/"):
            norms.setdefault(r["name"].split("/", 1)[1], []).append(r["value"])
    if not norms:
        return _check("gradients_flow", "during", "warn", "no gradient norms logged")
    dead = [k for k in _intended(info, cfg) if all(x == 0 for x in norms.get(k, [0.0]))]
    bad = [k for k, v in norms.items() if any(not _finite(x) for x in v)]
    value = {k: max((x for x in v if _finite(x)), default=None) for k, v in norms.items()}
    if dead or bad:
        parts = ([f"zero gradient norm at every logged step: {', '.join(dead)}"] if dead else []) + \
                ([f"non-finite gradient norms: {', '.join(bad)}"] if bad else [])
        return _check("gradients_flow", "during", "fail", "; ".join(parts), value=value, threshold="finite, > 0")
    return _check("gradients_flow", "during", "pass", "every component's gradient norm was finite and non-zero",
                  value=value, threshold="finite, > 0")


def _temperature_free(train: list[dict], cfg: dict, st: dict) -> dict | None:
    temps = [r["value"] for r in train if r["name"] == "temperature"]
    scale = (cfg.get("loss") or {}).get("max_logit_scale")
    if not temps or not scale:
        return None
    clamp = 1.0 / float(scale)
    last = temps[-int(st["last"]):]
    pinned = all(t <= clamp * (1 + float(st["margin"])) for t in last)
    return _check("temperature_free", "during", "warn" if pinned else "pass",
                  f"temperature {last[-1]:.4g}, clamp {clamp:.4g}" + (
                      " (pinned at the clamp: loss.max_logit_scale limits the model)" if pinned else ""),
                  value=last[-1], threshold=f"> {clamp:.4g} x (1 + {st['margin']})")


def _baseline_run(path: str) -> tuple[dict, dict]:
    """(cfg.yaml, facts/summary.json) of the baseline run; {} for what it does not have."""
    import json
    from pathlib import Path

    import yaml

    out = []
    for name, load in (("cfg.yaml", yaml.safe_load), ("facts/summary.json", json.loads)):
        try:
            out.append(load((Path(path) / name).read_text(encoding="utf-8")) or {})
        except (OSError, ValueError, yaml.YAMLError):
            out.append({})
    return out[0], out[1]


def _config_vs_baseline(cfg: dict, run: str) -> dict:
    from modalign.analysis.comparability import config_diff

    base_cfg, _ = _baseline_run(run)
    if not base_cfg:
        return _check("config_vs_baseline", "before", "warn", f"checks.baseline.run={run}: no cfg.yaml there")
    diff = config_diff({"run": cfg, "baseline": base_cfg})
    shown = "; ".join(f"{k}: {v['baseline']} -> {v['run']}" for k, v in list(diff.items())[:6])
    return _check("config_vs_baseline", "before", "pass",
                  f"{len(diff)} keys differ from the baseline run" + (f": {shown}" if shown else "") +
                  (" ..." if len(diff) > 6 else "") + " (modalign diff-config shows all)",
                  value={k: [v["baseline"], v["run"]] for k, v in diff.items()}, threshold=run)


def _beats_baseline(info: dict, summary: dict | None, st: dict) -> dict | None:
    metric, value = st.get("metric"), st.get("value")
    split = (info.get("eval") or {}).get("split", "test")
    if metric is not None and value is None and st.get("run"):
        value = (_baseline_run(st["run"])[1].get(split) or {}).get(metric)
        if value is None:
            return _check("beats_baseline", "after", "warn",
                          f"the baseline run {st['run']} has no {split} metric '{metric}'", threshold=st["run"])
    if metric is None or value is None:
        return None
    got = ((summary or {}).get(split) or {}).get(metric)
    if got is None:
        return _check("beats_baseline", "after", "warn", f"{split} metric '{metric}' is not in the run's results",
                      threshold=value)
    better = got > value if larger_is_better(metric) else got < value
    return _check("beats_baseline", "after", "pass" if better else "fail",
                  f"{split} {metric} {got:.4g} against the baseline's {value:.4g}", value=got, threshold=value)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def verdict(checks: list[dict]) -> str:
    """fail if any check failed, else warn if any warned, else pass."""
    statuses = {c["status"] for c in checks}
    return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"


def cell(checks: list[dict] | None) -> str:
    """A table cell: pass, `2 warn`, or `1 FAIL: loss_falls`; empty for a run without checks."""
    if not checks:
        return ""
    failed = [c["name"] for c in checks if c.get("status") == "fail"]
    warned = sum(c.get("status") == "warn" for c in checks)
    return f"{len(failed)} FAIL: {', '.join(failed)}" if failed else f"{warned} warn" if warned else "pass"


def lines(checks: list[dict]) -> list[str]:
    """One line per check, for run.log and the terminal."""
    return [f"check {c['phase']:6s} {c['name']:20s} {c['status'].upper():4s}  {c['message']}" for c in checks]
