"""The run writer: the one object that writes a run directory (DESIGN §3, §4).

    writer = RunWriter(path, rank=world.rank)
    writer.create(cfg_yaml, overrides_yaml, info)          # cfg.yaml, overrides.yaml, run.json
    writer.open_metrics(keep_until_step=None)               # metrics.jsonl, truncated on resume
    trainer = Trainer(..., sinks=[writer])                  # log() and checkpoint() calls
    writer.write_facts(summary, scores, embeddings, ...)    # facts/, figures/, card.md
    writer.set_status("completed")
    writer.finish_sinks("completed")                        # TensorBoard / MLflow / W&B mirrors, if any

Every write of a run goes through here: config, run.json updates, metrics lines, checkpoints and
their manifest, facts, figures, the card and the log. Under torchrun every rank holds a writer for
rank 0's directory; on ranks > 0 it writes nothing (each method returns without touching the disk)
and only reads, e.g. rank 0's checkpoints on resume. The trainer never sees a path: it reports
metric points and "checkpoint due" through the sink methods `log` and `checkpoint`.

No torch at import time: checkpoints import it when one is written or read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

from modalign import faults
from modalign.runs.rundir import STATUSES, RunDir, atomic_write_json, atomic_write_text, now_iso

log = logging.getLogger("modalign")


class RunWriter:
    def __init__(self, path: Path, rank: int = 0):
        self.run = RunDir(path)
        self.rank = rank
        self._metrics = None  # the open metrics.jsonl (rank 0, between open_metrics and close)
        self._log_handler: logging.Handler | None = None
        self.mirror = None  # tracking sinks (modalign.sinks.Mirror), fed from metrics.jsonl at each last.pt

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def writes(self) -> bool:
        """False on ranks > 0: every write method then does nothing."""
        return self.rank == 0

    # identity and status ---------------------------------------------------------------------
    def create(self, cfg_yaml: str, overrides_yaml: str, info: dict) -> None:
        """A new run: its folders, cfg.yaml, overrides.yaml and run.json (status running)."""
        if not self.writes:
            return
        for d in (self.run.checkpoints, self.run.facts, self.run.figures):
            d.mkdir(parents=True, exist_ok=True)
        self.write_config(cfg_yaml)
        atomic_write_text(self.path / "overrides.yaml", overrides_yaml)
        atomic_write_json(self.run.run_json, info)

    def record_failure(self, overrides_yaml: str, info: dict) -> None:
        """A sweep job that failed before its run could start: overrides.yaml and run.json only."""
        if self.writes:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path / "overrides.yaml", overrides_yaml)
            atomic_write_json(self.run.run_json, info)

    def write_config(self, cfg_yaml: str) -> None:
        if self.writes:
            atomic_write_text(self.path / "cfg.yaml", cfg_yaml)

    def update(self, **fields) -> None:
        """Merge `fields` into run.json (atomically)."""
        if not self.writes:
            return
        info = self.run.info()
        info.update(fields)
        atomic_write_json(self.run.run_json, info)

    def set_status(self, status: str, error: str | None = None) -> None:
        assert status in STATUSES
        fields = {"status": status, "error": error}
        fields["finished_at"] = None if status == "running" else now_iso()
        self.update(**fields)

    def training_starts(self) -> None:
        """The trainer is about to take its first step: the live tracking sinks open now."""
        if self.mirror is not None:
            self.mirror.start()

    def finish_sinks(self, status: str) -> None:
        """The run ended with `status`: the tracking sinks get what is left, then close."""
        if self.mirror is not None:
            self.mirror.finish(status)
            self.mirror = None

    def close_sinks(self) -> None:
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None

    def discard(self) -> None:
        """Remove a run that never trained (a bad value found after the directory was made)."""
        self.detach_log()
        if self.writes:
            shutil.rmtree(self.path, ignore_errors=True)

    def attach_log(self) -> None:
        """Send the `modalign` logger to run.log (rank 0 only)."""
        if not self.writes or self._log_handler is not None:
            return
        logger = logging.getLogger("modalign")
        logger.setLevel(logging.INFO)
        h = logging.FileHandler(self.path / "run.log", encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(h)
        self._log_handler = h

    def detach_log(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("modalign").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    # metrics: the sink the trainer logs to ---------------------------------------------------
    def open_metrics(self, keep_until_step: int | None = None) -> None:
        """Append to metrics.jsonl; a resumed run first keeps only the train/val points at or before
        `keep_until_step` (its checkpoint), so what comes after is written once, by this session."""
        if not self.writes:
            return
        path = self.run.metrics_path
        if keep_until_step is not None:
            rows = self.run.read_metrics()
            kept = [r for r in rows if r["step"] <= keep_until_step and r["split"] in ("train", "val")]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._metrics = open(path, "a", encoding="utf-8")

    def log(self, step: int, epoch: int | None, split: str, values: dict[str, float]) -> None:
        """One {"step","epoch","split","name","value","time"} line per value."""
        if not self.writes:
            return
        t = round(time.time(), 3)
        text = "".join(json.dumps({"step": step, "epoch": epoch, "split": split, "name": k, "value": float(v),
                                   "time": t}) + "\n" for k, v in values.items())
        f = self._metrics
        if f is None:  # e.g. the test metrics after training: append and close again
            with open(self.run.metrics_path, "a", encoding="utf-8") as f:
                f.write(text)
            return
        if faults.hit("kill:metrics_line"):  # a kill half-way through a line (see modalign.faults)
            f.write(text[: len(text) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(text)
        f.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    # checkpoints ------------------------------------------------------------------------------
    def checkpoint(self, name: str, state: Callable[[], dict], step: int, metric: float | None = None,
                   keep: int | None = None) -> None:
        """Write checkpoints/<name> from `state()` (called on rank 0 only: the other ranks never
        build a payload). keep: for step_<n>.pt, how many of them to keep afterwards."""
        if not self.writes:
            return
        from modalign.train.checkpoint import prune_step_checkpoints, save_checkpoint

        save_checkpoint(self.run.checkpoints, name, state(), step=step, metric=metric)
        if keep is not None:
            prune_step_checkpoints(self.run.checkpoints, keep)
        if name == "last.pt" and self.mirror is not None:
            self.mirror.checkpoint(step)  # a resume starts here: the sinks may hold everything up to it

    def load_checkpoint(self, name: str) -> dict | None:
        """checkpoints/<name> verified against the manifest, or None when there is none. Every rank
        reads rank 0's file."""
        from modalign.train.checkpoint import load_checkpoint

        p = self.run.checkpoints / name
        return load_checkpoint(p) if p.exists() else None

    def has_checkpoint(self) -> bool:
        return any(self.run.checkpoints.glob("*.pt"))

    # facts ------------------------------------------------------------------------------------
    def write_json(self, relative: str, obj) -> None:
        if self.writes:
            atomic_write_json(self.path / relative, obj)

    def write_lines(self, relative: str, rows: list[dict]) -> None:
        """A JSON-lines file (e.g. facts/predictions.jsonl), written whole and atomically."""
        if self.writes:
            atomic_write_text(self.path / relative, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def write_scores(self, relative: str, data, per_example: dict) -> None:
        """facts/<name>.parquet: one row per example of `data` (id, label, every per-example column)."""
        if not self.writes:
            return
        import pandas as pd

        cols = {"id": data.ids.astype(str)}
        if data.labels is not None:
            cols["label"] = data.labels
        cols.update(per_example)
        pd.DataFrame(cols).to_parquet(self.path / relative, index=False)

    def write_embeddings(self, relative: str, ids, modality, text) -> None:
        if self.writes:
            import numpy as np

            np.savez(self.path / relative, ids=ids.astype(str), modality=modality, text=text)

    def figure(self, draw: Callable[[Path], None]) -> None:
        """draw(figures_dir) writes figures into figures/ (rank 0 only)."""
        if self.writes:
            self.run.figures.mkdir(exist_ok=True)
            draw(self.run.figures)

    def write_card(self, summary: dict) -> None:
        if self.writes:
            from modalign.runs.card import card_text

            atomic_write_text(self.path / "card.md", card_text(self.run.info(), summary))

    def write_facts(self, summary: dict, split: str, data, per_example: dict, modality=None, text=None,
                    export_embeddings: bool = False) -> None:
        """A finished run's facts: the test metrics as metrics.jsonl lines (so every number of the
        summary has a line behind it), facts/summary.json, facts/scores.parquet, embeddings when
        asked for, the curves and similarity figures, card.md."""
        if not self.writes:
            return
        from modalign.report.figures import plot_run_curves, plot_similarity

        self.log(summary["steps"], None, split, summary[split])
        self.write_json("facts/summary.json", summary)
        self.write_scores("facts/scores.parquet", data, per_example)
        if export_embeddings and modality is not None:
            self.write_embeddings("facts/embeddings.npz", data.ids, modality, text)
        rows = self.run.read_metrics()
        self.figure(lambda d: plot_run_curves(rows, d))
        if modality is not None and text is not None:
            self.figure(lambda d: plot_similarity(modality[:32], text[:32], d / "similarity.png",
                                                  title=f"{split}: first {min(32, len(modality))} pairs (cosine)"))
        self.write_checks(rows, summary)
        self.write_card(summary)

    def write_checks(self, rows: list[dict], summary: dict | None) -> list[dict]:
        """Evaluate the run's health checks (modalign.analysis.checks) into run.json and run.log."""
        if not self.writes:
            return []
        import yaml

        from modalign.analysis.checks import evaluate, lines, read_predictions

        cfg_path = self.path / "cfg.yaml"
        cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
        info = self.run.info()
        checks = evaluate(info, cfg, rows, summary, read_predictions(self.path, info))
        self.update(checks=checks)
        for line in lines(checks):
            (log.warning if " FAIL " in line or " WARN " in line else log.info)(line)
        return checks
