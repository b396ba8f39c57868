"""The TensorBoard sink: event files under the run directory (`tb/`), read by `tensorboard --logdir`.

Scalars are `<split>/<name>` at their step and wall time (TensorBoard stores them as float32). A
resumed run writes a new event file in the same folder with `purge_step` = the first step it has
not sent, so TensorBoard drops any older event at or after that step: a step is never shown twice.
The config and tags are text entries at step 0; the figures (PNG) and card come at the end.
"""

from __future__ import annotations

import json

from modalign.sinks import RunMeta, TensorBoardOptions


class TensorBoardSink:
    def __init__(self, options: TensorBoardOptions):
        self.options = options
        self.writer = None

    def open(self, meta: RunMeta, state: dict) -> dict:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        purge = None if meta.committed is None else meta.committed + 1
        self.writer = SummaryWriter(str(meta.path / self.options.dir), purge_step=purge)
        if meta.committed is None:
            text = yaml.safe_dump(meta.config, sort_keys=False, allow_unicode=True)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)
            self.writer.add_text("tags", "\n".join(f"- **{k}**: {v}" for k, v in meta.tags.items()), 0)
        return {"dir": self.options.dir}

    def log(self, rows: list[dict]) -> None:
        for r in rows:
            self.writer.add_scalar(f"{r['split']}/{r['name']}", float(r["value"]), int(r["step"]),
                                   walltime=r.get("time"))
        self.writer.flush()

    def finish(self, status: str, meta: RunMeta) -> None:
        import matplotlib.image

        step = meta.committed or 0
        for png in meta.figures():
            image = matplotlib.image.imread(str(png))
            if image.ndim == 3 and image.shape[2] == 4:
                image = image[:, :, :3]
            self.writer.add_image(f"figures/{png.stem}", image, step, dataformats="HWC" if image.ndim == 3 else "HW")
        card = meta.path / "card.md"
        if card.exists():
            self.writer.add_text("card", card.read_text(encoding="utf-8"), step)
        self.writer.add_text("status", json.dumps({"status": status, **meta.tags}), step)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


SINK = TensorBoardSink
