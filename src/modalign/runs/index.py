"""Find run directories under a root and read what they say. No torch, no Hydra."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from modalign.errors import UserError
from modalign.runs.card import flatten


@dataclass
class RunRecord:
    path: Path
    info: dict
    summary: dict | None
    config: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # the command-line overrides that made it

    @property
    def status(self) -> str:
        return self.info.get("status", "?")

    def metric(self, name: str):
        """A test metric by name ("m2t_R@1" or "test/m2t_R@1"), or None."""
        if self.summary is None:
            return None
        split, leaf = next(((p[:-1], name[len(p):]) for p in ("test/", "val/", "train/") if name.startswith(p)),
                           ("test", name))  # test/retention/exact_match: the leaf keeps its own slash
        if split == "test" and leaf in self.summary.get("test", {}):
            return self.summary["test"][leaf]
        entry = self.summary.get("metrics", {}).get(f"{split}/{leaf}")
        return None if entry is None else entry["best"]

    def field(self, key: str):
        """A value by dotted key from run.json (e.g. status, data.name), the config (head.kind), or
        the overrides (head=mlp chose the config group)."""
        flat = flatten(self.info)
        if key in flat:
            return flat[key]
        flat = flatten(self.config)
        if key in flat:
            return flat[key]
        # a config group chosen on the command line: head=mlp is in the overrides, not the config
        given = dict(o.lstrip("+~").split("=", 1) for o in self.overrides if "=" in o)
        return given.get(key)


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser: a report reads 1,000s of configs


def _natural(path: Path) -> tuple:
    """Sort key in which sweep job 2 comes before job 10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def find_runs(root: Path) -> list[RunRecord]:
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such directory")
    paths = [root] if (root / "run.json").exists() else sorted((p.parent for p in root.rglob("run.json")), key=_natural)
    records = []
    for p in paths:
        try:
            info = json.loads((p / "run.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        summary = None
        if (p / "facts" / "summary.json").exists():
            try:
                summary = json.loads((p / "facts" / "summary.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                summary = None
        config = {}
        if (p / "cfg.yaml").exists():
            try:
                config = yaml.load((p / "cfg.yaml").read_text(encoding="utf-8"), Loader=_Loader) or {}
            except yaml.YAMLError:
                config = {}
        overrides = []
        if (p / "overrides.yaml").exists():
            try:
                overrides = [str(o) for o in (yaml.load((p / "overrides.yaml").read_text(encoding="utf-8"), Loader=_Loader) or [])]
            except (yaml.YAMLError, TypeError):
                overrides = []
        records.append(RunRecord(p, info, summary, config, overrides))
    return records


def parse_where(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for it in items:
        if "=" not in it:
            raise UserError(f"--where '{it}': expected KEY=VALUE, e.g. --where head.kind=mlp")
        k, v = it.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def select(records: list[RunRecord], where: list[tuple[str, str]]) -> list[RunRecord]:
    def ok(r: RunRecord) -> bool:
        return all(str(r.field(k)).lower() == v.lower() for k, v in where)

    return [r for r in records if ok(r)]
