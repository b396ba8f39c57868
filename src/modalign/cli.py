"""modalign — the command line. Parses arguments, composes config, wires a recipe; nothing else.

Exit codes: 0 ok; 1 a run failed; 2 bad input (config, data, arguments, checkpoints), with one
line naming the file, key or value. `modalign --help` imports neither torch nor Hydra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modalign.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        cmd = self.prog.removeprefix("modalign").strip()
        raise UserError(f"{cmd + ': ' if cmd else ''}{message} (see modalign {cmd + ' ' if cmd else ''}--help)")


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _groups_epilog() -> str:
    """The config groups and their options, read from the package's conf/ folder (no Hydra import)."""
    conf = Path(__file__).resolve().parent / "conf"
    lines = ["config groups (choose with GROUP=OPTION; set values with GROUP.KEY=VALUE):"]
    for g in sorted(p for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name != "plan"):
        options = sorted(f.stem for f in g.glob("*.yaml"))
        if options:
            lines.append(f"  {g.name:<10} {', '.join(options)}")
    lines.append("top-level keys: name, seed, outputs, resume, eval.protocol, eval.split, eval.export_embeddings")
    return "\n".join(lines)


def _experiments_epilog() -> str:
    conf = Path(__file__).resolve().parent / "conf" / "experiment"
    names = sorted(p.stem for p in conf.glob("*.yaml"))
    return ("experiments: " + ", ".join(names) + "\nlaunchers: hydra/launcher=joblib (parallel local jobs), "
            "env=slurm (submitit), hydra/launcher=submitit_local")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modalign", description="A workbench for cross-modal alignment research.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    d = sub.add_parser("demo", help="the main job on the embedded demo data: one align run, its metrics")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    d.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.max_steps=100")

    t = sub.add_parser("train", help="train a recipe: modalign train [--recipe align] [overrides]",
                       epilog=_groups_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--recipe", default="align", choices=["align", "autoencode", "fuse"],
                   help="align (stage 2, the default), autoencode (stage 1) or fuse (stage 3)")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    t.add_argument("overrides", nargs="*",
                   help="Hydra overrides: group=option or key=value, e.g. encoder=cnn trainer.max_steps=200; "
                        "resume=RUN_DIR continues a run")

    w = sub.add_parser("sweep", help="a Hydra multirun over a grid: modalign sweep experiment=NAME [overrides]",
                       epilog=_experiments_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    w.add_argument("overrides", nargs="*",
                   help="experiment=NAME, sweeps as comma lists (seed=0,1,2), other overrides; "
                        "resume=SWEEP_DIR runs the jobs that are not completed")

    e = sub.add_parser("eval", help="evaluate a run's best checkpoint on a split")
    e.add_argument("run", help="run directory")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--export-embeddings", action="store_true", help="write facts/embeddings.npz")
    e.add_argument("--device", default="auto", metavar="DEVICE",
                   help="where to evaluate: auto (default: a CUDA GPU if visible, else the CPU), cpu, cuda, cuda:N, mps; "
                        "a run trained on a GPU evaluates on a CPU and back")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    rp = sub.add_parser("report", help="tables, plots, verdicts and recommendations over sweeps or runs",
                        description="Build a report (index.html, report.md, summary.csv, groups.csv, plots) "
                                    "from sweep or run directories alone.")
    rp.add_argument("paths", nargs="+", metavar="PATH", help="sweep directories, run directories, or roots holding runs")
    rp.add_argument("--metric", help="the metric to optimize and compare (default: the sweep's, e.g. m2t_R@1)")
    rp.add_argument("--baseline", metavar="RUN|GROUP",
                    help="compare every group with this one (a group label such as head=linear, or a run dir), "
                         "Holm-corrected")
    rp.add_argument("--out", metavar="DIR", help="where to write (default: PATH/report for one sweep or root, "
                                                "else outputs/reports/report_<stamp>)")
    rp.add_argument("--export", metavar="DIR", help="also copy each run's card.md, run.json and "
                                                   "predictions.jsonl into DIR for archiving")
    rp.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    rp.add_argument("--quiet", "-q", action="store_true", help="print only the path of index.html")

    c = sub.add_parser("compare", help="paired comparison of runs or groups of runs on the same test examples",
                       description="Compare a baseline A with one or more candidates B... Each side is a run "
                                   "directory, or a sweep/root directory narrowed to one configuration with "
                                   "PATH:KEY=VALUE[,KEY=VALUE] (e.g. SWEEP:head=mlp). Refuses sides that are not "
                                   "comparable (data splits, eval protocol, parent checkpoints) unless "
                                   "--allow-mismatch.")
    c.add_argument("sides", nargs="+", metavar="SIDE", help="A (the baseline), then B, C, ... (candidates)")
    c.add_argument("--metric", default="m2t_R@1", help="a per-example test metric (default m2t_R@1)")
    c.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="a filter applied to every side")
    c.add_argument("--allow-mismatch", action="store_true",
                   help="compare even when the fingerprints differ; every table then says so")
    c.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")

    v = sub.add_parser("variants", help="the registered variants (experiment log), or scaffold a new one",
                       description="modalign variants [--outputs ROOT]: every registered variant with its "
                                   "metadata, completed runs and best headline metric under ROOT. "
                                   "modalign variants new NAME [--dir DIR]: scaffold a head variant package.")
    v.add_argument("action", nargs="?", default="list", choices=["list", "new"])
    v.add_argument("name", nargs="?", help="new: the variant's name (lower_snake_case)")
    v.add_argument("--outputs", default="outputs", help="list: where to count runs (default: outputs)")
    v.add_argument("--metric", default="m2t_R@1", help="list: the headline metric (default m2t_R@1)")
    v.add_argument("--dir", default=".", help="new: the folder to create the package in (default: .)")
    v.add_argument("--created-by", help="new: who made it (default: $USER)")
    v.add_argument("--model", default="", help="new: the tool or person that wrote the code")
    v.add_argument("--experiment-id", default="", help="new: the experiment it belongs to")

    r = sub.add_parser("runs", help="a table of the runs under a root")
    r.add_argument("root", nargs="?", default="outputs", help="directory to search (default: outputs)")
    r.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose run.json or config has this value, e.g. status=completed head.kind=mlp")
    r.add_argument("--sort", metavar="METRIC", help="sort by a test metric, best first (e.g. m2t_R@1)")

    sv = sub.add_parser("serve", help="a local read-only web view of an outputs root: runs, curves, sweeps")
    sv.add_argument("root", nargs="?", default="outputs", help="the outputs root to show (default: outputs)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1, this machine only; another address shows your runs "
                         "to your network)")

    ck = sub.add_parser("check", help="evaluate a run's health checks again: modalign check RUN [checks.KEY.NAME=VALUE]",
                        epilog="exit status 1 when a check fails (docs/checks.md)")
    ck.add_argument("run", help="a run directory")
    ck.add_argument("overrides", nargs="*", metavar="checks.KEY.NAME=VALUE",
                    help="other thresholds, e.g. checks.loss_falls.min_drop=0.2 checks.baseline.metric=m2t_R@1 "
                         "checks.baseline.value=0.3")

    cv = sub.add_parser("convert", help="convert paired data between formats: modalign convert IN OUT",
                        epilog="formats by name: DATA.npz, DATA.h5 (HDF5), DATA.parquet, or DIR (one .npy per array); "
                               "the captions (DATA.jsonl) and class prompts follow (docs/data.md)")
    cv.add_argument("input", help="the data to read (any format)")
    cv.add_argument("output", help="the data to write; its format from its name")
    cv.add_argument("--captions", metavar="PATH", help="the input's captions file, if not beside it")
    cv.add_argument("--compress", action="store_true",
                    help="compress the output (NPZ deflate, HDF5 gzip, Parquet zstd; .npy never): smaller, "
                         "slower to read")
    cv.add_argument("--quiet", action="store_true", help="no progress bar")

    dc = sub.add_parser("diff-config", help="what differs between two configs or runs: modalign diff-config A B",
                        epilog="A and B: run directories, config YAML files (a run's cfg.yaml), or quoted overrides "
                               "composed like modalign train ('head=linear trainer.max_steps=300'); exit 0 when they "
                               "are the same, 1 when they differ")
    dc.add_argument("a", help="a run directory, a config file, or overrides")
    dc.add_argument("b", help="the same for the other side")
    dc.add_argument("--recipe", default="align", choices=["align", "autoencode", "fuse"],
                    help="the recipe that overrides are composed for (default align)")
    dc.add_argument("--all", action="store_true", help="also bookkeeping keys (seed, outputs, threads, ...)")

    pl = sub.add_parser("plan", help="phased plans: modalign plan run|status|graph|report NAME",
                        epilog="shipped plans: " + ", ".join(sorted(x.stem for x in (Path(__file__).resolve().parent
                                                                                     / "conf" / "plan").glob("*.yaml")))
                               + "; a plan file's format: docs/plans.md")
    psub = pl.add_subparsers(dest="plan_command", parser_class=_Parser, required=True)
    pr = psub.add_parser("run", help="run a plan (again: completed jobs are reused, interrupted ones resume)")
    pr.add_argument("plan", help="a shipped plan's name (align_study) or a plan file")
    pr.add_argument("--jobs", "-j", type=int, default=None,
                    help="jobs at once on this machine (at most one per core; default: the plan's jobs:, else 1)")
    pr.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    pr.add_argument("overrides", nargs="*", help="config overrides for every job, e.g. trainer.max_steps=60")
    ps = psub.add_parser("status", help="phases, jobs, gates and triggers of a plan that runs or ran")
    ps.add_argument("plan", help="the plan directory (outputs/plans/NAME) or the plan's name")
    pg = psub.add_parser("graph", help="print a plan's DAG (and draw it with --out FILE.png)")
    pg.add_argument("plan", help="a shipped plan's name or a plan file")
    pg.add_argument("--out", metavar="FILE.png", help="also draw the graph into this PNG")
    pp = psub.add_parser("report", help="write a plan's report again from its directory")
    pp.add_argument("plan", help="the plan directory (outputs/plans/NAME) or the plan's name")

    y = sub.add_parser("sync", help="push run directories into a tracking sink: modalign sync RUN|SWEEP|ROOT --to mlflow",
                       epilog="options per sink: tensorboard.dir=tb, mlflow.uri=sqlite:///PATH mlflow.experiment=NAME, "
                              "wandb.mode=offline|online wandb.project=NAME wandb.entity=NAME (docs/tracking.md)")
    y.add_argument("target", help="a run directory, a sweep directory, or an outputs root")
    y.add_argument("--to", action="append", required=True, metavar="SINK",
                   help="tensorboard, mlflow or wandb (repeat, or comma-separate, for several)")
    y.add_argument("options", nargs="*", metavar="SINK.KEY=VALUE", help="sink options, e.g. mlflow.uri=sqlite:///m.db")
    y.add_argument("--quiet", action="store_true", help="no table")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        if argv[:1] == ["sync"] or argv[:2] == ["plan", "run"]:  # KEY=VALUE may also follow an option
            args, extra = parser.parse_known_args(argv)
            if any(e.startswith("-") for e in extra):
                cmd = " ".join(argv[:2] if argv[0] == "plan" else argv[:1])
                raise UserError(f"{cmd}: unrecognized arguments: {' '.join(extra)} (see modalign {cmd} --help)")
            if argv[0] == "sync":
                args.options = [*args.options, *extra]
            else:
                args.overrides = [*args.overrides, *extra]
        else:
            args = parser.parse_args(argv)
        if args.version:
            from modalign import __version__

            print(f"modalign {__version__}")
            return 0
        if args.command is None:
            build_parser().print_help()
            return 0
        return {"demo": cmd_demo, "train": cmd_train, "sweep": cmd_sweep, "eval": cmd_eval,
                "report": cmd_report, "compare": cmd_compare, "variants": cmd_variants, "runs": cmd_runs,
                "sync": cmd_sync, "serve": cmd_serve, "convert": cmd_convert, "check": cmd_check,
                "plan": cmd_plan, "diff-config": cmd_diff_config}[args.command](args)
    except UserError as e:  # one line, whatever the message holds (an id may contain a line break)
        print("modalign: error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modalign: interrupted; continue a run with: modalign train resume=RUN_DIR "
              "(a sweep: modalign sweep resume=SWEEP_DIR)", file=sys.stderr)
        return 130


