"""Reliability through the real command line: corrupt and hostile checkpoints, non-finite losses,
a full disk, and two sweeps started at once. (Kill-and-resume: tests/test_resume.py; fuzzed
input: tests/test_fuzz.py; the promises: docs/reliability.md.)"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SMALL, TINY, run_cli


def _one_line_exit_2(p, *expected: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    line = p.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("modalign: error:") and "Traceback" not in line, line
    for e in expected:
        assert e in line, line
    return line


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    dst = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, dst)
    return dst


# checkpoints -----------------------------------------------------------------------------------
def test_truncated_checkpoint_is_one_line_exit_2(run_copy, tmp_path, cache_dir):
    best = run_copy / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 3])
    p = run_cli(["eval", str(run_copy), "--quiet"], tmp_path, cache_dir)
    _one_line_exit_2(p, str(best), "sha256")


def test_bit_flipped_checkpoint_is_one_line_exit_2(run_copy, tmp_path, cache_dir):
    best = run_copy / "checkpoints" / "best.pt"
    data = bytearray(best.read_bytes())
    data[len(data) // 2] ^= 0x10
    best.write_bytes(bytes(data))
    p = run_cli(["eval", str(run_copy), "--quiet"], tmp_path, cache_dir)
    _one_line_exit_2(p, str(best), "sha256")


def test_wrong_format_checkpoints_are_one_line_exit_2(tmp_path, cache_dir):
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not a checkpoint\n")
    p = run_cli(["train", "--quiet", *SMALL, f"encoder.init_from={text}"], tmp_path, cache_dir)
    _one_line_exit_2(p, str(text))
    import torch

    other = tmp_path / "other.pt"  # a real torch file, but not a modalign checkpoint
    torch.save({"weights": torch.zeros(3)}, other)
    p = run_cli(["train", "--quiet", *SMALL, f"encoder.init_from={other}"], tmp_path, cache_dir)
    _one_line_exit_2(p, str(other), "not a modalign checkpoint")


class _Payload:
    """Unpickling this runs `touch MARKER`: what a booby-trapped checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_checkpoint(path: Path, marker: Path) -> None:
    import torch

    torch.save({"format_version": 1, "step": 1, "model_config": {}, "model": _Payload(marker)}, path)


def test_hostile_checkpoint_is_refused_and_its_code_never_runs(run_copy, tmp_path, cache_dir):
    marker = tmp_path / "pwned"
    # 1. in a run directory, with the manifest's sha256 updated to match, so only the loader stands guard
    best = run_copy / "checkpoints" / "best.pt"
    _hostile_checkpoint(best, marker)
    manifest = run_copy / "checkpoints" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["checkpoints"]["best.pt"]["sha256"] = hashlib.sha256(best.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(m))
    p = run_cli(["eval", str(run_copy), "--quiet"], tmp_path, cache_dir)
    _one_line_exit_2(p, str(best))
    # 2. handed over as a stage-1 parent, outside any manifest
    loose = tmp_path / "from_a_colleague.pt"
    _hostile_checkpoint(loose, marker)
    p = run_cli(["train", "--quiet", *SMALL, f"encoder.init_from={loose}"], tmp_path, cache_dir)
    _one_line_exit_2(p, str(loose))
    assert not marker.exists(), "the checkpoint's code ran"
    # the trap is real: plain pickle.load of the same object does run it
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


# non-finite ------------------------------------------------------------------------------------
def _fault_env(spec: str) -> dict:
    return {"MODALIGN_FAULTS": spec}


