"""Starting, resuming and executing runs: the lifecycle every face shares (`modalign train`,
`modalign demo`, each job of `modalign sweep`). It keeps run.json's status honest: `completed` only
after every fact is on disk, `failed` with the error line, `interrupted` on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from modalign.errors import UserError

RECIPES = {"align": "modalign.recipes.align:AlignRecipe", "autoencode": "modalign.recipes.autoencode:AutoencodeRecipe",
           "fuse": "modalign.recipes.fuse:FuseRecipe"}
SECTIONS = {"align": ("head", "loss", "text"), "autoencode": (), "fuse": ("fusion", "loss", "lm", "projector", "decode")}


def recipe_class(name: str):
    import importlib

    if name not in RECIPES:
        raise UserError(f"config: unknown recipe '{name}' (expected one of {', '.join(RECIPES)})")
    module, cls = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def watcher(cfg, writer):
    """The health checks watched while the run trains (modalign.runs.watch), a sink beside its writer."""
    from modalign.recipes.config import to_container
    from modalign.runs.watch import ChecksWatcher

    return ChecksWatcher(to_container(cfg, ""), writer.run.info)


def single_process_trainer(recipe, name: str, describe: dict, evaluate):
    """The optimizer, schedule, sampler, resume payload and Trainer of a single-process recipe
    (autoencode, fuse), reporting to its run writer. `recipe` has cfg, writer, model, objective,
    tensors, seed, trainer_cfg, optim_cfg, device, show_progress. -> (sampler, resume or None, trainer)."""
    from modalign.data.batches import EpochSampler
    from modalign.train.loop import Trainer
    from modalign.train.optim import build_optimizer, build_scheduler
    from modalign.train.progress import TrainProgress

    t = recipe.trainer_cfg
    opt = build_optimizer(recipe.model.components(), recipe.optim_cfg)
    sched = build_scheduler(opt, recipe.optim_cfg, t.max_steps)
    sampler = EpochSampler(recipe.tensors["train"], t.batch_size, recipe.seed, t.accumulate,
                           bucket=t.bucket_by_length)
    resume = recipe.writer.load_checkpoint("last.pt") if recipe.cfg.resume is not None else None
    keep = int(resume["step"]) if resume is not None else (0 if recipe.cfg.resume is not None else None)
    recipe.writer.open_metrics(keep_until_step=keep)  # a resumed run keeps its points up to last.pt
    progress = TrainProgress(f"{name} {recipe.writer.path.name[:36]}", t.monitor.removeprefix("val/")) \
        if recipe.show_progress else None
    trainer = Trainer(recipe.model, recipe.objective, opt, sched, sampler, evaluate, t,
                      [recipe.writer, watcher(recipe.cfg, recipe.writer)], describe=describe, progress=progress,
                      device=recipe.device)
    return sampler, resume, trainer


def split_resume(overrides: list[str]) -> tuple[str | None, list[str]]:
    resume, rest = None, []
    for o in overrides:
        if o.startswith("resume="):
            resume = o.split("=", 1)[1] or None
            if resume in ("null", "None"):
                resume = None
        else:
            rest.append(o)
    return resume, rest


def root_config(recipe: str) -> str:
    """The root config of a recipe: conf/align.yaml or conf/autoencode.yaml."""
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe '{recipe}' (expected one of {', '.join(RECIPES)})")
    return recipe


def check_resolved(resolved: dict, overrides: list[str], recipe: str) -> dict:
    """Checks every run's resolved config gets before a run dir exists; makes data paths absolute."""
    from modalign.recipes.config import compose, to_container

    known = set(to_container(compose([], root_config(recipe)), "", throw_on_missing=False)) \
        if any(o.startswith("+") for o in overrides) else set(resolved)
    extra = sorted(set(resolved) - known - {"logger"})  # logger: an optional group, absent by default
    if extra:
        raise UserError(f"config: unknown key '{extra[0]}'")
    sections = ["data", "encoder", "trainer", "eval", "env", *SECTIONS.get(recipe, ())]
    for key in sections:  # a section set to a scalar or deleted (eval=5, ~trainer) fails here, not mid-run
        if not isinstance(resolved.get(key), dict):
            raise UserError(f"config: '{key}' must be a config section (a mapping), got {resolved.get(key)!r}")
    optim = resolved["trainer"].get("optim")
    if not isinstance(optim, dict) or not all(isinstance(v, dict) for k, v in optim.items()
                                              if k not in ("warmup_steps", "min_lr_ratio", "betas", "eps")):
        raise UserError("config: 'trainer.optim' must map each component to {lr, weight_decay}")
    if "seed" not in resolved:
        raise UserError("config: 'seed' is required (an integer)")
    from modalign.sinks import read_logger

    read_logger(resolved.get("logger"))  # an unknown sink, a bad option or a missing package: here, not mid-run
    from modalign.analysis.checks import validate

    validate(resolved.get("checks"))  # thresholds of the health checks: here, not when the run ends
    for key in ("outputs", "name"):
        if not isinstance(resolved.get(key), str) or not resolved[key]:
            raise UserError(f"config: '{key}' must be a non-empty string, got {resolved.get(key)!r}")
    for key in ("path", "captions"):  # so eval and resume find the data from any directory
        value = resolved["data"].get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and Path(value).exists():
            resolved["data"][key] = str(Path(value).resolve())
    return resolved