# train ------------------------------------------------------------------------------------------
def _tune_malloc_early(overrides: list[str]) -> None:
    """env.malloc before torch starts any thread (modalign.train.allocator)."""
    from modalign.train.allocator import mode_from_overrides, tune_malloc

    tune_malloc(mode_from_overrides(overrides))


def cmd_train(args) -> int:
    from modalign.recipes.launch import train_command

    return train_command(args.recipe, [*(["--quiet"] if args.quiet else []), *args.overrides])


def cmd_demo(args) -> int:
    """The main job: the `demo` experiment (a small sweep on the embedded data), its table and report."""
    _tune_malloc_early(args.overrides)
    from modalign.recipes.sweep import run_sweep

    console = _console()
    if not args.quiet:
        console.print("[bold]modalign demo[/bold]: align smart-home sensor windows with their captions "
                      "(embedded demo data, frozen all-MiniLM-L6-v2): linear vs MLP heads, 2 seeds each")
    code, sweep_dir = run_sweep(["experiment=demo", *args.overrides], quiet=args.quiet)
    _print_sweep(sweep_dir)
    _print_report(sweep_dir / "report")
    return code


# sweep ------------------------------------------------------------------------------------------
def cmd_sweep(args) -> int:
    _tune_malloc_early(args.overrides)
    from modalign.recipes.sweep import run_sweep

    code, sweep_dir = run_sweep(args.overrides, quiet=args.quiet)
    _print_sweep(sweep_dir)
    _print_report(sweep_dir / "report")
    return code


