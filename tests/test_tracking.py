"""Tracking sinks (TensorBoard, MLflow, W&B offline) and `modalign sync`, through the real CLI, read
back with each backend's own reader: TensorBoard's EventAccumulator, MLflow's client, and W&B's
offline-run file reader (the records of run-<id>.wandb)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY, run_cli

pytest.importorskip("mlflow", reason="the tracking extra is not installed (pip install 'modalign[tracking]')")

ARGS = [*TINY, "trainer.max_steps=12", "trainer.eval_every=4", "trainer.log_every=1"]
ALL = "logger=[tensorboard,mlflow,wandb]"


def points(run: Path) -> dict[tuple[str, int], float]:
    """metrics.jsonl as {(split/name, step): value}; each (key, step) must appear once."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        key = (f"{r['split']}/{r['name']}", r["step"])
        assert key not in out, f"{key} twice in metrics.jsonl"
        out[key] = r["value"]
    return out


def tensorboard_points(run: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}, purge_orphaned_data=True)
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            assert (tag, e.step) not in out, f"{tag} at step {e.step} twice in TensorBoard"
            out[(tag, e.step)] = e.value
    return out


def mlflow_points(uri: str, run_id: str, keys) -> dict[tuple[str, int], float]:
    """MLflow's history of each key, under the key's metrics.jsonl name (MLflow spells @ as _at_)."""
    from mlflow.tracking import MlflowClient

    from modalign.sinks.mlflow_sink import metric_key

    client = MlflowClient(tracking_uri=uri)
    assert metric_key("val/m2t_R@10") == "val/m2t_R_at_10"
    out = {}
    for key in keys:
        for m in client.get_metric_history(run_id, metric_key(key)):
            assert (key, m.step) not in out, f"{key} at step {m.step} twice in MLflow"
            out[(key, m.step)] = m.value
    return out


