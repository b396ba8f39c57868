"""The run directory: its layout, reading it, and atomic writes. No torch.

    outputs/runs/<YYYYmmdd-HHMMSS>_<recipe>_<name>/
        cfg.yaml overrides.yaml run.json run.log metrics.jsonl card.md
        facts/{summary.json, scores.parquet, embeddings.npz}  figures/*.png  checkpoints/

See docs/run-directory.md for the contract. `modalign.runs.writer.RunWriter` is the only thing that
writes a run directory; this module is the read side and the atomic-write primitives.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


STATUSES = ("running", "completed", "failed", "interrupted")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def fresh_dir(base: Path, stem: str) -> Path:
    """Create base/stem, or base/stem-1, -2, ... if taken: two runs or sweeps started in the same
    second never share a directory (mkdir is atomic)."""
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        path = base / (stem if i == 0 else f"{stem}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh directory under {base}")


def new_run_path(root: Path, recipe: str, name: str) -> Path:
    """Create and return a fresh run dir under root/runs; never reuses an existing directory."""
    return fresh_dir(Path(root) / "runs", f"{datetime.now().strftime('%Y%m%d-%H%M%S')}_{recipe}_{slug(name)}")


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def facts(self) -> Path:
        return self.path / "facts"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    def info(self) -> dict:
        return read_json(self.run_json)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is gone too
        return rows


def host() -> str:
    return socket.gethostname()