def _print_sweep(sweep_dir: Path) -> None:
    """The sweep's jobs as a table: varied parameters, status, headline metrics."""
    import yaml
    from rich.table import Table

    from modalign.analysis.metrics import headline
    from modalign.runs.index import find_runs

    info = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    records = {r.path.name: r for r in find_runs(sweep_dir)}
    keys = list(info.get("grid", {}))
    metrics = list(headline(info.get("recipe")))
    table = Table(title=f"{sweep_dir} — {info['status']}")
    for col in ("job", *keys, "status", *metrics):
        table.add_column(col, justify="right" if col in metrics else "left")
    for job in info.get("jobs", []):
        r = records.get(job["dir"])
        values = dict(o.split("=", 1) for o in (job.get("overrides") or []) if "=" in o)
        cells = [job["dir"], *[values.get(k, "") for k in keys], job["status"] or ""]
        for m in metrics:
            v = r.metric(m) if r is not None else None
            cells.append("" if v is None else f"{v:.3f}")
        table.add_row(*cells)
    _console().print(table)
    for job in info.get("jobs", []):
        if job["status"] != "completed":
            print(f"job {job['dir']} {job['status']}: {job.get('error')}", file=sys.stderr)


# report -----------------------------------------------------------------------------------------
def _print_report(out: Path, rep=None) -> None:
    """Each group's verdict (or its metric with CI), the recommendations, and where index.html is."""
    import json

    from rich.table import Table

    console = _console()
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        console.print(f"no report in {out}")
        return
    if summary.get("verdicts"):
        table = Table(title=f"verdicts on {summary['verdicts'][0]['metric']} (95% CI over seeds)")
        for col in ("group", "n", "verdict", "next step"):
            table.add_column(col, justify="right" if col == "n" else "left")
        for v in summary["verdicts"]:
            table.add_row(v["group"], str(v["n"]), v["line"].split(" → ")[0] + " → " + v["verdict"]
                          + (f" ({v['note']})" if v["note"] else ""), v["next"])
        console.print(table)
    for w in summary.get("warnings", []):
        console.print(f"[yellow]warning[/yellow]: {w}")
    for line in summary.get("recommendations", []):
        console.print(f"• {line}", soft_wrap=False)
    console.print(f"report: {out / 'index.html'}")


