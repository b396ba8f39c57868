"""`modalign sweep experiment=NAME [overrides]`: a Hydra multirun, one run directory per job.

    outputs/experiments/exp_<YYYYmmdd-HHMMSS>_<name>/
        sweep.yaml       the experiment, the grid, each job's overrides and final status
        0/ 1/ ...        one run directory per job (the run-directory contract)

The grid is Hydra's: `hydra.sweeper.params` of the experiment config plus comma lists on the
command line (`seed=0,1,2`), expanded as a cartesian product by Hydra's basic sweeper; jobs go to
whichever launcher is configured (basic = sequential in this process, `hydra/launcher=joblib`,
`env=slurm` = submitit). A job never raises into Hydra: it records its own failure in its run.json,
so one failing job does not stop the others. `resume=SWEEP_DIR` runs the same sweep again in the
same directory, skipping every job whose run is completed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from modalign.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"


def experiment_file(overrides: list[str]) -> Path | None:
    for o in overrides:
        if o.startswith("experiment="):
            name = o.split("=", 1)[1]
            path = CONF / "experiment" / f"{name}.yaml"
            if not path.exists():
                options = ", ".join(sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
                raise UserError(f"config: no experiment '{name}' (available: {options})")
            return path
    return None


STAGE1_KEYS = ("bottleneck", "globals_beta", "decoder.", "globals_head.")


def experiment_recipe(overrides: list[str]) -> str:
    """The recipe a sweep runs: `recipe=NAME` on the command line, else the experiment's `recipe:`
    key, else autoencode when the overrides name a stage-1 setting (bottleneck=..., globals_beta=...),
    else align."""
    import yaml

    for o in overrides:
        if o.startswith("recipe="):
            return o.split("=", 1)[1]
    path = experiment_file(overrides)
    if path is not None:
        return (yaml.safe_load(path.read_text()) or {}).get("recipe", "align")
    if any(o.split("=", 1)[0].startswith(STAGE1_KEYS) for o in overrides):
        return "autoencode"
    return "align"


def sweep_overrides(overrides: list[str], where: str = "the overrides") -> dict[str, list[str]]:
    """{key: values} of the sweep overrides among `overrides`, parsed as Hydra parses them: comma
    lists (a=1,2, with quoted commas kept: a="x,y",z), range(), choice(), glob(). interval() is a
    continuous range an optimizing sweeper samples; a grid cannot enumerate it, so it is refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # OverrideParseException
        raise UserError(f"cannot parse {where} {' '.join(overrides)!r}: {str(e).splitlines()[0]}") from None
    grid = {}
    for o in parsed:
        if not o.is_sweep_override():
            continue
        if o.is_interval_sweep():
            raise UserError(f"{where}: '{o.input_line}' is an interval, which a grid cannot enumerate; "
                            "list the values (a=0.1,0.3), or use range(start,stop,step)")
        grid[o.get_key_element()] = list(o.sweep_string_iterator())
    return grid


def first_job(overrides: list[str], grid: dict[str, list[str]]) -> list[str]:
    """The overrides of the grid's first job: each sweep replaced by its first value."""
    out = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in grid]
    return out + [f"{k}={v[0]}" for k, v in grid.items()]


def plan(overrides: list[str]) -> dict:
    """Compose the experiment, check the first job's config, and return the sweep's plan:
    recipe, name, metric, mode, grid (config params + command-line sweeps)."""
    from omegaconf import OmegaConf

    from modalign.recipes.config import compose, to_container
    from modalign.recipes.launch import check_resolved, root_config

    recipe = experiment_recipe(overrides)
    cli_grid = sweep_overrides(overrides)
    fixed = [o for o in overrides if o.split("=", 1)[0] not in cli_grid]
    cfg = compose(fixed, root_config(recipe), return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}
    where = f"experiment {experiment_file(overrides) or 'config'}: hydra.sweeper.params"
    lines = [f"{k}={v}" for k, v in (params or {}).items()]
    grid = sweep_overrides(lines, where)
    grid.update({k: [str(v)] for k, v in (params or {}).items() if k not in grid})  # a single value
    grid.update(cli_grid)
    job0 = first_job(fixed, grid)
    resolved = to_container(compose(job0, root_config(recipe)), "")
    check_resolved(resolved, job0, recipe)
    if resolved.get("criteria") is not None:  # bad criteria fail now, not after the last job
        from modalign.analysis.criteria import parse_criteria

        parse_criteria(resolved["criteria"], f"experiment {experiment_file(overrides) or 'config'}")
    meta = resolved.get("sweep") or {}
    name = meta.get("name") or (Path(experiment_file(overrides)).stem if experiment_file(overrides) else "sweep")
    n = 1
    for values in grid.values():
        n *= len(values)
    from modalign.analysis.metrics import default_metric, mode

    metric = meta.get("metric", default_metric(recipe))
    return {"recipe": recipe, "name": name, "metric": metric,
            "mode": meta.get("mode", mode(metric)), "grid": grid, "n_jobs": n, "outputs": resolved["outputs"]}


