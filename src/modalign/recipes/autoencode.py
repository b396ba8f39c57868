"""The `autoencode` recipe (stage 1): setup -> fit -> test -> write facts -> return the metric.

    modalign train --recipe autoencode [overrides]       e.g. bottleneck=vq globals_beta=10
    modalign sweep experiment=compare_globals_heads

An encoder over the modality's tokens, a latent bottleneck (none | linear | vq), a decoder that
reconstructs the tokens, and a head that reconstructs the sample's global features, weighted by
`globals_beta`. Its encoder is the align recipe's encoder, so stage 2 can start from it
(`modalign train encoder.init_from=RUN_DIR`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from modalign.errors import UserError
from modalign.recipes.align import load_data
from modalign.recipes.config import check_range, to_container, typed
from modalign.recipes.settings import read_encoder, read_env, read_training
from modalign.runs.rundir import RunDir

log = logging.getLogger("modalign")
COMPONENTS = ("encoder", "bottleneck", "decoder", "globals_head")


@dataclass
class AutoencodeEval:
    split: str = "test"
    batch_size: int = 1024


class AutoencodeRecipe:
    def __init__(self, cfg, run: RunDir, progress: bool = True):
        self.cfg, self.run, self.show_progress = cfg, run, progress

    def setup(self) -> None:
        import torch
        from torch import nn

        from modalign.data.batches import PairedTensors
        from modalign.losses.reconstruction import autoencode_loss
        from modalign.models.autoencoder import AutoencoderConfig, BottleneckConfig, ModalityAutoencoder
        from modalign.models.quantizer import VQConfig
        from modalign.train.allocator import tune_malloc

        cfg = self.cfg
        self.seed, self.trainer_cfg, self.optim_cfg = read_training(cfg, COMPONENTS)
        env = read_env(cfg)
        self.eval_cfg = typed(AutoencodeEval, to_container(cfg.eval, "eval"), "eval")
        check_range("eval.split", self.eval_cfg.split, choices=("train", "val", "test"))
        check_range("eval.batch_size", self.eval_cfg.batch_size, min_value=1)
        encoder, init_from, _ = read_encoder(cfg)
        if init_from is not None:
            raise UserError("config: 'encoder.init_from' is for stage 2 (align); stage 1 trains its encoder from scratch")
        b = to_container(cfg.bottleneck, "bottleneck")
        vq = typed(VQConfig, b.pop("vq", {}), "bottleneck.vq")
        bottleneck = typed(BottleneckConfig, b, "bottleneck", vq=vq)
        check_range("bottleneck.kind", bottleneck.kind, choices=("none", "linear", "vq"))
        check_range("bottleneck.latent_dim", bottleneck.latent_dim, min_value=1)
        check_range("bottleneck.vq.codebook_size", vq.codebook_size, min_value=2)
        check_range("bottleneck.vq.decay", vq.decay, min_value=0.0, max_value=1.0)
        if bottleneck.kind == "vq" and vq.dim != bottleneck.latent_dim:
            raise UserError(f"config: 'bottleneck.vq.dim'={vq.dim} must equal 'bottleneck.latent_dim'={bottleneck.latent_dim}")
        beta = cfg.globals_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
            raise UserError(f"config: 'globals_beta' must be a number >= 0, got {beta!r}")
        self.globals_beta = float(beta)
        decoder_depth, head_hidden = cfg.decoder.depth, cfg.globals_head.hidden
        check_range("decoder.depth", decoder_depth, min_value=1)
        check_range("globals_head.hidden", head_hidden, min_value=1)
        t = self.trainer_cfg
        self.malloc = tune_malloc(env.malloc)
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(self.seed)

        self.data = load_data(cfg).validate()
        self.splits = {s: self.data.subset(s) for s in ("train", "val", "test")}
        if len(self.splits["train"]) < 2:
            raise UserError(f"{self.data.source}: the train split has fewer than 2 samples")
        no_text = torch.zeros(1, 1)
        self.tensors = {s: PairedTensors(d, np.zeros((len(d), 1), np.int64), no_text, torch.zeros(1, dtype=torch.long))
                        for s, d in self.splits.items()}
        import dataclasses

        encoder = dataclasses.replace(encoder, vocab_size=self.data.vocab_size, n_cont=self.data.n_cont,
                                      n_globals=self.data.n_globals, max_len=max(512, self.data.seq_len))
        self.model_cfg = AutoencoderConfig(encoder=encoder, bottleneck=bottleneck, decoder_depth=decoder_depth,
                                           globals_head_hidden=head_hidden)
        try:
            self.model = ModalityAutoencoder(self.model_cfg)
        except ValueError as e:
            raise UserError(f"config: {e}") from None
        beta_ = self.globals_beta

        class Objective(nn.Module):  # stateless; a module so the trainer can checkpoint it like any other
            def forward(self, model, batch):
                return autoencode_loss(model(batch), batch, beta_)

        self.objective = Objective()
        if t.monitor.removeprefix("val/") not in self.metric_names():
            raise UserError(f"config: 'trainer.monitor'={t.monitor!r} is not a validation metric of this run "
                            f"(have: {', '.join('val/' + m for m in self.metric_names())})")

    def metric_names(self) -> list[str]:
        names = ["total_loss", "rec_tokens"]
        if self.data.tokens_id is not None:
            names += ["rec_ce", "token_acc"]
        if self.data.tokens_cont is not None:
            names.append("rec_mse")
        if self.data.globals is not None:
            names.append("rec_globals")
        if self.model_cfg.bottleneck.kind == "vq":
            names += ["vq_perplexity", "vq_usage"]
        return names

    def setup_training(self) -> None:
        from modalign.data.batches import EpochSampler
        from modalign.runs.rundir import MetricsSink
        from modalign.train.checkpoint import load_checkpoint
        from modalign.train.loop import Trainer
        from modalign.train.optim import build_optimizer, build_scheduler
        from modalign.train.progress import TrainProgress

        t = self.trainer_cfg
        opt = build_optimizer(self.model.components(), self.optim_cfg)
        sched = build_scheduler(opt, self.optim_cfg, t.max_steps)
        self.sampler = EpochSampler(self.tensors["train"], t.batch_size, self.seed, t.accumulate)
        last = self.run.checkpoints / "last.pt"
        self.resume = load_checkpoint(last) if self.cfg.resume is not None and last.exists() else None
        keep = int(self.resume["step"]) if self.resume is not None else (0 if self.cfg.resume is not None else None)
        self.sink = MetricsSink(self.run.metrics_path, keep_until_step=keep)
        progress = TrainProgress(f"autoencode {self.run.path.name[:36]}", t.monitor.removeprefix("val/")) \
            if self.show_progress else None
        describe = {"model_config": self.model_cfg.to_dict(), "recipe": "autoencode"}
        self.trainer = Trainer(self.model, self.objective, opt, sched, self.sampler,
                               lambda: self.evaluate("val")[0], t, self.run.checkpoints, [self.sink],
                               describe=describe, progress=progress)
        self._write_provenance()

    def _write_provenance(self) -> None:
        import torch

        from modalign.runs.provenance import code_info, env_info

        params = {k: sum(p.numel() for p in ps) for k, ps in self.model.components().items()}
        b = self.model_cfg.bottleneck
        self.run.update(
            seed=self.seed,
            variant={"name": f"bottleneck={b.kind}", "created_by": "modalign", "model": None, "date": None,
                     "experiment_id": None, "version": code_info()["package_version"]},
            code=code_info(),
            env={**env_info(torch.__version__, str(self.cfg.env.device), torch.get_num_threads()), "malloc": self.malloc},
            data={"name": self.cfg.data.name, "source": self.data.source,
                  "splits": {s: {"n": len(d), "fingerprint": d.fingerprint()} for s, d in self.splits.items()}},
            parents=[], globals_beta=self.globals_beta,
            eval={"protocol": "reconstruction", "version": 1, "split": self.eval_cfg.split,
                  "metrics": self.metric_names()},
            params={"total": sum(params.values()),
                    "trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                    "by_component": params},
        )

    def evaluate(self, split: str):
        """-> (metrics, per-example errors, vq code counts or None) on one split."""
        import torch

        from modalign.losses.reconstruction import autoencode_loss, reconstruction_errors
        from modalign.models.quantizer import codebook_usage, perplexity

        self.model.eval()
        sums: dict[str, float] = {}
        per: dict[str, list] = {}
        counts = None
        n = 0
        correct = total = 0
        with torch.no_grad():
            for batch in self.tensors[split].eval_batches(self.eval_cfg.batch_size):
                out = self.model(batch)
                terms = autoencode_loss(out, batch, self.globals_beta)
                bsz = len(batch["index"])
                for k in ("total_loss", "rec_tokens", "rec_ce", "rec_mse", "rec_globals"):
                    if k in terms:
                        sums[k] = sums.get(k, 0.0) + float(terms[k]) * bsz
                for k, v in reconstruction_errors(out, batch).items():
                    per.setdefault(k, []).append(v.numpy())
                if out["rec_ids"] is not None and self.data.tokens_id is not None:
                    hit = (out["rec_ids"].argmax(-1) == batch["tokens_id"]) & batch["mask"]
                    correct += int(hit.sum())
                    total += int(batch["mask"].sum())
                if out["vq_info"]:
                    c = codebook_usage(out["vq_info"]["codes"], batch["mask"], self.model_cfg.bottleneck.vq.codebook_size)
                    counts = c if counts is None else counts + c
                n += bsz
        self.model.train()
        metrics = {k: v / n for k, v in sums.items()}
        if total:
            metrics["token_acc"] = correct / total
        if counts is not None:
            metrics["vq_perplexity"] = float(perplexity(counts))
            metrics["vq_usage"] = float((counts > 0).float().mean())
        per_example = {k: np.concatenate(v) for k, v in per.items()}
        return metrics, per_example, (None if counts is None else counts.numpy())

    def __call__(self) -> float:
        from modalign.report.figures import plot_codebook_usage
        from modalign.runs.facts import write_run_facts
        from modalign.train.checkpoint import load_checkpoint

        t0 = time.perf_counter()
        self.setup()
        self.setup_training()
        try:
            fit = self.trainer.fit(self.resume)
        finally:
            self.sink.close()
        best = self.run.checkpoints / "best.pt"
        if best.exists():
            self.model.load_state_dict(load_checkpoint(best)["model"])
        split = self.eval_cfg.split
        metrics, per_example, counts = self.evaluate(split)
        wall = time.perf_counter() - t0 + self.trainer.seconds_before
        summary = write_run_facts(self.run, split, metrics, per_example, self.splits[split], None, None, False,
                                  fit, wall, chance={})
        if counts is not None:
            plot_codebook_usage(counts, self.run.figures / "codebook_usage.png")
        self._plot_reconstructions(split)
        return summary[split][self.trainer_cfg.monitor.removeprefix("val/")]

    def _plot_reconstructions(self, split: str) -> None:
        import torch

        from modalign.report.figures import plot_reconstructions

        batch = self.tensors[split].batch(torch.arange(min(4, self.tensors[split].n)))
        self.model.eval()
        with torch.no_grad():
            out = self.model(batch)
        rec_ids = None if out["rec_ids"] is None else out["rec_ids"].argmax(-1).numpy()
        rec_cont = None if out["rec_cont"] is None else out["rec_cont"].float().numpy()
        plot_reconstructions(batch["tokens_id"].numpy() if self.data.tokens_id is not None else None, rec_ids,
                             batch["tokens_cont"].numpy() if self.data.tokens_cont is not None else None, rec_cont,
                             batch["mask"].numpy(), self.splits[split].ids[:4], self.run.figures / "reconstructions.png")