def cmd_report(args) -> int:
    from datetime import datetime

    from modalign.report.build import collect, export_runs, write_report

    paths = [Path(p) for p in args.paths]
    for p in paths:
        if not p.is_dir():
            raise UserError(f"{p}: no such directory")
    if args.resamples < 1:
        raise UserError(f"--resamples {args.resamples}: must be a positive number")
    if args.out:
        out = Path(args.out)
    elif len(paths) == 1 and not (paths[0] / "run.json").exists():
        out = paths[0] / "report"
    else:
        out = Path("outputs") / "reports" / f"report_{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    rep = collect(paths, args.metric, args.baseline, n_resamples=args.resamples)
    index = write_report(rep, out)
    if args.export:
        n = export_runs(rep, Path(args.export))
        if not args.quiet:
            _console().print(f"exported {n} runs (card.md, run.json, predictions.jsonl) to {args.export}")
    if args.quiet:
        print(index)
    else:
        _print_report(out)
    return 0


def _side(spec: str, where: list[tuple[str, str]], name: str):
    """A compare side 'PATH[:KEY=VALUE,...]' -> one Group of completed runs (one configuration)."""
    from modalign.analysis.comparability import differences, fingerprint
    from modalign.analysis.groups import group_runs
    from modalign.runs.index import find_runs, parse_where, select

    path, _, filters = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    own = parse_where([f for f in filters.split(",") if f]) if filters else []
    records = [r for r in select(find_runs(Path(path)), where + own) if r.status == "completed"]
    if not records:
        raise UserError(f"{spec}: no completed run matches")
    groups = group_runs(records)
    if len(groups) > 1:
        labels = "; ".join(g.label for g in groups)
        raise UserError(f"{spec}: holds {len(groups)} configurations ({labels}); narrow it to one, "
                        f"e.g. {path}:{groups[0].label.split(', ')[0]}")
    g = groups[0]
    base = fingerprint(g.runs[0].info)
    for r in g.runs[1:]:
        diff = differences(base, fingerprint(r.info), (str(g.runs[0].path), str(r.path)))
        if diff:
            raise UserError(f"{spec}: its runs are not comparable with each other: {diff[0]}")
    g.label = name
    return g