def new_sweep_dir(outputs: str, name: str) -> Path:
    from datetime import datetime

    from modalign.runs.rundir import fresh_dir, slug

    try:
        return fresh_dir(Path(outputs) / "experiments", f"exp_{datetime.now().strftime('%Y%m%d-%H%M%S')}_{slug(name)}")
    except OSError as e:
        raise UserError(f"outputs={outputs}: cannot create a sweep directory there ({e.strerror})") from None


def write_sweep_yaml(sweep_dir: Path, info: dict) -> None:
    import yaml

    from modalign.runs.rundir import atomic_write_text

    atomic_write_text(sweep_dir / "sweep.yaml", yaml.safe_dump(info, sort_keys=False, allow_unicode=True))


def collect_jobs(sweep_dir: Path) -> list[dict]:
    """Each job's number, overrides, status and error, read back from its run directory."""
    import json

    import yaml

    jobs = []
    for d in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        try:
            info = json.loads((d / "run.json").read_text())
        except (OSError, ValueError):
            info = {"status": "missing", "error": "the job left no run.json"}
        try:
            overrides = yaml.safe_load((d / "overrides.yaml").read_text())
        except (OSError, yaml.YAMLError):
            overrides = None
        jobs.append({"num": int(d.name), "dir": d.name, "overrides": overrides, "status": info.get("status"),
                     "error": info.get("error")})
    return jobs


def run_sweep(overrides: list[str], quiet: bool = False) -> tuple[int, Path]:
    """Plan, launch the multirun, record sweep.yaml. -> (exit code, sweep dir)."""
    import yaml

    from modalign.recipes.launch import split_resume
    from modalign.runs.rundir import now_iso

    resume, overrides = split_resume(overrides)
    if resume is not None:
        sweep_dir = Path(resume)
        try:
            previous = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
        except (OSError, yaml.YAMLError):
            raise UserError(f"resume={resume}: not a sweep directory (no readable sweep.yaml)") from None
        if overrides and overrides != previous["command_overrides"]:
            raise UserError(f"resume={resume}: the overrides differ from the sweep's own "
                            f"({' '.join(previous['command_overrides'])}); give none or the same")
        overrides = previous["command_overrides"]
    the_plan = plan(overrides)
    if resume is None:
        sweep_dir = new_sweep_dir(the_plan["outputs"], the_plan["name"])
    exp_file = experiment_file(overrides)
    info = {"name": the_plan["name"], "recipe": the_plan["recipe"], "experiment": _experiment_name(overrides),
            "experiment_config": yaml.safe_load(exp_file.read_text()) if exp_file else None,
            "metric": the_plan["metric"], "mode": the_plan["mode"], "grid": the_plan["grid"],
            "n_jobs": the_plan["n_jobs"], "command_overrides": list(overrides), "status": "running",
            "created_at": now_iso(), "finished_at": None, "jobs": []}
    if resume is not None:
        info["created_at"] = previous.get("created_at")
        info["resumed_at"] = now_iso()
    write_sweep_yaml(sweep_dir, info)
    if not quiet:
        print(f"sweep {sweep_dir}: {the_plan['n_jobs']} jobs of {the_plan['recipe']} "
              f"({', '.join(f'{k} in {v}' for k, v in the_plan['grid'].items()) or 'no grid'})", file=sys.stderr)
    _multirun(the_plan["recipe"], sweep_dir, overrides, quiet)
    jobs = collect_jobs(sweep_dir)
    info.update(jobs=jobs, finished_at=now_iso(),
                status="completed" if jobs and all(j["status"] == "completed" for j in jobs) else "incomplete")
    write_sweep_yaml(sweep_dir, info)
    write_sweep_report(sweep_dir, quiet)
    return (0 if info["status"] == "completed" else 1), sweep_dir


def write_sweep_report(sweep_dir: Path, quiet: bool) -> Path | None:
    """SWEEP/report/: tables, plots, verdicts (see `modalign.report.build`). A sweep whose every job
    failed before it started has nothing to report; the sweep's own table says why."""
    from modalign.report.build import collect, write_report

    try:
        rep = collect([sweep_dir])
    except UserError as e:  # said even with --quiet: a sweep without its report is worth a line
        print(f"sweep {sweep_dir}: no report ({e})", file=sys.stderr)
        return None
    return write_report(rep, sweep_dir / "report")


