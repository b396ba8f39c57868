# .venv/bin/python benchmarks/bench_patches.py --rounds 2 --seeds 0,1      (smoke check: --quick)
"""Patches as encoder tokens (`encoder.patch_size`): time per training step and test zero-shot
accuracy, patch sizes side by side with the unpatched transformer and the CNN, on two bundled sktime
sets (PLAID: 1,344 steps, 1 channel, 11 appliances; BasicMotions: 100 steps, 6 channels) and the demo
(smart-home events: categorical, at most 64 per window).

Step time: `recipe.trainer._train_step()` of real AlignRecipes composed as `modalign train` composes
them (default trainer: batch 256), all configurations of a data set built in this one process and
timed in turn, round by round (each round: every configuration, `--steps` steps each, after one
warm-up step); median and min seconds per step over all rounds.

Accuracy: `modalign train --quiet data=... <configuration> seed=S` in a fresh process per seed (the
default 150 steps), test `zeroshot_acc` and `train_seconds` from facts/summary.json; mean over seeds.
The unpatched transformer on PLAID is timed but not trained for accuracy: at about 16 s a step its
150 steps take 40 minutes a seed (add it with --unpatched-accuracy).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CACHE = common.HERE / ".bench-cache"
MODALIGN = str(Path(sys.executable).parent / "modalign")

SETS = {  # data set -> (its overrides, [(label, configuration overrides)])
    "PLAID": (["data=sktime", "data.dataset=PLAID"], [
        ("transformer, unpatched", ["encoder.patch_size=0"]),
        ("transformer, auto (32)", ["encoder.patch_size=auto"]),
        ("transformer, patch 16", ["encoder.patch_size=16"]),
        ("transformer, patch 32, RevIN", ["encoder.patch_size=32", "encoder.revin=true"]),
        ("cnn", ["encoder=cnn"]),
    ]),
    "BasicMotions": (["data=sktime", "data.dataset=BasicMotions"], [
        ("transformer, unpatched", ["encoder.patch_size=0"]),
        ("transformer, auto (4)", ["encoder.patch_size=auto"]),
        ("transformer, patch 10", ["encoder.patch_size=10"]),
        ("cnn", ["encoder=cnn"]),
    ]),
    "demo": ([], [
        ("transformer, unpatched = auto", ["encoder.patch_size=auto"]),
        ("transformer, patch 4 (events)", ["encoder.patch_size=4"]),
        ("transformer, patch 8 (events)", ["encoder.patch_size=8"]),
        ("cnn", ["encoder=cnn"]),
    ]),
}


def step_times(data: list[str], configs: list[tuple[str, list[str]]], rounds: int, steps: int) -> dict:
    """label -> [seconds of each timed step]; also label -> resolved patch size."""
    sys.path.insert(0, str(common.HERE))
    from bench_step import build_recipe

    root = tempfile.mkdtemp(prefix="bench-patches-")
    try:
        recipes = {}
        for label, ov in configs:
            recipes[label] = build_recipe([*data, *ov], root)
            recipes[label].trainer._train_step()  # warm-up
        times = {label: [] for label, _ in configs}
        for r in range(rounds):
            for label, _ in configs:
                print(f"#   round {r + 1}/{rounds}: {label}", file=sys.stderr, flush=True)
                for _ in range(steps):
                    t0 = time.perf_counter()
                    recipes[label].trainer._train_step()
                    times[label].append(time.perf_counter() - t0)
        sizes = {label: rec.model_cfg.encoder.patch_size for label, rec in recipes.items()}
        return {"times": times, "sizes": sizes}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def accuracy(data: list[str], ov: list[str], seed: int, out: Path, env: dict) -> dict:
    before = set((out / "runs").iterdir()) if (out / "runs").exists() else set()
    m = common.run_measured([MODALIGN, "train", "--quiet", f"outputs={out}", *data, *ov, f"seed={seed}"], env=env)
    if m["rc"] != 0:
        raise RuntimeError(f"modalign train {' '.join(data + ov)} failed ({m['rc']}):\n{m['stderr'][-3000:]}")
    (run,) = set((out / "runs").iterdir()) - before
    s = json.loads((run / "facts" / "summary.json").read_text())
    return {"acc": s["test"]["zeroshot_acc"], "train_seconds": s["train_seconds"]}


def main() -> int:
    ap = common.bench_args(__doc__.split("\n")[0], 2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration per round (default 2)")
    ap.add_argument("--seeds", default="0,1", help="seeds of the accuracy runs (default 0,1)")
    ap.add_argument("--sets", default=",".join(SETS), help=f"data sets (default {','.join(SETS)})")
    ap.add_argument("--unpatched-accuracy", action="store_true", help="also train PLAID's unpatched transformer")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    extra = []
    if args.quick:
        args.rounds, args.steps, seeds, extra = 1, 1, [0], ["trainer.max_steps=4", "trainer.eval_every=4"]
    env = dict(os.environ, MODALIGN_CACHE=str(CACHE), PYTHONWARNINGS="ignore")
    os.environ["MODALIGN_CACHE"] = str(CACHE)
    results = {}
    out = Path(tempfile.mkdtemp(prefix="bench-patches-runs-"))
    try:
        for name in args.sets.split(","):
            data, configs = SETS[name]
            print(f"# {name}: step times", file=sys.stderr, flush=True)
            st = step_times(data, configs, args.rounds, args.steps)
            acc = {}
            for label, ov in configs:
                if name == "PLAID" and "unpatched" in label and not args.unpatched_accuracy:
                    continue
                for s in seeds:
                    print(f"# {name}: {label}, seed {s}", file=sys.stderr, flush=True)
                    acc.setdefault(label, []).append(accuracy(data, [*ov, *extra], s, out, env))
            results[name] = (configs, st, acc)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    common.header("Patches: time per step and zero-shot accuracy", extra=f"{args.rounds} rounds x {args.steps} steps; "
                  f"seeds {','.join(map(str, seeds))}")
    for name, (configs, st, acc) in results.items():
        base = common.med(st["times"][configs[0][0]])
        print(f"**{name}** (`{' '.join(SETS[name][0]) or 'data=demo'}`; step time: batch 256)\n")
        rows = []
        for label, ov in configs:
            t = st["times"][label]
            a = acc.get(label)
            mean = sum(x["acc"] for x in a) / len(a) if a else None
            rows.append([label, f"`{' '.join(ov)}`", st["sizes"][label], common.fmt(common.med(t), 3),
                         common.fmt(common.mn(t), 3), f"{base / common.med(t):.1f}x",
                         "" if a is None else f"{mean:.3f} ({', '.join(format(x['acc'], '.3f') for x in a)})",
                         "" if a is None else common.fmt(sum(x["train_seconds"] for x in a) / len(a), 0)])
        common.table(["configuration", "overrides", "patch size", "s/step median", "s/step min",
                      f"speed-up vs {configs[0][0]}", "test zero-shot acc, mean (per seed)", "train s (150 steps)"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