def cmd_compare(args) -> int:
    from rich.table import Table

    from modalign.analysis.comparability import config_diff
    from modalign.analysis.compare import describe, mismatches, paired_comparison
    from modalign.analysis.metrics import full_name, per_example_column
    from modalign.runs.index import parse_where

    if len(args.sides) < 2:
        raise UserError("compare: give a baseline and at least one candidate (modalign compare A B)")
    if args.resamples < 1:
        raise UserError(f"--resamples {args.resamples}: must be a positive number")
    metric = full_name(args.metric)
    if per_example_column(metric) is None:
        raise UserError(f"--metric {args.metric}: not a mean over test examples, so there is nothing to pair; "
                        "use e.g. m2t_R@1, t2m_R@5, m2t_mAP or zeroshot_acc")
    where = parse_where(args.where)
    names = [chr(ord("A") + i) for i in range(len(args.sides))]
    sides = [_side(spec, where, n) for spec, n in zip(args.sides, names)]
    console = _console()
    for n, spec, g in zip(names, args.sides, sides):
        console.print(f"{n}: {spec} — {len(g.completed)} completed runs, seeds {', '.join(map(str, g.seeds))}")
    problems = [f"{c.label} vs {sides[0].label}: {d}" for c in sides[1:] for d in mismatches(sides[0], c)]
    if problems and not args.allow_mismatch:
        raise UserError(f"compare: not comparable: {problems[0]}"
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                        + "; --allow-mismatch compares them anyway")
    mark = " [MISMATCH: " + "; ".join(problems) + "]" if problems else ""
    for p in problems:
        console.print(f"[yellow]warning[/yellow]: compared despite a mismatch: {p}")
    if not problems:
        console.print("comparable: same data splits, eval protocol and parent checkpoints")
    diff = config_diff({g.label: g.config for g in sides})
    if diff:
        table = Table(title="config: what differs" + mark)
        for col in ("key", *names):
            table.add_column(col)
        for k, vals in diff.items():
            table.add_row(k, *[str(vals[n]) for n in names])
        console.print(table)
    else:
        console.print("config: identical (apart from seeds and bookkeeping)")
    rows = paired_comparison(sides[0], sides[1:], metric, args.resamples, args.seed)
    table = Table(title=f"paired bootstrap on {metric}, candidate − A ({args.resamples} resamples, seed {args.seed})"
                  + mark)
    for col in ("candidate", "A mean", "candidate mean", "difference [95% CI]", "p", "p (Holm)", "d_z", "examples"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for r in rows:
        table.add_row(r["candidate"], f"{r['baseline_mean']:.4f}", f"{r['candidate_mean']:.4f}",
                      f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]", f"{r['p_value']:.4g}",
                      f"{r['p_holm']:.4g}", f"{r['effect_size']:.2f}", str(r["n_examples"]))
    console.print(table)
    for r in rows:
        console.print(describe(r) + mark, soft_wrap=False)
    return 0


# eval -------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from modalign.recipes.evaluate import evaluate_run

    from rich.markup import escape

    result = evaluate_run(Path(args.run), args.split, args.export_embeddings, progress=not args.quiet,
                          device=args.device)
    console = _console()
    console.print(escape(f"{args.run} [{args.split}] step {result['step']} ({Path(result['checkpoint']).name}, "
                         f"{result['device']})"))
    for k, v in result["metrics"].items():
        console.print(f"  {k:<28} {v:.4f}")
    return 0


