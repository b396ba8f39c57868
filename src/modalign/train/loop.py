"""The training loop. It knows no file format: metrics go to sinks, state to checkpoints.

    trainer = Trainer(model, objective, optimizer, scheduler, sampler, evaluate, cfg, ckpt_dir, sinks)
    trainer.fit(resume=payload_or_None)

objective(batch) -> dict of named loss terms, with "loss" the one that is minimised;
sampler.batch(micro_step) -> batch dict; evaluate() -> dict of validation metrics.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from modalign.train import checkpoint as ckpt
from modalign import faults


@dataclass
class TrainerConfig:
    max_steps: int = 150  # the demo trains in about a minute on 2 CPU cores; compare at fixed step counts
    batch_size: int = 256  # the contrastive batch: each sample's negatives are the other 255
    accumulate: int = 1  # micro-batches per optimizer step; each micro-batch is its own contrastive batch
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 autocast where the CPU has bf16 units: ~2.3x faster here)
    eval_every: int = 50  # steps between validation passes (and last.pt writes)
    log_every: int = 10  # steps between train-metric points
    checkpoint_every: int = 0  # also keep step_<n>.pt every n steps; 0 = only best.pt and last.pt
    keep_checkpoints: int = 3  # step_<n>.pt files kept
    monitor: str = "val/m2t_R@1"  # metric that picks best.pt and drives early stopping
    monitor_mode: str = "max"  # max | min
    early_stop_patience: int = 0  # validation passes without improvement before stopping; 0 = off
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop (keep the last good checkpoint) | skip the step
    max_nonfinite_skips: int = 10  # skip: stop anyway after this many skipped steps (a run that diverged)


class Sink(Protocol):
    def log(self, step: int, epoch: int, split: str, values: dict[str, float]) -> None: ...


def bf16_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"trainer.precision='{precision}' (expected fp32, bf16 or auto)")
    return precision


def grad_norms(components: dict[str, list[nn.Parameter]]) -> dict[str, float]:
    """L2 norm of the gradient of each component's parameters (0 where no gradient)."""
    out = {}
    for name, params in components.items():
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        out[name] = float(torch.stack(grads).norm()) if grads else 0.0
    return out


class NonFiniteLoss(RuntimeError):
    """A loss term or gradient went NaN/inf: the message names the term and the components."""


class Preempted(Exception):
    """Training stopped on request (SIGTERM, as SLURM sends before a kill): last.pt holds the step."""


# Set by a signal handler (see modalign.recipes.launch); the loop checks it after every step, so the
# checkpoint it writes is always between two optimizer steps, never in the middle of one.
STOP = threading.Event()


