"""The health checks watched while a run trains: a sink of the trainer (modalign.train.loop.Sink).

It keeps the training curves it is sent and, at the first logged step from `decision_step` on (the
end of the loss check's window), evaluates the "during" checks (modalign.analysis.checks). A check
that fails is a warning in run.log at that step, or, with checks.on_fail=stop, stops the run:
CheckFailed, which the launcher turns into status `failed` and one line naming the check.
"""

from __future__ import annotations

import logging
from typing import Callable

from modalign.analysis.checks import decision_step, during

log = logging.getLogger("modalign")


class CheckFailed(RuntimeError):
    """A health check failed while training, and checks.on_fail=stop."""


class ChecksWatcher:
    """cfg: the run's resolved config (a dict); info: reads its run.json (params, for the checks)."""

    def __init__(self, cfg: dict, info: Callable[[], dict]):
        self.cfg, self.info = cfg, info
        self.on_fail = ((cfg.get("checks") or {}).get("on_fail")) or "warn"
        self.at = decision_step(cfg)
        self.rows: list[dict] = []
        self.done = False

    def log(self, step: int, epoch, split: str, values: dict[str, float]) -> None:
        if split != "train" or self.done:
            return
        if not self.rows and step > self.at:  # a resumed session past the window: decided before
            self.done = True
            return
        self.rows += [{"step": step, "split": split, "name": k, "value": v} for k, v in values.items()]
        if step < self.at:
            return
        self.done = True
        for c in during(self.info(), self.cfg, self.rows):
            if c["status"] == "pass":
                continue
            line = f"check during {c['name']} {c['status'].upper()} at step {step}: {c['message']}"
            if c["status"] == "fail" and self.on_fail == "stop":
                log.error("%s; stopping (checks.on_fail=stop)", line)
                raise CheckFailed(f"check {c['name']} failed at step {step}: {c['message']} (checks.on_fail=stop)")
            log.warning("%s", line)

    def checkpoint(self, name, state, step, metric=None, keep=None) -> None:
        pass

    def training_starts(self) -> None:
        pass

