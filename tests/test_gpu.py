"""GPU placement (marked `gpu`: run where torch.cuda.is_available(), skipped with that reason
elsewhere). One fp32 step equals the CPU's within float tolerance; a short CLI run trains on the GPU
and records it; a GPU run killed with SIGKILL resumes to the uninterrupted curve within tolerance
and evaluates on the CPU; two ranks over nccl equal one process (where two GPUs exist).

    python -m pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, run_cli

pytestmark = pytest.mark.gpu
FP32 = [*TINY, "trainer.precision=fp32", "env.device=cuda"]


def _curve(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["split"], r["name"]): r["value"] for r in rows
            if r["split"] in ("train", "val") and "seconds" not in r["name"]}


def test_one_fp32_step_on_cuda_equals_the_cpu_step():
    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    from ddp_step import CASES, model_and_batches

    from modalign.losses.objective import AlignObjective

    results = {}
    for device in ("cpu", "cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        model, batches = model_and_batches(mlm=True)
        model.to(device)
        objective = AlignObjective(CASES["queue+mlm"], 8).to(device)
        batch = objective.inputs({k: v.to(device) for k, v in batches[0].items()})
        terms = objective(model(batch), batch)
        terms["loss"].backward()
        results[device] = (float(terms["loss"]), {n: p.grad.cpu() for n, p in model.named_parameters()
                                                  if p.grad is not None})
    (loss_cpu, g_cpu), (loss_gpu, g_gpu) = results["cpu"], results["cuda"]
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-5)
    for name, g in g_cpu.items():
        torch.testing.assert_close(g_gpu[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, cache_dir) -> Path:
    cwd = tmp_path_factory.mktemp("gpu")
    p = run_cli(["train", "--quiet", *FP32, "trainer.max_steps=40", "trainer.eval_every=5"], cwd, cache_dir)
    assert p.returncode == 0, p.stderr
    return next((cwd / "outputs" / "runs").iterdir())


def test_a_short_run_trains_on_the_gpu_and_records_it(gpu_run):
    info = json.loads((gpu_run / "run.json").read_text())
    env = info["env"]
    assert info["status"] == "completed" and env["device"] == "cuda:0" and env["device_type"] == "cuda"
    assert env["device_name"] == torch.cuda.get_device_name(0) and env["gpu_memory_gib"] > 0
    assert env["cuda"] == torch.version.cuda and env["tf32"] is False
    summary = json.loads((gpu_run / "facts" / "summary.json").read_text())
    assert summary["chance"]["m2t_R@1"] < summary["test"]["m2t_R@1"]


def test_a_gpu_run_evaluates_on_the_cpu(gpu_run, tmp_path, cache_dir):
    p = run_cli(["eval", str(gpu_run), "--device", "cpu"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    got = json.loads((gpu_run / "facts" / "eval_test.json").read_text())
    want = json.loads((gpu_run / "facts" / "summary.json").read_text())["test"]
    assert got["device"] == "cpu" and got["metrics"]["m2t_R@1"] == pytest.approx(want["m2t_R@1"], abs=0.02)


def test_kill_and_resume_on_the_gpu_equals_uninterrupted_within_tolerance(gpu_run, tmp_path, cache_dir):
    env = dict(os.environ, MODALIGN_CACHE=str(cache_dir), PYTHONWARNINGS="ignore", MODALIGN_FAULTS="kill:step@17")
    p = subprocess.run([sys.executable, "-m", "modalign", "train", "--quiet", *FP32, "trainer.max_steps=40",
                        "trainer.eval_every=5"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    run = next((tmp_path / "outputs" / "runs").iterdir())
    p = run_cli(["train", "--quiet", f"resume={run}"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    a, b = _curve(run), _curve(gpu_run)
    assert set(a) == set(b)
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst < 1e-3, worst  # some CUDA kernels are not deterministic: tolerance, not bit for bit


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_ranks_over_nccl_train_like_one_process(gpu_run, tmp_path, cache_dir):
    start = time.time()
    env = dict(os.environ, MODALIGN_CACHE=str(cache_dir), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "modalign.recipes.align", "--quiet", *FP32, "trainer.max_steps=40", "trainer.eval_every=5"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = next((tmp_path / "outputs" / "runs").iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["env"]["backend"] == "nccl" and info["env"]["world_size"] == 2
    a, b = _curve(run), _curve(gpu_run)
    assert set(a) == set(b) and max(abs(a[k] - b[k]) for k in a) < 1e-3, time.time() - start


# --- stage 3 on the GPU ------------------------------------------------------------------------


def test_a_fuse_run_trains_and_decodes_on_the_gpu_in_bf16_with_the_lm_held_in_bf16(tmp_path, cache_dir, tiny_lm,
                                                                                    tiny_run):
    from test_fuse import FAST

    p = run_cli(["train", "--quiet", "--recipe", "fuse", f"lm.path={tiny_lm}", f"encoder.init_from={tiny_run}", *FAST,
                 "fusion=cross_attn", "fusion.layers=[4,20]", "fusion.lora_rank=2", "env.device=cuda",
                 "trainer.precision=bf16", "eval.retention=true"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    run = next((tmp_path / "outputs" / "runs").iterdir())
    info = json.loads((run / "run.json").read_text())
    summary = json.loads((run / "facts" / "summary.json").read_text())
    assert info["env"]["device_type"] == "cuda" and summary["precision"] == "bf16"
    assert summary["test"]["xe"] == summary["test"]["xe"] and len(
        (run / "facts" / "predictions_test.jsonl").read_text().splitlines()) == 16


def test_greedy_decoding_on_the_gpu_matches_transformers_generate_and_closed_gates_equal_the_bf16_lm():
    from test_fuse import batch, fused, tiny_llama
    from test_fuse_speed import _hf_greedy

    from modalign.train.device import autocast

    cuda = torch.device("cuda")
    model = fused("cross_attn", {"layers": [0, 2], "heads": 4}).to(cuda).eval()
    b = {k: v.to(cuda) for k, v in batch().items()}
    with torch.no_grad():
        assert model.generate(b, 8, eos_token_id=2) == _hf_greedy(model, b, 8, 2)
    reference = tiny_llama().to(cuda, torch.bfloat16)
    model.hold_frozen_lm_in(torch.bfloat16)
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 2], [1, 4, 2, 3]], device=cuda)
    with torch.no_grad(), autocast(cuda, "bf16"), model._signal(model.soft_tokens(b)):
        assert torch.equal(model.lm(input_ids=ids).logits, reference(input_ids=ids).logits)
