# .venv/bin/python benchmarks/bench_sweep.py --rounds 3      (smoke check: --quick)
"""Sweep and report overhead: what a sweep costs beyond its jobs' training, and a report over 1,000 runs.

Sweep: `modalign sweep --quiet encoder=cnn head=linear,mlp seed=0,1 trainer.max_steps=1` (4 jobs) and the
same with `head=linear seed=0` (1 job), on tiny demo data (512 train / 128 val / 1,000 test windows),
each a fresh `modalign` process, alternating 1-job and 4-job sweeps round by round (ABBA). The text
embeddings come from a warm cache (MODALIGN_CACHE=benchmarks/.bench-cache, gitignored, filled by an
untimed 1-job warm-up sweep the first time), as they do for every sweep after the first. From each job's facts/summary.json: train_seconds (the
trainer's fit: 1 optimizer step, a validation pass and the checkpoint writes) and wall_seconds (the
recipe from setup through the test pass; the facts, figures and card are written after it). Per-job cost = (wall of the 4-job sweep - wall of the 1-job sweep) / 3
(the slope, free of the fixed start-up and report costs); per-job overhead = per-job cost - the jobs'
mean train_seconds. Fixed cost = wall of the 1-job sweep - its job's cost.

Report: a temp root of synthetic but valid run directories, copied from the real jobs of a 4-job sweep
(run.json, cfg.yaml, overrides.yaml, metrics.jsonl, card.md, facts/summary.json, facts/scores.parquet;
no checkpoints or figures), as 20 configurations (head linear/mlp x trainer.max_steps 1..10 written in
the overrides and config) x 50 seeds, with the seed and the test metrics changed per run.
`modalign report ROOT --quiet --out OUT` on 1,000 runs and on the first 100, each in a fresh process,
against a reference that only reads what the report reads (every run.json, summary.json, cfg.yaml
with libyaml, overrides.yaml, and the scores.parquet column of the metric) in a plain loop.
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

COMMAND = ".venv/bin/python benchmarks/bench_sweep.py --rounds 3"
MODALIGN = str(Path(sys.executable).parent / "modalign")
DATA = ["trainer.max_steps=1", "data.n_train=512", "data.n_val=128", "data.n_test=1000"]


def run_cmd(args: list[str], env: dict) -> tuple[float, float]:
    """-> (wall seconds, peak RSS MiB) of one fresh process."""
    m = common.run_measured(args, env=env)
    if m["rc"] != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({m['rc']}):\n{m['stderr'][-3000:]}")
    return m["wall"], m["maxrss_mib"]


def sweep(grid: list[str], outputs: Path, env: dict) -> dict:
    before = set((outputs / "experiments").glob("exp_*")) if (outputs / "experiments").exists() else set()
    wall, rss = run_cmd([MODALIGN, "sweep", "--quiet", "encoder=cnn", *grid, *DATA, f"outputs={outputs}"], env)
    (sweep_dir,) = set((outputs / "experiments").glob("exp_*")) - before
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    summaries = [json.loads((j / "facts" / "summary.json").read_text()) for j in jobs]
    return {"wall": wall, "rss": rss, "dir": sweep_dir, "n": len(jobs),
            "train": [s["train_seconds"] for s in summaries], "recipe": [s["wall_seconds"] for s in summaries]}


# synthetic run directories -----------------------------------------------------------------------
KEEP = ("run.json", "cfg.yaml", "overrides.yaml", "metrics.jsonl", "card.md")


def make_runs(templates: dict[str, Path], root: Path, n_configs: int, n_seeds: int) -> int:
    """root/<head>_steps<k>/seed<s>/: valid run directories copied from the real jobs `templates`
    (head -> run dir), with seed, trainer.max_steps, the test metrics and the per-example hits of the
    R@1 and zero-shot columns changed (each summary metric that has a column is its column's mean)."""
    import numpy as np
    import pandas as pd
    import yaml

    rng = np.random.default_rng(0)
    heads = sorted(templates)
    count = 0
    for c in range(n_configs):
        head, steps = heads[c % len(heads)], 1 + c // len(heads)
        src = templates[head]
        info0 = json.loads((src / "run.json").read_text())
        summary0 = json.loads((src / "facts" / "summary.json").read_text())
        cfg0 = yaml.safe_load((src / "cfg.yaml").read_text())
        scores0 = pd.read_parquet(src / "facts" / "scores.parquet")
        overrides0 = [o for o in yaml.safe_load((src / "overrides.yaml").read_text())
                      if not o.startswith(("seed=", "trainer.max_steps=", "head="))]
        shift = 0.01 * steps + (0.02 if head == "mlp" else 0.0)
        for s in range(n_seeds):
            d = root / f"{head}_steps{steps}" / f"seed{s}"
            (d / "facts").mkdir(parents=True)
            for name in KEEP:
                if (src / name).exists():
                    shutil.copyfile(src / name, d / name)
            info = dict(info0, id=d.name, seed=s)
            (d / "run.json").write_text(json.dumps(info, indent=2))
            cfg = dict(cfg0, seed=s)
            cfg["trainer"] = dict(cfg0["trainer"], max_steps=steps)
            (d / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            (d / "overrides.yaml").write_text(yaml.safe_dump(
                [f"head={head}", f"trainer.max_steps={steps}", f"seed={s}", *overrides0]))
            summary = json.loads(json.dumps(summary0))
            scores = scores0.copy()
            for metric, col in (("m2t_R@1", "m2t_r1"), ("t2m_R@1", "t2m_r1"), ("zeroshot_acc", "zeroshot_correct")):
                if col in scores and metric in summary["test"]:
                    p = min(0.99, max(0.01, float(summary0["test"][metric]) + shift + rng.normal(0, 0.01)))
                    scores[col] = (rng.random(len(scores)) < p).astype(np.float64)
                    summary["test"][metric] = float(scores[col].mean())
            for k, v in summary["test"].items():
                if isinstance(v, float) and ("R@" in k or "mAP" in k) and k not in ("m2t_R@1", "t2m_R@1"):
                    summary["test"][k] = min(1.0, max(0.0, v + shift + rng.normal(0, 0.01)))
            summary["steps"] = steps
            (d / "facts" / "summary.json").write_text(json.dumps(summary, indent=2))
            scores.to_parquet(d / "facts" / "scores.parquet", index=False)
            count += 1
    return count


READ_ALL = r"""
import json, sys, time
from pathlib import Path
import yaml, pandas as pd
t0 = time.perf_counter()
loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
n = 0
for p in sorted(Path(sys.argv[1]).rglob("run.json")):
    d = p.parent
    json.loads(p.read_text()); json.loads((d / "facts" / "summary.json").read_text())
    yaml.load((d / "cfg.yaml").read_text(), Loader=loader); yaml.load((d / "overrides.yaml").read_text(), Loader=loader)
    pd.read_parquet(d / "facts" / "scores.parquet", columns=["id", "m2t_r1"])
    n += 1
print(json.dumps({"runs": n, "seconds": time.perf_counter() - t0}))
"""


def main() -> None:
    p = common.bench_args(__doc__.split("\n")[0], default_rounds=3)
    p.add_argument("--runs", type=int, default=None, help="synthetic run dirs for the report (default 1000)")
    args = p.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 1)
    n_runs = args.runs or (100 if args.quick else 1000)
    n_configs = 20 if n_runs >= 100 else 2
    n_seeds = n_runs // n_configs
    small = max(n_configs, n_runs // 10)

    tmp = Path(tempfile.mkdtemp(prefix="modalign-bench-sweep-"))
    # a caption cache of the benchmarks' own (gitignored), so a second run of the benchmark starts warm
    env = dict(os.environ, MODALIGN_CACHE=str(common.HERE / ".bench-cache"))
    try:
        out = tmp / "outputs"
        grids = {1: ["head=linear", "seed=0"], 4: ["head=linear,mlp", "seed=0,1"]}
        warm = sweep(grids[1], out, env)  # untimed: fills the caption cache (the first time)
        print(f"  warm-up sweep {warm['wall']:.1f} s", file=sys.stderr)
        res = {1: [], 4: []}
        for r in range(args.rounds):
            for n in ((1, 4) if r % 2 == 0 else (4, 1)):
                res[n].append(sweep(grids[n], out, env))
                print(f"  round {r + 1}/{args.rounds} {n}-job sweep {res[n][-1]['wall']:.1f} s "
                      f"(train {sum(res[n][-1]['train']):.1f} s)", file=sys.stderr)
                if n == 1:  # the report a sweep writes at its end, alone (part of the fixed cost)
                    res[n][-1]["report"] = run_cmd([MODALIGN, "report", str(res[n][-1]["dir"]), "--quiet", "--out",
                                                    str(tmp / f"sweep_report_{r}")], env)[0]

        import yaml

        templates = {}
        for j in sorted(p for p in res[4][0]["dir"].iterdir() if p.is_dir() and p.name.isdigit()):
            head = next(o.split("=", 1)[1] for o in yaml.safe_load((j / "overrides.yaml").read_text())
                        if o.startswith("head="))
            templates.setdefault(head, j)
        roots = {}
        for n in sorted({small, n_seeds * n_configs}):
            root = tmp / f"runs{n}"
            t0 = time.perf_counter()
            made = make_runs(templates, root, n_configs, n // n_configs)
            roots[made] = root
            print(f"  made {made} run dirs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rep = {(n, kind): [] for n in roots for kind in ("report", "read")}
        for r in range(args.rounds):
            for n, root in roots.items():
                order = ("report", "read") if r % 2 == 0 else ("read", "report")
                for kind in order:
                    if kind == "report":
                        target = tmp / f"report{n}_{r}"
                        wall, rss = run_cmd([MODALIGN, "report", str(root), "--quiet", "--out", str(target)], env)
                    else:
                        wall, rss = run_cmd([sys.executable, "-c", READ_ALL, str(root)], env)
                    rep[(n, kind)].append((wall, rss))
                    print(f"  round {r + 1}/{args.rounds} {kind} over {n} runs: {wall:.1f} s", file=sys.stderr)
        startup = []
        for _ in range(3):
            startup.append(run_cmd([sys.executable, "-c", "import torch, modalign.recipes.align"], env)[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    common.header("Sweep and report overhead", COMMAND)
    w1 = [x["wall"] for x in res[1]]
    w4 = [x["wall"] for x in res[4]]
    train = [t for x in res[1] + res[4] for t in x["train"]]
    recipe = [t for x in res[1] + res[4] for t in x["recipe"]]
    # per round: the slope between the 1-job and the 4-job sweep, and the 4-job sweep's own job means
    per_job = [(b["wall"] - a["wall"]) / 3 for a, b in zip(res[1], res[4])]
    tr4 = [sum(b["train"]) / len(b["train"]) for b in res[4]]
    wa4 = [sum(b["recipe"]) / len(b["recipe"]) for b in res[4]]
    overhead = [p_ - t_ for p_, t_ in zip(per_job, tr4)]
    print(f"Sweeps: `modalign sweep --quiet encoder=cnn {{head=linear seed=0 | head=linear,mlp seed=0,1}} "
          f"{' '.join(DATA)}`, {args.rounds} rounds alternating, warm caption cache; each a fresh process. "
          "Derived rows are computed per round (that round's 1-job and 4-job sweeps, the 4-job sweep's mean "
          "job), then min and median over rounds.\n")

    def mm(xs):
        return [f"{min(xs):.2f}", f"{common.med(xs):.2f}"]

    common.table(["measure", "min (s)", "median (s)"], [
        ["1-job sweep, process wall", *mm(w1)],
        ["4-job sweep, process wall", *mm(w4)],
        ["a job's train_seconds (summary.json: 1 step, a validation pass, checkpoint writes)", *mm(train)],
        ["a job's wall_seconds (summary.json: the recipe from setup through the test pass)", *mm(recipe)],
        ["per-job cost = (4-job wall - 1-job wall) / 3", *mm(per_job)],
        ["**per-job overhead beyond train_seconds** = per-job cost - mean train_seconds", f"{min(overhead):.2f}",
         f"**{common.med(overhead):.2f}**"],
        ["  setup and test: wall_seconds - train_seconds (data, caption cache, model, test evaluation)",
         *mm([w - t for w, t in zip(wa4, tr4)])],
        ["  the rest: per-job cost - wall_seconds (Hydra job, config checks, run dir, facts: parquet, 3 figures, card)",
         *mm([p_ - w for p_, w in zip(per_job, wa4)])],
        ["fixed cost of a sweep = 1-job wall - per-job cost", *mm([a["wall"] - p_ for a, p_ in zip(res[1], per_job)])],
        ["  of which `python -c 'import torch, modalign.recipes.align'`", *mm(startup)],
        ["  of which the sweep's report (`modalign report` on the 1-job sweep dir, a fresh process)",
         *mm([x["report"] for x in res[1]])],
    ])
    t4 = common.med([sum(x["train"]) for x in res[4]])
    print(f"Share of a 4-job sweep spent training: {t4:.1f} s of {common.med(w4):.1f} s ({t4 / common.med(w4):.0%}); "
          f"peak RSS of a sweep process {max(x['rss'] for x in res[4]):,.0f} MiB.\n")
    print(f"Report over synthetic run directories ({n_configs} configurations x seeds, copied from real jobs): "
          f"{args.rounds} rounds alternating, each a fresh process.\n")
    rows = []
    for n in sorted(roots):
        a, b = rep[(n, "report")], rep[(n, "read")]
        ra, rb = [w for w, _ in a], [w for w, _ in b]
        rows.append([f"{n:,}", f"{min(ra):.2f}", f"{common.med(ra):.2f}", f"{common.med(ra) / n * 1000:.1f}",
                     f"{min(rb):.2f}", f"{common.med(rb):.2f}", f"{common.med(ra) / common.med(rb):.1f}",
                     f"{max(x for _, x in a):,.0f}"])
    common.table(["runs", "`modalign report` min (s)", "median (s)", "ms per run (median)",
                  "read-only loop min (s)", "median (s)", "report / read-only", "report peak RSS (MiB)"], rows)


if __name__ == "__main__":
    main()
