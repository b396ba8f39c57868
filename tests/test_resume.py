"""Kill a real training run with SIGKILL, resume it, and get the run an uninterrupted one gets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _signal_after(cwd: Path, cache: Path, step: int, sig: int) -> tuple[subprocess.Popen, Path]:
    """Start the run, wait until last.pt holds at least `step`, send `sig`. -> (process, runs root)."""
    proc = _start(cwd, ARGS, cache)
    runs = cwd / "outputs" / "runs"
    deadline = time.time() + 240
    while _last_step(runs) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before the signal could be sent; make it longer"
    proc.send_signal(sig)
    return proc, runs


def _resume(run: Path, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modalign", "train", "--quiet", f"resume={run}"],
                          cwd=cwd, env=dict(os.environ, MODALIGN_CACHE=str(cache)),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir) -> Path:
    """The uninterrupted run every interrupted one must equal."""
    ref_dir = tmp_path_factory.mktemp("ref")
    ref = _start(ref_dir, ARGS, cache_dir)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    return next((ref_dir / "outputs" / "runs").iterdir())


def test_kill_and_resume_equals_uninterrupted(tmp_path, cache_dir, reference_run):
    kill_dir = tmp_path / "kill"
    kill_dir.mkdir()

    proc, runs = _signal_after(kill_dir, cache_dir, 15, signal.SIGKILL)
    proc.wait()
    run = next(runs.iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "running"  # killed: never claims to be completed
    assert not (run / "facts" / "summary.json").exists()

    resumed = _resume(run, kill_dir, cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    ref_run = reference_run
    assert _curve(run) == _curve(ref_run)  # bit for bit: same losses, metrics and steps
    a = json.loads((run / "facts" / "summary.json").read_text())["test"]
    b = json.loads((ref_run / "facts" / "summary.json").read_text())["test"]
    assert a == b
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert "resuming from" in (run / "run.log").read_text()


def test_sigterm_writes_a_checkpoint_marks_interrupted_and_resumes(tmp_path, cache_dir, reference_run):
    proc, runs = _signal_after(tmp_path, cache_dir, 5, signal.SIGTERM)  # what SLURM sends before a kill
    assert proc.wait(timeout=120) == 143
    stderr = proc.stderr.read()
    assert "resume=" in stderr and "Traceback" not in stderr
    run = next(runs.iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and "SIGTERM" in info["error"]
    step = json.loads((run / "checkpoints" / "manifest.json").read_text())["checkpoints"]["last.pt"]["step"]
    logged = max(r[0] for r in _curve(run) if r[1] == "train")
    assert step == logged < 60  # the checkpoint is the last step trained, not the last validation

    resumed = _resume(run, tmp_path, cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert _curve(run) == _curve(reference_run)


# kill anywhere -----------------------------------------------------------------------------------
# Faults land at exact places through MODALIGN_FAULTS (see modalign/faults.py): after an optimizer
# step, inside a checkpoint write (temp file written, not renamed; renamed, manifest not updated),
# and half-way through a metrics line. Each session is killed with SIGKILL, the run dir is checked,
# and the next session resumes; the last resumes to the end and must equal the uninterrupted run.
SHORT_SCHEDULE = ["kill:step@7", "kill:checkpoint_tmp@2", "kill:checkpoint_rename@1", "kill:metrics_line@4"]


def long_schedule(seed: int = 0, n: int = 12) -> list[str]:
    """n faults drawn from a seeded generator; steps are absolute and increase, arrival counts are
    per session (a resumed process counts its own checkpoint saves and metrics writes)."""
    import random

    rng = random.Random(seed)
    out, step = [], 0
    kinds = ["kill:step", "kill:checkpoint_tmp", "kill:checkpoint_rename", "kill:metrics_line"]
    for i in range(n):
        kind = kinds[i % 4] if i < 4 else rng.choice(kinds)
        if kind == "kill:step":
            step = min(58, step + rng.randint(2, 6))
            out.append(f"{kind}@{step}")
        else:
            out.append(f"{kind}@{rng.randint(1, 2 if 'checkpoint' in kind else 6)}")
    return out


def _check_after_kill(run: Path) -> None:
    from modalign.train.checkpoint import list_checkpoints, load_checkpoint

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "running", info  # killed: never claims completed, never a stale status
    assert not (run / "facts" / "summary.json").exists()
    if (run / "checkpoints" / "manifest.json").exists():
        for entry in list_checkpoints(run / "checkpoints"):  # every checkpoint the manifest accepts verifies
            load_checkpoint(run / "checkpoints" / entry["name"])


def _run_schedule(schedule: list[str], cwd: Path, cache: Path, reference: Path) -> list[tuple[str, int]]:
    """-> (fault, step of last.pt after the kill) per session: where in the run each kill landed."""
    runs = cwd / "outputs" / "runs"
    landed = []
    for i, fault in enumerate(schedule):
        env = dict(os.environ, MODALIGN_CACHE=str(cache), PYTHONWARNINGS="ignore", MODALIGN_FAULTS=fault)
        args = ARGS if i == 0 or not runs.exists() or not any(runs.iterdir()) else [f"resume={next(runs.iterdir())}"]
        if i > 0 and runs.exists() and any(runs.iterdir()) and not (next(runs.iterdir()) / "checkpoints" / "last.pt").exists():
            shutil.rmtree(next(runs.iterdir()))  # killed before its first checkpoint: start again, as a user would
            args = ARGS
        p = subprocess.run([sys.executable, "-m", "modalign", "train", "--quiet", *args], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, f"{fault}: the fault did not fire (exit {p.returncode}) {p.stderr}"
        _check_after_kill(next(runs.iterdir()))
        landed.append((fault, _last_step(runs)))
    run = next(runs.iterdir())
    done = _resume(run, cwd, cache)
    assert done.returncode == 0, done.stderr
    assert _curve(run) == _curve(reference)  # bit for bit, after every kill
    a = json.loads((run / "facts" / "summary.json").read_text())["test"]
    b = json.loads((reference / "facts" / "summary.json").read_text())["test"]
    assert a == b
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    return landed


def test_killed_anywhere_and_resumed_equals_uninterrupted(tmp_path, cache_dir, reference_run):
    _run_schedule(SHORT_SCHEDULE, tmp_path, cache_dir, reference_run)


@pytest.mark.slow
def test_killed_at_twelve_seeded_points_equals_uninterrupted(tmp_path, cache_dir, reference_run):
    landed = _run_schedule(long_schedule(seed=0, n=12), tmp_path, cache_dir, reference_run)
    assert len(set(landed)) >= 10, landed  # ten or more different places in the run
