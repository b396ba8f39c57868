"""Distributed training with torchrun on this machine (2 gloo processes): the same loss and
gradients as one process on the same global batch, and a whole run that equals a single-process
run and resumes across ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "tests" / "workers"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
FP32 = [*TINY, "trainer.precision=fp32"]


def _torchrun(args: list[str], cwd: Path, cache: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MODALIGN_CACHE=str(cache), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_two_ranks_give_the_single_process_loss_and_gradients(tmp_path, cache_dir):
    from ddp_step import model_and_batch

    from modalign.losses.objective import AlignObjective, LossConfig

    out = tmp_path / "ddp.pt"
    p = _torchrun([str(ROOT / "tests" / "workers" / "ddp_step.py"), str(out)], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    model, batch = model_and_batch()
    terms = AlignObjective(LossConfig(), 8)(model, batch)  # one process, the whole global batch
    terms["loss"].backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for local_loss in (False, True):
        r = got[local_loss]
        assert r["loss"] == pytest.approx(float(terms["loss"].detach()), abs=1e-6), local_loss
        assert set(r["grads"]) == set(want)
        for name, g in want.items():
            torch.testing.assert_close(r["grads"][name], g, atol=1e-6, rtol=1e-5, msg=f"{name} (local_loss={local_loss})")


def _curve(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["split"], r["name"]): r["value"] for r in rows
            if r["split"] in ("train", "val") and "seconds" not in r["name"]}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, cache_dir) -> Path:
    from conftest import run_cli

    cwd = tmp_path_factory.mktemp("single")
    p = run_cli(["train", "--quiet", *FP32], cwd, cache_dir)
    assert p.returncode == 0, p.stderr
    return next((cwd / "outputs" / "runs").iterdir())


def test_torchrun_trains_like_one_process_and_only_rank_0_writes(tmp_path, cache_dir, single_run):
    before = {p.name for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("modalign-rank*")}
    p = _torchrun(["-m", "modalign.recipes.align", "--quiet", *FP32], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1  # one run dir, written by rank 0
    info = json.loads((runs[0] / "run.json").read_text())
    assert info["status"] == "completed" and info["env"]["world_size"] == 2 and info["env"]["backend"] == "gloo"
    assert info["env"]["malloc"] == "tuned"  # by the command, before the process group's threads
    a, b = _curve(runs[0]), _curve(single_run)
    assert set(a) == set(b)
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst < 1e-4, worst  # every loss, gradient norm and validation metric of 12 steps
    after = {p.name for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("modalign-rank*")}
    assert after == before  # rank 1's shadow directory is gone


def test_a_killed_torchrun_run_resumes_across_ranks(tmp_path, cache_dir, single_run):
    shadows = Path(os.environ.get("TMPDIR", "/tmp"))
    before = {p.name for p in shadows.glob("modalign-rank*")}
    p = _torchrun(["-m", "modalign.recipes.align", "--quiet", *FP32], tmp_path, cache_dir,
                  env_extra={"MODALIGN_FAULTS": "kill:step@8"})
    assert p.returncode != 0
    run = next((tmp_path / "outputs" / "runs").iterdir())
    assert json.loads((run / "run.json").read_text())["status"] != "completed"
    p = _torchrun(["-m", "modalign.recipes.align", "--quiet", f"resume={run}"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    a, b = _curve(run), _curve(single_run)
    assert set(a) == set(b) and max(abs(a[k] - b[k]) for k in a) < 1e-4
    # the killed rank 1 could not remove its shadow directory; the next run's rank 1 did
    assert {p.name for p in shadows.glob("modalign-rank*")} <= before


def test_batch_size_must_divide_by_the_ranks(tmp_path, cache_dir):
    p = _torchrun(["-m", "modalign.recipes.align", "--quiet", *FP32, "trainer.batch_size=63"], tmp_path, cache_dir)
    assert p.returncode != 0
    assert "'trainer.batch_size'=63 must divide by the 2 ranks" in p.stderr
    assert "Traceback" not in "\n".join(l for l in p.stderr.splitlines() if "modalign" in l)
    shutil.rmtree(tmp_path / "outputs", ignore_errors=True)
