# .venv/bin/python benchmarks/bench_cli.py --rounds 10      (smoke check: --quick)
"""CLI start-up: `modalign --help` and `modalign runs` against `python -c pass`, side by side.

Each command is a fresh process, the commands alternate round by round (the order reversed every
other round), and each is measured GNU-time style: elapsed wall, user and system CPU, maximum
resident set size, page faults. With /usr/bin/time present those are its own (`/usr/bin/time -v`,
elapsed at its 10 ms resolution), and the wall columns in ms are a perf_counter around it; otherwise the
process is reaped with os.wait4 and its rusage read.
`modalign runs ROOT` lists a temp root of 20 small run directories (run.json, cfg.yaml,
overrides.yaml, facts/summary.json), so it reads and tabulates real records.
Reference rows: `python -c pass` (the interpreter alone) and `python -c "import torch"` (what a
command that needs torch pays at least).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/bench_cli.py --rounds 10"
GNU_TIME = "/usr/bin/time"


def gnu_time(args: list[str], env: dict) -> dict:
    """/usr/bin/time -v args -> {wall, user, sys, maxrss_mib, minflt, majflt}."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        m = common.run_measured([GNU_TIME, "-v", "-o", f.name, *args], env=env)
        if m["rc"] != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({m['rc']}):\n{m['stderr'][-2000:]}")
        text = f.read()

    def field(name: str) -> str:
        return re.search(rf"^\s*{re.escape(name)}.*?:\s*(\S+)\s*$", text, flags=re.M).group(1)

    parts = [float(x) for x in field("Elapsed (wall clock) time").split(":")]
    wall = sum(x * 60 ** i for i, x in enumerate(reversed(parts)))
    return {"wall": wall, "user": float(field("User time (seconds)")), "sys": float(field("System time (seconds)")),
            "maxrss_mib": int(field("Maximum resident set size (kbytes)")) / 1024,
            "minflt": int(field("Minor (reclaiming a frame) page faults")),
            "majflt": int(field("Major (requiring I/O) page faults")), "outer_wall": m["wall"]}


def measure(args: list[str], env: dict) -> dict:
    if os.path.exists(GNU_TIME):
        return gnu_time(args, env)
    m = common.run_measured(args, env=env)
    if m["rc"] != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({m['rc']}):\n{m['stderr'][-2000:]}")
    return m


def make_root(root: Path, n: int) -> None:
    for i in range(n):
        d = root / f"20261122-000000_align_demo-{i}"
        (d / "facts").mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"id": d.name, "name": "demo", "recipe": "align", "status": "completed",
                                                "seed": i}))
        (d / "cfg.yaml").write_text(f"seed: {i}\ndata:\n  name: demo\nencoder:\n  kind: cnn\nhead:\n  kind: mlp\n")
        (d / "overrides.yaml").write_text(f"- seed={i}\n")
        (d / "facts" / "summary.json").write_text(json.dumps(
            {"steps": 150, "wall_seconds": 30.0 + i, "test": {"m2t_R@1": 0.7 + i / 1000, "t2m_R@1": 0.6,
                                                             "zeroshot_acc": 0.8}}))


def main() -> None:
    args = common.bench_args(__doc__.split("\n")[0], default_rounds=10).parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 2)
    modalign = str(Path(sys.executable).parent / "modalign")
    tmp = Path(tempfile.mkdtemp(prefix="modalign-bench-cli-"))
    try:
        make_root(tmp / "runs", 20)
        env = dict(os.environ, COLUMNS="160")
        commands = {
            "`python -c pass` (reference)": [sys.executable, "-c", "pass"],
            "`modalign --help`": [modalign, "--help"],
            "`modalign runs ROOT` (20 runs)": [modalign, "runs", str(tmp / "runs")],
            "`modalign --version`": [modalign, "--version"],
            "`python -c \"import torch\"` (reference)": [sys.executable, "-c", "import torch"],
        }
        for cmd in commands.values():  # warm the page cache once
            measure(cmd, env)
        res = {k: [] for k in commands}
        for r in range(args.rounds):
            order = list(commands) if r % 2 == 0 else list(commands)[::-1]
            for k in order:
                res[k].append(measure(commands[k], env))
        # what each command imports (python -X importtime, cumulative µs of the top-level modules)
        heavy = {}
        for k in ("`modalign --help`", "`modalign runs ROOT` (20 runs)"):
            m = common.run_measured([sys.executable, "-X", "importtime", *commands[k][0:0], "-c",
                                     "import sys; from modalign.cli import main; sys.argv=['modalign', *sys.argv[1:]];"
                                     " raise SystemExit(main())", *commands[k][1:]], env=env)
            tops = []
            for line in m["stderr"].splitlines():
                mm = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
                if mm and len(mm.group(2)) <= 1:
                    tops.append((int(mm.group(1)), mm.group(3)))
            heavy[k] = sorted(tops, reverse=True)[:5]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    common.header("CLI start-up", COMMAND, f"measured with {'/usr/bin/time -v' if os.path.exists(GNU_TIME) else 'os.wait4 rusage'}")
    print(f"{args.rounds} rounds, commands alternating (order reversed every other round), each a fresh process, "
          "after one untimed warm-up run of each.\n")
    def wall_ms(x):  # perf_counter around the process (around /usr/bin/time when present: +~1 ms)
        return x.get("outer_wall", x["wall"]) * 1000

    ref = common.med([wall_ms(x) for x in res["`python -c pass` (reference)"]])
    rows = []
    for k, xs in res.items():
        w = [wall_ms(x) for x in xs]
        rows.append([k, f"{min(w):.0f}", f"{common.med(w):.0f}", f"{common.med(w) - ref:+.0f}",
                     f"{common.med([x['wall'] for x in xs]):.2f}",
                     f"{common.med([x['user'] for x in xs]):.2f}", f"{common.med([x['sys'] for x in xs]):.2f}",
                     f"{common.med([x['maxrss_mib'] for x in xs]):.0f}",
                     f"{common.med([x['minflt'] for x in xs]):,.0f}"])
    common.table(["command", "wall min (ms)", "wall median (ms)", "median - `python -c pass` (ms)",
                  "elapsed (s, GNU time)", "user (s)", "sys (s)", "max RSS (MiB)", "minor page faults"], rows)
    for k, tops in heavy.items():
        print(f"- {k}, largest top-level imports (`python -X importtime`, cumulative): "
              + ", ".join(f"`{name}` {us / 1000:.0f} ms" for us, name in tops))
    print()


if __name__ == "__main__":
    main()