def wandb_points(run: Path) -> dict[tuple[str, int], float]:
    """Every history row of every offline session of the run (a resumed run has two), in order."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    out = {}
    for f in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        ds = datastore.DataStore()
        ds.open_for_scan(str(f))
        while (data := ds.scan_data()) is not None:
            rec = pb.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") != "history":
                continue
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            step = row.pop("_step")
            for k, v in row.items():
                if k.startswith(("train/", "val/", "test/")):
                    assert (k, step) not in out, f"{k} at step {step} twice in W&B"
                    out[(k, step)] = v
    return out


def float32(d: dict) -> dict:
    import numpy as np

    return {k: float(np.float32(v)) for k, v in d.items()}


def only_run(cwd: Path) -> Path:
    runs = list((cwd / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def check_all_sinks(run: Path) -> None:
    expected = points(run)
    assert any(k[0].startswith("test/") for k in expected) and any(k[0].startswith("val/") for k in expected)
    # TensorBoard keeps scalars as float32
    assert tensorboard_points(run) == float32(expected)
    state = json.loads((run / "tracking.json").read_text())
    keys = {k for k, _ in expected}
    assert mlflow_points(state["mlflow"]["uri"], state["mlflow"]["run_id"], keys) == expected
    assert wandb_points(run) == expected
    assert all(state[s]["finished"] == "completed" for s in ("tensorboard", "mlflow", "wandb"))


def test_three_sinks_through_a_kill_and_a_sigterm_hold_every_point_once_equal_to_metrics_jsonl(tmp_path, cache_dir):
    """`logger=[tensorboard,mlflow,wandb]`; the run is killed, resumed, stopped by SIGTERM, resumed
    again: each sink continues its own run and ends with exactly the points of metrics.jsonl."""
    # killed after step 6 (last.pt holds step 4): steps 5-6 were logged to metrics.jsonl, never to a sink
    p = run_cli(["train", "--quiet", *ARGS, ALL], tmp_path, cache_dir, env_extra={"MODALIGN_FAULTS": "kill:step@6"})
    assert p.returncode == -9, p.stderr
    run = only_run(tmp_path)
    state = json.loads((run / "tracking.json").read_text())
    assert state["tensorboard"]["committed"] == state["mlflow"]["committed"] == 4
    assert "wandb" not in state  # offline W&B writes when a run ends or is interrupted
    # resumed, then stopped by SIGTERM after step 9 (last.pt at 9): W&B writes up to 9, all sinks hold 9
    p = run_cli(["train", "--quiet", f"resume={run}"], tmp_path, cache_dir, env_extra={"MODALIGN_FAULTS": "term:step@9"})
    assert p.returncode == 143, p.stderr
    middle = json.loads((run / "tracking.json").read_text())
    assert {middle[s]["committed"] for s in ("tensorboard", "mlflow", "wandb")} == {9}
    assert middle["mlflow"]["run_id"] == state["mlflow"]["run_id"]
    p = run_cli(["train", "--quiet", f"resume={run}"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    after = json.loads((run / "tracking.json").read_text())
    assert after["mlflow"]["run_id"] == state["mlflow"]["run_id"] and after["wandb"]["id"] == middle["wandb"]["id"]
    assert len(list((run / "wandb").glob(f"offline-run-*-{after['wandb']['id']}"))) == 2  # two sessions, one id
    check_all_sinks(run)  # every point once, equal to metrics.jsonl
    # what each sink cost the run, all three sessions summed: it only grows across sessions
    for s in ("tensorboard", "mlflow", "wandb"):
        assert set(after[s]["seconds"]) == {"open", "log", "finish"} and min(after[s]["seconds"].values()) > 0, after[s]
    for s in ("tensorboard", "mlflow"):
        assert after[s]["seconds"]["open"] > middle[s]["seconds"]["open"] > state[s]["seconds"]["open"] > 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=after["mlflow"]["uri"])
    mrun = client.get_run(after["mlflow"]["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.data.tags["modalign.recipe"] == "align"
    assert mrun.data.params["trainer.max_steps"] == "12" and len(mrun.data.tags["modalign.data_test"]) == 16
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id)} | {
        a.path for a in client.list_artifacts(mrun.info.run_id, "figures")}
    assert {"card.md", "summary.json", "figures/loss.png"} <= artifacts
    assert after["mlflow"]["uri"] == f"sqlite:///{(tmp_path / 'outputs' / 'mlflow.db').resolve()}"
    assert not list(tmp_path.glob("mlruns*"))  # nothing written outside outputs/


def test_a_sink_that_fails_mid_run_is_detached_and_the_run_completes(tmp_path, cache_dir):
    # the mlflow sink raises on its 3rd call (after opening and one batch of points)
    p = run_cli(["train", "--quiet", *ARGS, "logger=[tensorboard,mlflow]"], tmp_path, cache_dir,
                env_extra={"MODALIGN_FAULTS": "raise:sink_mlflow@3"})
    assert p.returncode == 0, p.stderr
    run = only_run(tmp_path)
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    log = (run / "run.log").read_text()
    assert log.count("logger mlflow failed") == 1 and "detached" in log
    assert tensorboard_points(run) == float32(points(run))  # the other sink has every point
    assert points(run)[("test/m2t_R@1", 12)] >= 0  # and the run directory every point


def test_a_missing_sink_package_is_one_line_and_exit_2_before_anything_trains(tmp_path, cache_dir):
    # an environment without wandb: the import system refuses it (as if it were not installed)
    code = ("import sys; sys.modules['wandb'] = None; from modalign.cli import main; "
            f"raise SystemExit(main(['train', '--quiet', *{ARGS!r}, 'logger=[tensorboard,wandb]']))")
    import os
    import subprocess

    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, MODALIGN_CACHE=str(cache_dir)))
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines == ["modalign: error: logger=wandb: the wandb package is not installed: "
                     "pip install 'modalign[tracking]'"]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("extra,needle", [
    (["logger=[mlflow]", "logger.mlflow.experiment="], "config: 'logger.mlflow.experiment'"),
    (["logger=[wandb]", "logger.wandb.mode=cloud"], "config: 'logger.wandb.mode' is 'cloud'; expected one of offline, online"),
    (["logger=[tensorboard]", "logger.tensorboard.dir=../x"], "config: 'logger.tensorboard.dir' is '../x'"),
    (["+logger.neptune.key=1"], "config: unknown sink 'logger.neptune'"),
], ids=["experiment", "wandb-mode", "tb-dir", "unknown-sink"])
def test_bad_logger_options_are_one_line_and_exit_2(tmp_path, cache_dir, extra, needle):
    p = run_cli(["train", "--quiet", *ARGS, *extra], tmp_path, cache_dir)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "outputs" / "runs").exists()


def test_sync_pushes_an_old_sweep_into_mlflow_nested_under_the_sweep(tmp_path, cache_dir, demo_sweep):
    import shutil

    sweep = tmp_path / demo_sweep[0].name  # a copy: the session's sweep is read-only for other tests
    shutil.copytree(demo_sweep[0], sweep)
    jobs = sorted(d for d in sweep.iterdir() if (d / "run.json").exists())
    assert len(jobs) >= 2 and not any((j / "tracking.json").exists() for j in jobs)  # trained without a sink
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    p = run_cli(["sync", str(sweep), "--to", "mlflow", f"mlflow.uri={uri}"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    assert f"synced {len(jobs)} run(s)" in p.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("modalign")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("modalign.sweep_run") == sweep.name]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(children) == len(jobs) == len(runs) - 1
    for job in jobs:
        state = json.loads((job / "tracking.json").read_text())
        child = next(r for r in children if r.info.run_id == state["mlflow"]["run_id"])
        assert child.info.status == "FINISHED" and child.info.run_name == f"{sweep.name}/{job.name}"
        expected = points(job)
        assert mlflow_points(uri, child.info.run_id, {k for k, _ in expected}) == expected
    # again: nothing new to send, no second copy of any run or point
    p = run_cli(["sync", str(sweep), "--to", "mlflow", f"mlflow.uri={uri}"], tmp_path, cache_dir)
    assert p.returncode == 0 and p.stdout.count("up to date") == len(jobs), p.stdout
    assert len(client.search_runs([exp.experiment_id])) == len(jobs) + 1
    expected = points(jobs[0])
    state = json.loads((jobs[0] / "tracking.json").read_text())
    assert mlflow_points(uri, state["mlflow"]["run_id"], {k for k, _ in expected}) == expected
