"""Kill a real training run with SIGKILL, resume it, and get the run an uninterrupted one gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY

ARGS = [*TINY, "trainer.max_steps=60", "trainer.eval_every=5", "trainer.log_every=1"]


def _curve(run: Path) -> list[tuple]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["name"], r["value"]) for r in rows if not r["name"].endswith("seconds")]


def _start(cwd: Path, args: list[str], cache: Path) -> subprocess.Popen:
    env = dict(os.environ, MODALIGN_CACHE=str(cache), PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "modalign", "train", "--quiet", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _last_step(run_root: Path) -> int:
    for m in run_root.glob("*/checkpoints/manifest.json"):
        try:
            return json.loads(m.read_text())["checkpoints"]["last.pt"]["step"]
        except (KeyError, json.JSONDecodeError, OSError):
            return -1
    return -1


def test_kill_and_resume_equals_uninterrupted(tmp_path, cache_dir):
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    ref = _start(ref_dir, ARGS, cache_dir)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    proc = _start(kill_dir, ARGS, cache_dir)
    runs = kill_dir / "outputs" / "runs"
    deadline = time.time() + 240
    while _last_step(runs) < 15 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = next(runs.iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "running"  # killed: never claims to be completed
    assert not (run / "facts" / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "modalign", "train", "--quiet", f"resume={run}"],
                             cwd=kill_dir, env=dict(os.environ, MODALIGN_CACHE=str(cache_dir)),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    ref_run = next((ref_dir / "outputs" / "runs").iterdir())
    assert _curve(run) == _curve(ref_run)  # bit for bit: same losses, metrics and steps
    a = json.loads((run / "facts" / "summary.json").read_text())["test"]
    b = json.loads((ref_run / "facts" / "summary.json").read_text())["test"]
    assert a == b
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert "resuming from" in (run / "run.log").read_text()