def start_run(resolved: dict, overrides: list[str], recipe: str, path: Path | None = None):
    """Create the run directory (a fresh one under outputs/runs, or `path` for a sweep job) and
    write cfg.yaml, overrides.yaml and run.json (status running). -> (cfg, RunWriter)."""
    from omegaconf import OmegaConf

    from modalign.recipes.config import compose, to_container
    from modalign.runs.card import config_diff
    from modalign.runs.rundir import new_run_path, now_iso
    from modalign.runs.writer import RunWriter

    # the defaults of the same data group, so the card's diff shows what the user changed
    defaults = to_container(compose([o for o in overrides if o.split("=")[0] == "data"], root_config(recipe)), "",
                            throw_on_missing=False)
    try:
        if path is None:
            path = new_run_path(Path(resolved["outputs"]), recipe, resolved["name"])
        else:
            path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"outputs={resolved['outputs']}: cannot create a run directory there ({e.strerror})") from None
    writer = RunWriter(path)
    cfg = OmegaConf.create(resolved)
    writer.create(OmegaConf.to_yaml(cfg), OmegaConf.to_yaml(OmegaConf.create(list(overrides))),
                  {"id": path.name, "name": resolved["name"], "recipe": recipe, "status": "running",
                   "error": None, "created_at": now_iso(), "finished_at": None, "seed": resolved.get("seed"),
                   "config_diff": config_diff(defaults, resolved)})
    return cfg, writer


def new_run(overrides: list[str], recipe: str):
    """Compose, check and start a single run under outputs/runs/."""
    from modalign.recipes.config import compose, to_container

    cfg = compose(overrides, root_config(recipe))
    resolved = to_container(cfg, "")  # every missing or bad value fails here, before a run dir exists
    return start_run(check_resolved(resolved, overrides, recipe), overrides, recipe)


RESUMABLE = {"trainer.max_steps", "trainer.eval_every", "trainer.log_every", "trainer.early_stop_patience", "trainer.early_stop_min_delta",
             "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.threads", "trainer.on_nonfinite",
             "trainer.max_nonfinite_skips", "env.device"}  # another device: equal to float tolerance (docs/reliability.md)


