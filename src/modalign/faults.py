"""Fault injection for the reliability tests (tests/test_reliability.py, docs/reliability.md).

MODALIGN_FAULTS="point@n[,point@n...]" makes a run misbehave at a chosen place, so a test can kill
it inside a checkpoint write or poison one step, deterministically, through the real entry point:

    kill:step               SIGKILL right after optimizer step n, before anything of it is logged
    term:step               SIGTERM right after optimizer step n (as SLURM sends before a time limit):
                            the run stops at that step with a checkpoint, status `interrupted`
    kill:checkpoint_tmp     SIGKILL in the n-th checkpoint save of this process, after the new file
                            is written under its temp name, before the rename
    kill:checkpoint_rename  SIGKILL in the n-th save, after the rename, before the manifest commit
    kill:metrics_line       SIGKILL in the n-th metrics write, half-way through a line
    nan:loss                the loss of optimizer step n is NaN
    kill:convert_chunk      SIGKILL after the n-th chunk of arrays `modalign convert` wrote
    raise:sink_NAME         the n-th call of this process into the tracking sink NAME (tensorboard,
                            mlflow, wandb) raises OSError, as a full disk or a locked store would

Without the variable (every real run) `hit` is one dictionary lookup and returns False.
"""

from __future__ import annotations

import os
import signal

ENV = "MODALIGN_FAULTS"
_counts: dict[str, int] = {}


def _plan() -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for item in os.environ.get(ENV, "").split(","):
        point, _, n = item.strip().rpartition("@")
        if point and n.isdigit():
            out.setdefault(point, set()).add(int(n))
    return out


def hit(point: str, at: int | None = None) -> bool:
    """True when the plan names `point` at `at` (a step) or, without `at`, at this arrival count."""
    if ENV not in os.environ:
        return False
    plan = _plan().get(point)
    if not plan:
        return False
    if at is None:
        _counts[point] = at = _counts.get(point, 0) + 1
    return at in plan


def kill_if(point: str, at: int | None = None) -> None:
    """SIGKILL this process (no cleanup, no flush: as the OOM killer or a wall-time limit would)."""
    if hit(point, at):
        os.kill(os.getpid(), signal.SIGKILL)


def term_if(point: str, at: int | None = None) -> None:
    """SIGTERM this process: its handler asks the trainer to stop cleanly after the current step."""
    if hit(point, at):
        os.kill(os.getpid(), signal.SIGTERM)
