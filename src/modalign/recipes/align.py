"""The `align` recipe (stage 2): setup -> fit -> test -> write facts -> return the metric.

    modalign train [overrides]                    e.g. modalign train encoder=cnn head=linear
    python -m modalign.recipes.align [overrides]
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

from modalign.data.paired import PairedData
from modalign.errors import UserError
from modalign.eval.evaluation import Evaluation
from modalign.recipes.config import to_container
from modalign.recipes.settings import TextSettings, patching_record, read_env, read_settings
from modalign.runs.writer import RunWriter

log = logging.getLogger("modalign")


def headline_protocol(data: PairedData, requested: str) -> str:
    if requested != "auto":
        if requested == "same_facts" and data.facts is None or requested == "same_label" and data.labels is None:
            raise UserError(f"config: 'eval.protocol'={requested} needs {'facts' if requested == 'same_facts' else 'labels'}, "
                            f"and {data.source} has none")
        return requested
    if data.facts is not None:
        return "same_facts"
    if data.labels is not None:
        return "same_label"
    return "exact_text"


# Generators that are pure functions of their arguments: a sweep's jobs that run in one process
# (Hydra's basic launcher) reuse the last data generated with the same arguments instead of
# generating it again (about 2.5 s per job at the demo's size). Readers of files are never reused.
PURE_GENERATORS = ("modalign.data.demo.make_demo_data",)
_generated: dict[str, PairedData] = {}


def load_data(cfg) -> PairedData:
    """Instantiate cfg.data (its _target_ is a reader or generator); UserErrors pass through."""
    import json

    from hydra.utils import instantiate

    node = to_container(cfg.data, "data")
    node.pop("name", None)
    key = json.dumps(node, sort_keys=True, default=repr) if node.get("_target_") in PURE_GENERATORS else None
    if key is not None and key in _generated:
        return _generated[key]
    try:
        data = instantiate(node)
        if key is not None:
            for a in (data.ids, data.split, data.lengths, data.tokens_id, data.tokens_cont, data.globals, data.labels):
                if a is not None:
                    a.flags.writeable = False  # shared by later jobs: nothing may change it in place
            _generated.clear()  # keep one data set, not one per configuration ever seen
            _generated[key] = data
        return data
    except Exception as e:  # Hydra wraps the target's exception; surface a UserError as it is
        cause = e
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        if type(e).__name__ == "InstantiationException":
            inner = e.__cause__ or e.__context__
            msg = f"{type(inner).__name__}: {inner}" if inner is not None else str(e).strip().splitlines()[0]
            raise UserError(f"config: data: {' '.join(msg.split())}") from None
        raise


class TextTable:
    """Every distinct caption and prompt, embedded once; groups = identical text."""

    def __init__(self, data: PairedData, settings: TextSettings, progress: bool):
        self.identity: dict = {}  # what run.json's `text` records besides the model id and cache stats
        self.by_id: dict[str, int] = {}  # sample id -> row, for samples whose text vector is keyed by id
        pre = None
        if settings.kind == "precomputed":  # the user's own vectors (modalign.data.text_embeddings)
            from modalign.data.text_embeddings import read_precomputed

            pre = read_precomputed(settings.path)
        keyed = [] if pre is None else [i for i in data.ids.tolist() if i in pre.by_id]
        skip = set(keyed)
        texts = {}
        for sid, caps in zip(data.ids.tolist(), data.captions):
            if sid not in skip:
                for c in caps:
                    texts.setdefault(c, len(texts))
        prompts = [p for ps in (data.class_prompts or []) for p in ps]
        for p in prompts:
            texts.setdefault(p, len(texts))
        self.index = texts
        if pre is not None:
            self.embeddings = np.concatenate([pre.texts(list(texts)), pre.samples(keyed)])
            self.by_id = {sid: len(texts) + j for j, sid in enumerate(keyed)}
            self.identity = pre.identity()
            self.model_id = self.identity.pop("model")
            self.stats = {"precomputed": len(texts) + len(keyed), "by_sample_id": len(keyed)}
            return
        from modalign.models.text_encoder import TextEmbedder

        embedder = TextEmbedder(settings.model, precision=settings.precision, cache_dir=settings.cache_dir,
                                batch_size=settings.batch_size, progress=progress)
        self.model_id = embedder.model_id
        self.embeddings = embedder.embed(list(texts))  # (U, text_dim)
        self.stats = dict(embedder.stats)

    def rows(self, data: PairedData) -> np.ndarray:
        """(N, K) table rows of each sample's captions, -1 where a sample has fewer than K; a sample
        with a vector by id has that one row (its captions share it)."""
        k = max(len(c) for c in data.captions)
        out = np.full((len(data), k), -1, np.int64)
        for i, (sid, caps) in enumerate(zip(data.ids.tolist(), data.captions)):
            if sid in self.by_id:
                out[i, 0] = self.by_id[sid]
            else:
                out[i, : len(caps)] = [self.index[c] for c in caps]
        return out


def init_encoder(encoder, cfg, source: str) -> dict:
    """Load a stage-1 run's encoder weights into `encoder` (stage 1 -> stage 2).
    source: a run dir (its best.pt, else last.pt) or a checkpoint file. -> the parent record for
    run.json: {role, path, sha256, step, recipe}. The checkpoint's sha256 is verified on load."""
    import dataclasses

    from modalign.runs.provenance import sha256_file
    from modalign.train.checkpoint import load_checkpoint

    p = Path(source)
    if p.is_dir():
        d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        p = d / "best.pt" if (d / "best.pt").exists() else d / "last.pt"
    if not p.exists():
        raise UserError(f"encoder.init_from={source}: no checkpoint there (checkpoints/best.pt or last.pt)")
    payload = load_checkpoint(p)
    theirs = payload.get("model_config", {}).get("encoder")
    if theirs is None:
        raise UserError(f"{p}: the checkpoint describes no encoder (model_config.encoder)")
    ours = dataclasses.asdict(cfg)
    defaults = dataclasses.asdict(type(cfg)())  # keys newer than the checkpoint: their defaults
    differ = [k for k in ("kind", "width", "depth", "heads", "kernel_size", "vocab_size", "n_cont", "n_globals",
                          "patch_size", "patch_stride", "revin")
              if ours.get(k) != theirs.get(k, defaults[k])]
    if differ:
        k = differ[0]
        raise UserError(f"{p}: its encoder has {k}={theirs.get(k)!r} but this run's has {k}={ours.get(k)!r} "
                        f"(set encoder.{k} to match, or use another parent)")
    state = {k.removeprefix("encoder."): v for k, v in payload["model"].items() if k.startswith("encoder.")}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{p}: encoder weights do not fit ({str(e).splitlines()[0]})") from None
    log.info("encoder initialised from %s (step %s)", p, payload.get("step"))
    return {"role": "encoder", "path": str(p.resolve()), "sha256": sha256_file(p), "step": payload.get("step"),
            "recipe": payload.get("recipe")}


