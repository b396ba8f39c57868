# .venv/bin/python benchmarks/run_all.py --write BENCHMARKS.md      (what `make bench` runs; smoke check: --quick)
"""Run the benchmark scripts one after the other and print (or write) their markdown sections.

Each script runs in its own process, alone on the machine as far as this runner is concerned (never
two at once: they would measure each other). Its stdout is the section body; its progress goes to
stderr. With --write FILE, each body replaces the text between the markers

    <!-- bench:NAME:start -->  ...  <!-- bench:NAME:end -->

in FILE (a section with those markers is appended when they are missing). Text outside the markers,
such as the discussion of a result, is left as it is. --quick runs every script's smoke check and
never writes unless --write is given too.

Scripts (about 20 min in all on an idle 2-core machine; longer when other jobs load it):
  step       bench_step.py       align recipe step vs a bare PyTorch + open_clip ClipLoss loop
  flops      bench_flops.py      training-step FLOP/s as a fraction of the measured matmul peak
  bf16       bench_bf16.py       the bf16 step's profile by kind of work; flash vs math attention (about 3 min)
  retrieval  bench_retrieval.py  retrieval metrics over 50k x 50k pairs vs matmul-bound and full matrix
  sweep      bench_sweep.py      per-job overhead of a sweep, and a report over 1,000 runs
  cli        bench_cli.py        `modalign --help` / `modalign runs` start-up vs `python -c pass`
  stats      bench_stats.py      paired bootstrap vs scipy (about 4.5 min; only with --only stats or --with-stats)
  fuse       bench_fuse.py       stage-3 step vs a bare transformers loop, LM load cold/cached, decoding (about 7 min)
  sinks      bench_sinks.py      a run with TensorBoard + MLflow + W&B offline vs no sink (about 14 min; only with --only)
  patches    bench_patches.py    encoder.patch_size: step time and zero-shot accuracy vs unpatched and CNN (about 45 min; only with --only)
  data       bench_data_scale.py HDF5 on disk at 1 and 8 GB vs NPZ in memory: step time, peak RSS (about 8 min, 10 GB of disk; only with --only)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SCRIPTS = {
    "step": ("bench_step.py", "Step overhead: align recipe vs a bare PyTorch loop"),
    "flops": ("bench_flops.py", "Hardware efficiency: training step vs matmul peak"),
    "bf16": ("bench_bf16.py", "bf16 step: where the time goes"),
    "retrieval": ("bench_retrieval.py", "Evaluation at scale: retrieval over 50,000 x 50,000 pairs"),
    "sweep": ("bench_sweep.py", "Sweep and report overhead"),
    "cli": ("bench_cli.py", "CLI start-up"),
    "stats": ("bench_stats.py", "Statistics: paired bootstrap"),
    "fuse": ("bench_fuse.py", "Stage 3: fuse step, LM load, decoding"),
    "sinks": ("bench_sinks.py", "Tracking sinks: cost per step"),
    "patches": ("bench_patches.py", "Patches: long series as tokens"),
    "data": ("bench_data_scale.py", "Data larger than memory: HDF5 read by rows"),
}
DEFAULT = ("step", "flops", "bf16", "retrieval", "sweep", "cli", "fuse")


def replace_section(text: str, name: str, title: str, body: str) -> str:
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip() + f"\n\n## {title}\n\n{block}\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help=f"comma-separated subset of {', '.join(SCRIPTS)} (default: {', '.join(DEFAULT)})")
    ap.add_argument("--with-stats", action="store_true", help="also run bench_stats.py (about 4.5 min)")
    ap.add_argument("--quick", action="store_true", help="every script's smoke check")
    ap.add_argument("--write", metavar="FILE", help="replace each script's marked section in FILE (e.g. BENCHMARKS.md)")
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else DEFAULT) if n]
    if args.with_stats and "stats" not in names:
        names.append("stats")
    for n in names:
        if n not in SCRIPTS:
            ap.error(f"unknown benchmark {n!r} (known: {', '.join(SCRIPTS)})")
    failed = []
    t_all = time.perf_counter()
    for n in names:
        script, title = SCRIPTS[n]
        cmd = [sys.executable, str(HERE / script)] + (["--quick"] if args.quick else [])
        print(f"== {n}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)  # stderr: progress, passed through
        secs = time.perf_counter() - t0
        print(f"== {n}: exit {p.returncode} after {secs:.0f} s", file=sys.stderr, flush=True)
        print(p.stdout, flush=True)
        if p.returncode != 0:
            failed.append(n)
            continue
        if args.write:
            path = Path(args.write)
            if n == "stats":
                print("== stats: its section in the file is hand-edited; paste the output above into it",
                      file=sys.stderr)
                continue
            body = re.sub(r"\A### [^\n]*\n+", "", p.stdout)  # the file's own "## " heading names the section
            body += f"\n_Run time of this script: {secs:.0f} s._\n"
            path.write_text(replace_section(path.read_text(encoding="utf-8"), n, title, body), encoding="utf-8")
    print(f"== all: {time.perf_counter() - t_all:.0f} s; failed: {', '.join(failed) or 'none'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
