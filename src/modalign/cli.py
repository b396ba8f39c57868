"""modalign — the command line. Parses arguments, composes config, wires a recipe; nothing else.

Exit codes: 0 ok; 1 a run failed; 2 bad input (config, data, arguments, checkpoints), with one
line naming the file, key or value. `modalign --help` imports neither torch nor Hydra.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from modalign.errors import UserError

HEADLINE = ("m2t_R@1", "t2m_R@1", "zeroshot_acc")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def _groups_epilog() -> str:
    """The config groups and their options, read from the package's conf/ folder (no Hydra import)."""
    conf = Path(__file__).resolve().parent / "conf"
    lines = ["config groups (choose with GROUP=OPTION; set values with GROUP.KEY=VALUE):"]
    for g in sorted(p for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = sorted(f.stem for f in g.glob("*.yaml"))
        if options:
            lines.append(f"  {g.name:<10} {', '.join(options)}")
    lines.append("top-level keys: name, seed, outputs, resume, eval.protocol, eval.split, eval.export_embeddings")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modalign", description="A workbench for cross-modal alignment research.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    d = sub.add_parser("demo", help="the main job on the embedded demo data: one align run, its metrics")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    d.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.max_steps=100")

    t = sub.add_parser("train", help="train a recipe: modalign train [--recipe align] [overrides]",
                       epilog=_groups_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--recipe", default="align", choices=["align"], help="which recipe (default: align)")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    t.add_argument("overrides", nargs="*",
                   help="Hydra overrides: group=option or key=value, e.g. encoder=cnn trainer.max_steps=200; "
                        "resume=RUN_DIR continues a run")

    e = sub.add_parser("eval", help="evaluate a run's best checkpoint on a split")
    e.add_argument("run", help="run directory")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--export-embeddings", action="store_true", help="write facts/embeddings.npz")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    r = sub.add_parser("runs", help="a table of the runs under a root")
    r.add_argument("root", nargs="?", default="outputs", help="directory to search (default: outputs)")
    r.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose run.json or config has this value, e.g. status=completed head.kind=mlp")
    r.add_argument("--sort", metavar="METRIC", help="sort by a test metric, best first (e.g. m2t_R@1)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            from modalign import __version__

            print(f"modalign {__version__}")
            return 0
        if args.command is None:
            build_parser().print_help()
            return 0
        return {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "runs": cmd_runs}[args.command](args)
    except UserError as e:
        print(f"modalign: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modalign: interrupted", file=sys.stderr)
        return 130


# train ------------------------------------------------------------------------------------------
def _split_resume(overrides: list[str]) -> tuple[str | None, list[str]]:
    resume, rest = None, []
    for o in overrides:
        if o.startswith("resume="):
            resume = o.split("=", 1)[1] or None
            if resume in ("null", "None"):
                resume = None
        else:
            rest.append(o)
    return resume, rest


def _new_run(overrides: list[str], recipe: str):
    from omegaconf import OmegaConf

    from modalign.recipes.config import compose, to_container
    from modalign.runs.card import config_diff
    from modalign.runs.rundir import RunDir, atomic_write_text, new_run_path, now_iso

    cfg = compose(overrides)
    resolved = to_container(cfg, "")  # every missing or bad value fails here, before a run dir exists
    # the defaults of the same data group, so the card's diff shows what the user changed
    defaults = to_container(compose([o for o in overrides if o.split("=")[0] == "data"]), "", throw_on_missing=False)
    known = set(to_container(compose([]), "")) if any(o.startswith("+") for o in overrides) else set(resolved)
    extra = sorted(set(resolved) - known)
    if extra:
        raise UserError(f"config: unknown key '{extra[0]}'")
    for key in ("outputs", "name"):
        if not isinstance(resolved.get(key), str) or not resolved[key]:
            raise UserError(f"config: '{key}' must be a non-empty string, got {resolved.get(key)!r}")
    for key in ("path", "captions"):  # so eval and resume find the data from any directory
        value = resolved["data"].get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and Path(value).exists():
            resolved["data"][key] = str(Path(value).resolve())
    try:
        path = new_run_path(Path(resolved["outputs"]), recipe, resolved["name"])
    except OSError as e:
        raise UserError(f"outputs={resolved['outputs']}: cannot create a run directory there ({e.strerror})") from None
    run = RunDir(path)
    run.init_dirs()
    cfg = OmegaConf.create(resolved)
    atomic_write_text(path / "cfg.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(path / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    run.write_info({"id": path.name, "name": resolved["name"], "recipe": recipe, "status": "running",
                    "error": None, "created_at": now_iso(), "finished_at": None, "seed": resolved.get("seed"),
                    "config_diff": config_diff(defaults, resolved)})
    return cfg, run


RESUMABLE = {"trainer.max_steps", "trainer.eval_every", "trainer.log_every", "trainer.early_stop_patience",
             "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.threads"}


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _load_yaml(path: Path):
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml or OmegaConf errors: a damaged file
        raise UserError(f"{path}: cannot be read as YAML ({type(e).__name__})") from None
    if not hasattr(cfg, "keys") or "trainer" not in cfg:
        raise UserError(f"{path}: not a modalign config (no 'trainer' section)")
    return cfg


def _run_info(run) -> dict:
    from modalign.runs.rundir import read_json

    try:
        return read_json(run.run_json)
    except (OSError, ValueError) as e:
        raise UserError(f"{run.run_json}: cannot be read ({type(e).__name__})") from None


def _resume_run(target: str, overrides: list[str]):
    """Continue the run that owns `target` (a run dir, its checkpoints dir, or a checkpoint in it)
    with its own cfg.yaml; key=value overrides may change settings such as trainer.max_steps."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from modalign.runs.rundir import RunDir, atomic_write_text

    p = Path(target)
    if not p.exists():
        raise UserError(f"resume={target}: no such run directory or checkpoint")
    run_path = p if p.is_dir() else p.parent
    if run_path.name == "checkpoints":
        run_path = run_path.parent
    if not (run_path / "cfg.yaml").exists() or not (run_path / "run.json").exists():
        raise UserError(f"resume={target}: not a run directory (no cfg.yaml and run.json in {run_path})")
    run = RunDir(run_path)
    if _run_info(run).get("status") == "completed":
        raise UserError(f"resume={target}: the run is already completed; raise trainer.max_steps in a new run instead")
    cfg = _load_yaml(run_path / "cfg.yaml")
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or not (key in RESUMABLE or key.startswith("eval.")):
            raise UserError(f"resume: cannot change '{key}' when resuming (the run would no longer equal an "
                            f"uninterrupted one); allowed: {', '.join(sorted(RESUMABLE))}, eval.*")
    try:
        for key, value in _flat(OmegaConf.to_container(OmegaConf.from_dotlist(overrides))):
            OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as e:
        raise UserError(f"resume: {str(e).splitlines()[0]}") from None
    cfg.resume = str(run_path)
    atomic_write_text(run_path / "cfg.yaml", OmegaConf.to_yaml(cfg))
    run.update(status="running", error=None, finished_at=None)
    return cfg, run


def _attach_log(run_path: Path) -> logging.Handler:
    logger = logging.getLogger("modalign")
    logger.setLevel(logging.INFO)
    h = logging.FileHandler(run_path / "run.log", encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(h)
    return h


def execute(cfg, run, quiet: bool):
    """Run the recipe in `run`; keep run.json's status honest. -> (exit code, summary or None)."""
    import shutil

    from modalign.recipes.align import AlignRecipe
    from modalign.runs.card import write_card
    from modalign.runs.rundir import read_json

    handler = _attach_log(run.path)
    log = logging.getLogger("modalign")
    log.info("run %s: %s", run.path, " ".join(sys.argv))
    recipe = AlignRecipe(cfg, run, progress=not quiet)
    trained = lambda: any(run.checkpoints.glob("*.pt"))  # noqa: E731
    try:
        recipe()
        run.set_status("completed")
        summary = read_json(run.facts / "summary.json")
        write_card(run, summary)  # again, now that run.json says completed
        return 0, summary
    except UserError as e:
        log.error("%s", e)
        if cfg.resume is None and not trained():
            logging.getLogger("modalign").removeHandler(handler)
            handler.close()
            shutil.rmtree(run.path, ignore_errors=True)  # nothing was trained: leave no half run behind
        else:
            run.set_status("failed", str(e))
        raise
    except KeyboardInterrupt:
        run.set_status("interrupted", "interrupted by the user")
        log.error("interrupted")
        raise
    except Exception as e:
        line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log.error("run failed: %s\n%s", line, traceback.format_exc())
        run.set_status("failed", line)
        print(f"modalign: run failed: {line} (traceback in {run.path / 'run.log'})", file=sys.stderr)
        return 1, None
    finally:
        logging.getLogger("modalign").removeHandler(handler)
        handler.close()


def _print_result(run, summary: dict, console) -> None:
    split = summary.get("split", "test")
    res, chance = summary.get(split, {}), summary.get("chance", {})
    console.print(f"[bold]run[/bold] {run.path}")
    console.print(f"relevance protocol: {summary.get('protocol')}; {summary.get('steps')} steps in "
                  f"{summary.get('train_seconds', 0):.0f} s ({summary.get('precision')})")
    for k in HEADLINE + ("exact_text/m2t_R@1", "exact_text/t2m_R@1"):
        if k in res:
            c = chance.get(k)
            tail = f"   (chance {c:.4f})" if c is not None else ""
            console.print(f"  {split} {k:<20} {res[k]:.3f}{tail}")


def cmd_train(args) -> int:
    from rich.console import Console

    resume, overrides = _split_resume(args.overrides)
    cfg, run = _resume_run(resume, overrides) if resume else _new_run(overrides, args.recipe)
    code, summary = execute(cfg, run, args.quiet)
    if code == 0 and not args.quiet:
        _print_result(run, summary, Console())
    elif code == 0:
        print(run.path)
    return code


def cmd_demo(args) -> int:
    from rich.console import Console

    console = Console()
    if not args.quiet:
        console.print("[bold]modalign demo[/bold]: align smart-home sensor windows with their captions "
                      "(embedded demo data, frozen all-MiniLM-L6-v2)")
    cfg, run = _new_run(["data=demo", *args.overrides], "align")
    code, summary = execute(cfg, run, args.quiet)
    if code == 0:
        _print_result(run, summary, console)
        if not args.quiet:
            console.print(f"card: {run.path / 'card.md'}   figures: {run.path / 'figures'}")
    return code


# eval -------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from omegaconf import OmegaConf
    from rich.console import Console

    from modalign.recipes.align import AlignRecipe
    from modalign.runs.facts import write_scores
    from modalign.runs.rundir import RunDir, atomic_write_json
    from modalign.train.checkpoint import load_checkpoint

    path = Path(args.run)
    if not (path / "cfg.yaml").exists():
        raise UserError(f"{path}: not a run directory (no cfg.yaml)")
    run = RunDir(path)
    ckpt = path / "checkpoints" / "best.pt"
    if not ckpt.exists():
        ckpt = path / "checkpoints" / "last.pt"
    if not ckpt.exists():
        raise UserError(f"{path}: no checkpoint to evaluate (checkpoints/best.pt or last.pt)")
    cfg = _load_yaml(path / "cfg.yaml")
    recipe = AlignRecipe(cfg, run, progress=not args.quiet)
    recipe.setup()
    recorded = _run_info(run).get("data", {}).get("splits", {}).get(args.split, {}).get("fingerprint")
    actual = recipe.splits[args.split].fingerprint()
    if recorded is not None and recorded != actual:
        raise UserError(f"{path}: the {args.split} split is not the data this run was trained and tested on "
                        f"(fingerprint {actual[:12]} now, {recorded[:12]} in run.json)")
    payload = load_checkpoint(ckpt)
    try:
        recipe.model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise UserError(f"{ckpt}: does not fit this run's model ({str(e).splitlines()[0]})") from None
    metrics, per_example, m, t = recipe.evaluate(args.split)
    run.facts.mkdir(exist_ok=True)
    atomic_write_json(run.facts / f"eval_{args.split}.json",
                      {"split": args.split, "checkpoint": str(ckpt), "step": payload["step"],
                       "metrics": metrics, "chance": recipe.chance(args.split)})
    name = "scores.parquet" if args.split == recipe.eval_cfg.split else f"scores_{args.split}.parquet"
    write_scores(run.facts / name, recipe.splits[args.split], per_example)
    if args.export_embeddings:
        import numpy as np

        np.savez(run.facts / ("embeddings.npz" if args.split == recipe.eval_cfg.split else f"embeddings_{args.split}.npz"),
                 ids=recipe.splits[args.split].ids.astype(str), modality=m, text=t)
    console = Console()
    console.print(f"{path} [{args.split}] step {payload['step']} ({ckpt.name})")
    for k, v in metrics.items():
        console.print(f"  {k:<28} {v:.4f}")
    return 0


# runs -------------------------------------------------------------------------------------------
def cmd_runs(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from modalign.runs.index import find_runs, parse_where, select

    where = parse_where(args.where)
    records = select(find_runs(Path(args.root)), where)
    if args.sort:
        records.sort(key=lambda r: (r.metric(args.sort) is None, -(r.metric(args.sort) or 0.0)))
    table = Table(title=f"runs under {args.root} ({len(records)})")
    for col in ("run", "status", "data", "encoder", "head", "steps", *HEADLINE, "wall s"):
        table.add_column(col, justify="right" if col in HEADLINE or col in ("steps", "wall s") else "left")
    for r in records:
        s = r.summary or {}
        cells = [r.path.name, r.status, str(r.field("data.name") or ""), str(r.field("encoder.kind") or ""),
                 str(r.field("head.kind") or ""), str(s.get("steps", ""))]
        for m in HEADLINE:
            v = r.metric(m)
            cells.append("" if v is None else f"{v:.3f}")
        cells.append(f"{s['wall_seconds']:.0f}" if "wall_seconds" in s else "")
        table.add_row(*cells)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
