"""A plan file, read and checked: phases of runs and sweeps with dependencies, gates, early starts,
triggers, replication and statistics (docs/plans.md). No torch, no Hydra: `modalign plan graph`
reads a plan in a blink, and every mistake in one is a single line naming the key, before any job.

    # modalign plan run align_study
    name: align_study
    recipe: align                 # each step's recipe unless it names its own
    metric: test/m2t_R@1          # the plan's headline metric (reports, statistics, replicate's top)
    overrides: [data.n_train=2000]  # every job's
    phases:
      sanity:
        runs: {overfit: {overrides: [data.n_train=256]}}
      core:
        after: [sanity]
        gate: {results: sanity.overfit, checks: pass, criteria: {metric: ..., bands: [...]}}
        runs: {primary: {overrides: [head=mlp]}}
        sweeps: {heads: {grid: {head: [linear, registers], seed: [0, 1]}}}
        triggers:
          scst: {run: core.fused, when: "plateau(val/cider_d, patience=2, min_delta=0.5)",
                 start: {overrides: [loss=scst, "init_from=${ref:core.fused.dir}"]}}
      ablations:
        after: [core]
        start_when: {run: core.primary, stable: {metric: val/m2t_R@1, last: 3, epsilon: 0.01}}
        ...
      replicate:
        after: [core]
        replicate: {results: core, top: 2, overrides: [data.seed=1]}
      statistics:
        after: [core, ablations]
        statistics: {results: [core, ablations], baseline: head=linear}
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from modalign.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf" / "plan"
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
REF = re.compile(r"\$\{ref:([^}]*)\}")
REF_FIELDS = ("dir", "checkpoint", "best.dir", "best.checkpoint")
PLATEAU = re.compile(r"\s*plateau\(\s*([^,\s)]+)\s*((?:,\s*[a-z_]+\s*=\s*[^,\s)]+\s*)*)\)\s*")
RECIPES = ("align", "autoencode", "fuse")


@dataclass(frozen=True)
class Step:
    phase: str
    name: str
    recipe: str
    overrides: tuple[str, ...]
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()  # a sweep's grid, in its order; () for a run

    @property
    def key(self) -> str:
        return f"{self.phase}.{self.name}"

    def points(self) -> list[list[str]]:
        """Each job's own overrides: the step's, then one grid point (the grid varies fastest last)."""
        if not self.grid:
            return [list(self.overrides)]
        keys = [k for k, _ in self.grid]
        return [merge_overrides(list(self.overrides), [f"{k}={v}" for k, v in zip(keys, values)])
                for values in itertools.product(*(vs for _, vs in self.grid))]


@dataclass(frozen=True)
class Gate:
    results: tuple[str, ...]  # phase or phase.step names
    checks: bool  # every health check of those runs must have passed
    criteria: object | None  # modalign.analysis.criteria.Criteria
    passing: tuple[str, ...]  # the verdicts that open the gate
    where: str


@dataclass(frozen=True)
class StartWhen:
    run: str  # phase.step (its first job)
    metric: str | None = None  # stable: the metric moved less than epsilon over the last `last` evaluations
    last: int = 3
    epsilon: float = 0.0
    step: int | None = None  # or: the run reached this training step

    def describe(self) -> str:
        if self.step is not None:
            return f"{self.run} reached step {self.step}"
        return f"{self.run} stable ({self.metric} moved < {self.epsilon:g} over its last {self.last} evaluations)"


@dataclass(frozen=True)
class Trigger:
    phase: str
    name: str
    on: str  # phase.step whose runs are watched
    metric: str
    patience: int
    min_delta: float
    start: Step  # the linked run (its overrides may use ${ref:...})

    @property
    def key(self) -> str:
        return f"{self.phase}.{self.name}"

    def describe(self) -> str:
        return f"plateau({self.metric}, patience={self.patience}, min_delta={self.min_delta:g}) on {self.on}"


@dataclass(frozen=True)
class Replicate:
    results: tuple[str, ...]
    top: int | None  # the best `top` configurations by the plan's metric; None = all
    overrides: tuple[str, ...]  # the other data set


@dataclass(frozen=True)
class Statistics:
    results: tuple[str, ...]
    baseline: str | None  # a group label (head=linear) or a phase.step whose runs are the baseline
    metric: str | None
    criteria: object | None


@dataclass
class Phase:
    name: str
    after: tuple[str, ...] = ()
    steps: list[Step] = field(default_factory=list)
    gate: Gate | None = None
    start_when: StartWhen | None = None
    triggers: list[Trigger] = field(default_factory=list)
    replicate: Replicate | None = None
    statistics: Statistics | None = None

    def needs(self) -> set[str]:
        """Every name (phase or phase.step) this phase reads results of, beyond `after`."""
        out: set[str] = set()
        for s in self.steps + [t.start for t in self.triggers]:
            out |= {r.rsplit(".", 1)[0] if r.endswith(".best") else r for r in refs_of(s.overrides)}
        if self.gate:
            out |= set(self.gate.results)
        if self.replicate:
            out |= set(self.replicate.results)
        if self.statistics:
            out |= set(self.statistics.results)
            if self.statistics.baseline and "=" not in self.statistics.baseline:
                out.add(self.statistics.baseline)
        return out


@dataclass
class Plan:
    name: str
    file: Path
    recipe: str
    metric: str | None
    overrides: tuple[str, ...]
    phases: dict[str, Phase]
    text: str  # the file as written (kept in plan.json)
    jobs: int = 1  # jobs at once unless `--jobs` says otherwise

    def step(self, key: str) -> Step:
        phase, _, name = key.partition(".")
        for s in self.phases[phase].steps:
            if s.name == name:
                return s
        for t in self.phases[phase].triggers:
            if t.name == name:
                return t.start
        raise KeyError(key)

    def order(self) -> list[str]:
        """The phases in an order that respects every dependency (the file's order where free)."""
        done: list[str] = []
        pending = list(self.phases)
        while pending:
            for p in pending:
                deps = {d.split(".")[0] for d in (*self.phases[p].after, *self.phases[p].needs())} - {p}
                if deps <= set(done):
                    done.append(p)
                    pending.remove(p)
                    break
            else:  # validated: no cycles
                done += pending
                break
        return done


def merge_overrides(*lists: list[str]) -> list[str]:
    """Override lists joined, a later value of the same key replacing an earlier one in place."""
    out: dict[str, str] = {}
    for lst in lists:
        for o in lst:
            key = o.split("=", 1)[0].lstrip("+~")
            out.pop(key, None)
            out[key] = o
    return list(out.values())


def refs_of(overrides) -> list[str]:
    """The targets (phase, phase.step, or either + '.best') named by ${ref:...} in `overrides`."""
    out = []
    for o in overrides:
        for expr in REF.findall(o):
            target, fld = split_ref(expr)
            out.append(target)
    return out


def split_ref(expr: str) -> tuple[str, str]:
    """'core.fused.best.checkpoint' -> ('core.fused', 'best.checkpoint'); the field is one of REF_FIELDS."""
    for f in sorted(REF_FIELDS, key=len, reverse=True):
        if expr.endswith("." + f):
            return expr[: -len(f) - 1], f
    raise ValueError(expr)


def plan_file(name_or_file: str) -> Path:
    name_or_file = name_or_file.removeprefix("plan=")
    p = Path(name_or_file)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"plan: no such plan file {name_or_file}")
        return p
    f = CONF / f"{name_or_file}.yaml"
    if not f.exists():
        shipped = ", ".join(sorted(x.stem for x in CONF.glob("*.yaml")))
        raise UserError(f"plan: no plan '{name_or_file}' (shipped plans: {shipped}; or give a plan file's path)")
    return f


