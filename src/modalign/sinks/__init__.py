"""Tracking sinks: mirrors of a run directory in TensorBoard, MLflow and W&B (offline by default).

    modalign train logger=[tensorboard,mlflow,wandb]
    modalign sync outputs/experiments/<a sweep> --to mlflow

The run directory stays the source of truth; a sink is a copy of it where a group already looks.
Every sink is fed from the same place, metrics.jsonl, by a `Mirror` attached to the run writer:

- points reach a sink when they are *committed*: at each `last.pt` checkpoint (everything up to
  its step) and when the run completes (everything, the test points included). A resumed run
  restarts from `last.pt`, so what a sink holds is never sent twice, and the points a killed run
  logged after its last checkpoint are sent once, by the session that logs them again;
- each sink's committed step and its ids (MLflow run id, W&B run id) are kept in the run's
  `tracking.json`, so a resumed run continues the same MLflow / W&B run and the same event files;
- a sink that fails (disk, lock, server) is logged once and detached: it never stops the run nor
  costs the run directory a point;
- `modalign sync` replays run directories through the same `Mirror`: a sink is one code path.

The sinks' packages are optional (`pip install 'modalign[tracking]'`); a configured sink whose
package is missing is one line and exit 2 before anything trains. No torch at import time.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalign import faults
from modalign.errors import UserError
from modalign.options import Options, one_of, require

log = logging.getLogger("modalign")
INSTALL = "pip install 'modalign[tracking]'"
STATE_FILE = "tracking.json"


@dataclass
class TensorBoardOptions(Options):
    dir: str = "tb"  # event files, relative to the run directory

    def validate(self) -> None:
        require(bool(self.dir) and not Path(self.dir).is_absolute() and ".." not in Path(self.dir).parts,
                "dir", self.dir, "a folder inside the run directory (relative, no '..')")


@dataclass
class MLflowOptions(Options):
    uri: Any = None  # tracking URI; default sqlite:///<outputs>/mlflow.db (artifacts in <outputs>/mlartifacts)
    experiment: str = "modalign"

    def validate(self) -> None:
        require(self.uri is None or (isinstance(self.uri, str) and bool(self.uri)), "uri", self.uri,
                "a tracking URI (sqlite:///PATH, file:PATH, http://...) or null for the default")
        require(bool(self.experiment), "experiment", self.experiment, "a non-empty experiment name")


@dataclass
class WandbOptions(Options):
    mode: str = "offline"  # offline: files under the run dir, `wandb sync` later; online contacts the server
    project: str = "modalign"
    entity: Any = None

    def validate(self) -> None:
        one_of(self, "mode", ("offline", "online"))
        require(bool(self.project), "project", self.project, "a non-empty project name")


# name -> (options, the module that must be importable, the sink class's module)
SINKS: dict[str, tuple[type[Options], str, str]] = {
    "tensorboard": (TensorBoardOptions, "tensorboard", "modalign.sinks.tb"),
    "mlflow": (MLflowOptions, "mlflow", "modalign.sinks.mlflow_sink"),
    "wandb": (WandbOptions, "wandb", "modalign.sinks.wandb_sink"),
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def read_logger(section, key: str = "logger") -> dict[str, Options]:
    """The `logger` section ({sink name: its options}, or empty / null for none) -> typed options,
    each sink's package checked. Raises UserError (one line) for an unknown sink, a bad option or a
    missing package."""
    from modalign.recipes.config import typed

    if section is None:
        return {}
    if not isinstance(section, dict):
        raise UserError(f"config: '{key}' must be a mapping of sinks (logger=[tensorboard,mlflow,wandb]), got {section!r}")
    out = {}
    for name, opts in section.items():
        if name not in SINKS:
            raise UserError(f"config: unknown sink '{key}.{name}' (known: {', '.join(SINKS)})")
        cls, module, _ = SINKS[name]
        out[name] = typed(cls, opts if opts is not None else {}, f"{key}.{name}")
        if not installed(module):
            raise UserError(f"{key}={name}: the {module} package is not installed: {INSTALL}")
    return out


def build_sink(name: str, options: Options):
    import importlib

    cls = importlib.import_module(SINKS[name][2]).SINK
    return cls(options)


# --- what a sink is told about a run ----------------------------------------------------------


@dataclass
class RunMeta:
    path: Path
    id: str
    name: str
    recipe: str
    status: str
    config: dict
    tags: dict[str, str]
    sweep: str | None  # the sweep directory's name, for a sweep job
    outputs: Path  # the outputs root that holds the run (runs/ or experiments/ under it)
    committed: int | None  # the step the sink holds points up to (None: a new sink)

    @property
    def label(self) -> str:
        return f"{self.sweep}/{self.path.name}" if self.sweep else self.id

    def figures(self) -> list[Path]:
        return sorted((self.path / "figures").glob("*.png"))


def outputs_root(run: Path) -> Path:
    """<root>/runs/<run> or <root>/experiments/<sweep>/<job> -> <root>; else the run's parent."""
    run = run.resolve()
    for p in run.parents:
        if p.name in ("runs", "experiments"):
            return p.parent
    return run.parent


