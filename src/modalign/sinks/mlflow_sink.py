"""The MLflow sink: one MLflow run per modalign run, sweep jobs nested under their sweep.

Default store: `sqlite:///<outputs>/mlflow.db`, artifacts in `<outputs>/mlartifacts/` (MLflow's
file store is in maintenance mode; SQLite is its local database backend). Open it with
`mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`. Calls on a SQLite store take a file
lock beside the database, so the jobs of a sweep running at once never meet "database is locked".

What goes in: the resolved config as params (dotted keys), tags (`modalign.recipe`, `.variant`,
`.data_<split>` fingerprints, `.sweep`, `.status`, `.run_dir`), every point of metrics.jsonl as
the metric `<split>/<name>` at its step and time, and at the end the figures, card.md and
facts/summary.json as artifacts and the status (FINISHED, FAILED, KILLED). MLflow forbids `@` in
names: `m2t_R@1` is logged as `m2t_R_at_1` (`metric_key`). A resumed run continues
the same MLflow run (its id is kept in the run's tracking.json).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from modalign.sinks import MLflowOptions, RunMeta

STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
PARAM_LIMIT = 6000  # MLflow's longest param value


def metric_key(name: str) -> str:
    """MLflow allows alphanumerics, `_ - . : /` and spaces in names: `@` becomes `_at_` (m2t_R@1 ->
    m2t_R_at_1), anything else `_`."""
    return re.sub(r"[^A-Za-z0-9_\-.: /]", "_", name.replace("@", "_at_"))


def default_uri(outputs: Path) -> str:
    return f"sqlite:///{(outputs / 'mlflow.db').resolve()}"


class MLflowSink:
    def __init__(self, options: MLflowOptions):
        self.options = options
        self.client = None
        self.run_id = None
        self._lock_path = None

    @contextlib.contextmanager
    def _locked(self):
        if self._lock_path is None:
            yield
            return
        import fcntl

        with open(self._lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _experiment(self, meta: RunMeta) -> str:
        exp = self.client.get_experiment_by_name(self.options.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(self.options.experiment, artifact_location=location)

    def _sweep_parent(self, experiment_id: str, meta: RunMeta) -> str:
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`modalign.sweep_run` = '{meta.sweep}'",
                                        max_results=1)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(experiment_id, run_name=meta.sweep,
                                     tags={"modalign.sweep_run": meta.sweep, "modalign.sweep": meta.sweep,
                                           "modalign.sweep_dir": str(meta.path.parent.resolve())})
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def open(self, meta: RunMeta, state: dict) -> dict:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from modalign.runs.card import flatten

        self.uri = state.get("uri") or self.options.uri or default_uri(meta.outputs)
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            self._lock_path = str(db) + ".lock"
        self.client = MlflowClient(tracking_uri=self.uri)
        with self._locked():
            if state.get("run_id"):
                self.run_id = state["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return {"uri": self.uri}
            experiment_id = self._experiment(meta)
            tags = {f"modalign.{k}": v for k, v in meta.tags.items()}
            if meta.sweep:
                tags["mlflow.parentRunId"] = self._sweep_parent(experiment_id, meta)
            run = self.client.create_run(experiment_id, run_name=meta.label, tags=tags)
            self.run_id = run.info.run_id
            params = [Param(metric_key(k)[:250], str(v)[:PARAM_LIMIT]) for k, v in flatten(meta.config).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        return {"uri": self.uri, "run_id": self.run_id, "experiment_id": experiment_id}

    def log(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(metric_key(f"{r['split']}/{r['name']}"), float(r["value"]), int(float(r.get("time") or 0) * 1000),
                          int(r["step"])) for r in rows]
        with self._locked():
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, status: str, meta: RunMeta) -> None:
        with self._locked():
            for png in meta.figures():
                self.client.log_artifact(self.run_id, str(png), "figures")
            for name in ("card.md", "facts/summary.json"):
                if (meta.path / name).exists():
                    self.client.log_artifact(self.run_id, str(meta.path / name))
            self.client.set_tag(self.run_id, "modalign.status", status)
            self.client.set_terminated(self.run_id, STATUS.get(status, "FINISHED"))
        self.close()

    def close(self) -> None:
        self.client = None


SINK = MLflowSink