def flat_items(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def load_yaml(path: Path):
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml or OmegaConf errors: a damaged file
        raise UserError(f"{path}: cannot be read as YAML ({type(e).__name__})") from None
    if not hasattr(cfg, "keys") or "trainer" not in cfg:
        raise UserError(f"{path}: not a modalign config (no 'trainer' section)")
    return cfg


def run_info(run) -> dict:
    from modalign.runs.rundir import read_json

    try:
        return read_json(run.run_json)
    except (OSError, ValueError) as e:
        raise UserError(f"{run.run_json}: cannot be read ({type(e).__name__})") from None


def resume_run(target: str, overrides: list[str]):
    """Continue the run that owns `target` (a run dir, its checkpoints dir, or a checkpoint in it)
    with its own cfg.yaml; key=value overrides may change settings such as trainer.max_steps."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from modalign.runs.writer import RunWriter

    p = Path(target)
    if not p.exists():
        raise UserError(f"resume={target}: no such run directory or checkpoint")
    run_path = p if p.is_dir() else p.parent
    if run_path.name == "checkpoints":
        run_path = run_path.parent
    if not (run_path / "cfg.yaml").exists() or not (run_path / "run.json").exists():
        raise UserError(f"resume={target}: not a run directory (no cfg.yaml and run.json in {run_path})")
    writer = RunWriter(run_path)
    if run_info(writer.run).get("status") == "completed":
        raise UserError(f"resume={target}: the run is already completed; raise trainer.max_steps in a new run instead")
    cfg = load_yaml(run_path / "cfg.yaml")
    current = dict(flat_items(OmegaConf.to_container(cfg)))
    try:
        given = dict(flat_items(OmegaConf.to_container(OmegaConf.from_dotlist([o for o in overrides if "=" in o]))))
    except Exception as e:  # a malformed override
        raise UserError(f"resume: cannot parse the overrides ({str(e).splitlines()[0]})") from None
    for o in overrides:
        key = o.split("=", 1)[0]
        if key in current and given.get(key) == current[key]:
            continue  # the run's own value, e.g. the original command pasted again
        if "=" not in o or not (key in RESUMABLE or key.startswith("eval.")):
            raise UserError(f"resume: cannot change '{key}' when resuming (the run would no longer equal an "
                            f"uninterrupted one); allowed: {', '.join(sorted(RESUMABLE))}, eval.*")
    try:
        for key, value in flat_items(OmegaConf.to_container(OmegaConf.from_dotlist(overrides))):
            OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as e:
        raise UserError(f"resume: {str(e).splitlines()[0]}") from None
    cfg.resume = str(run_path)
    writer.write_config(OmegaConf.to_yaml(cfg))
    writer.set_status("running")
    return cfg, writer


def execute(cfg, writer, quiet: bool, keep_failed: bool = False, world=None):
    """Run the recipe into `writer`'s run; keep run.json's status honest. -> (exit code, summary or
    None; None on ranks > 0, which write nothing)."""
    from modalign.runs.rundir import read_json
    from modalign.runs.watch import CheckFailed
    from modalign.train.checkpoint import CheckpointWriteError
    from modalign.train.distributed import SINGLE
    from modalign.train.loop import STOP, Preempted

    world = world or SINGLE
    writer.attach_log()
    log = logging.getLogger("modalign")
    log.info("run %s: %s", writer.path, " ".join(sys.argv))
    if world.distributed and str(cfg.recipe) != "align":
        raise UserError(f"torchrun: the {cfg.recipe} recipe runs in a single process for now (use align)")
    recipe = recipe_class(str(cfg.recipe))(cfg, writer, progress=not quiet, world=world)
    from modalign.recipes.config import to_container
    from modalign.sinks import attach, read_logger

    attach(writer, read_logger(to_container(cfg.logger, "logger") if cfg.get("logger") is not None else None))
    STOP.clear()
    previous = _on_sigterm(lambda *_: STOP.set())
    try:
        recipe()
        writer.set_status("completed")
        if not writer.writes:
            return 0, None
        summary = read_json(writer.run.facts / "summary.json")
        writer.write_card(summary)  # again, now that run.json says completed
        writer.finish_sinks("completed")
        return 0, summary
    except UserError as e:
        log.error("%s", e)
        if cfg.resume is None and not writer.has_checkpoint() and not keep_failed:
            writer.discard()  # nothing was trained: leave no half run behind
        else:
            writer.set_status("failed", str(e))
            writer.finish_sinks("failed")
        raise
    except Preempted as e:
        writer.set_status("interrupted", str(e))
        writer.finish_sinks("interrupted")
        log.error("%s", e)
        print(f"modalign: {e}; continue with: modalign train resume={writer.path}", file=sys.stderr)
        return 143, None  # 128 + SIGTERM, as a killed process would report
    except CheckFailed as e:  # checks.on_fail=stop: a health check failed while training
        writer.set_status("failed", str(e))
        writer.finish_sinks("failed")
        print(f"modalign: {e}; the run stopped (run.log has the curves so far; docs/checks.md)", file=sys.stderr)
        return 1, None
    except CheckpointWriteError as e:  # e.g. no space left: resumable once there is room again
        writer.set_status("interrupted", str(e))
        writer.finish_sinks("interrupted")
        log.error("%s", e)
        print(f"modalign: {e}; make room, then continue with: modalign train resume={writer.path}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        writer.set_status("interrupted", "interrupted by the user")
        writer.finish_sinks("interrupted")
        log.error("interrupted")
        raise
    except Exception as e:
        line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log.error("run failed: %s\n%s", line, traceback.format_exc())
        writer.set_status("failed", line)
        writer.finish_sinks("failed")
        print(f"modalign: run failed: {line} (traceback in {writer.path / 'run.log'})", file=sys.stderr)
        return 1, None
    finally:
        _on_sigterm(previous)
        writer.close_sinks()
        writer.detach_log()


def _on_sigterm(handler):
    """Install a SIGTERM handler (main thread only: elsewhere, e.g. a joblib worker, do nothing)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)


