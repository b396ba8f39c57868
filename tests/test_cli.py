"""The command line as a user meets it: real subprocesses, real files, the real text encoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, run_cli

CONTRACT = ["cfg.yaml", "overrides.yaml", "run.json", "run.log", "metrics.jsonl", "card.md",
            "facts/summary.json", "facts/scores.parquet", "facts/embeddings.npz", "figures/loss.png",
            "figures/metrics.png", "figures/similarity.png", "checkpoints/best.pt", "checkpoints/last.pt",
            "checkpoints/manifest.json"]


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "from modalign.cli import main\n"
            "for args in (['--help'], ['train', '--help'], ['runs', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            main(args)\n"
            "        except SystemExit as e:\n"
            "            assert e.code == 0, (args, e.code)\n"
            "print(','.join(m for m in ('torch', 'sentence_transformers', 'hydra') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ""


def test_help_lists_commands():
    p = subprocess.run([sys.executable, "-m", "modalign", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for cmd in ("demo", "train", "eval", "runs"):
        assert cmd in p.stdout


def test_run_directory_follows_the_contract(tiny_run):
    for rel in CONTRACT:
        assert (tiny_run / rel).exists(), rel
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["status"] == "completed" and info["error"] is None
    assert info["recipe"] == "align"
    assert set(info["data"]["splits"]) == {"train", "val", "test"}
    assert all(len(s["fingerprint"]) == 64 for s in info["data"]["splits"].values())
    assert info["eval"]["protocol"] == "same_facts"
    assert info["params"]["total"] == sum(info["params"]["by_component"].values()) > 0
    assert info["code"]["package_version"]
    assert info["env"]["torch"].startswith("2.")
    assert info["env"]["malloc"] == "tuned"  # env.malloc default: glibc keeps freed memory (this is Linux glibc)
    # env.device=auto (the default) on this machine without CUDA: trained and recorded on the CPU
    assert info["env"]["device"] == "cpu" and info["env"]["device_type"] == "cpu" and info["env"]["device_name"]
    assert "trainer.max_steps" in info["config_diff"]

    rows = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "split", "name", "value", "time"} <= set(rows[0])
    names = {(r["split"], r["name"]) for r in rows}
    for want in [("train", "loss"), ("train", "clip"), ("train", "temperature"), ("train", "grad_norm/encoder"),
                 ("train", "lr/heads"), ("val", "m2t_R@1"), ("test", "m2t_R@1"), ("test", "zeroshot_acc")]:
        assert want in names, want

    summary = json.loads((tiny_run / "facts" / "summary.json").read_text())
    assert 0.0 <= summary["test"]["m2t_R@1"] <= 1.0
    assert summary["chance"]["m2t_R@1"] < summary["test"]["m2t_R@1"]  # even 12 steps beat chance
    assert summary["metrics"]["train/loss"]["best"] <= summary["metrics"]["train/loss"]["final"]

    scores = pd.read_parquet(tiny_run / "facts" / "scores.parquet")
    assert len(scores) == 64 and scores["id"].is_unique
    assert scores["m2t_r1"].mean() == pytest.approx(summary["test"]["m2t_R@1"])
    emb = np.load(tiny_run / "facts" / "embeddings.npz")
    assert emb["modality"].shape == emb["text"].shape and emb["modality"].shape[0] == 64
    card = (tiny_run / "card.md").read_text()
    assert "completed" in card and "m2t_R@1" in card


def test_eval_reproduces_test_metrics(tiny_run, cache_dir, tmp_path):
    p = run_cli(["eval", str(tiny_run), "--split", "test"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    got = json.loads((tiny_run / "facts" / "eval_test.json").read_text())["metrics"]
    want = json.loads((tiny_run / "facts" / "summary.json").read_text())["test"]
    assert got["m2t_R@1"] == pytest.approx(want["m2t_R@1"])
    assert got["zeroshot_acc"] == pytest.approx(want["zeroshot_acc"])
    p = run_cli(["eval", str(tiny_run), "--split", "val"], tmp_path, cache_dir)
    assert p.returncode == 0 and (tiny_run / "facts" / "scores_val.parquet").exists()
    assert f"{tiny_run} [val] step 12 (best.pt, cpu)" in p.stdout.replace("\n", "")


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, cache_dir) -> Path:
    """A completed tiny autoencode (stage-1) run with a VQ bottleneck, through the CLI."""
    cwd = tmp_path_factory.mktemp("stage1")
    p = run_cli(["train", "--quiet", "--recipe", "autoencode", *TINY, "bottleneck=vq"], cwd, cache_dir)
    assert p.returncode == 0, p.stderr
    return next((cwd / "outputs" / "runs").iterdir())


def test_stage1_summary_values_are_the_means_of_their_score_columns(stage1_run):
    summary = json.loads((stage1_run / "facts" / "summary.json").read_text())["test"]
    scores = pd.read_parquet(stage1_run / "facts" / "scores.parquet")
    columns = ["rec_ce", "rec_mse", "rec_tokens", "rec_globals", "token_acc", "vq_commit", "vq_codebook", "total_loss"]
    assert set(columns) <= set(scores.columns) and len(scores) == 64
    for c in columns:
        assert summary[c] == pytest.approx(float(scores[c].mean()), rel=1e-6, abs=1e-9), c
    info = json.loads((stage1_run / "run.json").read_text())
    assert info["eval"] == {**info["eval"], "protocol": "reconstruction", "version": 2}


def test_eval_works_on_a_stage1_run_and_refuses_a_corrupted_one(stage1_run, tmp_path, cache_dir):
    want = json.loads((stage1_run / "facts" / "summary.json").read_text())["test"]
    p = run_cli(["eval", str(stage1_run)], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    assert "rec_tokens" in p.stdout and "Traceback" not in p.stderr
    got = json.loads((stage1_run / "facts" / "eval_test.json").read_text())["metrics"]
    for k in ("rec_tokens", "total_loss", "token_acc", "vq_perplexity"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(stage1_run, broken)
    best = broken / "checkpoints" / "best.pt"
    data = bytearray(best.read_bytes())
    data[len(data) // 2] ^= 0xFF
    best.write_bytes(bytes(data))
    p = run_cli(["eval", str(broken)], tmp_path, cache_dir)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "best.pt" in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_runs_table_lists_the_run(tiny_run, cache_dir):
    root = tiny_run.parent.parent
    p = run_cli(["runs", str(root), "--where", "status=completed", "--sort", "m2t_R@1"], root.parent, cache_dir)
    assert p.returncode == 0, p.stderr
    assert tiny_run.name[:15] in p.stdout and "completed" in p.stdout
    p = run_cli(["runs", str(root), "--where", "head.kind=linear"], root.parent, cache_dir)
    assert p.returncode == 0 and "(0)" in p.stdout
    p = run_cli(["runs", str(root), "--sort", "m2t_mean_rank"], root.parent, cache_dir)
    assert p.returncode == 0 and "m2t_mean_rank" in p.stdout  # the sorted metric is shown
    p = run_cli(["runs", str(root), "--sort", "nonsense"], root.parent, cache_dir)
    assert p.returncode == 2 and "nonsense" in p.stderr


def _write_user_npz(path: Path, n: int = 120, broken: str | None = None) -> None:
    """A wearable-style data set: continuous features only, per-label captions."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 20, 3)).astype(np.float32) + labels[:, None, None]
    split = np.array(["train"] * 80 + ["val"] * 20 + ["test"] * (n - 100))
    ids = np.array([f"s{i:04d}" for i in range(n)])
    names = ["walking", "running", "sitting"]
    arrays = dict(ids=ids, split=split, tokens_cont=x, labels=labels, label_names=np.array(names))
    if broken == "nan":
        arrays["tokens_cont"][5, 3, 1] = np.nan
    if broken == "dup":
        arrays["ids"][7] = arrays["ids"][3]
    if broken == "count":
        arrays["labels"] = labels[:-1]
    if broken == "split":
        arrays["split"][0] = "dev"
    if broken == "empty":
        arrays["split"][arrays["split"] == "val"] = "train"
    np.savez(path, **arrays)
    with open(path.with_suffix(".jsonl"), "w") as f:
        for i in range(n):
            cap = f"a person is {names[labels[i]]}"
            f.write(json.dumps({"id": ids[i], "captions": [cap if broken != "caption" or i != 9 else 42]}) + "\n")