def run_meta(path: Path, committed: int | None) -> RunMeta:
    import yaml

    from modalign.runs.card import flatten

    info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    cfg_path = path / "cfg.yaml"
    config = (yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}) if cfg_path.exists() else {}
    sweep = path.parent.name if (path.parent / "sweep.yaml").exists() else None
    flat = flatten(info)
    tags = {"recipe": str(info.get("recipe", "")), "status": str(info.get("status", "")),
            "seed": str(info.get("seed", "")), "run_dir": str(path.resolve())}
    variant = info.get("variant") or {}
    if variant.get("name"):
        tags["variant"] = f"{variant.get('kind', '')}:{variant['name']}".lstrip(":")
    for split in ("train", "val", "test"):
        fp = flat.get(f"data.splits.{split}.fingerprint")
        if fp:
            tags[f"data_{split}"] = str(fp)[:16]
    if sweep:
        tags["sweep"] = sweep
    return RunMeta(path=path, id=str(info.get("id", path.name)), name=str(info.get("name", path.name)),
                   recipe=str(info.get("recipe", "")), status=str(info.get("status", "")), config=config,
                   tags=tags, sweep=sweep, outputs=outputs_root(path), committed=committed)


# --- the mirror ---------------------------------------------------------------------------------


def read_state(path: Path) -> dict:
    """The run's tracking.json ({sink: {committed, ids, finished}}), {} when absent or unreadable."""
    p = path / STATE_FILE
    try:
        state = json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


