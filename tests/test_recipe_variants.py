"""The align recipe's options, each trained for a few steps in-process on the tiny demo."""

from __future__ import annotations

import json

import pytest

from conftest import TINY
from modalign.cli import main


def _train(tmp_path, monkeypatch, *overrides) -> tuple[dict, dict, list[dict]]:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet", *TINY, *overrides]) == 0
    run = next((tmp_path / "outputs" / "runs").iterdir())
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return (json.loads((run / "run.json").read_text()), json.loads((run / "facts" / "summary.json").read_text()),
            rows)


@pytest.mark.parametrize("overrides,terms", [
    (["encoder=cnn", "head=linear", "loss=siglip"], {"siglip"}),
    (["loss.queue_size=128", "loss.mlm_weight=0.1", "head.layers=3", "encoder.pooling=mean"],
     {"clip", "queue", "mlm"}),
    (["trainer.accumulate=2", "trainer.precision=fp32", "head.text_projection=false"], {"clip"}),
])
def test_variant_trains_and_logs_its_terms(overrides, terms, tmp_path, monkeypatch, cache_dir):
    info, summary, rows = _train(tmp_path, monkeypatch, *overrides)
    assert info["status"] == "completed"
    logged = {r["name"] for r in rows if r["split"] == "train"}
    assert terms <= logged and "loss" in logged
    assert all(r["value"] == r["value"] for r in rows if r["split"] == "train")  # no NaN
    loss = [r["value"] for r in rows if r["split"] == "train" and r["name"] == "loss"]
    assert loss[-1] < loss[0]  # it learns (12 steps are too few for every variant to beat chance at R@1)
    assert 0.0 <= summary["test"]["m2t_R@1"] <= 1.0 and "zeroshot_acc" in summary["test"]


def test_early_stopping_and_step_checkpoints(tmp_path, monkeypatch, cache_dir):
    # lr 0 on every group: the monitored metric cannot improve, so patience 1 stops at the 2nd eval
    info, summary, rows = _train(tmp_path, monkeypatch, "trainer.max_steps=60", "trainer.eval_every=2",
                                 "trainer.early_stop_patience=1", "trainer.optim.encoder.lr=0",
                                 "trainer.optim.heads.lr=0", "trainer.optim.logit_scale.lr=0",
                                 "trainer.checkpoint_every=2", "trainer.keep_checkpoints=1")
    assert summary["stopped_early"] and summary["steps"] == 4
    run = next((tmp_path / "outputs" / "runs").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_4.pt"]


def test_resume_of_interrupted_run_with_more_steps(tmp_path, monkeypatch, cache_dir):
    info, summary, _ = _train(tmp_path, monkeypatch)
    run = next((tmp_path / "outputs" / "runs").iterdir())
    assert main(["train", "--quiet", f"resume={run}"]) == 2  # completed runs are not resumed
    state = json.loads((run / "run.json").read_text())
    state["status"] = "interrupted"  # as after a preemption
    (run / "run.json").write_text(json.dumps(state))
    assert main(["train", "--quiet", f"resume={run}", "data.n_train=100"]) == 2  # would change the data
    # the original command pasted again is fine: its values are the run's own
    assert main(["train", "--quiet", f"resume={run}", *TINY[:3], "trainer.max_steps=16"]) == 0
    summary = json.loads((run / "facts" / "summary.json").read_text())
    assert summary["steps"] == 16
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train" and r["name"] == "loss"]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # no duplicated points
    assert len([r for r in rows if r["split"] == "test" and r["name"] == "m2t_R@1"]) == 1
