"""The W&B sink, offline by default: the run's files go under `<run>/wandb/offline-run-*`, and
`wandb sync <run>/wandb/offline-run-*` uploads them later. Nothing contacts a server unless
`logger.wandb.mode=online`.

What goes in: the resolved config, tags (recipe, variant, sweep), the sweep as the W&B group and
the recipe as the job type, every point of metrics.jsonl (points of one step in one history row,
keys `<split>/<name>`), and at the end the figures as images, the run's status and its test metrics
in the summary. The W&B run id comes from the run directory and is kept in tracking.json, so a
resumed run logs into the same id; each session is its own offline folder, and `wandb sync` of all
of them gives one history without repeated steps. Offline, the points are written when the run
ends or is interrupted (SIGTERM, a failure), up to its last checkpoint; online, at each checkpoint.
"""

from __future__ import annotations

import hashlib
from itertools import groupby

from modalign.sinks import RunMeta, WandbOptions


def run_id(meta: RunMeta) -> str:
    return hashlib.sha1(str(meta.path.resolve()).encode()).hexdigest()[:16]


class WandbSink:
    def __init__(self, options: WandbOptions):
        self.options = options
        self.run = None
        # offline, points are written when the run ends (or is interrupted), not at each checkpoint:
        # nobody watches an offline run before `wandb sync`, and a SIGKILL loses what W&B's service
        # process had not yet written (measured: a killed run's offline file held none of its points)
        self.live = options.mode == "online"

    def open(self, meta: RunMeta, state: dict) -> dict:
        import wandb

        rid = state.get("id") or run_id(meta)
        tags = [t[:64] for t in (meta.recipe, meta.tags.get("variant"), meta.sweep) if t]
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False,
                                  disable_git=True, x_disable_meta=True)
        self.run = wandb.init(mode=self.options.mode, dir=str(meta.path), project=self.options.project,
                              entity=self.options.entity, id=rid, name=meta.label, group=meta.sweep,
                              job_type=meta.recipe or None, tags=tags, config=meta.config, resume="allow",
                              reinit="create_new", settings=settings)
        return {"id": rid, "mode": self.options.mode}

    def log(self, rows: list[dict]) -> None:
        for step, points in groupby(rows, key=lambda r: int(r["step"])):
            self.run.log({f"{r['split']}/{r['name']}": float(r["value"]) for r in points}, step=step)

    def finish(self, status: str, meta: RunMeta) -> None:
        import wandb

        figures = meta.figures()
        if figures and meta.committed is not None:
            self.run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures}, step=meta.committed)
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "completed" else 1)
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None


SINK = WandbSink