class Mirror:
    """Feeds the sinks from a run's metrics.jsonl (see the module's docstring)."""

    def __init__(self, path: Path, sinks: dict[str, Any]):
        self.path = Path(path)
        self.all = dict(sinks)  # name -> sink
        self.active = dict(sinks)  # the ones not detached nor finished
        self.opened: set[str] = set()
        self.state: dict[str, dict] = read_state(self.path)
        self.rows: list[dict] = []
        self._offset = 0  # bytes of metrics.jsonl read so far (this session)
        self._sent: dict[str, int] = {}  # name -> index in self.rows of the first row not yet sent
        self.failed: set[str] = set()  # detached after a failure
        self.checkpoint_step: int | None = None  # the step of this session's last last.pt
        # seconds spent inside each sink's calls, by phase (open / log / finish), earlier sessions
        # included: what the sinks cost the run, kept in tracking.json
        self.seconds: dict[str, dict[str, float]] = {
            n: {k: float(v) for k, v in (self.state.get(n, {}).get("seconds") or {}).items()} for n in self.all}

    # state -------------------------------------------------------------------------------------
    def _write_state(self) -> None:
        from modalign.runs.rundir import atomic_write_json

        for name, st in self.state.items():
            if self.seconds.get(name):
                st["seconds"] = {k: round(v, 6) for k, v in self.seconds[name].items()}
        atomic_write_json(self.path / STATE_FILE, self.state)

    def _read_new_rows(self) -> None:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return
        with open(p, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only (a torn last line is never a point)
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and {"step", "split", "name", "value"} <= set(row):
                self.rows.append(row)
        self._offset += end

    # the sinks -----------------------------------------------------------------------------------
    PHASES = {"opening": "open", "logging points": "log", "finishing": "finish"}

    def _call(self, name: str, what: str, fn) -> bool:
        t0 = time.perf_counter()
        try:
            if faults.hit(f"raise:sink_{name}"):  # a sink failing mid-run (see modalign.faults)
                raise OSError(f"injected failure of the {name} sink")
            fn()
            return True
        except Exception as e:  # a sink never stops the run: log once, detach it
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            log.warning("logger %s failed while %s (%s: %s); detached: the run directory keeps every point",
                        name, what, type(e).__name__, text)
            self.active.pop(name, None)
            self.failed.add(name)
            self._close(name)
            return False
        finally:
            spent = self.seconds.setdefault(name, {})
            phase = self.PHASES[what]
            spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - t0

    def _close(self, name: str) -> None:
        if name in self.opened:
            self.opened.discard(name)
            try:
                self.all[name].close()
            except Exception:  # closing a failed sink: nothing more to lose
                pass

    def _open(self, name: str) -> bool:
        if name in self.opened:
            return True
        st = dict(self.state.get(name, {}))
        meta = run_meta(self.path, st.get("committed"))
        sink = self.all[name]
        self.opened.add(name)  # so a failure while opening closes what was half opened
        if not self._call(name, "opening", lambda: st.update(sink.open(meta, dict(st)) or {})):
            return False
        self.state[name] = st
        # what the sink holds already (a resumed or synced run): every row up to its committed step;
        # rows read after this are new, whatever their step (e.g. the test points at the last step)
        committed = st.get("committed")
        start = 0
        while committed is not None and start < len(self.rows) and self.rows[start]["step"] <= committed:
            start += 1
        self._sent[name] = start
        return True

    def start(self) -> None:
        """Training is about to start: open the live sinks now (their imports, an MLflow store's
        creation), so that neither the first checkpoint nor the run's train_seconds pays for it,
        and a sink that cannot open is detached before the first step."""
        if not self.active:
            return
        self._read_new_rows()  # a resumed run: what the sinks hold is known before they open
        for name, sink in list(self.active.items()):
            if getattr(sink, "live", True):
                self._open(name)
        self._write_state()

    def checkpoint(self, step: int) -> None:
        """last.pt now holds `step`: the live sinks get every point up to it. A sink that is not live
        (W&B offline: nobody watches it before `wandb sync`) waits for the end of the run."""
        self.checkpoint_step = step
        self.commit(step, [n for n, sink in self.active.items() if getattr(sink, "live", True)])

    def commit(self, upto: int | None = None, names: list[str] | None = None) -> None:
        """Send every point of metrics.jsonl up to step `upto` (None: all) that a sink does not hold."""
        if not self.active:
            return
        self._read_new_rows()
        for name in list(self.active) if names is None else [n for n in names if n in self.active]:
            if not self._open(name):
                continue
            start, stop = self._sent[name], len(self.rows)
            if upto is not None:
                while stop > start and self.rows[stop - 1]["step"] > upto:
                    stop -= 1
            todo = self.rows[start:stop]
            sink = self.all[name]
            if todo and not self._call(name, "logging points", lambda: sink.log(todo)):
                continue
            self._sent[name] = stop
            if todo:
                self.state[name]["committed"] = todo[-1]["step"]
        self._write_state()

    def finish(self, status: str) -> None:
        """The run ended: `completed` sends every point left, then each sink gets the run's status,
        figures and card; `failed` / `interrupted` send nothing past the last checkpoint (a resume
        logs those steps again)."""
        if not self.active:
            return
        if status == "completed":
            self.commit(None)
        elif self.checkpoint_step is not None:  # the sinks that are not live: up to the last checkpoint
            self.commit(self.checkpoint_step)
        for name in list(self.active):
            if not self._open(name):
                continue
            meta = run_meta(self.path, self.state[name].get("committed"))
            if self._call(name, "finishing", lambda: self.all[name].finish(status, meta)):
                self.state[name]["finished"] = status
            self._close(name)
        self.active.clear()
        self._write_state()

    def close(self) -> None:
        """Close whatever is still open (e.g. an exception ended the run before a status was set)."""
        for name in list(self.opened):
            self._close(name)
        self.active.clear()


def attach(writer, logger: dict[str, Options]) -> Mirror | None:
    """A Mirror of `writer`'s run for the configured sinks (None without any, or on ranks > 0)."""
    if not logger or not writer.writes:
        return None
    mirror = Mirror(writer.path, {name: build_sink(name, opts) for name, opts in logger.items()})
    writer.mirror = mirror
    return mirror


def last_checkpoint_step(path: Path) -> int:
    """The step of the run's last.pt (-1 without one): what a resume starts from."""
    try:
        manifest = json.loads((path / "checkpoints" / "manifest.json").read_text(encoding="utf-8"))
        return int(manifest["checkpoints"]["last.pt"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def sync(paths: list[Path], logger: dict[str, Options]) -> list[tuple[Path, dict]]:
    """Push run directories into sinks after the fact. -> [(run, {sink: {before, after, ok}})]: the
    step each sink held before and after. A sink that already holds a run, ended, is not reopened."""
    from modalign.runs.rundir import RunDir

    out = []
    for path in paths:
        status = json.loads((path / "run.json").read_text(encoding="utf-8")).get("status", "running")
        last = max((r["step"] for r in RunDir(path).read_metrics()), default=None)
        state = read_state(path)
        before = {n: state.get(n, {}).get("committed") for n in logger}
        todo = {n: o for n, o in logger.items()
                if not (state.get(n, {}).get("finished") == status and before[n] == last)}
        mirror = Mirror(path, {name: build_sink(name, opts) for name, opts in todo.items()})
        if status == "completed":
            mirror.finish(status)
        else:  # failed, interrupted, running or killed: its points up to its last checkpoint (what a
            mirror.commit(last_checkpoint_step(path))  # resume keeps), and its status when it has ended
            if status in ("failed", "interrupted"):
                mirror.finish(status)
            mirror.close()
        out.append((path, {n: {"before": before[n], "after": mirror.state.get(n, {}).get("committed"),
                               "ok": n not in mirror.failed} for n in logger}))
    return out
