"""The training loop. It knows no file format and writes no file: metric points and "checkpoint
due" go to sinks (the run writer is one), early stopping and non-finite handling are small policies.

    trainer = Trainer(model, objective, optimizer, scheduler, sampler, evaluate, cfg, sinks)
    trainer.fit(resume=payload_or_None)

objective.inputs(batch) -> the batch the model's forward needs (e.g. with the caption queue);
model(batch) -> the outputs every loss needs; objective(outputs, batch) -> dict of named loss
terms, "loss" the one minimised; sampler.batch(micro_step) -> batch dict on the host;
evaluate() -> dict of validation metrics.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from modalign import faults
from modalign.options import Options, at_least, one_of
from modalign.train.checkpoint import rng_state, set_rng_state
from modalign.train.device import autocast, grad_scaler, resolve_precision, to_device


@dataclass
class TrainerConfig(Options):
    max_steps: int = 150  # the demo trains in about a minute on 2 CPU cores; compare at fixed step counts
    batch_size: int = 256  # the contrastive batch: each sample's negatives are the other 255
    accumulate: int = 1  # micro-batches per optimizer step; each micro-batch is its own contrastive batch
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    precision: str = "auto"  # fp32 | bf16 | fp16 (CUDA, with loss scaling) | auto (bf16 where the hardware has it)
    eval_every: int = 50  # steps between validation passes (and last.pt writes)
    log_every: int = 10  # steps between train-metric points
    checkpoint_every: int = 0  # also keep step_<n>.pt every n steps; 0 = only best.pt and last.pt
    keep_checkpoints: int = 3  # step_<n>.pt files kept
    monitor: str = "val/m2t_R@1"  # metric that picks best.pt and drives early stopping
    monitor_mode: str = "max"  # max | min
    early_stop_patience: int = 0  # validation passes without improvement before stopping; 0 = off
    early_stop_min_delta: float = 0.0  # an improvement smaller than this counts as none (for patience; best.pt takes any)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop (keep the last good checkpoint) | skip the step
    max_nonfinite_skips: int = 10  # skip: stop anyway after this many skipped steps (a run that diverged)
    bucket_by_length: int = 0  # fuse: batches from groups of this many batches sorted by caption length; 0 = off

    def validate(self) -> None:
        for name, low in (("max_steps", 1), ("batch_size", 2), ("accumulate", 1), ("eval_every", 1),
                          ("log_every", 1), ("checkpoint_every", 0), ("keep_checkpoints", 0), ("grad_clip", 0),
                          ("threads", 0), ("early_stop_patience", 0), ("max_nonfinite_skips", 0),
                          ("bucket_by_length", 0)):
            at_least(self, name, low)
        at_least(self, "early_stop_min_delta", 0)
        one_of(self, "precision", ("auto", "fp32", "bf16", "fp16"))
        one_of(self, "monitor_mode", ("max", "min"))
        one_of(self, "on_nonfinite", ("stop", "skip"))


class Sink(Protocol):
    """Where the trainer reports. `state` is called only by a sink that writes the checkpoint."""

    def log(self, step: int, epoch: int, split: str, values: dict[str, float]) -> None: ...

    def checkpoint(self, name: str, state: Callable[[], dict], step: int, metric: float | None = None,
                   keep: int | None = None) -> None: ...

    def training_starts(self) -> None:
        """Called once per session, before the first step (the run writer opens its tracking sinks
        here, so their start-up is neither a stall at the first checkpoint nor training time)."""


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


@dataclass
class EarlyStopping:
    """Tracks the monitored validation metric: the best value and step, and the validation passes
    since it last improved by more than `min_delta` (a plateau: patience passes without such an
    improvement). Any improvement is a new best (best.pt); only one above min_delta resets the
    patience count. patience 0 never stops."""
    mode: str = "max"
    patience: int = 0
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    ref: float | None = None  # the value of the last improvement above min_delta
    bad_evals: int = 0
    stopped: bool = False

    def update(self, value: float, step: int) -> bool:
        """-> True when `value` is a new best (the caller then keeps best.pt)."""
        improved = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if improved:
            self.best, self.best_step = value, step
        gain = None if self.ref is None else (value - self.ref if self.mode == "max" else self.ref - value)
        if gain is None or gain > self.min_delta:
            self.ref, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        self.stopped = self.patience > 0 and self.bad_evals >= self.patience
        return improved

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "stopped_early": self.stopped, "plateau_ref": self.ref}

    def load_state_dict(self, s: dict) -> None:
        self.best, self.best_step, self.bad_evals = s["best"], s["best_step"], int(s["bad_evals"])
        self.ref = s.get("plateau_ref", s["best"])  # checkpoints from before min_delta: the best
        self.stopped = bool(s.get("stopped_early", False))


@dataclass
class NonFinitePolicy:
    """A step whose loss or gradient is NaN/inf: `stop` raises NonFiniteLoss, `skip` drops the
    update (the batch and the schedule move on) until more than `max_skips` were skipped."""
    action: str = "stop"
    max_skips: int = 10
    skips: int = 0

    def handle(self, step: int, bad_terms: list[str], bad_grads: list[str], last_saved: int | None) -> None:
        """Raise NonFiniteLoss with a line naming what went non-finite, or count one skip."""
        what = f"loss term '{bad_terms[0]}'" if bad_terms else f"the gradient of '{bad_grads[0]}'"
        where = f"non-finite gradients in: {', '.join(bad_grads)}" if bad_grads else "gradients finite"
        if self.action == "skip" and self.skips < self.max_skips:
            self.skips += 1
            return
        limit = (f"; {self.skips} steps already skipped (trainer.max_nonfinite_skips={self.max_skips})"
                 if self.action == "skip" else "")
        kept = f"checkpoints/last.pt (step {last_saved})" if last_saved is not None else "none yet"
        hint = "" if self.action == "skip" else "; trainer.on_nonfinite=skip skips such steps"
        raise NonFiniteLoss(f"{what} is not finite at step {step} ({where}){limit}; the last good "
                            f"checkpoint is {kept}{hint}")


class Trainer:
    def __init__(self, model: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, sampler, evaluate: Callable[[], dict[str, float]], cfg: TrainerConfig,
                 sinks: list[Sink], describe: dict | None = None, progress=None, ddp: nn.Module | None = None,
                 device: torch.device | None = None, world_size: int = 1):
        self.model, self.objective, self.opt, self.sched = model, objective, optimizer, scheduler
        self.ddp = ddp  # DistributedDataParallel around model (torchrun), or None
        self.world_size = world_size
        self.sampler, self.evaluate, self.cfg = sampler, evaluate, cfg
        self.sinks, self.describe = sinks, describe or {}
        self.progress = progress  # modalign.train.progress.TrainProgress or None
        self.device = device or torch.device("cpu")
        self.precision = resolve_precision(cfg.precision, self.device)
        self.scaler = grad_scaler(self.device, self.precision)
        self.early = EarlyStopping(cfg.monitor_mode, cfg.early_stop_patience, cfg.early_stop_min_delta)
        self.nonfinite = NonFinitePolicy(cfg.on_nonfinite, cfg.max_nonfinite_skips)
        self.step = 0
        self.last_saved: int | None = None  # step of the last last.pt handed to the sinks
        self.seconds_before = 0.0  # training time of earlier sessions of a resumed run
        self._t_start = time.perf_counter()

    # state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        """The checkpoint payload: enough to continue exactly where this step ends."""
        out = {
            **self.describe,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "epoch": self.sampler.epoch_of(self.step),
            "trainer": {**self.early.state_dict(), "nonfinite_skips": self.nonfinite.skips,
                        "train_seconds": self.seconds_before + time.perf_counter() - self._t_start},
        }
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state(self, payload: dict) -> None:
        from modalign.errors import UserError

        try:
            self.model.load_state_dict(payload["model"])
            self.objective.load_state_dict(payload["objective"])
            self.opt.load_state_dict(payload["optimizer"])  # moves its state to the parameters' device
        except (RuntimeError, ValueError, KeyError) as e:  # another version's or configuration's layout
            raise UserError(f"resume: the checkpoint does not fit this run's model or optimizer "
                            f"({str(e).splitlines()[0]}); was it written by another modalign version or config?") from None
        self.sched.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"])
        if self.scaler is not None and "scaler" in payload:
            self.scaler.load_state_dict(payload["scaler"])
        self.step = self.last_saved = int(payload["step"])
        t = payload["trainer"]
        self.early.load_state_dict(t)
        self.seconds_before = float(t.get("train_seconds", 0.0))
        self.nonfinite.skips = int(t.get("nonfinite_skips", 0))

    def _checkpoint(self, name: str, metric: float | None = None, keep: int | None = None) -> None:
        for sink in self.sinks:
            sink.checkpoint(name, self.state, step=self.step, metric=metric, keep=keep)
        if name == "last.pt":
            self.last_saved = self.step

    # loop -------------------------------------------------------------------------------------
    def _train_step(self) -> dict[str, float]:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        acc = self.cfg.accumulate
        totals: dict[str, torch.Tensor] = {}
        net = self.ddp if self.ddp is not None else self.model
        for micro in range(acc):
            batch = to_device(self.sampler.batch(self.step * acc + micro), self.device)
            batch = self.objective.inputs(batch)
            # DDP averages gradients once per optimizer step: not after every micro-batch
            sync = self.ddp.no_sync() if self.ddp is not None and micro < acc - 1 else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.precision):
                    terms = self.objective(net(batch), batch)
                if faults.hit("nan:loss", at=self.step + 1):
                    terms["loss"] = terms["loss"] * float("nan")
                loss = terms["loss"] / acc
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / acc
        if self.ddp is not None:  # what every rank logs and checks: the mean over ranks (local loss differs by rank)
            import torch.distributed as dist

            names = sorted(totals)
            stacked = torch.stack([totals[k] for k in names])
            dist.all_reduce(stacked)
            totals = dict(zip(names, stacked / self.world_size))
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        norms = grad_norms(self.model.components())
        gates = getattr(getattr(self.model, "fusion", None), "gate_parameters", None)
        # fused models: each gate's own gradient (before clipping), apart from the adapter weights
        gate_norms = {} if gates is None else {
            f"grad_norm/gate/{k}": float(p.grad.detach().float().norm()) if p.grad is not None else 0.0
            for k, p in gates().items()}
        bad = [k for k, v in totals.items() if not torch.isfinite(v)]
        # under fp16 an overflowing gradient is the loss scaler's business: it skips the step and
        # lowers the scale; a non-finite loss is still a non-finite loss
        bad_grads = [] if self.scaler is not None else [k for k, v in norms.items() if not math.isfinite(v)]
        if bad or bad_grads:
            return self._skip_nonfinite(bad, bad_grads)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.step += 1
        out = {k: float(v) for k, v in totals.items()}
        out.update({f"grad_norm/{k}": v for k, v in norms.items()})
        out.update(gate_norms)
        for g in self.opt.param_groups:
            out[f"lr/{g['name']}"] = g["lr"]
        if hasattr(self.model, "scale"):  # contrastive models: the learned temperature
            out["temperature"] = float(1.0 / self.model.scale().detach())
        if self.scaler is not None:
            out["loss_scale"] = float(self.scaler.get_scale())
        return out

    def _skip_nonfinite(self, bad_terms: list[str], bad_grads: list[str]) -> dict[str, float]:
        """The policy raises, or the update is dropped: the step is consumed (its batch, the
        schedule) but no parameter changes."""
        self.nonfinite.handle(self.step + 1, bad_terms, bad_grads, self.last_saved)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()  # unscale_ was called: the scaler expects an update before the next step
        self.sched.step()  # the schedule follows the step count, skipped or not
        self.step += 1
        return {"nonfinite_skips": float(self.nonfinite.skips)}

    def _log(self, split: str, values: dict[str, float]) -> None:
        epoch = self.sampler.epoch_of(max(self.step - 1, 0))
        for sink in self.sinks:
            sink.log(self.step, epoch, split, values)

    def _validate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = self.evaluate()
        metrics["eval_seconds"] = time.perf_counter() - t0
        self._log("val", metrics)
        key = self.cfg.monitor.removeprefix("val/")
        if key not in metrics:
            raise KeyError(f"trainer.monitor='{self.cfg.monitor}' is not a validation metric "
                           f"(have: {', '.join(sorted(metrics))})")
        if self.early.update(metrics[key], self.step):
            self._checkpoint("best.pt", metric=metrics[key])
        return metrics

    def fit(self, resume: dict | None = None) -> dict:
        try:
            return self._fit(resume)
        finally:
            close = getattr(self.sampler, "close", None)  # a sampler that reads ahead stops its thread
            if close is not None:
                close()

    def _fit(self, resume: dict | None) -> dict:
        if resume is not None:
            self.load_state(resume)
        cfg = self.cfg
        for sink in self.sinks:
            sink.training_starts()
        if self.progress:
            self.progress.start(cfg.max_steps, self.step)
        self._t_start = time.perf_counter()
        last_val: dict[str, float] = {}
        while self.step < cfg.max_steps and not self.early.stopped:
            values = self._train_step()
            faults.kill_if("kill:step", at=self.step)
            faults.term_if("term:step", at=self.step)
            if self.step % cfg.log_every == 0 or self.step == 1 or "nonfinite_skips" in values:
                self._log("train", values)
            evaluate = self.step % cfg.eval_every == 0 or self.step == cfg.max_steps
            if evaluate:
                last_val = self._validate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._checkpoint(f"step_{self.step}.pt", keep=cfg.keep_checkpoints)
            if evaluate:
                self._checkpoint("last.pt")  # last: after every other write of this step, so resume starts clean
                if self.early.stopped:
                    break
            if self.progress:
                self.progress.update(self.step, values.get("loss", float("nan")), last_val.get(cfg.monitor.removeprefix("val/")))
            if STOP.is_set() and self.step < cfg.max_steps:
                if not evaluate:
                    self._checkpoint("last.pt")
                if self.progress:
                    self.progress.stop()
                raise Preempted(f"stopped by SIGTERM after step {self.step}; checkpoints/last.pt holds it")
        if self.progress:
            self.progress.stop()
        return {"steps": self.step, "best": self.early.best, "best_step": self.early.best_step,
                "stopped_early": self.early.stopped,
                "train_seconds": self.seconds_before + time.perf_counter() - self._t_start,
                "precision": self.precision}
