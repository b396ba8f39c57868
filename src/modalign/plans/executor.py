"""`modalign plan run`: execute a plan (modalign.plans.spec) as local processes.

    OUTPUTS/plans/<name>/
        plan.json        the executor's state, written atomically after every change: phases (status,
                         why they started, gate verdicts), jobs (identity, run dir, status, each
                         launch), triggers (fired or not, when, why), events
        plan.yaml        the plan file as it ran
        runs/<phase>.<step>[.<i>]_<id>/   one run directory per job (the run-directory contract)
        jobs/<id>.json   a job's launch spec; locks/<id>: held by the job's process while it lives
        logs/<id>.log    a job process's stdout and stderr
        report/          the plan report (modalign.plans.report)

A job's identity is the sha256 of its resolved config (minus bookkeeping: outputs, name, resume,
threads). Running a plan again after a crash, a kill or an edit therefore resumes it: a completed
job is reused, an interrupted one resumes from its last.pt, a job whose config changed is a new job
in a new directory. Gates, early starts and triggers are decided again from the results on disk, so
a rerun takes the same decisions. The executor's own state is a file replaced atomically; SIGKILL
loses at most the event log of the moment, and its jobs receive SIGTERM from the kernel when it dies
(PR_SET_PDEATHSIG), which makes them write last.pt and stop as interrupted. SIGTERM and Ctrl-C stop
the jobs the same way and leave a plan that `modalign plan run` continues.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modalign.errors import UserError
from modalign.plans.spec import REF, Plan, Step, merge_overrides, split_ref

IDENTITY_EXCLUDES = ("outputs", "name", "resume", "trainer.threads")
DONE = ("completed", "failed")


@dataclass
class Job:
    id: str
    phase: str
    step: str
    index: int
    recipe: str
    overrides: list[str]
    dir: str
    status: str = "queued"  # queued | running | completed | failed | interrupted
    trigger: str | None = None  # the trigger that started it
    parent: str | None = None  # the run it was started from (trigger source)
    started_at: float | None = None
    finished_at: float | None = None
    launches: list[dict] = field(default_factory=list)  # {mode: started|resumed|reused, at, exit}
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.phase}.{self.step}" + (f".{self.index}" if self.index else "")


def identity(resolved: dict) -> str:
    """The job's identity: sha256 over its resolved config without bookkeeping keys."""
    from modalign.runs.card import flatten

    flat = {k: v for k, v in flatten(resolved).items()
            if not any(k == x or k.startswith(x + ".") for x in IDENTITY_EXCLUDES)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve_job(recipe: str, overrides: list[str]) -> dict:
    """Compose and check a job's config exactly as `modalign train` would (UserError on a bad one)."""
    from modalign.recipes.config import compose, to_container
    from modalign.recipes.launch import check_resolved, root_config

    return check_resolved(to_container(compose(overrides, root_config(recipe)), ""), overrides, recipe)


def read_metric_series(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of a logged metric ('val/m2t_R@1') from a run's metrics.jsonl, in order."""
    split, _, name = metric.partition("/")
    out = []
    try:
        with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
            for line in f:
                try:
                    p = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if p.get("split") == split and p.get("name") == name:
                    out.append((int(p["step"]), float(p["value"])))
    except OSError:
        pass
    return out


def last_step(run_dir: Path) -> int:
    """The last training step a run logged (0 before any)."""
    step = 0
    try:
        with open(Path(run_dir) / "metrics.jsonl", "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 4096))
            for line in f.read().splitlines():
                try:
                    step = max(step, int(json.loads(line)["step"]))
                except (ValueError, KeyError):
                    continue
    except OSError:
        pass
    return step


def stable(series: list[tuple[int, float]], last: int, epsilon: float) -> bool:
    """The last `last` values lie within epsilon of each other."""
    if len(series) < last:
        return False
    vals = [v for _, v in series[-last:]]
    return max(vals) - min(vals) < epsilon


def _run_info(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _summary(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "facts" / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _pdeathsig() -> None:  # in the job's process, before exec: SIGTERM when the executor dies
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


LAUNCHER_KEYS = ("hydra/launcher=", "hydra.launcher.")


class LocalProcesses:
    """Jobs as child processes of the executor: they get SIGTERM from the kernel if it dies."""
    kind = "local"

    def __init__(self, threads: int):
        self.threads = threads

    def start(self, spec_path: Path, log_path: Path):
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        with open(log_path, "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "modalign.plans.job", str(spec_path)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=_pdeathsig)

    def poll(self, handle) -> int | None:
        return handle.poll()

    def ident(self, handle) -> str:
        return f"pid {handle.pid}"

    def stop(self, handles: list) -> None:
        for h in handles:
            if h.poll() is None:
                h.send_signal(signal.SIGTERM)
        for h in handles:
            try:
                h.wait(timeout=120)
            except subprocess.TimeoutExpired:
                h.kill()


class Submitit:
    """Jobs through submitit, with the launcher config sweeps use (`env=slurm` and
    `hydra.launcher.*`, or `hydra/launcher=submitit_local`): SLURM jobs outlive the executor, and
    a rerun waits for them through their lock (same host) before it decides anything."""

    GENERIC = ("timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node", "name",
               "stderr_to_stdout")

    def __init__(self, kind: str, params: dict, folder: Path, threads: int):
        import submitit

        self.kind, self.threads = kind, threads
        self.ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm" if kind == "slurm" else "local")
        out = {}
        for k, v in params.items():
            if k in ("_target_", "submitit_folder") or v is None:
                continue
            if k in self.GENERIC:
                out[k] = v
            elif kind == "slurm":
                out[f"slurm_{k}"] = v
        out["name"] = "modalign-plan"
        self.ex.update_parameters(**out)

    def start(self, spec_path: Path, log_path: Path):
        from modalign.plans.job import run_spec

        return self.ex.submit(run_spec, str(spec_path), self.threads)

    def poll(self, handle) -> int | None:
        if not handle.done():
            return None
        try:
            return int(handle.result())
        except Exception:  # noqa: BLE001 — the job's own run.json says what failed
            return 1

    def ident(self, handle) -> str:
        return f"{self.kind} job {handle.job_id}"

    def stop(self, handles: list) -> None:
        for h in handles:
            if not h.done():
                h.cancel(check=False)
        deadline = time.time() + 120
        while time.time() < deadline and not all(h.done() for h in handles):
            time.sleep(0.5)


def launcher_of(overrides: list[str], recipe: str) -> tuple[str, dict]:
    """("local" | "submitit_local" | "slurm", the launcher's parameters) from the plan's overrides,
    read exactly as `modalign sweep` reads them (env=slurm, hydra/launcher=..., hydra.launcher.*)."""
    from omegaconf import OmegaConf

    given = [o for o in overrides if o.startswith(("env=", *LAUNCHER_KEYS))]
    if not given:
        return "local", {}
    from modalign.recipes.config import compose
    from modalign.recipes.launch import root_config

    cfg = compose(given, root_config(recipe), return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False) if cfg.hydra.get("launcher") else {}
    target = str(launcher.get("_target_", ""))
    kind = "slurm" if target.endswith("SlurmLauncher") else "submitit_local" if target.endswith("LocalLauncher") else "local"
    return kind, {k: v for k, v in launcher.items() if not (isinstance(v, str) and "${" in v)}


class Executor:
    def __init__(self, plan: Plan, cli_overrides: list[str], jobs: int = 1, quiet: bool = False,
                 outputs: str | None = None):
        self.plan, self.cli, self.quiet = plan, list(cli_overrides), quiet
        cores = os.cpu_count() or 1
        if jobs < 1:
            raise UserError(f"--jobs {jobs}: must be at least 1")
        self.slots = min(jobs, cores)
        self.threads = max(1, cores // self.slots)
        self.capped = jobs > cores
        root = outputs or self._outputs()
        self.dir = Path(root) / "plans" / plan.name
        self.jobs: dict[str, Job] = {}
        self.steps: dict[str, list[str]] = {}  # phase.step -> job ids (expanded steps only)
        self.phases: dict[str, dict] = {p: {"status": "pending"} for p in plan.phases}
        self.triggers: dict[str, dict] = {t.key: {"status": "waiting", "fired": []}
                                          for p in plan.phases.values() for t in p.triggers}
        self.events: list[dict] = []
        self.previous: dict = {}
        self.procs: dict[str, object] = {}  # job id -> the backend's handle
        kind, params = launcher_of([*plan.overrides, *self.cli], plan.recipe)
        self.cli = [o for o in self.cli if not o.startswith(LAUNCHER_KEYS)]
        self.plan.overrides = tuple(o for o in self.plan.overrides if not o.startswith(LAUNCHER_KEYS))
        if kind == "local":
            self.backend = LocalProcesses(self.threads)
        else:
            if kind == "slurm":  # the cluster decides how many run at once; each gets its cpus_per_task
                self.slots, self.threads, self.capped = max(jobs, int(params.get("array_parallelism") or jobs)), \
                    int(params.get("cpus_per_task") or self.threads), False
            self.backend = Submitit(kind, params, self.dir / ".submitit", self.threads)
        self.stopping: str | None = None
        self.trained = 0
        self.started_at = time.time()

    # -- set-up ------------------------------------------------------------------------------------
    def _outputs(self) -> str:
        for o in self.cli + list(self.plan.overrides):
            if o.startswith("outputs="):
                return o.split("=", 1)[1]
        return "outputs"

    def step_overrides(self, step: Step, point: list[str]) -> list[str]:
        """A job's overrides: the plan's, the step's (with its grid point), the command line's, and
        what a trigger watching the step needs (early stopping at the plateau it waits for)."""
        shared = [o for o in (*self.plan.overrides, *self.cli) if self._applies(o, step.recipe)]
        out = merge_overrides([o for o in shared if o in self.plan.overrides], point,
                              [o for o in shared if o in self.cli])
        for p in self.plan.phases.values():
            for t in p.triggers:
                if t.on == step.key:
                    from modalign.analysis.metrics import larger_is_better

                    out = merge_overrides(out, [f"trainer.monitor={t.metric}",
                                                f"trainer.monitor_mode={'max' if larger_is_better(t.metric) else 'min'}",
                                                f"trainer.early_stop_patience={t.patience}",
                                                f"trainer.early_stop_min_delta={t.min_delta}"])
        return out

    def _applies(self, override: str, recipe: str) -> bool:
        """Whether a plan-wide or command-line override is for this recipe: a key only another
        recipe has (decode.* for fuse, head=... for align) is left out of this one's jobs; a key no
        recipe has stays, so that it fails as a typo."""
        if not hasattr(self, "_known"):
            from modalign.plans.spec import RECIPES
            from modalign.recipes.config import compose, to_container
            from modalign.recipes.launch import root_config
            from modalign.runs.card import flatten

            conf = Path(__file__).resolve().parents[1] / "conf"
            self._known = {}
            for r in RECIPES:
                keys = set(flatten(to_container(compose([], root_config(r)), "", throw_on_missing=False)))
                keys |= {k.rsplit(".", i)[0] for k in list(keys) for i in range(1, k.count(".") + 1)}
                self._known[r] = keys | {"logger", "experiment"}
            self._groups = {d.name for d in conf.iterdir() if d.is_dir()}
        key = override.split("=", 1)[0].lstrip("+~")
        if key in self._known[recipe] or key in ("hydra",) or key.startswith("hydra."):
            return True
        return not any(key in keys for r, keys in self._known.items() if r != recipe)

    def check_all(self) -> int:
        """Compose every job known before the plan starts (references stand in as paths), so a bad
        override fails now, with one line, not in phase 3. -> the number of jobs composed."""
        n = 0
        for p in self.plan.phases.values():
            for step in [*p.steps, *(t.start for t in p.triggers)]:
                for point in step.points():
                    overrides = [REF.sub("/plan-reference", o) for o in self.step_overrides(step, point)]
                    try:
                        resolve_job(step.recipe, overrides)
                    except UserError as e:
                        raise UserError(f"{self.plan.file}: phases.{p.name} step {step.name}: {e}") from None
                    n += 1
        return n

    def lock(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in ("runs", "jobs", "locks", "logs"):
            (self.dir / d).mkdir(exist_ok=True)
        self._lock = open(self.dir / ".lock", "a+")  # noqa: SIM115 — held while the executor lives
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"plan {self.dir}: another `modalign plan run` is running it now") from None
        if (self.dir / "plan.json").exists():
            try:
                self.previous = json.loads((self.dir / "plan.json").read_text(encoding="utf-8"))
            except ValueError:
                self.previous = {}
        self.events = list(self.previous.get("events") or [])
        if self.previous:
            self.event("plan", f"run again: {'edited plan, ' if self.previous.get('plan_sha256') != self._sha() else ''}"
                               "completed jobs are reused, interrupted ones resume")
        else:
            self.event("plan", "started")

    def _sha(self) -> str:
        return hashlib.sha256(self.plan.text.encode()).hexdigest()

    # -- state -------------------------------------------------------------------------------------
    def event(self, kind: str, what: str, **extra) -> None:
        self.events.append({"time": time.time(), "kind": kind, "what": what, **extra})
        if not self.quiet:
            self._print(f"[{kind}] {what}")

    def _print(self, line: str) -> None:
        if getattr(self, "progress", None) is not None:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr)

    def save(self, status: str = "running") -> None:
        from modalign.runs.rundir import atomic_write_json, atomic_write_text

        atomic_write_text(self.dir / "plan.yaml", self.plan.text)
        atomic_write_json(self.dir / "plan.json", {
            "name": self.plan.name, "file": str(self.plan.file), "plan_sha256": self._sha(), "metric": self.plan.metric,
            "recipe": self.plan.recipe,
            "overrides": self.cli, "status": status, "pid": os.getpid(), "slots": self.slots,
            "threads_per_job": self.threads, "created_at": self.previous.get("created_at", self.started_at),
            "updated_at": time.time(), "order": self.plan.order(), "phases": self.phases,
            "steps": self.steps, "jobs": {k: asdict(j) for k, j in self.jobs.items()},
            "triggers": self.triggers, "events": self.events[-2000:]})

    # -- jobs --------------------------------------------------------------------------------------
    def add_job(self, step: Step, index: int, overrides: list[str], trigger: str | None = None,
                parent: str | None = None) -> Job:
        resolved = resolve_job(step.recipe, overrides)
        jid = identity({**resolved, "recipe": step.recipe})
        if jid in self.jobs:
            return self.jobs[jid]
        label = f"{step.phase}.{step.name}" + (f".{index}" if index else "")
        found = sorted((self.dir / "runs").glob(f"*_{jid}"))
        run_dir = found[0] if found else self.dir / "runs" / f"{label}_{jid}"
        job = Job(jid, step.phase, step.name, index, step.recipe, overrides, str(run_dir), trigger=trigger,
                  parent=parent)
        old = (self.previous.get("jobs") or {}).get(jid) or {}
        job.launches = list(old.get("launches") or [])
        job.started_at = old.get("started_at")  # the first start, across reruns (the timeline)
        info = _run_info(run_dir)
        if info.get("status") == "completed":
            job.status = "completed"
            job.finished_at = old.get("finished_at")
            job.launches.append({"mode": "reused", "at": time.time(), "exit": 0})
            self.event("job", f"{label}: reused (completed in {run_dir.name})", job=jid)
        self.jobs[jid] = job
        return job

    def launch(self, job: Job) -> None:
        out = Path(job.dir)
        lock = self.dir / "locks" / job.id
        with open(lock, "a+") as f:  # a job from before a crash may still be writing its checkpoint
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    if self.stopping:
                        return
                    time.sleep(0.2)
        info = _run_info(out)
        if info.get("status") == "completed":  # finished by that process after all
            job.status, job.finished_at = "completed", time.time()
            return
        mode = "resumed" if info and (out / "checkpoints" / "last.pt").exists() else "started"
        spec = {"dir": str(out), "recipe": job.recipe, "overrides": job.overrides, "lock": str(lock),
                "plan": {"id": self.plan.name, "dir": str(self.dir), "phase": job.phase, "step": job.step,
                         "job": job.id, **({"trigger": job.trigger, "parent": job.parent} if job.trigger else {})}}
        from modalign.runs.rundir import atomic_write_json

        atomic_write_json(self.dir / "jobs" / f"{job.id}.json", spec)
        self.procs[job.id] = self.backend.start(self.dir / "jobs" / f"{job.id}.json",
                                                self.dir / "logs" / f"{job.id}.log")
        job.status = "running"
        job.started_at = job.started_at or time.time()
        job.launches.append({"mode": mode, "at": time.time(), "exit": None,
                             "where": self.backend.ident(self.procs[job.id])})
        self.trained += 1
        self.event("job", f"{job.label}: {mode} ({out.name})", job=job.id)

    def reap(self) -> bool:
        changed = False
        for jid, proc in list(self.procs.items()):
            code = self.backend.poll(proc)
            if code is None:
                continue
            del self.procs[jid]
            job = self.jobs[jid]
            info = _run_info(Path(job.dir))
            job.launches[-1]["exit"] = code
            job.finished_at = time.time()
            job.status = info.get("status") if info.get("status") in ("completed", "failed", "interrupted") else \
                ("completed" if code == 0 else "failed")
            job.error = info.get("error") if job.status != "completed" else None
            if job.status == "interrupted" and not self.stopping:
                job.status = "failed"  # stopped by something else than us
            if job.status == "failed" and not job.error:
                job.error = f"the job process exited {code}; see {self.dir / 'logs' / (jid + '.log')}"
            tail = f": {job.error}" if job.error else ""
            self.event("job", f"{job.label}: {job.status}{tail}", job=jid)
            changed = True
        return changed

    # -- results -----------------------------------------------------------------------------------
    def results(self, name: str) -> list[Job] | None:
        """The jobs of a phase or phase.step, or None while they are not all known and ended."""
        if "." in name:
            phase = name.split(".")[0]
            ids = self.steps.get(name)
            if ids is None:
                return None
            jobs = [self.jobs[i] for i in ids]
            trig = self.triggers.get(name)
            if trig is not None:  # a trigger's runs: known once it is decided
                if trig["status"] == "waiting":
                    return None
            if self.phases[phase]["status"] in ("pending",) or any(j.status not in DONE for j in jobs):
                return None
            return jobs
        if self.phases[name]["status"] not in ("completed", "failed"):
            return None
        return [self.jobs[i] for key, ids in self.steps.items() if key.split(".")[0] == name for i in ids]

    def best(self, jobs: list[Job]) -> Job:
        """The best completed job by its own monitored validation metric (never by a test metric)."""
        done = [j for j in jobs if j.status == "completed"]
        if not done:
            raise UserError("no completed run to take the best of")

        def score(j: Job):
            s = _summary(Path(j.dir))
            cfg = _read_cfg(Path(j.dir))
            mon = (cfg.get("trainer") or {}).get("monitor", "")
            sign = 1 if (cfg.get("trainer") or {}).get("monitor_mode", "max") == "max" else -1
            v = ((s.get("metrics") or {}).get(mon) or {}).get("best")
            return -math.inf if v is None else sign * float(v)

        return max(done, key=score)  # max keeps the first of equals: the plan's order

    def substitute(self, overrides: list[str], source: Job | None = None, watched: str | None = None) -> list[str] | None:
        """Overrides with each ${ref:...} replaced by a path; None while a referenced result is not
        ready. A trigger's reference to the step it watches means the run that fired it."""
        out = []
        for o in overrides:
            missing = False

            def repl(m):
                nonlocal missing
                target, fld = split_ref(m.group(1))
                if source is not None and target == watched and not fld.startswith("best"):
                    job = source
                else:
                    jobs = self.results(target)
                    if jobs is None:
                        missing = True
                        return m.group(0)
                    if fld.startswith("best"):
                        job = self.best(jobs)
                    else:
                        if len(jobs) != 1:
                            raise UserError(f"{self.plan.file}: ${{ref:{m.group(1)}}}: {target} has {len(jobs)} runs; "
                                            "use .best.dir or .best.checkpoint")
                        job = jobs[0]
                        if job.status != "completed":
                            raise UserError(f"${{ref:{m.group(1)}}}: {job.label} did not complete")
                return str(Path(job.dir) / "checkpoints" / "best.pt") if fld.endswith("checkpoint") else job.dir

            o2 = REF.sub(repl, o)
            if missing:
                return None
            out.append(o2)
        return out

    # -- phases ------------------------------------------------------------------------------------
    def _dep_phases(self, name: str) -> set[str]:
        p = self.plan.phases[name]
        out = {d.split(".")[0] for d in p.after}
        out |= {d.split(".")[0] for d in p.needs()}
        return out - {name}

    def try_start(self, name: str) -> bool:
        """Start a pending phase whose turn has come. -> whether anything changed."""
        p, st = self.plan.phases[name], self.phases[name]
        for d in sorted(self._dep_phases(name)):
            if self.phases[d]["status"] in ("failed", "blocked"):
                why = self.phases[d].get("why") or self.phases[d]["status"]
                return self.block(name, f"{d} {self.phases[d]['status']} ({why})")
        after_done = all(self.results(a) is not None for a in p.after)
        reason = f"after {', '.join(p.after)} finished" if p.after else "first phase"
        if not after_done:
            sw = p.start_when
            if sw is None or not self._start_when_holds(sw):
                return False
            reason = f"early start: {sw.describe()}"
            if p.after and not after_done:
                reason += f", before {', '.join(a for a in p.after if self.results(a) is None)} finished"
        needs = {n for n in p.needs() if n.split(".")[0] != name}
        if any(self.results(n) is None for n in needs):
            return False
        if p.gate is not None:
            verdict = self.judge_gate(p)
            st["gate"] = verdict
            if not verdict["passed"]:
                self.event("gate", f"{name}: closed: {verdict['line']} -> next: {verdict['next']}")
                return self.block(name, f"gate failed: {verdict['line']}; next: {verdict['next']}")
            self.event("gate", f"{name}: open: {verdict['line']}")
        st.update(status="running", started_at=time.time(), why_started=reason)
        self.event("phase", f"{name}: started ({reason})")
        if p.replicate is not None:
            try:
                self._expand_replicate(p)
            except UserError as e:  # a config that no longer composes: the phase fails, the plan goes on
                self.steps[f"{name}.replicate"] = []
                st.update(why=f"replicate: {e}", step_errors=1)
                self.event("phase", f"{name}: replicate cannot run: {e}")
        if p.statistics is not None:
            self._statistics(p)
        return True

    def block(self, name: str, why: str) -> bool:
        if self.phases[name]["status"] == "blocked":
            return False
        self.phases[name].update(status="blocked", why=why, finished_at=time.time())
        self.event("phase", f"{name}: blocked: {why}")
        return True

    def _start_when_holds(self, sw) -> bool:
        ids = self.steps.get(sw.run)
        if not ids:
            return False
        job = self.jobs[ids[0]]
        if job.status not in ("running", "completed"):
            return False
        if sw.step is not None:
            return last_step(Path(job.dir)) >= sw.step
        return stable(read_metric_series(Path(job.dir), sw.metric), sw.last, sw.epsilon)

    def expand_steps(self, name: str) -> bool:
        """Expand the steps of a running phase whose references are ready. -> whether any was."""
        changed = False
        for step in self.plan.phases[name].steps:
            if step.key in self.steps:
                continue
            ids = []
            try:
                for i, point in enumerate(step.points()):
                    overrides = self.substitute(self.step_overrides(step, point))
                    if overrides is None:
                        break  # a referenced result is not ready yet
                    ids.append(self.add_job(step, i, overrides).id)
                else:
                    self.steps[step.key] = ids
                    changed = True
            except UserError as e:  # a referenced run failed, or a config no longer composes
                self.steps[step.key] = ids
                self.phases[name]["why"] = f"step {step.name}: {e}"
                self.phases[name]["step_errors"] = self.phases[name].get("step_errors", 0) + 1
                self.event("phase", f"{name}: step {step.name} cannot run: {e}")
                changed = True
        return changed

    def _expand_replicate(self, p) -> None:
        from modalign.analysis.groups import group_runs
        from modalign.analysis.metrics import full_name, larger_is_better
        from modalign.runs.index import find_runs

        rep = p.replicate
        sources = [j for r in rep.results for j in self.results(r) or [] if j.status == "completed"]
        records = [r for j in sources for r in find_runs(Path(j.dir))]
        by_dir = {str(Path(j.dir).resolve()): j for j in sources}
        groups = group_runs(records)
        metric = full_name(self.plan.metric or _default_metric(sources[0].recipe if sources else "align"))
        sign = 1 if larger_is_better(metric) else -1
        ranked = sorted(groups, key=lambda g: -sign * (g.stats(metric, 1000)["mean"]
                                                        if g.completed else -sign * math.inf))
        chosen = ranked[: rep.top] if rep.top else ranked
        ids = []
        for g in chosen:
            for r in g.runs:
                src = by_dir[str(r.path.resolve())]
                overrides = merge_overrides(src.overrides, list(rep.overrides))
                job = self.add_job(Step(p.name, "replicate", src.recipe, ()), len(ids), overrides)
                ids.append(job.id)
        self.steps[f"{p.name}.replicate"] = ids
        self.event("replicate", f"{p.name}: {len(ids)} runs of {', '.join(g.label for g in chosen) or 'nothing'} "
                                f"with {' '.join(rep.overrides)}")

    def _statistics(self, p) -> None:
        from modalign.plans.report import statistics_jobs, statistics_report

        state = {"steps": self.steps, "jobs": {k: asdict(j) for k, j in self.jobs.items()}}
        try:
            path = statistics_report(self.dir, self.plan, p, *statistics_jobs(state, p))
            self.phases[p.name]["statistics"] = str(path)
            self.event("statistics", f"{p.name}: {path}")
        except UserError as e:
            self.phases[p.name]["statistics_error"] = str(e)
            self.event("statistics", f"{p.name}: no statistics ({e})")

    def judge_gate(self, p) -> dict:
        from modalign.analysis.criteria import judge
        from modalign.analysis.groups import group_runs
        from modalign.analysis.metrics import full_name
        from modalign.runs.index import find_runs

        g = p.gate
        jobs = [j for r in g.results for j in self.results(r) or []]
        records = [r for j in jobs for r in find_runs(Path(j.dir))]
        lines, passed, nxt = [], True, "continue"
        if g.checks:
            bad = [(Path(r.path).name, c["name"]) for r in records for c in r.info.get("checks") or []
                   if c.get("status") == "fail"]
            if bad:
                passed = False
                lines.append(f"failed health checks: {', '.join(f'{n} in {d}' for d, n in bad[:4])}")
                nxt = "fix what the failed check names (modalign check RUN), then run the plan again"
            else:
                lines.append(f"health checks of {len(records)} runs passed")
        verdicts = []
        if g.criteria is not None:
            m = full_name(g.criteria.metric)
            for grp in group_runs(records) or []:
                stt = grp.stats(m)
                if stt["n"] == 0:
                    passed = False
                    lines.append(f"{grp.label or 'runs'}: no completed run with {m}")
                    nxt = "see the runs' run.log"
                    continue
                v = judge(g.criteria, stt["mean"], stt["ci_low"], stt["ci_high"])
                line = v.line(m, stt["mean"], stt["ci_low"], stt["ci_high"])
                rel = g.criteria.relative
                exempt = rel is not None and grp.label == rel.baseline  # the floor is judged by nothing but itself
                unmet = None if exempt else g.criteria.unmet(grp.completed)
                if unmet is not None:  # criteria.require: what the metric alone cannot tell
                    req, why = unmet
                    v = type(v)(req.verdict, req.next, f"requires {req.describe()}: {why}")
                    line = v.line(m, stt["mean"], stt["ci_low"], stt["ci_high"])
                verdicts.append({"group": grp.label, "verdict": v.verdict, "estimate": stt["mean"]})
                lines.append(line)
                if v.verdict not in g.passing:
                    passed, nxt = False, v.next
            if not records:
                passed = False
                lines.append("no run to judge")
        return {"passed": passed, "line": "; ".join(lines), "next": nxt, "verdicts": verdicts,
                "pass": list(g.passing), "results": list(g.results)}

    def resolve_triggers(self) -> bool:
        changed = False
        for p in self.plan.phases.values():
            if self.phases[p.name]["status"] != "running":
                continue
            for t in p.triggers:
                st = self.triggers[t.key]
                if st["status"] != "waiting":
                    continue
                src_ids = self.steps.get(t.on)
                if src_ids is None:
                    continue
                srcs = [self.jobs[i] for i in src_ids]
                ids = list(st.get("jobs") or [])
                for j in srcs:
                    if j.status not in DONE or j.id in {f["source"] for f in st["fired"]} | set(st.get("quiet", [])):
                        continue
                    s = _summary(Path(j.dir))
                    if j.status == "completed" and s.get("stopped_early"):
                        series = read_metric_series(Path(j.dir), t.metric)
                        overrides = self.substitute(self.step_overrides(t.start, list(t.start.overrides)),
                                                    source=j, watched=t.on)
                        if overrides is None:
                            continue
                        job = self.add_job(t.start, len(ids), overrides, trigger=t.key, parent=j.dir)
                        ids.append(job.id)
                        why = (f"{t.describe()}: {j.label} stopped at step {s.get('steps')} with no gain above "
                               f"{t.min_delta:g} in {t.patience} evaluations (last: "
                               f"{', '.join(f'{v:.4g}' for _, v in series[-(t.patience + 1):])}); best at step "
                               f"{s.get('best_step')}")
                        st["fired"].append({"source": j.id, "job": job.id, "at": time.time(), "why": why})
                        self.event("trigger", f"{t.key}: fired: {why} -> {job.label} from {Path(j.dir).name}")
                    else:
                        st.setdefault("quiet", []).append(j.id)
                        why = (f"{j.label} {j.status}" + (" without a plateau (ran to trainer.max_steps)"
                                                          if j.status == "completed" else ""))
                        st.setdefault("not_fired", []).append({"source": j.id, "at": time.time(), "why": why})
                        self.event("trigger", f"{t.key}: not fired: {why}")
                    changed = True
                st["jobs"] = ids
                if all(j.status in DONE for j in srcs) and \
                        len(st["fired"]) + len(st.get("quiet", [])) == len(srcs):
                    st["status"] = "fired" if st["fired"] else "not fired"
                    self.steps[t.key] = ids
                    changed = True
        return changed

    def try_finish(self, name: str) -> bool:
        p, st = self.plan.phases[name], self.phases[name]
        if st["status"] != "running":
            return False
        if any(s.key not in self.steps for s in p.steps):
            return False
        if any(self.triggers[t.key]["status"] == "waiting" for t in p.triggers):
            return False
        ids = [i for key, v in self.steps.items() if key.split(".")[0] == name for i in v]
        jobs = [self.jobs[i] for i in ids]
        if any(j.status not in DONE for j in jobs):
            return False
        failed = [j for j in jobs if j.status == "failed"]
        st.update(status="failed" if failed or st.get("step_errors") else "completed", finished_at=time.time())
        if failed:
            st["why"] = f"{len(failed)} of {len(jobs)} jobs failed ({failed[0].label}: {failed[0].error})"
        self.event("phase", f"{name}: {st['status']}" + (f" ({st['why']})" if failed else f" ({len(jobs)} jobs)"))
        return True

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        self.lock()
        prev_term = signal.signal(signal.SIGTERM, self._on_term)
        try:
            return self._loop()
        except KeyboardInterrupt:
            self.stopping = "interrupted by the user"
            self._stop_jobs()
            self.save("interrupted")
            print(f"modalign: plan {self.plan.name} interrupted; continue with: modalign plan run "
                  f"{self._again()}", file=sys.stderr)
            return 130
        finally:
            signal.signal(signal.SIGTERM, prev_term)

    def _again(self) -> str:
        return " ".join([str(self.plan.file) if self.plan.file.parent.name != "plan" else self.plan.name, *self.cli])

    def _on_term(self, *_):
        self.stopping = "SIGTERM"

    def _stop_jobs(self) -> None:
        self.backend.stop(list(self.procs.values()))
        self.reap()

    def _loop(self) -> int:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = None if self.quiet else Progress(
            TextColumn(f"plan {self.plan.name}"), BarColumn(), MofNCompleteColumn(), TextColumn("jobs"),
            TextColumn("{task.description}"), TimeElapsedColumn(), transient=True)
        task = None
        if self.progress is not None:
            self.progress.start()
            task = self.progress.add_task("", total=None)
        try:
            while True:
                if self.stopping:
                    self._stop_jobs()
                    self.save("interrupted")
                    print(f"modalign: plan {self.plan.name} stopped ({self.stopping}); continue with: "
                          f"modalign plan run {self._again()}", file=sys.stderr)
                    return 143
                changed = self.reap()
                for name in self.plan.order():
                    st = self.phases[name]["status"]
                    if st == "pending":
                        changed |= self.try_start(name)
                    if self.phases[name]["status"] == "running":
                        changed |= self.expand_steps(name)
                changed |= self.resolve_triggers()
                for name in self.plan.order():
                    changed |= self.try_finish(name)
                queued = [j for j in self.jobs.values() if j.status in ("queued", "interrupted")]
                for job in queued:
                    if len(self.procs) >= self.slots:
                        break
                    self.launch(job)
                    changed = True
                if changed:
                    self.save()
                if task is not None:
                    done = sum(j.status in DONE for j in self.jobs.values())
                    running = [j.label for j in self.jobs.values() if j.status == "running"]
                    self.progress.update(task, total=len(self.jobs), completed=done,
                                         description=(f"running {', '.join(running)}" if running else ""))
                if not self.procs and not queued and not changed:
                    break
                if not changed:
                    time.sleep(0.3)
        finally:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None
        for name, st in self.phases.items():
            if st["status"] == "pending":
                self.block(name, "never started: what it waits for did not finish")
        statuses = {st["status"] for st in self.phases.values()}
        status = "completed" if statuses == {"completed"} else ("failed" if "failed" in statuses else "blocked")
        self.event("plan", f"{status}: {self.trained} job launches this time, "
                           f"{sum(1 for j in self.jobs.values() if j.status == 'completed')} of {len(self.jobs)} jobs completed")
        self.save(status)
        from modalign.plans.report import write_plan_report

        try:
            path = write_plan_report(self.dir)
            if not self.quiet:
                self._print(f"report: {path}")
        except UserError as e:
            print(f"plan {self.dir}: no report ({e})", file=sys.stderr)
        return 0 if status == "completed" else 1


def _read_cfg(run_dir: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((run_dir / "cfg.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _default_metric(recipe: str) -> str:
    from modalign.analysis.metrics import default_metric

    return default_metric(recipe)
