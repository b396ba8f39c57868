"""The `autoencode` recipe (stage 1): setup -> fit -> test -> write facts -> return the metric.

    modalign train --recipe autoencode [overrides]       e.g. bottleneck=vq globals_beta=10
    modalign sweep experiment=compare_globals_heads

An encoder over the modality's tokens, a latent bottleneck (none | linear | vq), a decoder that
reconstructs the tokens, and a head that reconstructs the sample's global features, weighted by
`globals_beta`. Its encoder is the align recipe's encoder, so stage 2 can start from it
(`modalign train encoder.init_from=RUN_DIR`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from modalign.errors import UserError
from modalign.eval.evaluation import Evaluation
from modalign.recipes.align import load_data
from modalign.options import Options, at_least, one_of
from modalign.recipes.config import to_container, typed
from modalign.recipes.settings import read_encoder, read_env, read_training
from modalign.runs.writer import RunWriter

log = logging.getLogger("modalign")
COMPONENTS = ("encoder", "bottleneck", "decoder", "globals_head")


@dataclass
class AutoencodeEval(Options):
    split: str = "test"
    batch_size: int = 1024

    def validate(self) -> None:
        one_of(self, "split", ("train", "val", "test"))
        at_least(self, "batch_size", 1)


class AutoencodeRecipe:
    def __init__(self, cfg, writer: RunWriter, progress: bool = True, world=None):
        from modalign.train.distributed import SINGLE

        self.cfg, self.writer, self.show_progress = cfg, writer, progress
        self.world = world or SINGLE

    def setup(self) -> None:
        import torch
        from torch import nn

        from modalign.data.batches import PairedTensors
        from modalign.losses.reconstruction import autoencode_loss
        from modalign.models.autoencoder import (AutoencoderConfig, BottleneckConfig, DecoderOptions,
                                                 GlobalsHeadOptions, ModalityAutoencoder)
        from modalign.models.quantizer import VQConfig
        from modalign.train.allocator import tune_malloc
        from modalign.train.device import resolve_device, set_tf32

        cfg = self.cfg
        self.seed, self.trainer_cfg, self.optim_cfg = read_training(cfg, COMPONENTS)
        env = read_env(cfg)
        self.eval_cfg = typed(AutoencodeEval, to_container(cfg.eval, "eval"), "eval")
        encoder, init_from, _ = read_encoder(cfg)
        if init_from is not None:
            raise UserError("config: 'encoder.init_from' is for stage 2 (align); stage 1 trains its encoder from scratch")
        if encoder.patch_size not in (0, "auto"):
            raise UserError(f"config: 'encoder.patch_size'={encoder.patch_size}: stage 1 (autoencode) reconstructs "
                            "every step from one token per step; patches are for stage 2 (align) for now")
        encoder = dataclasses.replace(encoder, patch_size=0)  # auto: one token per step here
        b = to_container(cfg.bottleneck, "bottleneck")
        vq = typed(VQConfig, b.pop("vq", {}), "bottleneck.vq")
        bottleneck = typed(BottleneckConfig, b, "bottleneck", vq=vq)
        beta = cfg.globals_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
            raise UserError(f"config: 'globals_beta' must be a number >= 0, got {beta!r}")
        self.globals_beta = float(beta)
        decoder = typed(DecoderOptions, to_container(cfg.decoder, "decoder"), "decoder")
        globals_head = typed(GlobalsHeadOptions, to_container(cfg.globals_head, "globals_head"), "globals_head")
        decoder_depth, head_hidden = decoder.depth, globals_head.hidden
        t = self.trainer_cfg
        self.malloc = tune_malloc(env.malloc)
        self.device = resolve_device(env.device)
        set_tf32(env.tf32)
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
            def inputs(self, batch):
                return batch

            def forward(self, out, batch):
                return autoencode_loss(out, batch, beta_)

        self.objective = Objective()
        self.model.to(self.device)
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
            names += ["vq_commit", "vq_codebook", "vq_perplexity", "vq_usage"]
        return names

    def setup_training(self) -> None:
        from modalign.recipes.launch import single_process_trainer

        describe = {"model_config": self.model_cfg.to_dict(), "recipe": "autoencode"}
        self.sampler, self.resume, self.trainer = single_process_trainer(
            self, "autoencode", describe, lambda: self.evaluate("val").metrics)
        self._write_provenance()

    def _write_provenance(self) -> None:
        import torch

        from modalign.eval.reconstruction import PROTOCOL_VERSION
        from modalign.runs.provenance import code_info
        from modalign.train.device import env_info

        params = {k: sum(p.numel() for p in ps) for k, ps in self.model.components().items()}
        b = self.model_cfg.bottleneck
        self.writer.update(
            seed=self.seed,
            variant={"name": f"bottleneck={b.kind}", "created_by": "modalign maintainers", "model": None,
                     "date": None, "experiment_id": None, "version": code_info()["package_version"]},
            code=code_info(),
            env=env_info(torch.get_num_threads(), self.device, self.malloc),
            data={"name": self.cfg.data.name, "source": self.data.source, "on_disk": self.data.lazy,
                  "splits": {s: {"n": len(d), "fingerprint": d.fingerprint()} for s, d in self.splits.items()}},
            parents=[], globals_beta=self.globals_beta,
            eval={"protocol": "reconstruction", "version": PROTOCOL_VERSION, "split": self.eval_cfg.split,
                  "metrics": self.metric_names()},
            params={"total": sum(params.values()),
                    "trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                    "by_component": params,
                    "trainable_by_component": {k: sum(p.numel() for p in ps if p.requires_grad)
                                               for k, ps in self.model.components().items()}},
        )

    def evaluate(self, split: str) -> Evaluation:
        """Every reconstruction metric on one split: the means of the per-example scores
        (modalign.eval.reconstruction), and the VQ codebook's perplexity and usage over the split."""
        import torch

        from modalign.eval.reconstruction import reconstruction_scores
        from modalign.models.quantizer import codebook_usage, perplexity
        from modalign.train.device import to_device

        self.model.eval()
        vq = self.model_cfg.bottleneck.vq
        per: dict[str, list] = {}
        counts = None
        with torch.no_grad():
            for batch in self.tensors[split].eval_batches(self.eval_cfg.batch_size):
                batch = to_device(batch, self.device)
                out = self.model(batch)
                for k, v in reconstruction_scores(out, batch, self.globals_beta, vq.commitment_cost, vq.ema).items():
                    per.setdefault(k, []).append(v.cpu().numpy())
                if out["vq_info"]:
                    c = codebook_usage(out["vq_info"]["codes"], batch["mask"], vq.codebook_size).cpu()
                    counts = c if counts is None else counts + c
        self.model.train()
        per_example = {k: np.concatenate(v) for k, v in per.items()}
        metrics = {k: float(v.mean()) for k, v in per_example.items()}
        if counts is not None:
            metrics["vq_perplexity"] = float(perplexity(counts))
            metrics["vq_usage"] = float((counts > 0).float().mean())
        return Evaluation(metrics, per_example, extra={"codes": None if counts is None else counts.numpy()})

    def test(self, split: str | None = None) -> Evaluation:
        """The evaluated split with the best checkpoint (the model as trained when there is none)."""
        best = self.writer.load_checkpoint("best.pt")
        if best is not None:
            self.model.load_state_dict(best["model"])
        return self.evaluate(split or self.eval_cfg.split)

    def chance(self, split: str) -> dict[str, float]:
        return {}

    def write_facts(self, fit: dict, test: Evaluation, wall: float) -> dict:
        from modalign.report.figures import plot_codebook_usage
        from modalign.runs.facts import build_summary

        split = self.eval_cfg.split
        summary = build_summary(self.writer.run.info(), self.writer.run.read_metrics(), split, test.metrics, fit,
                                wall, chance={})
        self.writer.write_facts(summary, split, self.splits[split], test.per_example)
        if test.extra.get("codes") is not None:
            self.writer.figure(lambda d: plot_codebook_usage(test.extra["codes"], d / "codebook_usage.png"))
        self.writer.figure(lambda d: self._plot_reconstructions(split, d / "reconstructions.png"))
        return summary

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.setup()
        self.setup_training()
        try:
            fit = self.trainer.fit(self.resume)
        finally:
            self.writer.close()
        test = self.test()
        wall = time.perf_counter() - t0 + self.trainer.seconds_before
        summary = self.write_facts(fit, test, wall)
        return summary[self.eval_cfg.split][self.trainer_cfg.monitor.removeprefix("val/")]

    def _plot_reconstructions(self, split: str, path) -> None:
        import torch

        from modalign.report.figures import plot_reconstructions
        from modalign.train.device import to_device

        batch = to_device(self.tensors[split].batch(torch.arange(min(4, self.tensors[split].n))), self.device)
        self.model.eval()
        with torch.no_grad():
            out = self.model(batch)
        rec_ids = None if out["rec_ids"] is None else out["rec_ids"].argmax(-1).cpu().numpy()
        rec_cont = None if out["rec_cont"] is None else out["rec_cont"].float().cpu().numpy()
        plot_reconstructions(batch["tokens_id"].cpu().numpy() if self.data.tokens_id is not None else None, rec_ids,
                             batch["tokens_cont"].cpu().numpy() if self.data.tokens_cont is not None else None,
                             rec_cont, batch["mask"].cpu().numpy(), self.splits[split].ids[:4], path)
