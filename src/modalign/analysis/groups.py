"""Runs grouped by configuration over seeds, and a group's statistics. No torch.

A group is the set of runs that share one configuration (the config minus the seed and
bookkeeping, see `comparability.BOOKKEEPING`) and one fingerprint (data splits, eval protocol,
parents): the seeds of one variant, and nothing that may not be compared with them. Its label is
what distinguishes it from the other groups in words the user typed (`head=mlp`), falling back
to config keys (`head.kind=mlp`) when the overrides do not tell the groups apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from modalign.analysis.comparability import config_diff, config_key, fingerprint, fingerprint_id
from modalign.analysis.stats import bootstrap_ci, iqm
from modalign.runs.index import RunRecord

NOT_A_PARAM = ("seed", "outputs", "resume", "name", "experiment", "hydra", "+modalign_quiet")
IQM_MIN_RUNS = 4  # below 4 runs the interquartile mean trims nothing and equals the mean


@dataclass
class Group:
    label: str
    params: dict[str, object]  # what distinguishes this group: override or config key -> value
    runs: list[RunRecord]
    fingerprint: dict[str, str]
    comparable_set: str = "A"  # groups in the same set share a fingerprint and may be compared
    config: dict = field(default_factory=dict)

    @property
    def completed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "completed"]

    @property
    def seeds(self) -> list:
        return [r.info.get("seed") for r in self.completed]

    def values(self, metric: str) -> np.ndarray:
        """The metric over this group's completed runs that have it [n]."""
        vals = [r.metric(metric) for r in self.completed]
        return np.array([v for v in vals if v is not None], dtype=np.float64)

    def stats(self, metric: str, n_resamples: int = 10_000, random_state=0) -> dict:
        """mean, std, n, 95% bootstrap CI of the mean over runs, and IQM (n >= 4)."""
        x = self.values(metric)
        if x.size == 0:
            return {"n": 0, "mean": np.nan, "std": np.nan, "ci_low": np.nan, "ci_high": np.nan, "iqm": np.nan}
        mean, low, high = bootstrap_ci(x, "mean", n_resamples=n_resamples, random_state=random_state)
        return {"n": int(x.size), "mean": mean, "std": float(x.std(ddof=1)) if x.size > 1 else np.nan,
                "ci_low": low, "ci_high": high, "iqm": iqm(x) if x.size >= IQM_MIN_RUNS else np.nan}


def device_type(record: RunRecord) -> str:
    """cpu | cuda | mps: where the run trained (run.json env; runs from before GPU placement: cpu).
    Runs of one configuration on different devices are different groups: GPU kernels and bf16
    autocast differ from the CPU's, and so do wall times."""
    env = record.info.get("env") or {}
    return str(env.get("device_type") or str(env.get("device") or "cpu").split(":")[0])


def _override_params(record: RunRecord) -> dict[str, str]:
    out = {}
    for o in record.overrides:
        if "=" not in o:
            continue
        k, v = o.split("=", 1)
        k = k.lstrip("+~")
        if k.split(".")[0] not in NOT_A_PARAM:
            out[k] = v
    return out


def _distinguishing(params: list[dict]) -> list[str]:
    keys = sorted(set().union(*(set(p) for p in params))) if params else []
    return [k for k in keys if len({str(p.get(k)) for p in params}) > 1]


def group_runs(records: list[RunRecord]) -> list[Group]:
    """Runs with a config -> groups, in the order their first run appears. Runs without a config
    (a job that failed before it started) belong to no group; callers list them on their own."""
    buckets: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in records:
        if not r.config:
            continue
        fp = fingerprint(r.info) if r.info.get("data") else {"recipe": str(r.info.get("recipe"))}
        buckets.setdefault((config_key(r.config), fingerprint_id(fp), device_type(r)), []).append(r)
    if not buckets:
        return []
    firsts = [runs[0] for runs in buckets.values()]
    overrides = [_override_params(r) for r in firsts]
    keys = _distinguishing(overrides)
    labels = [", ".join(f"{k}={p.get(k, '∅')}" for k in keys) for p in overrides]
    params = [{k: p.get(k) for k in keys} for p in overrides]
    devices = [device for _, _, device in buckets]
    if len(set(devices)) > 1:  # the same configuration on a CPU and on a GPU: two groups, said so
        labels = [", ".join(x for x in (label, f"device={d}") if x) for label, d in zip(labels, devices)]
        params = [{**p, "device": d} for p, d in zip(params, devices)]
    if len(set(labels)) < len(labels):  # overrides do not tell them apart: use the config itself
        diff = config_diff({str(i): r.config for i, r in enumerate(firsts)})
        diff.update({"device": {str(i): d for i, d in enumerate(devices)}} if len(set(devices)) > 1 else {})
        labels = [", ".join(f"{k}={diff[k][str(i)]}" for k in diff) for i in range(len(firsts))]
        params = [{k: diff[k][str(i)] for k in diff} for i in range(len(firsts))]
    fps = {fp_id for _, fp_id, _ in buckets}
    set_names = {fp_id: chr(ord("A") + i) for i, fp_id in enumerate(dict.fromkeys(fp_id for _, fp_id, _ in buckets))}
    groups = []
    for i, ((_, fp_id, _), runs) in enumerate(buckets.items()):
        label = labels[i] or "all runs"
        if len(fps) > 1 and labels.count(labels[i]) > 1:
            label += f" (set {set_names[fp_id]})"
        fp = fingerprint(runs[0].info) if runs[0].info.get("data") else {}
        groups.append(Group(label, params[i], runs, fp, set_names[fp_id], runs[0].config))
    return groups


def find_group(groups: list[Group], spec: str) -> Group | None:
    """The group whose label is `spec` (e.g. 'head=mlp'), or that holds the run directory `spec`."""
    for g in groups:
        if g.label == spec or ", ".join(f"{k}={v}" for k, v in g.params.items()) == spec:
            return g
    for g in groups:
        if any(str(r.path) == spec or r.path.name == spec or str(r.path.resolve()) == spec for r in g.runs):
            return g
    return None
