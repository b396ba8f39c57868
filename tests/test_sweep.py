"""Sweeps (Hydra multirun) and stage 1 -> stage 2, on the real code path with tiny data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import SMALL, run_cli
from modalign.cli import main
from modalign.runs.provenance import sha256_file

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "src/modalign/conf/experiment").glob("*.yaml"))


def _sweep_dir(cwd: Path) -> Path:
    dirs = list((cwd / "outputs" / "experiments").iterdir())
    assert len(dirs) == 1
    return dirs[0]


def _summary(run: Path) -> dict:
    return json.loads((run / "facts" / "summary.json").read_text())


# Run end to end: the experiments whose recipe and grid no other test covers (demo runs in the
# report tests' shared sweep; compare_projections is demo's grid with a third seed;
# compare_latent_spaces is a slice of compare_globals_heads). Every experiment is planned below.
# compare_heads runs in `make test-slow`: its path (an align sweep) is the demo sweep's, and the
# register head it adds trains end to end in tests/test_variants.py
# compare_globals_heads runs the corners of its grid (2 latent spaces x globals_beta 0 and 10: 4 of
# its 9 jobs, the grid narrowed from the command line as a user would).
RUN_END_TO_END = ["compare_globals_heads", pytest.param("compare_heads", marks=pytest.mark.slow)]
NARROWED = {"compare_globals_heads": ["bottleneck=none,vq", "globals_beta=0,10"]}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_plans(name):
    from modalign.recipes.sweep import plan

    p = plan([f"experiment={name}", *SMALL])
    assert p["n_jobs"] >= 2 and p["grid"] and p["metric"].startswith("test/")


@pytest.mark.parametrize("name", RUN_END_TO_END)
def test_experiment_runs_with_the_smoke_trainer(name, tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "--quiet", f"experiment={name}", *SMALL, *NARROWED.get(name, [])])
    sweep = _sweep_dir(tmp_path)
    info = yaml.safe_load((sweep / "sweep.yaml").read_text())
    assert code == 0 and info["status"] == "completed", info["jobs"]
    n = 1
    for values in info["grid"].values():
        n *= len(values)
    assert len(info["jobs"]) == n == info["n_jobs"]
    assert sweep.name.startswith("exp_") and sweep.name.endswith(f"_{name}")
    groups = pd.read_csv(sweep / "report" / "groups.csv")  # the sweep's report, written at its end
    assert groups["completed"].sum() == n and (sweep / "report" / "index.html").exists()
    if len([k for k, v in info["grid"].items() if len(v) > 1 and k != "seed"]) == 2:
        assert (sweep / "report" / "heatmap.png").exists()  # e.g. latent x globals_beta
    for job in info["jobs"]:
        run = sweep / job["dir"]
        assert json.loads((run / "run.json").read_text())["status"] == "completed"
        overrides = yaml.safe_load((run / "overrides.yaml").read_text())
        for key in info["grid"]:  # each job ran with one value of each swept key
            assert any(o.startswith(f"{key}=") for o in overrides)
    if name == "compare_globals_heads":
        # rec_globals falls as globals_beta rises, for every latent space
        by = {}
        for job in info["jobs"]:
            o = dict(x.split("=", 1) for x in job["overrides"])
            by[(o["bottleneck"], float(o["globals_beta"]))] = _summary(sweep / job["dir"])["test"]["rec_globals"]
        assert set(by) == {(latent, beta) for latent in ("none", "vq") for beta in (0.0, 10.0)}, by
        for latent in ("none", "vq"):
            assert by[(latent, 0.0)] > by[(latent, 10.0)], by
        for job in info["jobs"]:  # at globals_beta=0 the head is reported but not optimized
            if "globals_beta=0" in job["overrides"]:
                rows = [json.loads(l) for l in (sweep / job["dir"] / "metrics.jsonl").read_text().splitlines()]
                norms = [r["value"] for r in rows if r["name"] == "grad_norm/globals_head"]
                assert norms and all(v == 0.0 for v in norms)
                assert any(r["name"] == "rec_globals" and r["split"] == "train" for r in rows)
        vq = next(j for j in info["jobs"] if "bottleneck=vq" in j["overrides"])
        assert _summary(sweep / vq["dir"])["test"]["vq_perplexity"] > 1.0
        assert (sweep / vq["dir"] / "figures" / "codebook_usage.png").exists()
    if name == "compare_heads":  # the report: R@1 by registers kept, and each head's variant metadata
        report = json.loads((sweep / "report" / "summary.json").read_text())
        assert [r["k"] for r in report["registers"]["head=registers"]] == [1, 2, 3]
        assert {v["name"] for v in report["variants"]} == {"linear", "mlp", "registers"}
        assert all(v["created_by"] and v["version"] and v["source_sha256"] for v in report["variants"])
        assert (sweep / "report" / "registers.png").exists()
        html = (sweep / "report" / "index.html").read_text()
        assert "Retrieval by registers kept" in html and "M1-registers" in html


def test_failed_job_does_not_stop_the_sweep_and_resume_finishes_it(tmp_path, cache_dir):
    from test_cli import _write_user_npz

    _write_user_npz(tmp_path / "a.npz")
    args = ["sweep", "--quiet", "data=npz", f"data.path={tmp_path / 'a.npz'},{tmp_path / 'b.npz'}",
            "trainer=smoke", "trainer.batch_size=32", "encoder=cnn"]
    p = run_cli(args, tmp_path, cache_dir)
    assert p.returncode == 1, p.stderr  # the sweep is incomplete
    sweep = _sweep_dir(tmp_path)
    info = yaml.safe_load((sweep / "sweep.yaml").read_text())
    status = {j["dir"]: j["status"] for j in info["jobs"]}
    assert status == {"0": "completed", "1": "failed"}
    assert "b.npz" in info["jobs"][1]["error"]
    # the report lists the failed job as failed, with its error; it is never silently dropped
    runs = pd.read_csv(sweep / "report" / "summary.csv")
    failed = runs.loc[runs["run"].astype(str) == "1"].iloc[0]
    assert failed["status"] == "failed" and "b.npz" in failed["error"]
    assert "failed" in (sweep / "report" / "index.html").read_text()
    done = (sweep / "0" / "run.json").read_text()

    shutil.copy(tmp_path / "a.npz", tmp_path / "b.npz")  # the missing input appears
    shutil.copy(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    p = run_cli(["sweep", "--quiet", f"resume={sweep}"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    info = yaml.safe_load((sweep / "sweep.yaml").read_text())
    assert [j["status"] for j in info["jobs"]] == ["completed", "completed"]
    assert (sweep / "0" / "run.json").read_text() == done  # the completed job was not run again


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path, cache_dir):
    p = run_cli(["sweep", "--quiet", "hydra/launcher=submitit_local", "head=linear,mlp", *SMALL], tmp_path,
                cache_dir, timeout=600)
    assert p.returncode == 0, p.stderr
    sweep = _sweep_dir(tmp_path)
    info = yaml.safe_load((sweep / "sweep.yaml").read_text())
    assert [j["status"] for j in info["jobs"]] == ["completed", "completed"]
    assert (sweep / ".submitit").is_dir()  # the jobs really went through submitit


def test_align_from_a_stage1_checkpoint_records_its_parent(tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet", "--recipe", "autoencode", *SMALL, "bottleneck=linear", "name=stage1"]) == 0
    stage1 = next((tmp_path / "outputs" / "runs").glob("*_autoencode_stage1"))
    assert main(["train", "--quiet", *SMALL, f"encoder.init_from={stage1}", "encoder.freeze=true", "name=stage2"]) == 0
    stage2 = next((tmp_path / "outputs" / "runs").glob("*_align_stage2"))
    parents = json.loads((stage2 / "run.json").read_text())["parents"]
    assert len(parents) == 1 and parents[0]["role"] == "encoder" and parents[0]["recipe"] == "autoencode"
    assert parents[0]["sha256"] == sha256_file(stage1 / "checkpoints" / "best.pt")

    import torch

    from modalign.train.checkpoint import load_checkpoint

    a = load_checkpoint(stage1 / "checkpoints" / "best.pt")["model"]
    b = load_checkpoint(stage2 / "checkpoints" / "last.pt")["model"]
    enc = [k for k in b if k.startswith("encoder.")]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)  # frozen: the stage-1 weights, unchanged
    # a parent whose encoder does not match is refused with one line
    assert main(["train", "--quiet", *SMALL, f"encoder.init_from={stage1}", "encoder.width=64"]) == 2


def test_plain_override_sweep_plans_the_cartesian_product():
    from modalign.recipes.sweep import plan

    p = plan(["bottleneck=none,linear,vq", "seed=0,1,2", "trainer=smoke"])
    assert p["recipe"] == "autoencode" and p["n_jobs"] == 9 and p["metric"] == "test/total_loss"
    p = plan(["head=linear,mlp", "seed=0,1,2"])
    assert p["recipe"] == "align" and p["n_jobs"] == 6 and p["grid"]["head"] == ["linear", "mlp"]


def test_grid_values_are_parsed_as_hydra_parses_them():
    """Experiment params and command-line sweeps go through Hydra's override parser: range(),
    choice(), quoted commas; an interval (which no grid can enumerate) is one line naming it."""
    from modalign.errors import UserError
    from modalign.recipes.sweep import plan, sweep_overrides

    grid = sweep_overrides(["seed=range(3)", "head=choice(linear,mlp)", "name='a,b',c", "trainer.max_steps=5"])
    assert grid == {"seed": ["0", "1", "2"], "head": ["linear", "mlp"], "name": ["'a,b'", "c"]}
    with pytest.raises(UserError, match=r"'trainer.optim.encoder.lr=interval\(0.1,1.0\)' is an interval"):
        sweep_overrides(["trainer.optim.encoder.lr=interval(0.1,1.0)"], "experiment x.yaml: hydra.sweeper.params")
    p = plan(["experiment=demo", "seed=range(1,4)", "trainer=smoke"])
    assert p["grid"] == {"head": ["linear", "mlp"], "seed": ["1", "2", "3"]} and p["n_jobs"] == 6
