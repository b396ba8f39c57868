"""One job of a plan, in its own process: `python -m modalign.plans.job SPEC.json`.

The executor (modalign.plans.executor) writes the spec (run directory, recipe, overrides, the plan's
{id, phase, step, ...} for run.json) and starts this module. The job holds an exclusive lock on its
lock file for as long as it lives, so a plan executor started again after a crash waits for a job
that is still writing its checkpoint instead of starting it twice. Exit 0 when the run completed.
"""

from __future__ import annotations

import fcntl
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    lock = open(spec["lock"], "a+")  # noqa: SIM115 — held until the process ends
    fcntl.flock(lock, fcntl.LOCK_EX)
    from modalign.train.allocator import mode_from_overrides, tune_malloc

    # env.malloc before torch starts a thread, as `modalign train` does: the same allocator, the
    # same memory layout, so a plan's job computes what the same `modalign train` computes
    tune_malloc(mode_from_overrides(spec["overrides"]))
    from modalign.recipes.config import compose, to_container
    from modalign.recipes.launch import root_config
    from modalign.recipes.sweep import run_job

    out = Path(spec["dir"])
    recipe, overrides = spec["recipe"], list(spec["overrides"])
    run_job(out, recipe, overrides, True, lambda: to_container(compose(overrides, root_config(recipe)), ""),
            info={"plan": spec["plan"]}, resume_overrides=spec.get("resume_overrides"))
    try:
        status = json.loads((out / "run.json").read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        status = None
    return 0 if status == "completed" else 1


def run_spec(spec_path: str, threads: int) -> int:
    """The job as a function, for submitit (SLURM or its local executor): the same as the module."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # before torch is imported
    return main(["modalign.plans.job", spec_path])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