def load_plan(name_or_file: str) -> Plan:
    import yaml

    path = plan_file(name_or_file)
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_plan(raw, path, text)


def _strings(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        raise UserError(f"{where} must be a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def _overrides(value, where: str) -> tuple[str, ...]:
    out = _strings(value, where)
    for o in out:
        if "=" not in o and not o.startswith("~"):
            raise UserError(f"{where}: '{o}' is not an override (KEY=VALUE)")
        for expr in REF.findall(o):
            try:
                split_ref(expr)
            except ValueError:
                raise UserError(f"{where}: '${{ref:{expr}}}' must end in one of .{', .'.join(REF_FIELDS)} "
                                "(e.g. ${ref:core.primary.best.checkpoint})") from None
    return out


def _keys(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise UserError(f"{where}.{extra[0]} is not a key here (known: {', '.join(allowed)})")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise UserError(f"{where}: '{value}' is not a name (letters, digits, _ and -, starting with a letter)")
    return value


def _step(phase: str, name: str, obj, recipe: str, where: str, sweep: bool) -> Step:
    obj = _mapping(obj, where)
    _keys(obj, ("recipe", "overrides", "grid") if sweep else ("recipe", "overrides"), where)
    r = obj.get("recipe", recipe)
    if r not in RECIPES:
        raise UserError(f"{where}.recipe: '{r}' is not a recipe ({', '.join(RECIPES)})")
    grid = ()
    if sweep:
        g = _mapping(obj.get("grid"), f"{where}.grid")
        if not g:
            raise UserError(f"{where}.grid must name at least one key and its values, e.g. {{seed: [0, 1]}}")
        items = []
        for k, vs in g.items():
            if isinstance(vs, str):
                vs = [v.strip() for v in vs.split(",")]
            if not isinstance(vs, list) or not vs:
                raise UserError(f"{where}.grid.{k} must be a non-empty list of values, got {vs!r}")
            items.append((str(k), tuple(str(v) for v in vs)))
        grid = tuple(items)
    return Step(phase, name, r, _overrides(obj.get("overrides"), f"{where}.overrides"), grid)


def _results(value, where: str) -> tuple[str, ...]:
    out = _strings(value, where)
    if not out:
        raise UserError(f"{where} must name a phase or a phase.step")
    return out


def _number(obj: dict, key: str, where: str, default, low: float, integer: bool = False):
    v = obj.get(key, default)
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= low
    if not ok or (integer and int(v) != v):
        kind = "an integer" if integer else "a number"
        raise UserError(f"{where}.{key} must be {kind} >= {low:g}, got {v!r}")
    return int(v) if integer else float(v)


def _gate(obj, where: str) -> Gate:
    from modalign.analysis.criteria import parse_criteria

    obj = _mapping(obj, where)
    _keys(obj, ("results", "checks", "criteria", "pass"), where)
    results = _results(obj.get("results"), f"{where}.results")
    checks = obj.get("checks")
    if checks not in (None, "pass"):
        raise UserError(f"{where}.checks must be 'pass' (every health check of the results passed), got {checks!r}")
    crit = parse_criteria(obj["criteria"], where) if obj.get("criteria") is not None else None
    if crit is None and checks is None:
        raise UserError(f"{where} needs criteria (bands on a metric) or checks: pass")
    passing = _strings(obj.get("pass"), f"{where}.pass")
    if crit is not None:
        verdicts = [b.verdict for b in crit.bands]
        for v in passing:
            if v not in verdicts:
                raise UserError(f"{where}.pass: '{v}' is not a verdict of its bands ({', '.join(verdicts)})")
        if not passing:  # every band but the least favourable one
            passing = tuple(verdicts[:-1]) if len(verdicts) > 1 else tuple(verdicts)
    return Gate(results, checks == "pass", crit, passing, where)


def _start_when(obj, where: str) -> StartWhen:
    obj = _mapping(obj, where)
    _keys(obj, ("run", "stable", "step"), where)
    run = obj.get("run")
    if not isinstance(run, str) or run.count(".") != 1:
        raise UserError(f"{where}.run must name a run as phase.step, got {run!r}")
    if ("stable" in obj) == ("step" in obj):
        raise UserError(f"{where} needs one of stable: {{metric, last, epsilon}} or step: N")
    if "step" in obj:
        return StartWhen(run, step=_number(obj, "step", where, None, 1, integer=True))
    st = _mapping(obj["stable"], f"{where}.stable")
    _keys(st, ("metric", "last", "epsilon"), f"{where}.stable")
    metric = st.get("metric")
    if not isinstance(metric, str) or "/" not in metric:
        raise UserError(f"{where}.stable.metric must name a logged metric such as val/m2t_R@1, got {metric!r}")
    return StartWhen(run, metric, _number(st, "last", f"{where}.stable", 3, 2, integer=True),
                     _number(st, "epsilon", f"{where}.stable", None, 0))


def _trigger(phase: str, name: str, obj, recipe: str, where: str) -> Trigger:
    obj = _mapping(obj, where)
    if True in obj:  # YAML 1.1 reads a key `on` as true
        raise UserError(f"{where}: name the watched run with run: (phase.step); `on:` reads as true in YAML")
    _keys(obj, ("run", "when", "start"), where)
    on = obj.get("run")
    if not isinstance(on, str) or on.count(".") != 1:
        raise UserError(f"{where}.run must name a run or sweep as phase.step, got {on!r}")
    when = obj.get("when")
    m = PLATEAU.fullmatch(when) if isinstance(when, str) else None
    if m is None:
        raise UserError(f"{where}.when must read plateau(METRIC, patience=N, min_delta=X), got {when!r}")
    args = dict(a.split("=", 1) for a in re.sub(r"\s", "", m.group(2)).split(",") if a)
    extra = sorted(set(args) - {"patience", "min_delta"})
    if extra:
        raise UserError(f"{where}.when: '{extra[0]}' is not an argument of plateau (patience, min_delta)")
    try:
        values = {k: float(v) for k, v in args.items()}
    except ValueError:
        raise UserError(f"{where}.when: plateau's arguments must be numbers, got {when!r}") from None
    values = {"patience": values.get("patience", 2), "min_delta": values.get("min_delta", 0.0)}
    patience = _number(values, "patience", f"{where}.when", None, 1, integer=True)
    min_delta = _number(values, "min_delta", f"{where}.when", None, 0)
    if not m.group(1).startswith("val/"):
        raise UserError(f"{where}.when: plateau watches a validation metric (val/...), got {m.group(1)!r}")
    start = _step(phase, name, obj.get("start"), recipe, f"{where}.start", sweep=False)
    return Trigger(phase, name, on, m.group(1), patience, min_delta, start)


def parse_plan(raw, path: Path, text: str = "") -> Plan:
    where = str(path)
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a plan is a mapping with name and phases, got {type(raw).__name__}")
    _keys(raw, ("name", "recipe", "metric", "jobs", "overrides", "phases"), where)
    jobs = _number(raw, "jobs", where + ":", 1, 1, integer=True)
    name = _name(raw.get("name", path.stem), f"{where}: name")
    recipe = raw.get("recipe", "align")
    if recipe not in RECIPES:
        raise UserError(f"{where}: recipe '{recipe}' is not a recipe ({', '.join(RECIPES)})")
    metric = raw.get("metric")
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise UserError(f"{where}: metric must be a metric name such as test/m2t_R@1, got {metric!r}")
    phases_raw = _mapping(raw.get("phases"), f"{where}: phases")
    if not phases_raw:
        raise UserError(f"{where}: phases must list at least one phase")
    phases: dict[str, Phase] = {}
    for pname, pobj in phases_raw.items():
        at = f"{where}: phases.{pname}"
        pname = _name(pname, at)
        pobj = _mapping(pobj, at)
        _keys(pobj, ("after", "gate", "start_when", "runs", "sweeps", "triggers", "replicate", "statistics"), at)
        ph = Phase(pname, after=_strings(pobj.get("after"), f"{at}.after"))
        names: set[str] = set()
        for kind in ("runs", "sweeps"):
            for sname, sobj in _mapping(pobj.get(kind), f"{at}.{kind}").items():
                sname = _name(sname, f"{at}.{kind}")
                if sname in names:
                    raise UserError(f"{at}.{kind}.{sname}: two steps of the phase are called '{sname}'")
                names.add(sname)
                ph.steps.append(_step(pname, sname, sobj, recipe, f"{at}.{kind}.{sname}", kind == "sweeps"))
        for tname, tobj in _mapping(pobj.get("triggers"), f"{at}.triggers").items():
            tname = _name(tname, f"{at}.triggers")
            if tname in names:
                raise UserError(f"{at}.triggers.{tname}: a step of the phase is already called '{tname}'")
            names.add(tname)
            ph.triggers.append(_trigger(pname, tname, tobj, recipe, f"{at}.triggers.{tname}"))
        if pobj.get("gate") is not None:
            ph.gate = _gate(pobj["gate"], f"{at}.gate")
        if pobj.get("start_when") is not None:
            ph.start_when = _start_when(pobj["start_when"], f"{at}.start_when")
            if not ph.after:
                raise UserError(f"{at}.start_when starts the phase before its after: phases finish; give after:")
        if pobj.get("replicate") is not None:
            r = _mapping(pobj["replicate"], f"{at}.replicate")
            _keys(r, ("results", "top", "overrides"), f"{at}.replicate")
            top = None if r.get("top") is None else _number(r, "top", f"{at}.replicate", None, 1, integer=True)
            ov = _overrides(r.get("overrides"), f"{at}.replicate.overrides")
            if not ov:
                raise UserError(f"{at}.replicate.overrides must name the other data set (e.g. data.seed=1)")
            ph.replicate = Replicate(_results(r.get("results"), f"{at}.replicate.results"), top, ov)
        if pobj.get("statistics") is not None:
            s = _mapping(pobj["statistics"], f"{at}.statistics")
            _keys(s, ("results", "baseline", "metric", "criteria"), f"{at}.statistics")
            from modalign.analysis.criteria import parse_criteria

            crit = parse_criteria(s["criteria"], f"{at}.statistics") if s.get("criteria") is not None else None
            base = s.get("baseline")
            if base is not None and not isinstance(base, str):
                raise UserError(f"{at}.statistics.baseline must be a group label (head=linear) or a phase.step")
            ph.statistics = Statistics(_results(s.get("results"), f"{at}.statistics.results"), base,
                                       s.get("metric"), crit)
        if not (ph.steps or ph.triggers or ph.replicate or ph.statistics):
            raise UserError(f"{at} has nothing to do (runs, sweeps, triggers, replicate or statistics)")
        phases[pname] = ph
    plan = Plan(name, Path(path), recipe, metric, _overrides(raw.get("overrides"), f"{where}: overrides"), phases, text,
                jobs)
    _check_names(plan, where)
    return plan


def _check_names(plan: Plan, where: str) -> None:
    """Every name a phase uses exists, and no phase waits on itself through others."""
    steps = {s.key for p in plan.phases.values() for s in p.steps} | \
            {t.key for p in plan.phases.values() for t in p.triggers}

    def known(ref: str, at: str, steps_only: bool = False) -> None:
        if ref in steps or (not steps_only and ref in plan.phases):
            return
        what = "a run or sweep (phase.step)" if steps_only else "a phase or a phase.step"
        raise UserError(f"{at}: '{ref}' is not {what} of this plan")

    for r in refs_of(plan.overrides):
        known(r, f"{where}: overrides")
    for p in plan.phases.values():
        at = f"{where}: phases.{p.name}"
        for a in p.after:
            known(a, f"{at}.after")
        for r in p.needs():
            known(r, at)
        if p.start_when:
            known(p.start_when.run, f"{at}.start_when.run", steps_only=True)
        for t in p.triggers:
            known(t.on, f"{at}.triggers.{t.name}.run", steps_only=True)
            if t.on in {x.key for x in p.triggers}:
                raise UserError(f"{at}.triggers.{t.name}.run: a trigger watches a run or sweep, not another trigger")
    deps = {p.name: {d.split(".")[0] for d in (*p.after, *p.needs())} for p in plan.phases.values()}
    for p in plan.phases.values():
        if p.start_when:
            deps[p.name].add(p.start_when.run.split(".")[0])
        for t in p.triggers:
            deps[p.name].add(t.on.split(".")[0])
    for start in deps:
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for d in deps[node]:
                if d == start and (len(path) > 1 or d != node or _self_wait(plan.phases[start])):
                    raise UserError(f"{where}: phases wait on each other in a circle: {' -> '.join(path + [d])}")
                if d not in seen and d != node:
                    seen.add(d)
                    stack.append((d, path + [d]))


def _self_wait(p: Phase) -> bool:
    """A phase may watch or reference its own steps (a trigger on its run), but not wait for itself
    to finish (after: [itself], a gate or statistics on itself)."""
    own = {p.name}
    return bool(own & set(p.after)) or bool(p.gate and own & set(p.gate.results)) or \
        bool(p.statistics and own & set(p.statistics.results)) or bool(p.replicate and own & set(p.replicate.results))