def test_nonfinite_loss_stops_naming_the_term_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    args = ["train", "--quiet", *TINY, "trainer.eval_every=4"]
    p = run_cli(args, tmp_path, cache_dir, env_extra=_fault_env("nan:loss@7"))
    assert p.returncode == 1
    line = p.stderr.strip().splitlines()[-1]
    assert "loss term 'loss' is not finite at step 7" in line
    assert "non-finite gradients in: encoder, heads" in line and "checkpoints/last.pt (step 4)" in line
    run = next((tmp_path / "outputs" / "runs").iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "not finite at step 7" in info["error"]
    from modalign.train.checkpoint import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4  # the last good one, intact
    # and the run continues from it once the cause is gone
    p = run_cli(["train", "--quiet", f"resume={run}"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr


def test_nonfinite_steps_are_skipped_counted_and_limited(tmp_path, cache_dir):
    args = ["train", "--quiet", *TINY, "trainer.on_nonfinite=skip", "trainer.max_nonfinite_skips=2"]
    p = run_cli(args, tmp_path, cache_dir, env_extra=_fault_env("nan:loss@3,nan:loss@5"))
    assert p.returncode == 0, p.stderr
    run = next((tmp_path / "outputs" / "runs").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skips = [(r["step"], r["value"]) for r in rows if r["name"] == "nonfinite_skips"]
    assert skips == [(3, 1.0), (5, 2.0)]
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    # one more than the limit stops the run, saying so
    again = tmp_path / "again"
    again.mkdir()
    p = run_cli(args, again, cache_dir, env_extra=_fault_env("nan:loss@3,nan:loss@5,nan:loss@6"))
    assert p.returncode == 1 and "2 steps already skipped (trainer.max_nonfinite_skips=2)" in p.stderr


# full disk -------------------------------------------------------------------------------------
def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and mount namespaces to make a small real disk")
def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, cache_dir):
    """A run killed at step 5 (last.pt at step 4) moves to a real tmpfs just big enough for what it
    has; resumed there, its next checkpoint write hits ENOSPC. The previous checkpoint must still
    verify, the run must say interrupted, and a resume with room must finish it."""
    from modalign.train.checkpoint import list_checkpoints, load_checkpoint

    args = ["train", "--quiet", *TINY, "trainer.eval_every=4"]
    p = run_cli(args, tmp_path, cache_dir, env_extra={"MODALIGN_FAULTS": "kill:step@5"})
    assert p.returncode == -9
    run = next((tmp_path / "outputs" / "runs").iterdir())
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    disk = tmp_path / "disk"
    disk.mkdir()
    used = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    size_kb = used // 1024 + 256  # the run as it is, plus room for logs but not for another checkpoint
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {disk} && cp -a {run} {disk}/run && "
              f"{sys.executable} -m modalign train --quiet resume={disk}/run; "
              f"echo EXIT=$?; cp -a {disk}/run {tmp_path}/after")
    env = dict(os.environ, MODALIGN_CACHE=str(cache_dir), PYTHONWARNINGS="ignore")
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "EXIT=1" in p.stdout, (p.stdout, p.stderr)
    line = p.stderr.strip().splitlines()[-1]
    assert "No space left on device" in line and "(step 4) is intact" in line and "resume=" in line, line
    after = tmp_path / "after"
    info = json.loads((after / "run.json").read_text())
    assert info["status"] == "interrupted" and "No space left" in info["error"]
    assert load_checkpoint(after / "checkpoints" / "last.pt")["step"] == 4
    assert not list(after.glob("checkpoints/.*.tmp-*"))  # the half-written file was removed
    assert all(c["step"] == 4 for c in list_checkpoints(after / "checkpoints"))
    # with room again, the same command finishes the run
    p = run_cli(["train", "--quiet", f"resume={after}"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    assert json.loads((after / "run.json").read_text())["status"] == "completed"


# concurrency -----------------------------------------------------------------------------------
def test_two_sweeps_started_at_once_never_share_a_directory(tmp_path, cache_dir):
    env = dict(os.environ, MODALIGN_CACHE=str(cache_dir), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "modalign", "sweep", "--quiet", "head=linear,mlp", "name=same", *SMALL,
           "trainer.max_steps=4"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    sweeps = sorted((tmp_path / "outputs" / "experiments").iterdir())
    assert len(sweeps) == 2  # same name, same second: two directories
    from modalign.train.checkpoint import load_checkpoint

    for s in sweeps:
        info = yaml.safe_load((s / "sweep.yaml").read_text())
        assert [(j["dir"], j["status"]) for j in info["jobs"]] == [("0", "completed"), ("1", "completed")]
        assert sorted(p.name for p in s.iterdir() if p.name.isdigit()) == ["0", "1"]  # no third job wrote here
        for job, head in (("0", "linear"), ("1", "mlp")):
            assert f"head={head}" in yaml.safe_load((s / job / "overrides.yaml").read_text())
            lines = (s / job / "metrics.jsonl").read_text().splitlines()
            steps = [json.loads(line)["step"] for line in lines if json.loads(line)["split"] == "train"]
            assert steps == sorted(steps)  # one writer: no interleaved second run in this file
            load_checkpoint(s / job / "checkpoints" / "last.pt")
        assert (s / "report" / "index.html").exists()