class AlignRecipe:
    def __init__(self, cfg, writer: RunWriter, progress: bool = True, world=None):
        from modalign.train.distributed import SINGLE

        self.cfg, self.writer, self.show_progress = cfg, writer, progress
        self.world = world or SINGLE  # torchrun: every rank runs the recipe; only rank 0's writer writes

    # setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Settings, data, text embeddings and the model: everything training and evaluation share.
        Every config value is checked before the data is loaded or a caption is encoded."""
        import torch

        from modalign.data.batches import PairedTensors
        from modalign.losses.objective import AlignObjective
        from modalign.models.align import AlignModel

        from modalign.train.allocator import state, tune_malloc
        from modalign.train.device import resolve_device, set_tf32

        self.settings = read_settings(self.cfg)
        st = self.settings
        env = read_env(self.cfg)  # under torchrun the command tuned it before gloo's threads started
        self.malloc = state() if self.world.distributed else tune_malloc(env.malloc)
        self.device = resolve_device(env.device, self.world.local_rank if self.world.distributed else None)
        set_tf32(env.tf32)
        self.trainer_cfg, self.optim_cfg, self.eval_cfg, self.loss_cfg = st.trainer, st.optim, st.eval, st.loss
        if st.trainer.threads:
            torch.set_num_threads(st.trainer.threads)
        torch.manual_seed(st.seed)

        log.info("loading data")
        self.data = load_data(self.cfg).validate()
        self.splits = {s: self.data.subset(s) for s in ("train", "val", "test")}
        if len(self.splits["train"]) < 2:
            raise UserError(f"{self.data.source}: the train split has {len(self.splits['train'])} sample; "
                            "a contrastive batch needs at least 2")
        self.protocol = headline_protocol(self.data, st.eval.protocol)
        self.protocols = [self.protocol] + [p for p in ("exact_text", "same_facts", "same_label")
                                            if p != self.protocol and self._has_protocol(p)]
        self.metric_names = self._metric_names()
        if st.trainer.monitor.removeprefix("val/") not in self.metric_names:
            raise UserError(f"config: 'trainer.monitor'={st.trainer.monitor!r} is not a validation metric of "
                            f"this run (e.g. val/m2t_R@1, val/t2m_mAP"
                            f"{', val/zeroshot_acc' if 'zeroshot_acc' in self.metric_names else ''})")

        # under torchrun rank 0 embeds the captions (a cache miss encodes them) while the other ranks
        # wait, then read its cache: N ranks do not encode the same texts N times at once
        from modalign.train.distributed import broadcast_object

        if not self.world.is_main:
            broadcast_object(None, self.world)
        self.text = TextTable(self.data, st.text, progress=self.show_progress)
        if self.world.is_main:
            broadcast_object(True, self.world)
        table = torch.from_numpy(self.text.embeddings)  # (U, text_dim)
        groups = torch.arange(len(table))  # identical text = identical row = one caption group
        self.tensors = {s: PairedTensors(d, self.text.rows(d), table, groups) for s, d in self.splits.items()}
        if self.data.class_prompts is not None:
            rows = [(self.text.index[p], k) for k, ps in enumerate(self.data.class_prompts) for p in ps]
            self.prompt_text = table[torch.tensor([r for r, _ in rows])].to(self.device)
            self.prompt_class = torch.tensor([k for _, k in rows], device=self.device)

        self.model_cfg = st.model_config(self.data, text_dim=int(table.shape[1]))
        try:
            self.model = AlignModel(self.model_cfg)
        except ValueError as e:  # a component's check that needs the data (e.g. head.aux_target=globals)
            raise UserError(f"config: {e}") from None
        self.objective = AlignObjective(self.loss_cfg, self.model_cfg.text_dim, self.world.rank, self.world.size)
        self.parents = []
        if st.encoder_init_from is not None:
            self.parents.append(init_encoder(self.model.encoder, self.model_cfg.encoder, st.encoder_init_from))
        if st.encoder_freeze:
            if st.encoder_init_from is None:
                raise UserError("config: 'encoder.freeze'=true needs 'encoder.init_from' (a frozen random encoder learns nothing)")
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)
        self.model.to(self.device)
        self.objective.to(self.device)

    def _metric_names(self) -> list[str]:
        """Every evaluation metric this run will report, in the order of evaluate()."""
        names = []
        for p in self.protocols:
            prefix = "" if p == self.protocol else f"{p}/"
            for d in ("m2t", "t2m"):
                names += [f"{prefix}{d}_{m}" for m in ("R@1", "R@5", "R@10", "median_rank", "mean_rank", "mAP")]
        if self.data.class_prompts is not None and self.data.labels is not None:
            names.append("zeroshot_acc")
        return names

    def setup_training(self) -> None:
        """The optimizer, schedule, sampler and trainer, reporting to the run writer; records provenance."""
        from modalign.data.batches import EpochSampler
        from modalign.train.loop import Trainer
        from modalign.train.optim import build_optimizer, build_scheduler
        from modalign.train.progress import TrainProgress

        t, seed = self.trainer_cfg, self.cfg.seed
        opt = build_optimizer(self.model.components(), self.optim_cfg)
        sched = build_scheduler(opt, self.optim_cfg, t.max_steps)
        world = self.world
        shard = None
        if world.distributed:
            from modalign.train.distributed import shard as shard_of

            if t.batch_size % world.size:
                raise UserError(f"config: 'trainer.batch_size'={t.batch_size} must divide by the {world.size} "
                                "ranks (each trains on an equal shard of the global batch)")
            shard = shard_of(t.batch_size, world)
        self.sampler = EpochSampler(self.tensors["train"], t.batch_size, seed, t.accumulate, shard,
                                    token_noise=self.loss_cfg.mlm_weight > 0, bucket=t.bucket_by_length)
        if self.sampler.batch_size < t.batch_size:
            log.warning("trainer.batch_size=%d is larger than the %d training samples; using %d",
                        t.batch_size, len(self.splits["train"]), self.sampler.batch_size)

        # a resumed run continues from rank 0's last.pt (every rank reads it) and keeps the points up
        # to it (none if it was killed before the first)
        self.resume = self.writer.load_checkpoint("last.pt") if self.cfg.resume is not None else None
        if self.resume is not None:
            log.info("resuming from %s at step %d", self.writer.path / "checkpoints" / "last.pt", self.resume["step"])
        keep = int(self.resume["step"]) if self.resume is not None else (0 if self.cfg.resume is not None else None)
        self.writer.open_metrics(keep_until_step=keep)
        progress = None
        if self.show_progress:
            progress = TrainProgress(f"align {self.writer.path.name[:40]}", t.monitor.removeprefix("val/"))
        describe = {"model_config": self.model_cfg.to_dict(), "recipe": "align",
                    "text_model": self.text.model_id}
        ddp = None
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # every parameter the loss uses is in forward's graph; find_unused covers the ones a
            # configuration leaves out (e.g. the SigLIP bias under CLIP, a frozen encoder)
            ddp = DistributedDataParallel(self.model, find_unused_parameters=True,
                                          device_ids=[self.device.index] if self.device.type == "cuda" else None)
        from modalign.recipes.launch import watcher

        self.trainer = Trainer(self.model, self.objective, opt, sched, self.sampler,
                               lambda: self.evaluate("val").metrics, t, [self.writer, watcher(self.cfg, self.writer)],
                               describe=describe,
                               progress=progress, ddp=ddp, device=self.device, world_size=world.size)
        self._write_provenance()

    def _has_protocol(self, p: str) -> bool:
        return {"exact_text": True, "same_facts": self.data.facts is not None,
                "same_label": self.data.labels is not None}[p]

    def _write_provenance(self) -> None:
        import torch

        from modalign.eval.align_eval import PROTOCOL_VERSION
        from modalign.registry import get_variant
        from modalign.runs.provenance import code_info
        from modalign.train.device import env_info

        params = {k: sum(p.numel() for p in ps) for k, ps in self.model.components().items()}
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.writer.update(
            seed=self.cfg.seed,
            variant=get_variant("head", self.model_cfg.head.kind).metadata(),
            code=code_info(),
            env=env_info(torch.get_num_threads(), self.device, self.malloc, self.world),
            data={"name": self.cfg.data.name, "source": self.data.source, "on_disk": self.data.lazy,
                  "splits": {s: {"n": len(d), "fingerprint": d.fingerprint()} for s, d in self.splits.items()}},
            text={"model": self.text.model_id, "cache": self.text.stats, **self.text.identity},
            parents=self.parents,
            eval={"protocol": self.protocol, "protocols": self.protocols, "version": PROTOCOL_VERSION,
                  "split": self.eval_cfg.split, "metrics": self.metric_names},
            params={"total": sum(params.values()), "trainable": trainable, "by_component": params,
                    "trainable_by_component": {k: sum(p.numel() for p in ps if p.requires_grad)
                                               for k, ps in self.model.components().items()}},
            patching=patching_record(self.model_cfg.encoder, self.data.seq_len, self.settings.encoder.patch_size == "auto"),
        )

    # evaluate ---------------------------------------------------------------------------------
    def evaluate(self, split: str) -> Evaluation:
        """Retrieval under every protocol and zero-shot accuracy on one split, with both sides'
        embeddings (N, D)."""
        from modalign.eval.align_eval import class_embeddings, embed_split, evaluate_embeddings

        data = self.splits[split]
        m, t = embed_split(self.model, self.tensors[split], self.eval_cfg.batch_size, self.device)
        groups = {p: data.group_ids(p) for p in self.protocols}
        class_text = None
        if self.data.class_prompts is not None and data.labels is not None:
            class_text = class_embeddings(self.model, self.prompt_text, self.prompt_class,
                                          len(self.data.class_prompts))
        metrics, per_example = evaluate_embeddings(m, t, groups, self.protocol, class_text, data.labels)
        metrics["logit_scale"] = float(self.model.scale().detach())
        return Evaluation(metrics, per_example, m, t)

    # fit / test / facts -----------------------------------------------------------------------
    def fit(self) -> dict:
        try:
            return self.trainer.fit(self.resume)
        finally:
            self.writer.close()

    def test(self, split: str | None = None) -> Evaluation:
        """The evaluated split with the best checkpoint (the model as trained when there is none)."""
        split = split or self.eval_cfg.split
        best = self.writer.load_checkpoint("best.pt")
        if best is not None:
            self.model.load_state_dict(best["model"])
        return self.evaluate_with_prefixes(split)

    def evaluate_with_prefixes(self, split: str) -> Evaluation:
        ev = self.evaluate(split)
        ev.metrics.update(self.evaluate_prefixes(split))
        return ev

    def evaluate_prefixes(self, split: str) -> dict[str, float]:
        """For a head with ordered registers (`n_overlap`): retrieval under the headline protocol
        with only the first k registers kept, k = 1..K_o, as `registers_{k}/m2t_R@1` etc."""
        from modalign.eval.align_eval import prefix_retrieval

        if not hasattr(self.model.head, "n_overlap"):
            return {}
        data = self.splits[split]
        return prefix_retrieval(self.model, self.tensors[split], data.group_ids(self.protocol),
                                self.eval_cfg.batch_size, self.device)

    def write_facts(self, fit: dict, test: Evaluation, wall: float) -> dict:
        from modalign.runs.facts import build_summary

        split = self.eval_cfg.split
        summary = build_summary(self.writer.run.info(), self.writer.run.read_metrics(), split, test.metrics, fit,
                                wall, self.chance(split))
        self.writer.write_facts(summary, split, self.splits[split], test.per_example, test.modality, test.text,
                                self.eval_cfg.export_embeddings)
        return summary

    def chance(self, split: str) -> dict[str, float]:
        """R@1 of a random ranking under each protocol, and zero-shot accuracy of a random guess."""
        from modalign.eval.retrieval import chance_recall_at_1

        data, out = self.splits[split], {}
        for p in self.protocols:
            r1 = chance_recall_at_1(data.group_ids(p))
            prefix = "" if p == self.protocol else f"{p}/"
            out[f"{prefix}m2t_R@1"] = out[f"{prefix}t2m_R@1"] = r1
        if self.data.class_prompts is not None and data.labels is not None:
            out["zeroshot_acc"] = 1.0 / len(self.data.class_prompts)
        return out

    def __call__(self) -> float | None:
        t0 = time.perf_counter()
        self.setup()
        self.setup_training()
        fit = self.fit()
        if not self.world.is_main:
            return None  # the test and the facts are rank 0's: the other ranks are done
        test = self.test()
        wall = time.perf_counter() - t0 + self.trainer.seconds_before  # a resumed run counts its earlier sessions
        summary = self.write_facts(fit, test, wall)
        return summary[self.eval_cfg.split][self.trainer_cfg.monitor.removeprefix("val/")]


def main(argv: list[str] | None = None) -> int:
    """python -m modalign.recipes.align [--quiet] [overrides] — the same as `modalign train`."""
    from modalign.recipes.launch import train_command

    return train_command("align", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