def test_user_npz_trains_without_code_change(tmp_path, cache_dir):
    _write_user_npz(tmp_path / "wear.npz")
    p = run_cli(["train", "--quiet", "data=npz", f"data.path={tmp_path / 'wear.npz'}", "trainer.max_steps=6",
                 "trainer.batch_size=32", "trainer.eval_every=3", "encoder=cnn"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    run = Path(p.stdout.strip().splitlines()[-1])
    info = json.loads((tmp_path / run / "run.json").read_text())
    assert info["status"] == "completed" and info["eval"]["protocol"] == "same_label"
    assert info["data"]["splits"]["train"]["n"] == 80
    # evaluation from another directory finds the data (its path is stored absolute) ...
    p = run_cli(["eval", str(tmp_path / run)], tmp_path.parent, cache_dir)
    assert p.returncode == 0, p.stderr
    # ... and refuses data that changed since training
    _write_user_npz(tmp_path / "wear.npz", n=121)
    p = run_cli(["eval", str(tmp_path / run)], tmp_path, cache_dir)
    assert p.returncode == 2 and "not the data this run was trained" in p.stderr, p.stderr


BAD = [
    # (case id, args, a fragment the single error line must contain)
    ("unknown-key", ["trainer.max_stepz=3"], "trainer.max_stepz"),
    ("unknown-option", ["encoder=lstm"], "lstm"),
    ("wrong-type", ["trainer.max_steps=abc"], "trainer.max_steps"),
    ("negative-size", ["trainer.batch_size=-4"], "trainer.batch_size"),
    ("zero-steps", ["trainer.max_steps=0"], "trainer.max_steps"),
    ("bad-choice", ["trainer.precision=fp8"], "trainer.precision"),
    ("heads-width", ["encoder.width=30", "encoder.heads=4"], "encoder.heads"),
    ("missing-path", ["data=npz"], "data.path"),
    ("no-such-file", ["data=npz", "data.path=nope.npz"], "nope.npz"),
    ("bad-demo-arg", ["data.difficulty=brutal"], "brutal"),
    ("unparsable", ["trainer.max_steps=1=2"], "trainer.max_steps"),
    ("top-level-unknown", ["+foo=1"], "foo"),
    ("bad-monitor", ["trainer.monitor=val/accuracy"], "trainer.monitor"),
    ("even-kernel", ["encoder=cnn", "encoder.kernel_size=4"], "encoder.kernel_size"),
    ("zero-temperature", ["loss.init_temperature=0"], "loss.init_temperature"),
    ("protocol-without-facts", ["eval.protocol=nonsense"], "eval.protocol"),
    ("gpu-device", ["env.device=cuda"], "no CUDA device is visible"),  # not silently trained on the CPU
    ("bad-device", ["env.device=tpu"], "env.device"),
    ("fp16-on-cpu", ["env.device=cpu", "trainer.precision=fp16"], "trainer.precision"),
    ("bad-malloc", ["env.malloc=jemalloc"], "env.malloc"),
]


@pytest.mark.parametrize("case,args,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_config_exits_2_with_one_line(case, args, fragment, tmp_path, cache_dir):
    tiny = [o for o in TINY if not o.startswith("data.")] if "data=npz" in args else TINY
    p = run_cli(["train", "--quiet", *tiny, *args], tmp_path, cache_dir)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and fragment in lines[0]
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a failed start must leave no run directory"


@pytest.mark.parametrize("broken,fragment", [("nan", "non-finite"), ("dup", "duplicate"), ("count", "labels"),
                                             ("split", "dev"), ("empty", "val"), ("caption", "not a string")])
def test_bad_data_exits_2_with_one_line(broken, fragment, tmp_path, cache_dir):
    _write_user_npz(tmp_path / "bad.npz", broken=broken)
    p = run_cli(["train", "--quiet", "data=npz", f"data.path={tmp_path / 'bad.npz'}"], tmp_path, cache_dir)
    assert p.returncode == 2, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert fragment in lines[0] and "bad." in lines[0]


def test_bad_arguments_exit_2(tmp_path, cache_dir):
    for args, fragment in ((["eval", str(tmp_path)], "not a run directory"),
                           (["runs", str(tmp_path / "nowhere")], "nowhere"),
                           (["runs", "--where", "oops"], "KEY=VALUE"),
                           (["train", "resume=" + str(tmp_path / "gone")], "gone"),
                           (["frobnicate"], "invalid choice")):
        p = run_cli(args, tmp_path, cache_dir)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert p.returncode == 2 and len(lines) == 1 and fragment in lines[0], (args, p.stderr)


@pytest.mark.parametrize("override, expected", [  # found by tests/test_fuzz.py
    ("trainer=5", "'trainer' must name one of its options (default, fuse, smoke), got '5'"),
    ("logger=null", "got 'null' (to leave the group out: ~logger)"),
    ("eval=5", "'eval' must be a config section"),
    ("~seed", "'seed' is required"),
    ("trainer.optim.encoder=5", "'trainer.optim' must map each component"),
    ("trainer.optim.eps=-1", "'trainer.optim.eps' is -1.0"),
    ("trainer.optim.betas=[1.5,0.9]", "'trainer.optim.betas[0]' is 1.5"),
    ("trainer.optim.min_lr_ratio=-5", "'trainer.optim.min_lr_ratio' is -5.0"),
    ("trainer.grad_clip=nan", "'trainer.grad_clip' is nan"),
])
def test_structural_and_nan_config_errors_stop_before_a_run_dir(override, expected, tmp_path, monkeypatch, capsys):
    from modalign.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet", "trainer=smoke", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not any(runs.iterdir())
