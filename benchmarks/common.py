# Helpers shared by the benchmark scripts (not run on its own): machine facts, statistics, tables,
# subprocess measurement with peak RSS, and the bench-only open_clip install.
"""Shared helpers for `benchmarks/bench_*.py`. Imports neither torch nor modalign."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable

# open_clip_torch is a bench-only dependency, installed without its dependencies (torchvision from the
# registry would not match this torch, and would break sentence-transformers) into this gitignored folder.
BENCH_DEPS = HERE / ".bench-deps"
OPEN_CLIP_PIN = "open_clip_torch==3.3.0"


def ensure_open_clip() -> Path:
    """Install open_clip_torch (no dependencies) into benchmarks/.bench-deps once; -> its loss.py.

    Only `open_clip/loss.py` is used, loaded from its file: `import open_clip` would import
    open_clip.transform -> torchvision, which is not installed (on purpose)."""
    loss = BENCH_DEPS / "open_clip" / "loss.py"
    if not loss.exists():
        print(f"# installing {OPEN_CLIP_PIN} (--no-deps) into {BENCH_DEPS.relative_to(REPO)}", file=sys.stderr)
        subprocess.run([PY, "-m", "pip", "--disable-pip-version-check", "install", "-q", "--no-deps",
                        "--target", str(BENCH_DEPS), OPEN_CLIP_PIN], check=True)
    return loss


def load_clip_loss_module():
    """open_clip's loss.py as a module (it imports torch and torch.distributed only)."""
    import importlib.util

    path = ensure_open_clip()
    spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def open_clip_version() -> str:
    for d in BENCH_DEPS.glob("open_clip_torch-*.dist-info"):
        return d.name.removeprefix("open_clip_torch-").removesuffix(".dist-info")
    return "?"


# machine -----------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_line(extra: str = "") -> str:
    """One line: cores, CPU model, RAM, load, python and library versions, date (UTC)."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = subprocess.run(
        [PY, "-c", "import torch, numpy; print(torch.__version__, numpy.__version__)"],
        capture_output=True, text=True).stdout.split()
    torch_v, numpy_v = (versions + ["?", "?"])[:2]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    noted = [f"{k}={v}" for k, v in sorted(os.environ.items())
             if k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") or k.startswith("MALLOC_")]
    extra = ", ".join(x for x in (extra, "environment " + " ".join(noted) if noted else "") if x)
    return (f"{os.cpu_count()} CPUs (nproc), lscpu model \"{cpu_model()}\", {mem:.0f} GiB RAM, "
            f"load average {load} at start; Python {platform.python_version()}, torch {torch_v}, "
            f"numpy {numpy_v}{', ' + extra if extra else ''}; date {datetime.now(timezone.utc):%Y-%m-%d} (UTC)")


def actual_command() -> str:
    """The command line that is running, as typed from the repo root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def header(title: str, command: str | None = None, extra: str = "") -> None:
    """The section's title, the command that made it (the running one), and the machine line."""
    print(f"### {title}\n")
    print(f"- Command (from the repo root): `{actual_command()}`")
    print(f"- Machine: {machine_line(extra)}\n")


# statistics and tables ---------------------------------------------------------------------------
def mn(xs):
    return min(xs)


def med(xs):
    return statistics.median(xs)


def table(columns: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print()


def fmt(x, digits: int = 2) -> str:
    if x is None:
        return ""
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


# subprocess measurement --------------------------------------------------------------------------
def run_measured(args: list[str], env_extra: dict | None = None, env: dict | None = None,
                 cwd: Path | None = None) -> dict:
    """Run one fresh process (output to temp files) and reap it with os.wait4, so its rusage is its
    own: {"wall", "user", "sys", "maxrss_mib", "minflt", "majflt", "rc", "stdout", "stderr"}."""
    import tempfile

    env = dict(env if env is not None else os.environ, **(env_extra or {}))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=cwd or REPO, stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss_mib": ru.ru_maxrss / 1024,
                "minflt": ru.ru_minflt, "majflt": ru.ru_majflt, "rc": p.returncode,
                "stdout": out.read(), "stderr": err.read()}


def run_worker(args: list[str], env_extra: dict | None = None) -> dict:
    """Run `python args...` in a fresh process; it prints one JSON object on its last stdout line.
    Adds the process's wall time, CPU time and peak RSS."""
    m = run_measured([PY, *args], env_extra)
    if m["rc"] != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed ({m['rc']}):\n{m['stderr'][-3000:]}")
    out = json.loads(m["stdout"].strip().splitlines()[-1])
    out.setdefault("process_wall_s", m["wall"])
    out.setdefault("cpu_s", m["user"] + m["sys"])
    out.setdefault("process_maxrss_mib", m["maxrss_mib"])
    return out


def peak_rss_mib() -> float:
    """This process's peak RSS so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_args(description: str, default_rounds: int):
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=default_rounds, help=f"alternating rounds (default {default_rounds})")
    p.add_argument("--quick", action="store_true", help="a small smoke check (numbers not for quoting)")
    return p
