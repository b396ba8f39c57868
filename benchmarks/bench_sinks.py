# .venv/bin/python benchmarks/bench_sinks.py --rounds 3      (smoke check: --quick)
"""Tracking sinks: what `logger=[tensorboard,mlflow,wandb]` costs a training run, side by side with
no logger (the default) in one run.

Each run is a fresh `modalign train --quiet` process on the demo (align recipe, batch 256, the demo's
data), 150 steps with `trainer.eval_every=10`: a validation pass and a `last.pt` every 10 steps, so
the live sinks (TensorBoard, MLflow) commit 15 times, five times as often as the default
(eval_every=50): an upper bound on the per-step cost. The two sides alternate round by round (ABBA),
each side with its own outputs root (MLflow's SQLite store is created by the first sinks run and
reused by the next, as in a sweep). The text embeddings come from a warm cache
(MODALIGN_CACHE=benchmarks/.bench-cache, shared with bench_sweep/bench_fuse).

From each run: `train_seconds` (facts/summary.json: the trainer's fit, with its validation passes and
checkpoint writes, and with sinks every commit), and the seconds each sink spent opening, logging
points and finishing (tracking.json, measured by the Mirror around every call into a sink).

- per-step cost = train_seconds / steps (the live sinks open just before the first step, outside
  train_seconds: that one-time cost is reported on its own);
- overhead = per-step cost with sinks / without - 1, paired by round (goal < 2%);
- sinks' own share = the sinks' logging seconds / the no-sink train_seconds of the same round: the
  same overhead measured directly, free of the machine's run-to-run noise;
- fixed cost per run: opening (before the first step for TensorBoard and MLflow; at the end for W&B
  offline, which writes its whole run there, after the loop), finishing, and the difference in the
  process's wall time (imports included).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CACHE = common.HERE / ".bench-cache"
MODALIGN = str(Path(sys.executable).parent / "modalign")
SINKS = ("tensorboard", "mlflow", "wandb")


def one_run(outputs: Path, logger: str, args: list[str], env: dict) -> dict:
    before = set((outputs / "runs").iterdir()) if (outputs / "runs").exists() else set()
    chosen = [f"logger={logger}"] if logger else []  # no logger: the default (no sink)
    m = common.run_measured([MODALIGN, "train", "--quiet", f"outputs={outputs}", *chosen, *args], env=env)
    if m["rc"] != 0:
        raise RuntimeError(f"modalign train logger={logger} failed ({m['rc']}):\n{m['stderr'][-3000:]}")
    (run,) = set((outputs / "runs").iterdir()) - before
    summary = json.loads((run / "facts" / "summary.json").read_text())
    state = json.loads((run / "tracking.json").read_text()) if (run / "tracking.json").exists() else {}
    seconds = {name: state.get(name, {}).get("seconds", {}) for name in SINKS if name in state}
    bad = [n for n in seconds if state[n].get("finished") != "completed"]
    if bad:
        raise RuntimeError(f"sink(s) {bad} did not finish the run {run}: {state}")
    return {"wall": m["wall"], "train": summary["train_seconds"], "steps": summary["steps"], "seconds": seconds}


def main() -> int:
    args = common.bench_args(__doc__.split("\n")[0], 3).parse_args()
    steps, every = (20, 10) if args.quick else (150, 10)
    train_args = [f"trainer.max_steps={steps}", f"trainer.eval_every={every}"]
    env = dict(os.environ, MODALIGN_CACHE=str(CACHE), PYTHONWARNINGS="ignore")
    tmp = Path(tempfile.mkdtemp(prefix="bench-sinks-"))
    rows: list[dict] = []
    try:
        # warm-up (untimed): fills the text-embedding cache, and the OS's file cache for every import
        print("# warm-up: one run with the three sinks", file=sys.stderr, flush=True)
        one_run(tmp / "warm", "[" + ",".join(SINKS) + "]", ["trainer.max_steps=2", "trainer.eval_every=1"], env)
        for r in range(args.rounds):
            order = ("none", "sinks") if r % 2 == 0 else ("sinks", "none")
            got = {}
            for side in order:
                logger = None if side == "none" else "[" + ",".join(SINKS) + "]"
                print(f"# round {r + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
                got[side] = one_run(tmp / side, logger, train_args, env)
            rows.append(got)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    common.header("Tracking sinks: a run with TensorBoard + MLflow + W&B offline against no sink",
                  extra=f"{steps} steps, eval_every {every}")

    def phase(run: dict, what: str, name: str | None = None) -> float:
        return sum(s.get(what, 0.0) for n, s in run["seconds"].items() if name in (None, n))

    per_step = {"none": [], "sinks": []}
    overhead, share = [], []
    for got in rows:
        a, b = got["none"], got["sinks"]
        sa = a["train"] / a["steps"]
        sb = b["train"] / b["steps"]
        per_step["none"].append(sa)
        per_step["sinks"].append(sb)
        overhead.append(sb / sa - 1)
        share.append(phase(b, "log") / a["train"])
    print("Per-step cost (train_seconds / steps), "
          f"{args.rounds} rounds, min / median:\n")
    common.table(["logger", "s/step min", "s/step median", "overhead vs none (median of rounds)"], [
        ["none (default)", common.fmt(common.mn(per_step["none"]), 4), common.fmt(common.med(per_step["none"]), 4), ""],
        ["[tensorboard,mlflow,wandb]", common.fmt(common.mn(per_step["sinks"]), 4),
         common.fmt(common.med(per_step["sinks"]), 4), f"{100 * common.med(overhead):+.2f}%"],
    ])
    print("The sinks' own seconds (tracking.json), per run, median of rounds; share = logging seconds / "
          "the no-sink run's train_seconds:\n")
    trows = []
    for name in SINKS:
        opened = [phase(g["sinks"], "open", name) for g in rows]
        logged = [phase(g["sinks"], "log", name) for g in rows]
        finished = [phase(g["sinks"], "finish", name) for g in rows]
        trows.append([name, common.fmt(common.med(opened), 3), common.fmt(common.med(logged), 3),
                      f"{100 * common.med([lg / g['none']['train'] for lg, g in zip(logged, rows)]):.3f}%",
                      common.fmt(common.med(finished), 3)])
    trows.append(["all three", common.fmt(common.med([phase(g["sinks"], "open") for g in rows]), 3),
                  common.fmt(common.med([phase(g["sinks"], "log") for g in rows]), 3),
                  f"{100 * common.med(share):.3f}%",
                  common.fmt(common.med([phase(g["sinks"], "finish") for g in rows]), 3)])
    common.table(["sink", "opening s (once)", "logging s (all commits)", "share of train time",
                  "finishing s (after the loop)"], trows)
    wall = [g["sinks"]["wall"] - g["none"]["wall"] for g in rows]
    print(f"Whole process: {common.fmt(common.med([g['none']['wall'] for g in rows]), 1)} s without sinks, "
          f"{common.fmt(common.med([g['sinks']['wall'] for g in rows]), 1)} s with them "
          f"(difference, median of rounds: {common.fmt(common.med(wall), 1)} s: the sinks' imports, opening "
          "and finishing, once per run).")
    print(f"\nPer-round overhead: {', '.join(f'{100 * o:+.2f}%' for o in overhead)}; "
          f"per-round share: {', '.join(f'{100 * s:.3f}%' for s in share)}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