def run_distributed(overrides: list[str], recipe: str, quiet: bool, world):
    """Every torchrun rank calls this. Rank 0 creates (or resumes) the run directory and shares its
    path; the other ranks train in step with it through a writer that writes nothing, reading the
    run's config and checkpoints. -> (exit code, summary on rank 0 else None, the writer)."""
    from modalign.runs.writer import RunWriter
    from modalign.train.distributed import broadcast_object

    if recipe != "align":
        raise UserError(f"torchrun: the {recipe} recipe runs in a single process for now (use --recipe align)")
    resume, overrides = split_resume(overrides)
    if world.is_main:
        try:
            cfg, writer = resume_run(resume, overrides) if resume else new_run(overrides, recipe)
            broadcast_object(str(writer.path), world)
        except UserError as e:
            broadcast_object(UserError(str(e)), world)  # the other ranks stop with the same line
            raise
        return (*execute(cfg, writer, quiet, world=world), writer)
    got = broadcast_object(None, world)
    if isinstance(got, UserError):
        raise got
    writer = RunWriter(Path(got), rank=world.rank)
    cfg = load_yaml(writer.path / "cfg.yaml")  # written by rank 0 before it shared the path
    return (*execute(cfg, writer, quiet=True, world=world), writer)


def train_command(recipe: str, argv: list[str]) -> int:
    """`modalign train` and `python -m modalign.recipes.<recipe>`: one run, or one rank of a
    torchrun launch. argv: [--quiet] and overrides. -> the exit code."""
    from modalign.train.allocator import mode_from_overrides, tune_malloc

    quiet = any(a in ("--quiet", "-q") for a in argv)
    overrides = [a for a in argv if a not in ("--quiet", "-q")]
    tune_malloc(mode_from_overrides(overrides))  # before torch is imported or gloo starts a thread
    from modalign.train.distributed import from_env

    if from_env().distributed:
        from modalign.train.distributed import exit_process

        code = 1
        try:
            code = _train_distributed(recipe, overrides, quiet)
        except UserError as e:  # what the CLI prints for any UserError: one line, exit 2
            print("modalign: error: " + str(e), file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            code = 130
        except Exception:  # a bug: say where, since the process will not unwind into Python's handler
            traceback.print_exc()
            code = 1
        finally:
            exit_process(code)  # never returns (see there why a rank skips the interpreter's shutdown)
    resume, overrides = split_resume(overrides)
    cfg, writer = resume_run(resume, overrides) if resume else new_run(overrides, recipe)
    code, summary = execute(cfg, writer, quiet)
    _print_result(writer, summary, quiet, code)
    return code


def _train_distributed(recipe: str, overrides: list[str], quiet: bool) -> int:
    from modalign.train.distributed import init_from_env, leave

    world = init_from_env()
    code = 1
    try:
        code, summary, writer = run_distributed(overrides, recipe, quiet, world)
        if world.is_main:
            _print_result(writer, summary, quiet, code)
            if code == 0 and not quiet:
                print(f"trained on {world.size} ranks, each on 1/{world.size} of every global batch")
        return code
    finally:
        leave(clean=code == 0)


def _print_result(writer, summary: dict | None, quiet: bool, code: int) -> None:
    """A finished run: its path (--quiet), or its headline test metrics beside chance."""
    if code != 0:
        return
    if quiet:
        print(writer.path)
        return
    from rich.console import Console

    from modalign.analysis.metrics import PRINTED

    console = Console(width=None if sys.stdout.isatty() else 160)
    split = summary.get("split", "test")
    res, chance = summary.get(split, {}), summary.get("chance", {})
    console.print(f"[bold]run[/bold] {writer.path}")
    console.print(f"relevance protocol: {summary.get('protocol')}; {summary.get('steps')} steps in "
                  f"{summary.get('train_seconds', 0):.0f} s ({summary.get('precision')})")
    for k in PRINTED.get(summary.get("recipe"), ()):
        if k in res:
            c = chance.get(k)
            tail = f"   (chance {c:.4f})" if c is not None else ""
            console.print(f"  {split} {k:<20} {res[k]:.3f}{tail}")
