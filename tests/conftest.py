"""Shared fixtures. The text-embedding cache is shared by the whole session (and by the CLI
subprocesses through MODALIGN_CACHE), so the real MiniLM encodes each caption once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test` runs `-n auto`: one worker per core), each worker and the CLI
# processes it starts get an equal share of the cores: torch's default (one thread per core) in
# every worker would oversubscribe them, and OpenMP threads that wait for a busy core spin.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

# A tiny demo: fast enough for a subprocess per test, big enough that every split has facts to match.
TINY = ["data.n_train=256", "data.n_val=64", "data.n_test=64", "trainer.batch_size=64",
        "trainer.max_steps=12", "trainer.eval_every=6", "trainer.log_every=2"]

# Smoke-sized sweeps: a few seconds per job.
SMALL = ["trainer=smoke", "data.n_train=192", "data.n_val=48", "data.n_test=48", "trainer.batch_size=32"]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA exists; elsewhere they are skipped, saying why."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False on this machine")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The session's text-embedding cache; xdist's workers share one (beside their own temp
    folders): it is written atomically, so the captions are encoded about once per test session."""
    if os.environ.get("MODALIGN_TEST_CACHE"):
        d = Path(os.environ["MODALIGN_TEST_CACHE"])
    elif _WORKERS > 1:
        d = tmp_path_factory.getbasetemp().parent / "modalign-cache"
        d.mkdir(exist_ok=True)
    else:
        d = tmp_path_factory.mktemp("modalign-cache")
    os.environ["MODALIGN_CACHE"] = str(d)
    return d


def run_cli(args: list[str], cwd: Path, cache: Path, timeout: int = 300, env_extra: dict | None = None):
    """Run `python -m modalign ARGS` as a user would; returns CompletedProcess with text output."""
    env = dict(os.environ, MODALIGN_CACHE=str(cache), PYTHONWARNINGS="ignore", COLUMNS="120")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "modalign", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def shared(tmp_path_factory, name: str, build):
    """A session resource that tests only read, built once per test session: under xdist the first
    worker to ask builds it (in a folder beside the workers' own) while the others wait on a file
    lock, then every worker gets what `build(folder)` returned (JSON-able)."""
    if _WORKERS <= 1:
        return build(tmp_path_factory.mktemp(name))
    import fcntl
    import json
    import tempfile

    root = tmp_path_factory.getbasetemp().parent
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / f"{name}.json"
        if done.exists():
            return json.loads(done.read_text())
        result = build(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root)))
        done.write_text(json.dumps(result))
        return result


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir) -> Path:
    """One completed tiny align run (with embeddings exported), shared by the read-only tests
    (`modalign eval` adds its eval_*.json and scores_*.parquet, written atomically)."""

    def build(cwd: Path) -> str:
        p = run_cli(["train", "--quiet", *TINY, "eval.export_embeddings=true"], cwd, cache_dir)
        assert p.returncode == 0, p.stderr
        runs = list((cwd / "outputs" / "runs").iterdir())
        assert len(runs) == 1
        return str(runs[0])

    return Path(shared(tmp_path_factory, "tiny", build))


@pytest.fixture(scope="session")
def demo_sweep(tmp_path_factory, cache_dir) -> tuple[Path, str]:
    """The demo experiment (2 heads x 2 seeds, with criteria) at smoke size, through the CLI:
    (sweep dir, what the CLI printed). Shared by the report and browser tests, which only read it."""

    def build(cwd: Path) -> list:
        p = run_cli(["sweep", "experiment=demo", *SMALL], cwd, cache_dir, timeout=600)
        assert p.returncode == 0, p.stderr
        return [str(next((cwd / "outputs" / "experiments").iterdir())), p.stdout]

    sweep, stdout = shared(tmp_path_factory, "demo-sweep", build)
    return Path(sweep), stdout


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M, loaded once per session through modalign's loader from the GGUF file
    (cold: dequantized, then cached as safetensors in a session folder), offline.
    -> (LoadedLM, that cache folder)."""
    from modalign.models.lm import LMOptions, load_lm

    d = tmp_path_factory.mktemp("lm-cache")
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return load_lm(LMOptions(cache_dir=str(d))), d
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny Llama-style causal LM folder (random weights, 30 blocks of width 64, like SmolLM2's
    depth) with SmolLM2's real tokenizer, for fuse tests where a real LM's quality is not the point.
    Loaded by the same code as any local LM (`lm.path=...`). The tokenizer is read from the GGUF
    file as load_lm reads it, without dequantizing the weights (half a minute) that nothing here uses."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from modalign.models.lm import LMOptions, locate

    d = tmp_path_factory.mktemp("tiny-lm")
    folder, gguf = locate(LMOptions())
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as load_lm sets it
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=30,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d