class Trainer:
    def __init__(self, model: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, sampler, evaluate: Callable[[], dict[str, float]], cfg: TrainerConfig,
                 ckpt_dir: Path | None, sinks: list[Sink], describe: dict | None = None,
                 progress=None, ddp: nn.Module | None = None):
        self.model, self.objective, self.opt, self.sched = model, objective, optimizer, scheduler
        self.ddp = ddp  # DistributedDataParallel around model (torchrun), or None
        self.sampler, self.evaluate, self.cfg = sampler, evaluate, cfg
        self.ckpt_dir, self.sinks, self.describe = ckpt_dir, sinks, describe or {}
        self.progress = progress  # modalign.train.progress.TrainProgress or None
        self.precision = resolve_precision(cfg.precision)
        self.step, self.best, self.best_step, self.bad_evals = 0, None, None, 0
        self.stopped_early = False
        self.nonfinite_skips = 0  # steps skipped for a non-finite loss or gradient (on_nonfinite=skip)
        self.seconds_before = 0.0  # training time of earlier sessions of a resumed run
        self._t_start = time.perf_counter()

    # state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            **self.describe,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": ckpt.rng_state(),
            "step": self.step,
            "epoch": self.sampler.epoch_of(self.step),
            "trainer": {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                        "stopped_early": self.stopped_early, "nonfinite_skips": self.nonfinite_skips,
                        "train_seconds": self.seconds_before + time.perf_counter() - self._t_start},
        }

    def load_state(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.objective.load_state_dict(payload["objective"])
        self.opt.load_state_dict(payload["optimizer"])
        self.sched.load_state_dict(payload["scheduler"])
        ckpt.set_rng_state(payload["rng"])
        self.step = int(payload["step"])
        t = payload["trainer"]
        self.best, self.best_step, self.bad_evals = t["best"], t["best_step"], int(t["bad_evals"])
        self.seconds_before = float(t.get("train_seconds", 0.0))
        self.stopped_early = bool(t.get("stopped_early", False))
        self.nonfinite_skips = int(t.get("nonfinite_skips", 0))

    def _save(self, name: str, metric: float | None = None) -> None:
        if self.ckpt_dir is not None:
            ckpt.save_checkpoint(self.ckpt_dir, name, self.state(), step=self.step, metric=metric)

    # loop -------------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self) -> dict[str, float]:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        acc = self.cfg.accumulate
        totals: dict[str, torch.Tensor] = {}
        net = self.ddp if self.ddp is not None else self.model
        for micro in range(acc):
            batch = self.sampler.batch(self.step * acc + micro)
            # DDP averages gradients once per optimizer step: not after every micro-batch
            sync = self.ddp.no_sync() if self.ddp is not None and micro < acc - 1 else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    terms = self.objective(net, batch)
                if faults.hit("nan:loss", at=self.step + 1):
                    terms["loss"] = terms["loss"] * float("nan")
                (terms["loss"] / acc).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / acc
        if self.ddp is not None:  # what every rank logs and checks: the mean over ranks (local loss differs by rank)
            import torch.distributed as dist

            names = sorted(totals)
            stacked = torch.stack([totals[k] for k in names])
            dist.all_reduce(stacked)
            totals = dict(zip(names, stacked / dist.get_world_size()))
        components = self.model.components()
        norms = grad_norms(components)
        bad = [k for k, v in totals.items() if not torch.isfinite(v)]
        bad_grads = [k for k, v in norms.items() if not math.isfinite(v)]
        if bad or bad_grads:
            return self._nonfinite(bad, bad_grads)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        out = {k: float(v) for k, v in totals.items()}
        out.update({f"grad_norm/{k}": v for k, v in norms.items()})
        for g in self.opt.param_groups:
            out[f"lr/{g['name']}"] = g["lr"]
        if hasattr(self.model, "scale"):  # contrastive models: the learned temperature
            out["temperature"] = float(1.0 / self.model.scale().detach())
        return out

    def _nonfinite(self, bad_terms: list[str], bad_grads: list[str]) -> dict[str, float]:
        """Stop with a line naming what went non-finite, or (on_nonfinite=skip) skip the update:
        the step is consumed (its batch, the schedule) but no parameter changes."""
        step = self.step + 1
        what = (f"loss term '{bad_terms[0]}'" if bad_terms else f"the gradient of '{bad_grads[0]}'")
        where = f"non-finite gradients in: {', '.join(bad_grads)}" if bad_grads else "gradients finite"
        if self.cfg.on_nonfinite != "skip" or self.nonfinite_skips >= self.cfg.max_nonfinite_skips:
            limit = (f"; {self.nonfinite_skips} steps already skipped (trainer.max_nonfinite_skips="
                     f"{self.cfg.max_nonfinite_skips})" if self.cfg.on_nonfinite == "skip" else "")
            last = ckpt.list_checkpoints(self.ckpt_dir) if self.ckpt_dir is not None and \
                (self.ckpt_dir / ckpt.MANIFEST).exists() else []
            kept = next((f"checkpoints/last.pt (step {c['step']})" for c in last if c["name"] == "last.pt"),
                        "none yet")
            hint = "" if self.cfg.on_nonfinite == "skip" else "; trainer.on_nonfinite=skip skips such steps"
            raise NonFiniteLoss(f"{what} is not finite at step {step} ({where}){limit}; the last good "
                                f"checkpoint is {kept}{hint}")
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()  # the schedule follows the step count, skipped or not
        self.step += 1
        self.nonfinite_skips += 1
        return {"nonfinite_skips": float(self.nonfinite_skips)}

    def _log(self, split: str, values: dict[str, float]) -> None:
        epoch = self.sampler.epoch_of(max(self.step - 1, 0))
        for sink in self.sinks:
            sink.log(self.step, epoch, split, values)

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.cfg.monitor_mode == "max" else value < self.best

    def _validate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = self.evaluate()
        metrics["eval_seconds"] = time.perf_counter() - t0
        self._log("val", metrics)
        key = self.cfg.monitor.removeprefix("val/")
        if key not in metrics:
            raise KeyError(f"trainer.monitor='{self.cfg.monitor}' is not a validation metric "
                           f"(have: {', '.join(sorted(metrics))})")
        value = metrics[key]
        if self._improved(value):
            self.best, self.best_step, self.bad_evals = value, self.step, 0
            self._save("best.pt", metric=value)
        else:
            self.bad_evals += 1
        return metrics

    def fit(self, resume: dict | None = None) -> dict:
        if resume is not None:
            self.load_state(resume)
        cfg = self.cfg
        if self.progress:
            self.progress.start(cfg.max_steps, self.step)
        self._t_start = time.perf_counter()
        last_val: dict[str, float] = {}
        while self.step < cfg.max_steps and not self.stopped_early:
            values = self._train_step()
            faults.kill_if("kill:step", at=self.step)
            if self.step % cfg.log_every == 0 or self.step == 1 or "nonfinite_skips" in values:
                self._log("train", values)
            evaluate = self.step % cfg.eval_every == 0 or self.step == cfg.max_steps
            if evaluate:
                last_val = self._validate()
                self.stopped_early = cfg.early_stop_patience > 0 and self.bad_evals >= cfg.early_stop_patience
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._save(f"step_{self.step}.pt")
                ckpt.prune_step_checkpoints(self.ckpt_dir, cfg.keep_checkpoints)
            if evaluate:
                self._save("last.pt")  # last: after every other write of this step, so resume starts clean
                if self.stopped_early:
                    break
            if self.progress:
                self.progress.update(self.step, values.get("loss", float("nan")), last_val.get(cfg.monitor.removeprefix("val/")))
            if STOP.is_set() and self.step < cfg.max_steps:
                if not evaluate:
                    self._save("last.pt")
                if self.progress:
                    self.progress.stop()
                raise Preempted(f"stopped by SIGTERM after step {self.step}; checkpoints/last.pt holds it")
        if self.progress:
            self.progress.stop()
        return {"steps": self.step, "best": self.best, "best_step": self.best_step,
                "stopped_early": self.stopped_early,
                "train_seconds": self.seconds_before + time.perf_counter() - self._t_start,
                "precision": self.precision}
