"""Health checks (modalign.analysis.checks): recorded in run.json, run.log and card.md when a run
ends, shown by `modalign runs`, evaluated again by `modalign check RUN`; a loss that does not fall
and a frozen component that should train are caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY, run_cli
from modalign.analysis.checks import evaluate, validate, verdict
from modalign.errors import UserError


def _checks(run: Path) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads((run / "run.json").read_text())["checks"]}


def test_a_healthy_run_records_its_checks_in_run_json_run_log_and_card(tiny_run, tmp_path, cache_dir):
    checks = _checks(tiny_run)
    assert set(checks) == {"trainable_components", "loss_falls", "gradients_flow", "temperature_free",
                           "no_nonfinite_steps"}
    assert all(c["status"] == "pass" for c in checks.values()), checks
    assert checks["loss_falls"]["value"] >= 0.05 and set(checks["gradients_flow"]["value"]) >= {"encoder", "heads"}
    assert "check during loss_falls" in (tiny_run / "run.log").read_text()
    assert "## Checks" in (tiny_run / "card.md").read_text()
    p = run_cli(["check", str(tiny_run)], tmp_path, cache_dir)
    assert p.returncode == 0 and "checks of" in p.stdout and "pass" in p.stdout, p.stderr
    # other thresholds: the same run fails a stricter loss check, and exit status 1 says so
    p = run_cli(["check", str(tiny_run), "checks.loss_falls.min_drop=0.99"], tmp_path, cache_dir)
    assert p.returncode == 1 and "fail" in p.stdout, p.stdout
    for bad, fragment in ((["checks.loss_falls.min_drop=abc"], "must be a number >= 0"),
                          (["checks.nope.x=1"], "unknown check 'checks.nope'"),
                          (["loss_falls=1"], "expected checks.KEY.NAME=VALUE")):
        p = run_cli(["check", str(tiny_run), *bad], tmp_path, cache_dir)
        assert p.returncode == 2 and fragment in p.stderr and p.stderr.count("\n") == 1, p.stderr
    p = run_cli(["check", str(tmp_path)], tmp_path, cache_dir)
    assert p.returncode == 2 and "not a run directory" in p.stderr
    # a check reads files only: no torch, no text encoder (it runs where reports run)
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom modalign.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    rc = main(['check', {str(tiny_run)!r}])\n"
            "print(rc, [m for m in ('torch', 'sentence_transformers') if m in sys.modules])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "0 []", (p.stdout, p.stderr)


def test_a_loss_that_does_not_fall_fails_its_check_everywhere(tmp_path, cache_dir):
    """Every learning rate 0: the run completes, and its loss check fails in run.json, card.md,
    `modalign runs` and `modalign check`."""
    zero = ["trainer.optim.encoder.lr=0", "trainer.optim.heads.lr=0", "trainer.optim.logit_scale.lr=0"]
    p = run_cli(["train", "--quiet", *TINY, *zero], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    run = tmp_path / p.stdout.strip().splitlines()[-1]
    checks = _checks(run)
    assert checks["loss_falls"]["status"] == "fail" and abs(checks["loss_falls"]["value"]) < 0.05, checks["loss_falls"]
    assert "the loss does not fall" in checks["loss_falls"]["message"]
    assert checks["trainable_components"]["status"] == "pass"  # lr 0 on purpose is not a frozen component
    assert "1 failed: loss_falls" in (run / "card.md").read_text()
    # while training it was a warning at the end of the check's window (half of the 12 steps)
    assert "check during loss_falls FAIL at step 6" in (run / "run.log").read_text()
    p = run_cli(["runs", str(tmp_path / "outputs")], tmp_path, cache_dir)
    assert p.returncode == 0 and "1 FAIL" in p.stdout, p.stdout
    assert run_cli(["check", str(run)], tmp_path, cache_dir).returncode == 1


def test_checks_on_fail_stop_stops_the_run_at_the_failed_check(tmp_path, cache_dir):
    zero = ["trainer.optim.encoder.lr=0", "trainer.optim.heads.lr=0", "trainer.optim.logit_scale.lr=0"]
    p = run_cli(["train", "--quiet", *TINY, *zero, "checks.on_fail=stop"], tmp_path, cache_dir)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1 and "check loss_falls failed at step 6" in lines[0], p.stderr
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "loss_falls" in info["error"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6  # stopped there, not at max_steps (12)
    p = run_cli(["train", "--quiet", *TINY, "checks.on_fail=maybe"], tmp_path, cache_dir)
    assert p.returncode == 2 and "'checks.on_fail'='maybe' must be one of warn, stop" in p.stderr, p.stderr


def test_a_frozen_component_that_should_train_fails_before_and_during(tmp_path, cache_dir):
    """A head whose parameters were left frozen (requires_grad False) while trainer.optim.heads.lr
    is 1e-3: trainable_components and gradients_flow fail, naming the head."""
    from modalign.recipes.align import AlignRecipe
    from modalign.recipes.launch import new_run

    cfg, writer = new_run([f"outputs={tmp_path / 'outputs'}", *TINY], "align")
    recipe = AlignRecipe(cfg, writer, progress=False)
    recipe.setup()
    for p in recipe.model.components()["heads"]:
        p.requires_grad_(False)  # the bug a check must catch: the projection heads left frozen
    recipe.setup_training()
    fit = recipe.fit()
    recipe.write_facts(fit, recipe.test(), wall=1.0)
    checks = _checks(writer.path)
    assert checks["trainable_components"]["status"] == "fail", checks["trainable_components"]
    assert "component 'heads' has no trainable parameters, but trainer.optim.heads.lr=0.001" in \
        checks["trainable_components"]["message"]
    assert checks["gradients_flow"]["status"] == "fail" and "heads" in checks["gradients_flow"]["message"]
    card = (writer.path / "card.md").read_text()
    failed = card.split("## Checks", 1)[1].splitlines()[0]
    assert "failed" in failed and "trainable_components" in failed and "gradients_flow" in failed, failed


def _rows(name: str, values: list[float], start: int = 1) -> list[dict]:
    return [{"step": start + i, "split": "train", "name": name, "value": v} for i, v in enumerate(values)]


def test_temperature_pinned_at_its_clamp_warns_and_a_baseline_is_beaten_in_the_metrics_direction():
    info = {"params": {"trainable_by_component": {"encoder": 10}, "by_component": {"encoder": 10}},
            "eval": {"split": "test"}}
    cfg = {"trainer": {"max_steps": 10, "optim": {"encoder": {"lr": 1e-3}}}, "loss": {"max_logit_scale": 100.0}}
    rows = _rows("loss", [4.0, 3.0, 2.0, 1.5]) + _rows("grad_norm/encoder", [1.0, 0.5, 0.2, 0.1]) + \
        _rows("temperature", [0.05, 0.0101, 0.01, 0.01])
    got = {c["name"]: c for c in evaluate(info, cfg, rows, None)}
    assert got["temperature_free"]["status"] == "warn" and got["loss_falls"]["status"] == "pass"
    for metric, value, status in (("m2t_R@1", 0.30, "pass"), ("m2t_R@1", 0.50, "fail"),
                                  ("m2t_median_rank", 5.0, "pass"), ("m2t_median_rank", 2.0, "fail")):
        cfg["checks"] = {"baseline": {"metric": metric, "value": value}}
        summary = {"test": {"m2t_R@1": 0.40, "m2t_median_rank": 3.0}}
        checks = evaluate(info, cfg, rows, summary)
        base = next(c for c in checks if c["name"] == "beats_baseline")
        assert base["status"] == status and verdict(checks) == ("fail" if status == "fail" else "warn"), (metric, value)
    with pytest.raises(UserError, match="needs a metric and a value or a run"):
        validate({"baseline": {"metric": "m2t_R@1", "value": None}})


def test_the_report_flags_a_run_that_failed_a_check(tiny_run, tmp_path, cache_dir):
    """A report over a healthy run and one whose loss did not fall: the runs table has a checks
    column, the failed run is named in a warning, and summary.json carries each run's checks."""
    import shutil

    root = tmp_path / "runs"
    root.mkdir()
    good = root / tiny_run.name
    shutil.copytree(tiny_run, good)
    bad = root / (tiny_run.name + "_flat")
    shutil.copytree(tiny_run, bad)
    info = json.loads((bad / "run.json").read_text())
    for c in info["checks"]:
        if c["name"] == "loss_falls":
            c.update(status="fail", message="loss 4.2 -> 4.2 (+0.0%); the loss does not fall")
    (bad / "run.json").write_text(json.dumps(info))
    p = run_cli(["report", str(root), "--out", str(tmp_path / "report"), "--quiet"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in md.split("## Runs", 1)[1].splitlines() if line.startswith("| run"))
    assert "| status | checks |" in header, header
    assert "1 FAIL: loss_falls" in md and "1 of 2 runs failed a health check" in md and bad.name in md
    html = (tmp_path / "report" / "index.html").read_text()
    assert "1 FAIL: loss_falls" in html
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert {r["path"].rsplit("/", 1)[-1]: any(c["status"] == "fail" for c in r["checks"]) for r in summary["runs"]} == \
        {good.name: False, bad.name: True}


def _val(name: str, values: list[float]) -> list[dict]:
    return [{"step": 10 * (i + 1), "split": "val", "name": name, "value": v} for i, v in enumerate(values)]


def test_stage3_checks_gates_that_never_move_a_soft_token_scale_off_and_generic_captions():
    info = {"params": {"trainable_by_component": {"adapter": 10, "projector": 10},
                       "by_component": {"adapter": 10, "projector": 10}}, "eval": {"split": "test"}}
    cfg = {"trainer": {"max_steps": 40, "optim": {"adapter": {"lr": 5e-4}, "projector": {"lr": 1e-3}}}}
    train = _rows("loss", [4.0, 3.0, 2.0]) + _rows("grad_norm/adapter", [1.0, 0.5, 0.2]) + \
        _rows("grad_norm/projector", [1.0, 0.5, 0.2])
    stuck = _val("gate/alpha_8", [0.3, 0.3, 0.3]) + _val("gate/alpha_16", [0.3, 0.3, 0.30001])
    moving = _val("gate/alpha_8", [0.3, 0.31, 0.35])
    caps = ["the person cooks in the kitchen", "the person sleeps in the bedroom", "the person cooks dinner"]

    def run(val, ratio, preds, **over):
        c = {**cfg, "checks": over} if over else cfg
        return {x["name"]: x for x in evaluate(info, c, train + val + _val("soft_norm_ratio", ratio), None, preds)}

    got = run(stuck, [1.1, 0.9], ["the person is at home"] * 3)
    assert got["gates_move"]["status"] == "fail" and "no gate moved by 0.0001" in got["gates_move"]["message"]
    assert got["norm_ratio"]["status"] == "pass" and got["norm_ratio"]["value"] == 0.9
    assert got["generic_captions"]["status"] == "fail" and "1 different captions of 3" in got["generic_captions"]["message"]
    got = run(moving, [1.0, 6.0], caps)
    assert got["gates_move"]["status"] == "pass" and got["gates_move"]["value"] == pytest.approx(0.05)
    assert got["norm_ratio"]["status"] == "fail" and "outside [0.25, 4]" in got["norm_ratio"]["message"]
    assert got["generic_captions"]["status"] == "pass"
    # thresholds are the run's: a stricter distinct-2 turns the same captions generic
    got = run(moving, [1.0], caps, generic_captions={"min_distinct": 0.9}, norm_ratio={"high": 8.0})
    assert got["generic_captions"]["status"] == "fail" and got["norm_ratio"]["status"] == "pass"
    # a recipe without gates or soft tokens (align) has neither check; adapters kept fixed (lr 0) neither
    plain = {x["name"] for x in evaluate(info, cfg, train, None)}
    assert not plain & {"gates_move", "norm_ratio", "generic_captions"}
    floor = {x["name"] for x in evaluate(info, {**cfg, "fusion": {"kind": "none"}}, train + _val("soft_norm_ratio", [0.0]),
                                         None, ["the person is at home"] * 3)}
    assert not floor & {"norm_ratio", "generic_captions"}  # fusion=none has no soft tokens, and generic captions by design
    frozen = {**cfg, "trainer": {**cfg["trainer"], "optim": {"adapter": {"lr": 0}, "projector": {"lr": 1e-3}}}}
    assert "gates_move" not in {x["name"] for x in evaluate(info, frozen, train + stuck, None)}


def test_a_baseline_run_gives_its_metric_and_a_config_diff(tiny_run, tmp_path, cache_dir):
    import yaml

    info = json.loads((tiny_run / "run.json").read_text())
    cfg = yaml.safe_load((tiny_run / "cfg.yaml").read_text())
    mine = {**cfg, "trainer": {**cfg["trainer"], "max_steps": cfg["trainer"]["max_steps"] + 5},
            "checks": {"baseline": {"metric": "m2t_R@1", "run": str(tiny_run)}}}
    theirs = json.loads((tiny_run / "facts" / "summary.json").read_text())["test"]["m2t_R@1"]
    got = {c["name"]: c for c in evaluate(info, mine, [], {"test": {"m2t_R@1": theirs + 0.1}})}
    assert got["config_vs_baseline"]["phase"] == "before"
    assert "1 keys differ from the baseline run" in got["config_vs_baseline"]["message"]
    assert got["config_vs_baseline"]["value"] == {"trainer.max_steps": [cfg["trainer"]["max_steps"],
                                                                         cfg["trainer"]["max_steps"] + 5]}
    assert got["beats_baseline"]["status"] == "pass" and got["beats_baseline"]["threshold"] == theirs
    # the same comparison from the command line, between the run and overrides of another config
    p = run_cli(["diff-config", str(tiny_run), str(tiny_run)], tmp_path, cache_dir)
    assert p.returncode == 0 and "same configuration" in p.stdout, p.stderr
    p = run_cli(["diff-config", "head=linear", "head=mlp trainer.max_steps=300"], tmp_path, cache_dir)
    assert p.returncode == 1 and "head.kind" in p.stdout and "trainer.max_steps" in p.stdout and "300" in p.stdout
    p = run_cli(["diff-config", str(tmp_path / "nope"), "x"], tmp_path, cache_dir)
    assert p.returncode == 2 and "not overrides (KEY=VALUE" in p.stderr and "Traceback" not in p.stderr


def test_modality_used_fails_a_run_whose_captions_do_not_need_their_modality():
    info = {"params": {"trainable_by_component": {"projector": 10}, "by_component": {"projector": 10}},
            "eval": {"split": "test"}}
    cfg = {"trainer": {"max_steps": 40, "optim": {"projector": {"lr": 1e-3}}}}
    train = _rows("loss", [4.0, 3.0, 2.0]) + _rows("grad_norm/projector", [1.0, 0.5, 0.2])

    def used(gap, c=cfg):
        got = {x["name"]: x for x in evaluate(info, c, train, {"split": "test", "test": {"reliance_gap": gap}})}
        return got.get("modality_used")

    assert used(0.31)["status"] == "pass" and used(0.31)["value"] == 0.31
    low = used(0.004)
    assert low["status"] == "fail" and "ignores the modality" in low["message"] and low["threshold"] == 0.02
    assert used(0.004, {**cfg, "checks": {"modality_used": {"min_gap": 0.001}}})["status"] == "pass"
    assert used(0.0, {**cfg, "fusion": {"kind": "none"}}) is None  # the floor has no modality input by design
    assert {x["name"] for x in evaluate(info, cfg, train, {"split": "test", "test": {"cider_d": 50.0}})} \
        .isdisjoint({"modality_used"})  # a run from before the reliance gap: nothing to judge


def test_metric_stable_warns_when_the_validation_metric_collapses_after_its_best_point():
    """The shape of a gated run that decayed into fragments: val CIDEr-D 251 -> 139 -> 0."""
    info = {"params": {"trainable_by_component": {"projector": 10}, "by_component": {"projector": 10}},
            "eval": {"split": "test"}}
    cfg = {"trainer": {"max_steps": 300, "monitor": "val/cider_d", "monitor_mode": "max",
                       "optim": {"projector": {"lr": 1e-3}}}}
    train = _rows("loss", [4.0, 3.0, 2.0]) + _rows("grad_norm/projector", [1.0, 0.5, 0.2])
    summary = {"split": "test", "test": {"cider_d": 251.0}}

    def stable(values, c=cfg):
        got = {x["name"]: x for x in evaluate(info, c, train + _val("cider_d", values), summary)}
        return got.get("metric_stable")

    collapsed = stable([251.0, 139.0, 0.0])  # the last two average 69.5: 28% of the best
    assert collapsed["status"] == "warn" and collapsed["value"] == pytest.approx(0.2769, abs=1e-4)
    assert collapsed["threshold"] == 0.5 and "best 251 at step 10" in collapsed["message"]
    assert "collapsed" in collapsed["message"]
    assert stable([100.0, 180.0, 170.0])["status"] == "pass"  # a dip after the best is not a collapse
    assert stable([100.0, 180.0, 40.0, 150.0])["status"] == "pass"  # nor is one noisy evaluation
    assert stable([100.0, 180.0]) is None  # two evaluations: too few to judge
    assert stable([251.0, 139.0, 0.0], {**cfg, "checks": {"metric_stable": {"max_drop": 1.0}}})["status"] == "pass"
    loss = {**cfg, "trainer": {**cfg["trainer"], "monitor": "val/xe", "monitor_mode": "min"}}
    got = {x["name"]: x for x in evaluate(info, loss, train + _val("xe", [2.0, 1.0, 1.8, 1.8]), summary)}
    assert got["metric_stable"]["status"] == "warn" and got["metric_stable"]["threshold"] == 1.5  # 80% above its best


def test_generic_captions_judges_distinct_n_against_the_references_of_the_same_samples():
    """Long templated captions have a low corpus distinct-2 whatever the model: 48 different captions
    for 120 samples, built from a few phrases, are not generic when their references are as
    repetitive; two captions for 120 samples are."""
    info = {"params": {"trainable_by_component": {"projector": 10}, "by_component": {"projector": 10}},
            "eval": {"split": "test"}}
    cfg = {"trainer": {"max_steps": 40, "optim": {"projector": {"lr": 1e-3}}}}
    who, what, when = ["a resident", "someone", "the occupant"], ["sleeps in the bedroom", "cooks in the kitchen",
                                                                  "showers in the bathroom", "watches tv"], \
        ["in the morning", "at night", "in the afternoon", "late at night"]
    refs = [f"{who[i % 3]} {what[i % 4]} {when[i // 12 % 4]} for a long while" for i in range(120)]
    preds = [f"{who[(i + 1) % 3]} {what[i % 4]} {when[i // 12 % 4]} for a long time" for i in range(120)]
    rows = [{"prediction": p, "references": [r]} for p, r in zip(preds, refs)]

    def generic(predictions):
        return {x["name"]: x for x in evaluate(info, cfg, [], None, predictions)}["generic_captions"]

    absolute = generic(preds)  # without references: the absolute threshold calls them generic
    assert absolute["status"] == "fail" and absolute["threshold"] == 0.1
    relative = generic(rows)
    assert relative["status"] == "pass" and relative["threshold"] == 0.5 and relative["value"] > 0.8
    assert "of the references'" in relative["message"]
    two = [{"prediction": preds[i % 2], "references": [r]} for i, r in enumerate(refs)]
    assert generic(two)["status"] == "fail" and "2 different captions of 120" in generic(two)["message"]
