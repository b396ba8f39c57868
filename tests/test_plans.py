"""Phased plans (modalign.plans, docs/plans.md): plan files, `modalign plan run/status/graph`, the
executor's identity-by-config resume after SIGKILL, gates, early starts and plateau triggers, on
real runs through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from modalign.errors import UserError
from modalign.plans.spec import load_plan, parse_plan

SMALL = ["data.n_val=64", "data.n_test=64", "trainer.batch_size=32"]


def _write(tmp_path: Path, name: str, plan: dict) -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(f"# modalign plan run {f}\n" + yaml.safe_dump(plan, sort_keys=False))
    return f


def _state(out: Path, name: str) -> dict:
    return json.loads((out / "plans" / name / "plan.json").read_text())


def _starts(run_dir: Path) -> int:
    """How many times a process trained in this run directory (each start or resume logs one line)."""
    return sum(1 for line in (run_dir / "run.log").read_text().splitlines() if f"run {run_dir}:" in line)


@pytest.mark.parametrize("plan, message", [
    ({"phases": {}}, "phases must list at least one phase"),
    ({"phases": {"a": {"runz": {}}}}, "phases.a.runz is not a key here"),
    ({"phases": {"a": {"runs": {"r": {}}}, "b": {"after": ["c"], "runs": {"r": {}}}}}, "'c' is not a phase"),
    ({"phases": {"a": {"after": ["b"], "runs": {"r": {}}}, "b": {"after": ["a"], "runs": {"r": {}}}}},
     "in a circle: a -> b -> a"),
    ({"phases": {"a": {"runs": {"r": {"overrides": ["encoder.init_from=${ref:a.r.path}"]}}}}},
     "must end in one of .dir"),
    ({"phases": {"a": {"runs": {"r": {"overrides": ["encoder.init_from=${ref:z.r.dir}"]}}}}}, "'z.r' is not a phase"),
    ({"phases": {"a": {"runs": {"r": {}}, "triggers": {"t": {True: "a.r", "when": "plateau(val/x)"}}}}},
     "`on:` reads as true"),  # YAML 1.1 reads the key on: as true
    ({"phases": {"a": {"runs": {"r": {}}, "triggers": {"t": {"run": "a.r", "when": "stalls(val/x)"}}}}},
     "when must read plateau(METRIC, patience=N, min_delta=X)"),
    ({"phases": {"a": {"runs": {"r": {}}}, "b": {"start_when": {"run": "a.r", "step": 5}, "runs": {"r": {}}}}},
     "give after:"),
    ({"phases": {"a": {"runs": {"r": {}}}, "b": {"after": ["a"], "gate": {"results": "a", "criteria": {
        "metric": "test/m2t_R@1", "bands": [{"min": 0.1, "verdict": "ok", "next": "go"},
                                            {"verdict": "bad", "next": "stop"}]}, "pass": ["good"]},
        "runs": {"r": {}}}}}, "'good' is not a verdict of its bands (ok, bad)"),
    ({"phases": {"a": {"sweeps": {"s": {"grid": {}}}}}}, "grid must name at least one key"),
    ({"phases": {"a": {"runs": {"r": {"recipe": "distill"}}}}}, "'distill' is not a recipe"),
])
def test_a_bad_plan_is_one_line_naming_the_key(plan, message, tmp_path):
    with pytest.raises(UserError) as e:
        parse_plan({"name": "p", **plan}, tmp_path / "p.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(tmp_path / "p.yaml") in str(e.value)


def test_a_bad_override_in_a_later_phase_fails_before_any_job_runs(tmp_path, cache_dir):
    f = _write(tmp_path, "bad", {"name": "bad", "phases": {
        "a": {"runs": {"r": {"overrides": ["trainer.max_steps=2"]}}},
        "b": {"after": ["a"], "runs": {"r": {"overrides": ["trainer.max_stepz=2"]}}}}})
    res = run_cli(["plan", "run", str(f), f"outputs={tmp_path / 'out'}"], tmp_path, cache_dir)
    assert res.returncode == 2, res.stderr
    assert "phases.b step r" in res.stderr and "trainer.max_stepz" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "plans" / "bad" / "runs").exists() or \
        not any((tmp_path / "out" / "plans" / "bad" / "runs").iterdir())


def test_shipped_plans_parse_and_graph_prints_the_dag(tmp_path, cache_dir):
    for name in ("align_study", "fuse_study"):
        plan = load_plan(name)
        assert plan.phases and plan.file.read_text().startswith("# modalign plan run")
    res = run_cli(["plan", "graph", "align_study", "--out", str(tmp_path / "g.png")], tmp_path, cache_dir)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.index("sanity") < out.index("core") < out.index("statistics")
    assert "early: core.primary stable (val/m2t_R@1" in out and "gate: test/m2t_R@1 in learns" in out
    assert (tmp_path / "g.png").stat().st_size > 10_000


def test_a_plateau_trigger_starts_a_linked_run_and_start_when_starts_a_phase_early(tmp_path, cache_dir):
    """The stage-1 run cannot learn (every lr is 0), so its validation loss is flat: the plateau
    trigger stops it and starts an align run from its best checkpoint, which records it as its
    parent. The second phase starts when the stage-1 run reaches step 3, before its phase ends."""
    lr0 = [f"trainer.optim.{c}.lr=0" for c in ("encoder", "decoder", "globals_head", "bottleneck")]
    f = _write(tmp_path, "trig", {
        "name": "trig", "recipe": "autoencode",
        "overrides": ["data.n_train=256", *SMALL, "encoder.width=64"],
        "phases": {
            "stage1": {
                "runs": {"ae": {"overrides": ["bottleneck=none", "trainer.max_steps=60", "trainer.eval_every=3", *lr0]}},
                "triggers": {"align": {"run": "stage1.ae", "when": "plateau(val/total_loss, patience=2, min_delta=0)",
                                       "start": {"recipe": "align", "overrides": [
                                           "encoder.init_from=${ref:stage1.ae.dir}", "trainer.max_steps=6",
                                           "trainer.eval_every=3"]}}}},
            "early": {"after": ["stage1"], "start_when": {"run": "stage1.ae", "step": 3},
                      "runs": {"quick": {"recipe": "align", "overrides": ["trainer.max_steps=4", "trainer.eval_every=2"]}}}}})
    out = tmp_path / "out"
    res = run_cli(["plan", "run", str(f), "--jobs", "2", f"outputs={out}"], tmp_path, cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    st = _state(out, "trig")
    jobs = {j["step"]: j for j in st["jobs"].values()}
    ae, linked = Path(jobs["ae"]["dir"]), Path(jobs["align"]["dir"])
    # the trigger fired on the plateau: the source stopped early, at the third flat evaluation
    summary = json.loads((ae / "facts" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 9
    fired = st["triggers"]["stage1.align"]
    assert fired["status"] == "fired" and "no gain above 0 in 2 evaluations" in fired["fired"][0]["why"]
    info = json.loads((linked / "run.json").read_text())
    assert info["status"] == "completed" and info["recipe"] == "align"
    assert info["plan"]["trigger"] == "stage1.align" and info["plan"]["parent"] == str(ae)
    assert info["parents"][0]["path"] == str(ae / "checkpoints" / "best.pt")  # its encoder: the source's best
    # the early phase started on start_when, while stage1 was still running
    early, stage1 = st["phases"]["early"], st["phases"]["stage1"]
    assert early["why_started"].startswith("early start: stage1.ae reached step 3, before stage1 finished")
    assert early["started_at"] < stage1["finished_at"]
    assert jobs["quick"]["started_at"] < jobs["ae"]["finished_at"]  # the timeline: the bars overlap
    report = (out / "plans" / "trig" / "report")
    assert (report / "timeline.png").stat().st_size > 5_000
    md = (report / "report.md").read_text()
    assert "stage1.align: fired" in md and "early start" in md


def test_a_failed_gate_blocks_the_phases_after_it_and_says_why(tmp_path, cache_dir):
    f = _write(tmp_path, "gated", {
        "name": "gated", "overrides": ["data.n_train=256", *SMALL, "trainer.max_steps=4", "trainer.eval_every=2"],
        "phases": {
            "sanity": {"runs": {"overfit": {}}},
            "core": {"after": ["sanity"], "runs": {"main": {"overrides": ["head=linear"]}},
                     "gate": {"results": "sanity.overfit", "criteria": {"metric": "test/m2t_R@1", "bands": [
                         {"min": 0.99, "verdict": "learns", "next": "run the core phase"},
                         {"verdict": "broken", "next": "read the loss curve of the overfit run"}]}}},
            "statistics": {"after": ["core"], "statistics": {"results": ["core"]}}}})
    out = tmp_path / "out"
    res = run_cli(["plan", "run", str(f), f"outputs={out}"], tmp_path, cache_dir)
    assert res.returncode == 1, res.stderr[-2000:]
    st = _state(out, "gated")
    assert st["status"] == "blocked"
    core = st["phases"]["core"]
    assert core["status"] == "blocked" and core["gate"]["passed"] is False
    assert "broken" in core["why"] and "next: read the loss curve of the overfit run" in core["why"]
    assert st["phases"]["statistics"]["status"] == "blocked" and "core blocked" in st["phases"]["statistics"]["why"]
    assert [j["step"] for j in st["jobs"].values()] == ["overfit"]  # the gated phase trained nothing
    md = (out / "plans" / "gated" / "report" / "report.md").read_text()
    assert "closed: test/m2t_R@1" in md and "→ broken →" in md and "-> next: read the loss curve" in md
    status = run_cli(["plan", "status", str(out / "plans" / "gated")], tmp_path, cache_dir)
    assert status.returncode == 0 and "core           blocked" in status.stdout


def _kill_mid_plan_and_rerun(tmp_path: Path, cache_dir: Path, plan_arg: str, name: str, extra: list[str]) -> None:
    """SIGKILL the executor while a job of phase `core` trains (after its first checkpoint), run the
    plan again. Every job completed before the kill is reused (its run trained once), the
    interrupted ones resume, the resumed run equals an uninterrupted one bit for bit, and a third
    run trains nothing and writes the same report."""
    out = tmp_path / "out"
    args = ["plan", "run", plan_arg, "--jobs", "2", f"outputs={out}", *extra]
    env = dict(os.environ, MODALIGN_CACHE=str(cache_dir), PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "modalign", *args, "--quiet"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    plan_json = out / "plans" / name / "plan.json"
    deadline, done_before = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        try:
            st = json.loads(plan_json.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        running = [j for j in st["jobs"].values() if j["status"] == "running" and j["phase"] == "core"]
        if any((Path(j["dir"]) / "checkpoints" / "last.pt").exists() for j in running):
            done_before = {k for k, j in st["jobs"].items() if j["status"] == "completed"}
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert done_before, f"never saw a core job with a checkpoint: {proc.stderr.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL

    res = run_cli(args, tmp_path, cache_dir, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    st = json.loads(plan_json.read_text())
    assert st["status"] == "completed" and all(j["status"] == "completed" for j in st["jobs"].values())
    interrupted = []
    for jid, j in st["jobs"].items():
        run = Path(j["dir"])
        if jid in done_before:
            assert _starts(run) == 1, f"{j['dir']} trained again"
            assert j["launches"][-1]["mode"] == "reused"
        else:
            assert [x["mode"] for x in j["launches"]].count("started") == 1 or \
                not (run / "checkpoints").exists(), j["launches"]
        if [x["mode"] for x in j["launches"]][-2:] == ["started", "resumed"]:
            interrupted.append(j)
    assert interrupted, "the killed job should have resumed from its checkpoint"
    # the resumed job equals the same config trained without a kill
    j = interrupted[0]
    ref = run_cli(["train", "--quiet", *j["overrides"], f"outputs={tmp_path / 'ref'}"], tmp_path, cache_dir,
                  env_extra={"OMP_NUM_THREADS": str(st["threads_per_job"])})
    assert ref.returncode == 0, ref.stderr[-2000:]
    resumed = json.loads((Path(j["dir"]) / "facts" / "summary.json").read_text())["test"]
    uninterrupted = json.loads((Path(ref.stdout.strip()) / "facts" / "summary.json").read_text())["test"]
    assert resumed == uninterrupted
    report = out / "plans" / name / "report"
    first = (report / "summary.json").read_text()
    assert (report / "index.html").exists() and (report / "statistics" / "statistics" / "index.html").exists()
    assert any((report / "export").iterdir())
    # a third run: nothing to train, the same report
    again = run_cli(args, tmp_path, cache_dir)
    assert again.returncode == 0
    st3 = json.loads(plan_json.read_text())
    assert all(j["launches"][-1]["mode"] == "reused" for j in st3["jobs"].values())
    assert (report / "summary.json").read_text() == first
    status = run_cli(["plan", "status", str(out / "plans" / name)], tmp_path, cache_dir)
    assert status.returncode == 0 and "statistics     completed" in status.stdout


def test_a_plan_killed_with_sigkill_and_rerun_reuses_every_completed_job(tmp_path, cache_dir):
    """A small plan of the same shape as align_study (sanity -> core over seeds -> statistics)."""
    f = _write(tmp_path, "small", {
        "name": "small", "overrides": ["data.n_train=512", *SMALL, "trainer.max_steps=40", "trainer.eval_every=4"],
        "phases": {"sanity": {"runs": {"overfit": {"overrides": ["data.n_train=256"]}}},
                   "core": {"after": ["sanity"], "sweeps": {"heads": {"grid": {"head": ["linear", "mlp"]}}}},
                   "statistics": {"after": ["core"], "statistics": {"results": ["core"], "baseline": "head=linear"}}}})
    _kill_mid_plan_and_rerun(tmp_path, cache_dir, str(f), "small", [])


@pytest.mark.slow
def test_align_study_killed_with_sigkill_and_rerun_reuses_every_completed_job(tmp_path, cache_dir):
    """The shipped align_study at test size (13 jobs)."""
    _kill_mid_plan_and_rerun(tmp_path, cache_dir, "align_study", "align_study",
                             ["trainer.max_steps=40", "trainer.eval_every=4", *SMALL])


def test_a_plan_runs_its_jobs_through_submitit_with_the_sweeps_launcher_config(tmp_path, cache_dir):
    f = _write(tmp_path, "sub", {"name": "sub", "overrides": ["data.n_train=256", *SMALL, "trainer.max_steps=4",
                                                            "trainer.eval_every=2"],
                                 "phases": {"one": {"runs": {"r": {}}}}})
    out = tmp_path / "out"
    res = run_cli(["plan", "run", str(f), "hydra/launcher=submitit_local", f"outputs={out}"], tmp_path, cache_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    st = _state(out, "sub")
    (job,) = st["jobs"].values()
    assert job["status"] == "completed" and job["launches"][0]["where"].startswith("submitit_local job ")
    assert (out / "plans" / "sub" / ".submitit").is_dir()  # the job really went through submitit
    assert not any("hydra/launcher" in o for o in job["overrides"])  # the launcher is the executor's business
    assert json.loads((Path(job["dir"]) / "run.json").read_text())["plan"]["id"] == "sub"


@pytest.mark.slow
def test_fuse_study_runs_end_to_end_at_test_size(tmp_path, cache_dir, tiny_lm):
    """The shipped stage-3 plan with a tiny random LM and a few steps: every phase runs; the tiny LM's
    validation CIDEr-D stays flat, so the plateau trigger of the fused run starts SCST from it. The
    statistics wait on a gate that requires the fused run to use its modality and caption with
    distinct_preds >= 0.5: they run when its facts say so, and are blocked, naming why, when not."""
    out = tmp_path / "out"
    res = run_cli(["plan", "run", "fuse_study", f"outputs={out}", f"lm.path={tiny_lm}", "trainer.max_steps=8",
                   "trainer.eval_every=2", "data.n_val=16", "data.n_test=16", "eval.val_samples=4",
                   "decode.max_new_tokens=6", "eval.meteor=false"], tmp_path, cache_dir, timeout=1800)
    st = _state(out, "fuse_study")
    others = {p: s["status"] for p, s in st["phases"].items() if p != "statistics"}
    assert others == {p: "completed" for p in others}, res.stderr[-3000:]
    assert st["triggers"]["core.scst"]["status"] == "fired"
    scst = next(j for j in st["jobs"].values() if j["step"] == "scst")
    assert "loss=scst" in scst["overrides"] and scst["parent"].endswith(Path(scst["parent"]).name)
    fused = Path(next(j for j in st["jobs"].values() if j["step"] == "fused")["dir"])
    checks = {c["name"]: c["status"] for c in json.loads((fused / "run.json").read_text())["checks"]}
    distinct = json.loads((fused / "facts" / "summary.json").read_text())["test"]["distinct_preds"]
    meets = checks.get("modality_used") == "pass" and distinct >= 0.5
    gate = st["phases"]["statistics"]["gate"]
    assert gate["passed"] == meets, gate
    if meets:
        assert st["phases"]["statistics"]["status"] == "completed" and res.returncode == 0
        assert (out / "plans" / "fuse_study" / "report" / "statistics" / "statistics" / "index.html").exists()
    else:
        assert st["phases"]["statistics"]["status"] == "blocked" and "requires" in st["phases"]["statistics"]["why"]