# variants ---------------------------------------------------------------------------------------
def cmd_variants(args) -> int:
    if args.action == "new":
        from modalign.registry import scaffold

        if not args.name:
            raise UserError("variants new: give the variant's name, e.g. modalign variants new gated_mlp")
        pkg = scaffold(args.name, Path(args.dir), created_by=args.created_by, model=args.model,
                       experiment_id=args.experiment_id)
        console = _console()
        console.print(f"created {pkg}/ (__init__.py, conf/head/{args.name}.yaml, README.md)")
        console.print(f"use it:  MODALIGN_PLUGINS={pkg.resolve()} modalign train head={args.name}")
        return 0
    if args.name:
        raise UserError(f"variants: unexpected argument '{args.name}' (did you mean: modalign variants new {args.name}?)")
    from rich.table import Table

    from modalign.registry import all_variants
    from modalign.analysis.metrics import full_name, larger_is_better
    from modalign.runs.index import find_runs

    metric = full_name(args.metric)
    runs = find_runs(Path(args.outputs)) if Path(args.outputs).exists() else []
    table = Table(title=f"variants (runs and best {metric} under {args.outputs})")
    for col in ("kind", "name", "created by", "model", "date", "experiment", "version", "approach", "status",
                "runs", f"best {args.metric}"):
        table.add_column(col, justify="right" if col in ("runs", f"best {args.metric}") else "left",
                         overflow="fold")
    for var in all_variants():
        mine = [r for r in runs if r.status == "completed" and (r.info.get("variant") or {}).get("name") == var.name
                and (r.info.get("variant") or {}).get("kind") == var.kind]
        values = [v for v in (r.metric(metric) for r in mine) if v is not None]
        best = (max if larger_is_better(metric) else min)(values) if values else None
        table.add_row(var.kind, var.name, var.created_by, var.model, var.date, var.experiment_id, var.version,
                      var.approach, var.status, str(len(mine)), "" if best is None else f"{best:.3f}")
    _console().print(table)
    return 0