def _experiment_name(overrides: list[str]) -> str | None:
    for o in overrides:
        if o.startswith("experiment="):
            return o.split("=", 1)[1]
    return None


def _multirun(recipe: str, sweep_dir: Path, overrides: list[str], quiet: bool) -> None:
    import hydra

    from modalign.recipes.config import plugin_searchpath
    from modalign.recipes.launch import root_config

    argv = ["modalign-sweep", "--multirun", f"hydra.sweep.dir={sweep_dir.resolve()}",
            "hydra.sweep.subdir=${hydra.job.num}", "hydra.output_subdir=null",
            "hydra/job_logging=none", "hydra/hydra_logging=none", f"+modalign_quiet={str(quiet).lower()}",
            *plugin_searchpath(), *overrides]
    app = hydra.main(config_path="pkg://modalign.conf", config_name=root_config(recipe), version_base="1.3")(sweep_job)
    saved = sys.argv
    sys.argv = argv
    try:
        app()
    except SystemExit as e:  # Hydra reports its own errors (e.g. a bad override) and exits
        if e.code not in (0, None):
            raise UserError(f"sweep: Hydra stopped the multirun (exit {e.code}); see the message above") from None
    finally:
        sys.argv = saved


def sweep_job(cfg) -> float | None:
    """One job of the multirun, in its own run directory. Never raises: a failure is recorded in
    the job's run.json (status failed, error line) and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from modalign.recipes.config import to_container

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    overrides = [o for o in hc.overrides.task if not o.startswith("+modalign_quiet=")]
    quiet = bool(cfg.get("modalign_quiet", False))
    with open_dict(cfg):
        cfg.pop("modalign_quiet", None)
    recipe = str(cfg.get("recipe", "align"))
    run_job(out, recipe, overrides, quiet, lambda: to_container(cfg, ""))
    return _metric(out, cfg)


def run_job(out: Path, recipe: str, overrides: list[str], quiet: bool, resolve, info: dict | None = None,
            resume_overrides: list[str] | None = None) -> str:
    """One job in its own run directory `out` (a sweep's or a plan's): a completed run is kept as it
    is, an interrupted one with a checkpoint is resumed, anything else starts again. `resolve()`
    gives the job's resolved config; `info` is merged into run.json (a plan's {plan: ...}). Never
    raises: a failure is recorded in the job's run.json (status failed, error line).
    -> "reused" | "resumed" | "started"."""
    import json
    import shutil

    from modalign.recipes.launch import check_resolved, execute, resume_run, start_run

    previous = None
    if (out / "run.json").exists():
        try:
            previous = json.loads((out / "run.json").read_text())
        except ValueError:
            previous = None
    if previous is not None and previous.get("status") == "completed":
        return "reused"  # resume: a completed job is not run again
    mode = "started"
    try:
        if previous is not None and (out / "checkpoints" / "last.pt").exists():
            mode = "resumed"
            run_cfg, writer = resume_run(str(out), list(resume_overrides or []))
        else:
            if out.exists():
                shutil.rmtree(out)  # a job that failed before its first checkpoint starts again
            resolved = check_resolved(resolve(), overrides, recipe)
            run_cfg, writer = start_run(resolved, overrides, recipe, path=out)
        if info:
            writer.update(**info)
        execute(run_cfg, writer, quiet, keep_failed=True)
    except UserError as e:
        _record_failure(out, overrides, recipe, str(e))
    except Exception as e:  # noqa: BLE001 — a bug in one job must not stop the sweep
        _record_failure(out, overrides, recipe, f"{type(e).__name__}: {e}")
    return mode


def _record_failure(out: Path, overrides: list[str], recipe: str, error: str) -> None:
    from modalign.runs.rundir import now_iso
    from modalign.runs.writer import RunWriter

    out.mkdir(parents=True, exist_ok=True)
    writer = RunWriter(out)
    if writer.run.run_json.exists():
        try:
            writer.set_status("failed", error)
            return
        except (OSError, ValueError):
            pass
    import yaml

    writer.record_failure(yaml.safe_dump(list(overrides)),
                          {"id": out.name, "recipe": recipe, "status": "failed", "error": error,
                           "created_at": now_iso(), "finished_at": now_iso()})


def _metric(out: Path, cfg) -> float | None:
    import json

    try:
        summary = json.loads((out / "facts" / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    metric = str((cfg.get("sweep") or {}).get("metric", "test/m2t_R@1"))
    split, _, name = metric.partition("/")
    return summary.get(split, {}).get(name)
