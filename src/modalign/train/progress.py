"""A rich progress bar for training: step, loss, the monitored validation metric, time left."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, description: str, metric_name: str, console: Console | None = None):
        self.description, self.metric_name = description, metric_name
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    def start(self, total: int, completed: int = 0) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[metric]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=total, completed=completed,
                                             loss="-", metric="")

    def update(self, step: int, loss: float, metric: float | None) -> None:
        shown = f"{self.metric_name} {metric:.3f}" if metric is not None else ""
        self._progress.update(self._task, completed=step, loss=f"{loss:.3f}", metric=shown)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