# check ------------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    """A run's health checks from its directory (modalign.analysis.checks), with the run's own
    thresholds or the ones given; prints a table; exit 1 if one fails."""
    import yaml
    from rich.table import Table

    from modalign.analysis.checks import evaluate, read_predictions, validate, verdict
    from modalign.runs.rundir import RunDir, read_json

    run = Path(args.run)
    if not (run / "run.json").is_file():
        raise UserError(f"check: {run}: not a run directory (no run.json)")
    try:
        cfg = yaml.safe_load((run / "cfg.yaml").read_text()) if (run / "cfg.yaml").exists() else {}
    except yaml.YAMLError as e:
        raise UserError(f"check: {run / 'cfg.yaml'}: not YAML ({' '.join(str(e).split())})") from None
    checks_cfg = dict((cfg or {}).get("checks") or {})
    for item in args.overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 3 or parts[0] != "checks":
            raise UserError(f"check: '{item}': expected checks.KEY.NAME=VALUE, e.g. checks.loss_falls.min_drop=0.2")
        checks_cfg.setdefault(parts[1], {})
        if not isinstance(checks_cfg[parts[1]], dict):
            checks_cfg[parts[1]] = {}
        checks_cfg[parts[1]] = {**checks_cfg[parts[1]], parts[2]: yaml.safe_load(value)}
    validate(checks_cfg)
    cfg = {**(cfg or {}), "checks": checks_cfg}
    rd = RunDir(run)
    summary_path = rd.facts / "summary.json"
    info = rd.info()
    checks = evaluate(info, cfg, rd.read_metrics(), read_json(summary_path) if summary_path.exists() else None,
                      read_predictions(run, info))
    table = Table(title=f"checks of {run.name}: {verdict(checks)}")
    for col in ("phase", "check", "status", "value", "threshold", "message"):
        table.add_column(col)
    for c in checks:
        style = {"fail": "bold red", "warn": "yellow"}.get(c["status"], "green")
        table.add_row(c["phase"], c["name"], f"[{style}]{c['status']}[/{style}]",
                      "" if c["value"] is None else str(c["value"])[:40], "" if c["threshold"] is None else str(c["threshold"]),
                      c["message"])
    _console().print(table)
    return 1 if verdict(checks) == "fail" else 0


# diff-config ------------------------------------------------------------------------------------
def _config_of(spec: str, recipe: str) -> tuple[dict, str]:
    """A resolved config from a run directory, a YAML file, or overrides. -> (config, what it is)."""
    import yaml

    p = Path(spec)
    f = p / "cfg.yaml" if p.is_dir() else p
    if p.is_dir() and not f.exists():
        raise UserError(f"diff-config: {spec}: a directory without cfg.yaml (not a run directory)")
    if f.is_file():
        try:
            cfg = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"diff-config: {f}: not readable YAML ({' '.join(str(e).split())[:120]})") from None
        if not isinstance(cfg, dict):
            raise UserError(f"diff-config: {f}: not a config (a YAML mapping)")
        return cfg, str(f)
    if "=" not in spec:
        raise UserError(f"diff-config: {spec}: no such run directory or file, and not overrides (KEY=VALUE ...)")
    from modalign.recipes.config import compose, to_container
    from modalign.recipes.launch import root_config

    return to_container(compose(spec.split(), root_config(recipe)), "", throw_on_missing=False), f"{recipe} {spec}"


def cmd_diff_config(args) -> int:
    """Two configs side by side: every key whose value differs (bookkeeping left out unless --all)."""
    from rich.table import Table

    from modalign.analysis.comparability import config_diff
    from modalign.runs.card import flatten

    a, what_a = _config_of(args.a, args.recipe)
    b, what_b = _config_of(args.b, args.recipe)
    if args.all:
        fa, fb = flatten(a), flatten(b)
        diff = {k: {"A": fa.get(k), "B": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
    else:
        diff = config_diff({"A": a, "B": b})
    if not diff:
        print(f"same configuration: {what_a} and {what_b}" + ("" if args.all else " (bookkeeping keys not compared; --all)"))
        return 0
    table = Table(title=f"{len(diff)} keys differ")
    table.add_column("key")
    table.add_column(f"A: {what_a}", overflow="fold")
    table.add_column(f"B: {what_b}", overflow="fold")
    for k, v in diff.items():
        table.add_row(k, "—" if v.get("A") is None else str(v.get("A")), "—" if v.get("B") is None else str(v.get("B")))
    _console().print(table)
    return 1


# plan -------------------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    """`modalign plan run|status|graph|report` (modalign.plans)."""
    from modalign.plans.spec import load_plan

    if args.plan_command == "graph":
        from modalign.plans.report import graph_text, plot_graph

        plan = load_plan(args.plan)
        print(graph_text(plan))
        if args.out:
            out = Path(args.out)
            if out.suffix.lower() != ".png":
                raise UserError(f"plan graph --out {args.out}: give a .png file")
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"plan graph --out {args.out}: cannot write there ({e.strerror})") from None
            print(f"graph: {plot_graph(plan, out)}")
        return 0
    if args.plan_command in ("status", "report"):
        from modalign.plans.report import find_plan_dir, status_text, write_plan_report

        plan_dir = find_plan_dir(args.plan)
        if args.plan_command == "status":
            print(status_text(plan_dir))
        else:
            print(write_plan_report(plan_dir))
        return 0
    from modalign.plans.executor import Executor

    plan = load_plan(args.plan)
    ex = Executor(plan, list(args.overrides), jobs=args.jobs or plan.jobs, quiet=args.quiet)
    n = ex.check_all()
    if ex.capped:
        print(f"plan: --jobs {args.jobs} is more than the {ex.slots} cores here; running {ex.slots} at once",
              file=sys.stderr)
    if not args.quiet:
        print(f"plan {plan.name}: {len(plan.phases)} phases, {n} jobs known before it starts; directory {ex.dir}; "
              f"{ex.slots} at once, {ex.threads} threads each", file=sys.stderr)
    code = ex.run()
    if args.quiet:
        print(ex.dir)
    return code


# convert ----------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    """Read any data format lazily and stream it into another (modalign.data.formats.convert)."""
    from modalign.data.formats import convert
    from modalign.data.npz import array_items

    bars = []

    def progress(data):  # the bar starts once the input is read and valid
        if args.quiet:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("convert"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=True)
        bars.append(bar)
        bar.start()
        task = bar.add_task("arrays", total=sum(a.nbytes for a in array_items(data).values()))
        return lambda n: bar.advance(task, n)

    try:
        data, fmt = convert(args.input, args.output, captions=args.captions, compress=args.compress, progress=progress)
    finally:
        for bar in bars:
            bar.stop()
    out = Path(args.output)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({fmt}, {size / 1e6:.1f} MB): {len(data)} samples; captions {out.with_suffix('.jsonl')}"
          + (f"; class prompts {out.with_suffix('.prompts.json')}" if data.class_prompts else ""))
    return 0


# runs -------------------------------------------------------------------------------------------
def cmd_runs(args) -> int:
    from rich.table import Table

    from modalign.runs.index import find_runs, parse_where, select

    from modalign.analysis.checks import cell as checks_cell
    from modalign.analysis.metrics import HEADLINE, larger_is_better

    where = parse_where(args.where)
    records = select(find_runs(Path(args.root)), where)
    recipes = list(dict.fromkeys(str(r.info.get("recipe") or "align") for r in records)) or ["align"]
    columns = list(dict.fromkeys(m for rec in recipes for m in HEADLINE.get(rec, HEADLINE["align"])))
    if args.sort:
        if records and all(r.metric(args.sort) is None for r in records):
            raise UserError(f"--sort {args.sort}: no run under {args.root} has this metric (e.g. m2t_R@1, t2m_mAP, "
                            "zeroshot_acc, rec_tokens, cider_d)")
        sign = -1.0 if larger_is_better(args.sort) else 1.0  # best first
        records.sort(key=lambda r: (r.metric(args.sort) is None, sign * (r.metric(args.sort) or 0.0)))
        if args.sort.split("/")[-1] not in columns:
            columns.append(args.sort)
    table = Table(title=f"runs under {args.root} ({len(records)})")
    for col in ("run", "status", "checks", "data", "encoder", "head / fusion", "steps", *columns, "wall s"):
        table.add_column(col, justify="right" if col in columns or col in ("steps", "wall s") else "left")
    for r in records:
        s = r.summary or {}
        cells = [r.path.name, r.status, checks_cell(r.info.get("checks")).split(":")[0], str(r.field("data.name") or ""),
                 str(r.field("encoder.kind") or ""),
                 str(r.field("head.kind") or r.field("fusion.kind") or ""), str(s.get("steps", ""))]
        for m in columns:
            v = r.metric(m)
            cells.append("" if v is None else f"{v:.3f}")
        cells.append(f"{s['wall_seconds']:.0f}" if "wall_seconds" in s else "")
        table.add_row(*cells)
    _console().print(table)
    return 0


def cmd_sync(args) -> int:
    """Replay run directories into sinks (modalign.sinks.sync): runs trained before a sink was
    configured, or on a machine without it. Each sink receives only what it does not hold yet."""
    import yaml

    from modalign.runs.index import find_runs
    from modalign.sinks import read_logger, sync

    names = [n.strip() for item in args.to for n in item.split(",") if n.strip()]
    section: dict = {n: {} for n in names}
    for o in args.options:
        key, eq, value = o.partition("=")
        sink, _, leaf = key.partition(".")
        if not eq or not leaf:
            raise UserError(f"sync: '{o}': expected SINK.KEY=VALUE, e.g. mlflow.uri=sqlite:///m.db")
        if sink not in section:
            raise UserError(f"sync: '{o}' sets an option of '{sink}', which is not among --to {','.join(names)}")
        section[sink][leaf] = yaml.safe_load(value) if value else None
    logger = read_logger(section, key="sync --to")
    runs = [r.path for r in find_runs(Path(args.target)) if (r.path / "metrics.jsonl").exists()]
    if not runs:
        raise UserError(f"sync: {args.target}: no run directories there (a run, a sweep, or an outputs root)")
    results = sync(runs, logger)
    if not args.quiet:
        from rich.table import Table

        table = Table(title=f"synced {len(runs)} run(s) to {', '.join(names)}")
        table.add_column("run")
        for n in names:
            table.add_column(f"{n}: steps sent", justify="right")
        for path, res in results:
            cells = [path.name]
            for n in names:
                r = res[n]
                if not r["ok"]:
                    cells.append("failed (see the log)")
                elif r["after"] == r["before"]:
                    cells.append("up to date")
                else:
                    cells.append(f"{0 if r['before'] is None else r['before'] + 1}..{r['after']}")
            table.add_row(*cells)
        _console().print(table)
    failed = sum(1 for _, res in results for n in names if not res[n]["ok"])
    return 1 if failed else 0


def cmd_serve(args) -> int:
    """A read-only local web view (modalign.serve) until Ctrl-C."""
    import ipaddress

    from modalign.serve import make_server

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"serve: {root}: no such directory (an outputs root, e.g. outputs)")
    if not 0 <= args.port <= 65535:
        raise UserError(f"serve: --port {args.port}: expected 0..65535")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"modalign: warning: serving on {args.host}: anyone who can reach this machine can read your runs "
              "(it is read-only, without authentication)", file=sys.stderr)
    try:
        server = make_server(root, args.host, args.port)
    except OSError as e:
        raise UserError(f"serve: cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    host, port = server.server_address[:2]
    print(f"modalign serve: http://{host}:{port}/ (read-only view of {root.resolve()}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
