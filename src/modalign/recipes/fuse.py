"""The `fuse` recipe (stage 3): a stage-2 encoder fused into a frozen language model, trained to caption.

    modalign train --recipe fuse encoder.init_from=outputs/runs/<an align run> fusion=additive
    modalign sweep experiment=fuse_baselines

setup -> fit (teacher-forced caption cross-entropy) -> test (decode, captioning metrics, retention)
-> facts. The LM (default SmolLM2-135M-Instruct, `modalign.models.lm`) and, by default, the encoder
stay frozen; the projector and the fusion variant's parameters train (`modalign.models.fusion`).
run.json `parents` records the align run's checkpoint and the LM, each with its sha256.
Checkpoints hold the trainable parameters only. See docs/stage3.md.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalign.errors import UserError
from modalign.eval.evaluation import Evaluation
from modalign.options import Options, at_least, one_of, require
from modalign.recipes.align import load_data
from modalign.recipes.config import to_container, typed
from modalign.recipes.settings import read_env, read_training
from modalign.runs.writer import RunWriter

log = logging.getLogger("modalign")
# optimizer groups; each model has the ones its fusion variant trains (trainer.optim.<component>)
COMPONENTS = ("projector", "adapter", "gates", "lora", "lm_blocks", "prompt", "encoder")
PROBE = Path(__file__).resolve().parents[1] / "eval" / "retention_probe.json"


@dataclass
class FuseEval(Options):
    split: str = "test"
    val_samples: int = 64  # val samples decoded at each evaluation (the first N); the test split is decoded whole
    batch_size: int = 64  # decoding batch (greedy decoding is bound by reading the LM's weights once per token)
    samples_in_card: int = 8
    retention: bool = True  # text-only perplexity and greedy continuations of a fixed probe, before and after
    meteor: Any = "auto"  # METEOR on the evaluated split: auto (where Java is installed) | true | false

    def validate(self) -> None:
        one_of(self, "split", ("train", "val", "test"))
        require(self.meteor == "auto" or isinstance(self.meteor, bool), "meteor", self.meteor,
                "expected auto, true or false")
        for name in ("val_samples", "batch_size"):
            at_least(self, name, 1)
        at_least(self, "samples_in_card", 0)


@dataclass
class DecodeOptions(Options):
    max_new_tokens: int = 40
    num_beams: int = 1  # 1 = greedy
    length_penalty: float = 1.0

    def validate(self) -> None:
        at_least(self, "max_new_tokens", 1)
        at_least(self, "num_beams", 1)


@dataclass
class FuseLoss(Options):
    kind: str = "xe"  # xe: teacher-forced cross-entropy | scst: self-critical, CIDEr-D reward, greedy baseline
    max_new_tokens: int = 40  # scst: length limit of the sampled and greedy captions
    contrastive: float = 0.0  # xe: weight of the soft-token / caption-embedding InfoNCE term (0 = XE alone)
    temperature: float = 0.1  # xe: the InfoNCE term's fixed temperature

    def validate(self) -> None:
        one_of(self, "kind", ("xe", "scst"))
        at_least(self, "max_new_tokens", 1)
        at_least(self, "contrastive", 0.0)
        require(self.temperature > 0, "temperature", self.temperature, "it must be > 0")
        require(self.kind == "xe" or self.contrastive == 0, "contrastive", self.contrastive,
                "the contrastive term goes with loss.kind=xe (SCST fine-tunes on its reward alone)")


def find_checkpoint(source: str, key: str) -> Path:
    p = Path(source).expanduser()
    if p.is_dir():
        d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        p = d / "best.pt" if (d / "best.pt").exists() else d / "last.pt"
    if not p.exists():
        raise UserError(f"{key}={source}: no checkpoint there (a run directory with checkpoints/best.pt, or a .pt file)")
    return p


def load_align_model(source: str, data):
    """The stage-2 AlignModel of an align run (its best checkpoint) -> (model, parent record)."""
    from modalign.models.align import AlignModel, AlignModelConfig
    from modalign.runs.provenance import sha256_file
    from modalign.train.checkpoint import load_checkpoint

    p = find_checkpoint(source, "encoder.init_from")
    payload = load_checkpoint(p)
    if payload.get("recipe") not in (None, "align") or "encoder" not in payload.get("model_config", {}):
        raise UserError(f"{p}: not an align run's checkpoint (stage 3 takes its encoder and head from stage 2)")
    try:
        mcfg = AlignModelConfig.from_dict(payload["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{p}: its model_config cannot be read ({e})") from None
    enc = mcfg.encoder
    for key, ours in (("vocab_size", data.vocab_size), ("n_cont", data.n_cont), ("n_globals", data.n_globals)):
        if getattr(enc, key) != ours:
            raise UserError(f"{p}: its encoder was trained on data with {key}={getattr(enc, key)}, this data has "
                            f"{key}={ours} (use an align run on the same kind of data)")
    if data.seq_len > enc.max_len:
        raise UserError(f"{p}: its encoder takes up to {enc.max_len} tokens; this data has {data.seq_len}")
    model = AlignModel(mcfg)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise UserError(f"{p}: the weights do not fit its own model_config ({str(e).splitlines()[0]})") from None
    return model, {"role": "encoder", "path": str(p.resolve()), "sha256": sha256_file(p), "step": payload.get("step"),
                   "recipe": "align"}


def auto_align_run(cfg, quiet: bool) -> str:
    """`encoder.init_from=auto`, for the demo experiments only: the align run of the same demo data
    with the align recipe's defaults (seed 0), trained once under <outputs>/stage2/ and reused by
    every fuse run (and sweep job) that asks for it. Jobs running at once wait for the first (a
    file lock). -> its run directory."""
    import fcntl
    import hashlib
    import json
    import shutil

    from modalign.recipes.align import PURE_GENERATORS
    from modalign.recipes.config import compose
    from modalign.recipes.launch import check_resolved, execute, start_run
    from modalign.runs.rundir import read_json

    data = to_container(cfg.data, "data")
    if data.get("_target_") not in PURE_GENERATORS:
        raise UserError("config: 'encoder.init_from'=auto trains an align run on the demo data only; for your "
                        "data, train one (modalign train data=...) and pass its directory")
    overrides = [f"data.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in sorted(data.items())
                 if k not in ("_target_", "name")]
    key = hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:12]
    root = Path(str(cfg.outputs)) / "stage2"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"align_demo_{key}"
    with open(root / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (path / "run.json").exists() and read_json(path / "run.json").get("status") == "completed":
            return str(path)
        shutil.rmtree(path, ignore_errors=True)  # an attempt that did not finish
        args = [*overrides, "seed=0", f"outputs={cfg.outputs}"]
        log.info("encoder.init_from=auto: training the align run %s first", path)
        resolved = to_container(compose(args, "align"), "")
        acfg, writer = start_run(check_resolved(resolved, args, "align"), args, "align", path)
        code, _ = execute(acfg, writer, quiet)
        if code != 0:
            raise UserError(f"encoder.init_from=auto: the align run failed (exit {code}); see {path / 'run.log'}")
    return str(path)


def _scst_objective_class():
    import torch

    from modalign.eval.captioning import CiderD
    from modalign.models.fusion import scst_loss

    class SCSTObjective(torch.nn.Module):
        """Self-critical sequence training (Rennie et al. 2017): for each training sample, a caption
        sampled from the model and the greedy caption; reward = CIDEr-D against the sample's
        references with document frequencies of the train split; the loss raises the log-probability
        of the sampled caption in proportion to how much it beats the greedy one. Sampling draws on
        torch's global RNG, which checkpoints hold, so a resumed run draws the same captions."""

        def __init__(self, recipe):
            super().__init__()
            self.recipe = [recipe]  # not a submodule: the model is the trainer's, not the objective's
            train = recipe.splits["train"]
            self.references = [list(c) for c in train.captions]
            self.cider = CiderD(self.references)

        def inputs(self, batch):
            r = self.recipe[0]
            model, tok, eos, n = r.model, r.lm.tokenizer, r.eos, r.loss_opts.max_new_tokens
            was = model.training
            model.eval()
            with r.amp():
                sampled = model.generate(batch, n, eos_token_id=eos, pad_token_id=eos, do_sample=True, with_eos=True)
                greedy = model.generate(batch, n, eos_token_id=eos, pad_token_id=eos)
            model.train(was)
            refs = [self.references[i] for i in batch["index"].tolist()]
            texts = [tok.decode([t for t in s if t != eos], skip_special_tokens=True) for s in sampled]
            r_s = self.cider.scores(texts, refs)
            r_g = self.cider.scores([tok.decode(g, skip_special_tokens=True) for g in greedy], refs)
            longest = max(1, max(len(s) for s in sampled))
            text = torch.full((len(sampled), longest), -1, dtype=torch.long)
            for i, s in enumerate(sampled):
                if s:
                    text[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            device = batch["text"].device
            return {**batch, "text": text.to(device),
                    "advantage": torch.tensor(r_s - r_g, dtype=torch.float32, device=device),
                    "reward": torch.tensor(float(r_s.mean())), "reward_greedy": torch.tensor(float(r_g.mean()))}

        def forward(self, out, batch):
            loss = scst_loss(out, batch["advantage"])
            return {"loss": loss, "reward": batch["reward"], "reward_greedy": batch["reward_greedy"]}

    return SCSTObjective


def SCSTObjective(recipe):
    return _scst_objective_class()(recipe)


class FuseRecipe:
    def __init__(self, cfg, writer: RunWriter, progress: bool = True, world=None):
        from modalign.train.distributed import SINGLE

        self.cfg, self.writer, self.show_progress = cfg, writer, progress
        self.world = world or SINGLE

    # setup ------------------------------------------------------------------------------------
    def read_config(self) -> None:
        """Every option, typed and checked, before any data or model is loaded."""
        from modalign.models.fusion import ProjectorOptions
        from modalign.models.lm import LMOptions
        from modalign.registry import get_variant

        cfg = self.cfg
        self.seed, self.trainer_cfg, self.optim_cfg = read_training(cfg, COMPONENTS)
        self.env = read_env(cfg)
        self.eval_cfg = typed(FuseEval, to_container(cfg.eval, "eval"), "eval")
        self.decode = typed(DecodeOptions, to_container(cfg.decode, "decode"), "decode")
        self.loss_opts = typed(FuseLoss, to_container(cfg.loss, "loss"), "loss") if "loss" in cfg else FuseLoss()
        self.start_from = cfg.get("init_from")
        if self.start_from is not None and not isinstance(self.start_from, str):
            raise UserError(f"config: 'init_from' must be a fuse run directory or checkpoint, got {self.start_from!r}")
        if self.loss_opts.kind == "scst" and self.start_from is None:
            raise UserError("config: loss=scst fine-tunes a trained fuse run: set init_from=RUN (a fuse run directory)")
        self.lm_opts = typed(LMOptions, to_container(cfg.lm, "lm"), "lm")
        self.proj_opts = typed(ProjectorOptions, to_container(cfg.projector, "projector"), "projector")
        fusion = to_container(cfg.fusion, "fusion")
        kind = fusion.pop("kind", None)
        if not isinstance(kind, str):
            raise UserError(f"config: 'fusion.kind' must be a fusion variant name, got {kind!r}")
        self.variant = get_variant("fusion", kind)
        self.fusion_opts = typed(self.variant.obj.Options, fusion, "fusion")
        enc = to_container(cfg.encoder, "encoder")
        unknown = sorted(set(enc) - {"init_from", "freeze"})
        if unknown:
            raise UserError(f"config: unknown key 'encoder.{unknown[0]}' (stage 3 takes its encoder from "
                            f"encoder.init_from; known: freeze, init_from)")
        self.init_from, self.freeze = enc.get("init_from"), enc.get("freeze", True)
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise UserError(f"config: 'encoder.init_from' must be an align run directory or checkpoint, got {self.init_from!r}")
        if not isinstance(self.freeze, bool):
            raise UserError(f"config: 'encoder.freeze' must be true or false, got {self.freeze!r}")
        if self.init_from == "auto":
            self.init_from = auto_align_run(self.cfg, quiet=not self.show_progress)
        if self.loss_opts.contrastive > 0 and not self.variant.obj.uses_modality:
            raise UserError(f"config: 'loss.contrastive'={self.loss_opts.contrastive} needs a modality input, and "
                            f"fusion={kind} has none (set loss=xe for it)")
        if self.init_from is None and self.variant.obj.uses_modality:
            raise UserError(f"config: 'encoder.init_from' is required for fusion={kind} (an align run directory: "
                            f"stage 3 fuses a stage-2 encoder)")

    def setup(self) -> None:
        import torch

        from modalign.data.batches import PairedTensors
        from modalign.models.fusion import (FusedLM, Projector, auto_scale, build_fusion, caption_loss,
                                            soft_text_contrastive)
        from modalign.models.lm import load_lm
        from modalign.train.allocator import tune_malloc
        from modalign.train.device import resolve_device, resolve_precision, set_tf32

        self.read_config()
        t = self.trainer_cfg
        self.malloc = tune_malloc(self.env.malloc)
        self.device = resolve_device(self.env.device)
        self.precision = resolve_precision(t.precision, self.device)
        set_tf32(self.env.tf32)
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(self.seed)

        self.data = load_data(self.cfg).validate()
        self.splits = {s: self.data.subset(s) for s in ("train", "val", "test")}
        if len(self.splits["train"]) < 2:
            raise UserError(f"{self.data.source}: the train split has fewer than 2 samples")
        self.parents: list[dict] = []
        modality = None
        if self.init_from is not None:
            modality, parent = load_align_model(self.init_from, self.data)
            self.parents.append(parent)
        self.lm = load_lm(self.lm_opts)
        self.parents.append(self.lm.identity)
        tok, lm = self.lm.tokenizer, self.lm.model
        self.eos = tok.eos_token_id
        self.start_ids = self._start_ids(tok)
        self.table, self.index = self._caption_table(tok)
        groups = torch.arange(len(self.table))
        self.tensors = {s: PairedTensors(d, self._rows(d), self.table, groups, token_text=True)
                        for s, d in self.splits.items()}

        width = int(lm.config.hidden_size)
        torch.manual_seed(self.seed)  # the trainable parts' init depends on the seed only
        fusion = build_fusion(self.variant.name, self.fusion_opts, lm, width)
        projector = None
        if fusion.uses_modality:
            in_dim = modality.cfg.embed_dim if self.proj_opts.features == "embedding" else modality.cfg.encoder.width
            scale = self.proj_opts.scale or auto_scale(lm.get_input_embeddings().weight)
            projector = Projector(self.proj_opts, in_dim, width, scale)
            self.projector_scale = scale
        else:
            modality, self.projector_scale = None, None
        self.model = FusedLM(modality, lm, projector, fusion, self.start_ids, freeze_encoder=self.freeze,
                             features=self.proj_opts.features, probe_ids=self._probe_ids(tok))
        if self.start_from is not None:
            self.parents.append(self._start_from(self.start_from))
        elif self.proj_opts.init_from is not None:
            if projector is None:
                raise UserError(f"config: 'projector.init_from' needs a projector, and fusion={self.variant.name} "
                                f"has no modality input")
            self.parents.append(self._projector_from(self.proj_opts.init_from))
        if self.precision == "bf16":
            self.model.hold_frozen_lm_in(torch.bfloat16)
        self.model.to(self.device)
        if projector is not None and self.freeze:
            self._cache_features()

        model, weight, temperature = self.model, self.loss_opts.contrastive, self.loss_opts.temperature

        class Objective(torch.nn.Module):  # stateless; a module so the trainer checkpoints it like any other
            def inputs(self, batch):
                if weight > 0:
                    return {**batch, "caption_embedding": model.caption_embedding(batch["text"])}
                return batch

            def forward(self, out, batch):
                terms = caption_loss(out)
                if weight > 0:
                    c = soft_text_contrastive(out, batch["caption_embedding"], batch["groups"], temperature)
                    terms["loss"] = terms["loss"] + weight * c
                    terms["contrastive"] = c.detach()
                return terms

        if self.loss_opts.kind == "scst":
            from modalign.models.fusion import Centered

            for m in self.model.modules():  # captions are sampled in eval mode: score them with the same model
                if isinstance(m, Centered):
                    m.use_running = True
        self.objective = SCSTObjective(self) if self.loss_opts.kind == "scst" else Objective()
        names = self.metric_names()
        if t.monitor.removeprefix("val/") not in names:
            raise UserError(f"config: 'trainer.monitor'={t.monitor!r} is not a validation metric of this run "
                            f"(have: {', '.join('val/' + m for m in names)})")

    def _fingerprint(self, split: str) -> str:
        """A split's fingerprint, hashed once per run (the feature cache and run.json both need it)."""
        known = self.__dict__.setdefault("_fingerprints", {})
        if split not in known:
            known[split] = self.splits[split].fingerprint()
        return known[split]

    def _cache_features(self) -> None:
        """A frozen encoder's features of every split, computed once per run (not per step and
        epoch), keyed by the split's fingerprint and the align checkpoint's sha256."""
        from modalign.models.fusion import frozen_features

        t0 = time.perf_counter()
        sha = self.parents[0]["sha256"]
        for s, d in self.splits.items():
            key = (self._fingerprint(s), sha, self.proj_opts.features)
            self.tensors[s].features = frozen_features(self.model, self.tensors[s].eval_batches(256), key)
        log.info("frozen encoder features of %s samples cached in %.1f s",
                 sum(t.n for t in self.tensors.values()), time.perf_counter() - t0)

    def _start_from(self, source: str) -> dict:
        """init_from: the trained parts of another fuse run with the same fusion and projector."""
        from modalign.models.fusion import projector_shape
        from modalign.runs.provenance import sha256_file
        from modalign.train.checkpoint import load_checkpoint

        p = find_checkpoint(source, "init_from")
        payload = load_checkpoint(p)
        theirs, ours = payload.get("model_config") or {}, self.model_config()
        if payload.get("recipe") != "fuse":
            raise UserError(f"{p}: not a fuse run's checkpoint (init_from continues a stage-3 run)")
        theirs_proj = projector_shape(theirs.get("projector") or {})
        for key in ("fusion", "projector", "start_ids"):
            if (theirs_proj if key == "projector" else theirs.get(key)) != (
                    self.proj_opts.shape() if key == "projector" else ours.get(key)):
                raise UserError(f"{p}: its {key} settings differ from this run's ({theirs.get(key)} vs {ours.get(key)})")
        if (theirs.get("lm") or {}).get("sha256") != self.lm.identity["sha256"]:
            raise UserError(f"{p}: it was trained on another LM (sha256 {str((theirs.get('lm') or {}).get('sha256'))[:12]}, "
                            f"this run's is {self.lm.identity['sha256'][:12]})")
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as e:
            raise UserError(f"{p}: its weights do not fit this run's model ({str(e).splitlines()[0]})") from None
        log.info("trained parts initialised from %s (step %s)", p, payload.get("step"))
        return {"role": "init", "path": str(p.resolve()), "sha256": sha256_file(p), "step": payload.get("step"),
                "recipe": "fuse"}

    def _projector_from(self, source: str) -> dict:
        """projector.init_from: only the projector of another fuse run, whatever its fusion (the
        two-stage recipe of LLaVA and BLIP-2: train the projector under `prefix`, then the gated
        variant from it). Its projector settings, LM and encoder must be this run's."""
        from modalign.models.fusion import projector_shape
        from modalign.runs.provenance import sha256_file
        from modalign.train.checkpoint import load_checkpoint

        p = find_checkpoint(source, "projector.init_from")
        payload = load_checkpoint(p)
        theirs = payload.get("model_config") or {}
        if payload.get("recipe") != "fuse":
            raise UserError(f"{p}: not a fuse run's checkpoint (projector.init_from takes a stage-3 run's projector)")
        mine = self.proj_opts.shape()
        if not theirs.get("projector"):
            raise UserError(f"{p}: it has no projector (fusion={(theirs.get('fusion') or {}).get('kind')})")
        other = projector_shape(theirs["projector"])
        diff = sorted(k for k in set(mine) | set(other) if mine.get(k) != other.get(k))
        if diff:
            raise UserError(f"{p}: its projector.{diff[0]} is {other.get(diff[0])!r}, this run's {mine.get(diff[0])!r}")
        if (theirs.get("lm") or {}).get("sha256") != self.lm.identity["sha256"]:
            raise UserError(f"{p}: it was trained on another LM (sha256 {str((theirs.get('lm') or {}).get('sha256'))[:12]}, "
                            f"this run's is {self.lm.identity['sha256'][:12]})")
        run_json = p.parent.parent / "run.json"
        if run_json.exists():  # the projector reads the encoder's features: they must be the same encoder's
            import json

            enc = next((q for q in json.loads(run_json.read_text()).get("parents") or [] if q.get("role") == "encoder"), None)
            if enc is not None and enc.get("sha256") != self.parents[0].get("sha256"):
                raise UserError(f"{p}: its projector reads another align run's encoder (sha256 {str(enc.get('sha256'))[:12]}, "
                                f"this run's is {str(self.parents[0].get('sha256'))[:12]})")
        prefix = "projector."
        weights = {k[len(prefix):]: v for k, v in payload["model"].items() if k.startswith(prefix)}
        try:
            self.model.projector.load_state_dict(weights)
        except RuntimeError as e:
            raise UserError(f"{p}: its projector does not fit this run's ({str(e).splitlines()[0]})") from None
        log.info("projector initialised from %s (step %s, fusion=%s)", p, payload.get("step"),
                 (theirs.get("fusion") or {}).get("kind"))
        return {"role": "projector", "path": str(p.resolve()), "sha256": sha256_file(p), "step": payload.get("step"),
                "recipe": "fuse"}

    def _probe_ids(self, tok) -> list[list[int]]:
        """The retention probe's texts as token ids after the start: real text on which the fusion
        measures the residual stream's scale at each block (norm-matched variants inject at it)."""
        import json

        texts = json.loads(PROBE.read_text())["texts"]
        return [self.start_ids + tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def _start_ids(self, tok) -> list[int]:
        if self.lm_opts.template == "chat":
            if not getattr(tok, "chat_template", None):
                raise UserError(f"config: 'lm.template'=chat, but the LM {self.lm_opts.name} has no chat template")
            ids = tok.apply_chat_template([{"role": "user", "content": self.lm_opts.prompt}],
                                          add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        bos = int(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
        if self.lm_opts.template == "assistant":
            header = self._assistant_header(tok)  # SmolLM2: <|im_start|>assistant\n, its bos already first
            return [bos] + (header[1:] if header and header[0] == bos else header)
        return [bos]

    def _assistant_header(self, tok) -> list[int]:
        """The chat template's header of an assistant turn (what add_generation_prompt appends), as ids."""
        if not getattr(tok, "chat_template", None):
            raise UserError(f"config: 'lm.template'=assistant, but the LM {self.lm_opts.name} has no chat template")
        turn = [{"role": "user", "content": "x"}]
        full = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        bare = tok.apply_chat_template(turn, add_generation_prompt=False, tokenize=False)
        if not full.startswith(bare) or full == bare:
            raise UserError(f"config: 'lm.template'=assistant: the chat template of {self.lm_opts.name} has no "
                            f"assistant header to start from (use lm.template=chat or plain)")
        return list(tok(full[len(bare):], add_special_tokens=False)["input_ids"])

    def _caption_table(self, tok):
        """Every distinct caption as LM token ids + eos, padded with -1 -> (table (U, L), {text: row})."""
        import torch

        index: dict[str, int] = {}
        for caps in self.data.captions:
            for c in caps:
                index.setdefault(c, len(index))
        encoded = tok(list(index), add_special_tokens=False)["input_ids"]
        longest = max(len(e) for e in encoded) + 1
        table = torch.full((len(encoded), longest), -1, dtype=torch.long)
        for i, e in enumerate(encoded):
            table[i, : len(e) + 1] = torch.tensor(e + [self.eos])
        return table, index

    def _rows(self, data) -> np.ndarray:
        k = max(len(c) for c in data.captions)
        out = np.full((len(data), k), -1, np.int64)
        for i, caps in enumerate(data.captions):
            out[i, : len(caps)] = [self.index[c] for c in caps]
        return out

    def metric_names(self) -> list[str]:
        return ["xe", "reliance_gap", "first_token_jsd", "cider_d", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "pred_words",
                "distinct_preds", "soft_norm_ratio"]

    def setup_training(self) -> None:
        from modalign.recipes.launch import single_process_trainer

        describe = {"model_config": self.model_config(), "recipe": "fuse", "lm_sha256": self.lm.identity["sha256"]}
        self.sampler, self.resume, self.trainer = single_process_trainer(
            self, "fuse", describe, lambda: self.evaluate("val", limit=self.eval_cfg.val_samples).metrics)
        self.retention_before = self.retention(frozen=True) if self.eval_cfg.retention else None
        self._write_provenance()

    def model_config(self) -> dict:
        return {"fusion": {"kind": self.variant.name, **asdict(self.fusion_opts)}, "projector": asdict(self.proj_opts),
                "projector_scale": self.projector_scale, "lm": self.lm.identity, "start_ids": self.start_ids,
                "encoder_frozen": self.freeze}

    def _write_provenance(self) -> None:
        import torch

        from modalign.runs.provenance import code_info
        from modalign.train.device import env_info

        params = {k: sum(p.numel() for p in ps) for k, ps in self.model.components().items()}
        self.writer.update(
            seed=self.seed,
            variant=self.variant.metadata(),
            code=code_info(),
            env=env_info(torch.get_num_threads(), self.device, self.malloc),
            data={"name": self.cfg.data.name, "source": self.data.source, "on_disk": self.data.lazy,
                  "splits": {s: {"n": len(d), "fingerprint": self._fingerprint(s)} for s, d in self.splits.items()}},
            parents=self.parents,
            lm={k: self.lm.identity[k] for k in ("name", "sha256", "layers", "width", "vocab", "params")},
            eval={"protocol": "captioning", "version": 1, "split": self.eval_cfg.split, "metrics": self.metric_names(),
                  "decode": asdict(self.decode)},
            params={"total": sum(p.numel() for p in self.model.parameters()) + sum(
                        p.numel() for p in self.lm.model.parameters() if not p.requires_grad),
                    "trainable": sum(params.values()), "by_component": params, "trainable_by_component": params},
        )

    # evaluation ---------------------------------------------------------------------------------
    def with_meteor(self) -> bool:
        """METEOR on the evaluated split (never on the val subset: a Java start-up per evaluation)."""
        from modalign.eval.captioning import meteor_available

        if self.eval_cfg.meteor is False:
            return False
        ok, why = meteor_available()
        if not ok and self.eval_cfg.meteor is True:
            raise UserError(f"config: 'eval.meteor'=true, but {why}")
        return ok

    def evaluate(self, split: str, limit: int | None = None) -> Evaluation:
        """Teacher-forced cross-entropy, the reliance gap and the first token's divergence across the
        batch (`reliance_gap`, `first_token_jsd`), decoded captions and their
        metrics on `split` (the first `limit` samples), the soft-to-text token norm ratio, and the gates."""
        import torch

        from modalign.eval.captioning import caption_scores
        from modalign.models.fusion import first_token_jsd, injection_ratios, per_example_xe, reliance_gap
        from modalign.train.device import to_device

        data = self.tensors[split]
        n = data.n if limit is None else min(limit, data.n)
        tok = self.lm.tokenizer
        self.model.eval()
        xe, gap, jsd, soft_norms, preds = [], [], [], [], []
        donor = None  # the previous batch's last soft tokens: the first sample's mismatched input
        bs = self.eval_cfg.batch_size
        injected: dict = {}  # what the gated hooks add to the residual stream (inject/<block>/...)
        with torch.no_grad(), self.amp():
            for start in range(0, n, bs):
                idx = torch.arange(start, min(n, start + bs))
                batch = to_device(data.batch(idx), self.device)
                with self.model.measure_injection(injected):
                    out = self.model(batch)
                xe.append(per_example_xe(out).cpu().numpy())
                gap.append(reliance_gap(self.model, batch, out, donor).float().cpu().numpy())
                jsd.append(first_token_jsd(out).cpu().numpy())
                donor = out.soft[-1:] if out.soft is not None else None
                soft_norms.append(float(out.soft_norm))
                rows = self.model.generate(batch, self.decode.max_new_tokens, self.decode.num_beams,
                                           self.decode.length_penalty, eos_token_id=self.eos, pad_token_id=self.eos)
                preds += [tok.decode(r, skip_special_tokens=True).strip() for r in rows]
        self.model.train()
        refs = [list(c) for c in self.splits[split].captions[:n]]
        metrics, per = caption_scores(preds, refs, with_meteor=limit is None and self.with_meteor())
        per["xe"] = np.concatenate(xe)
        metrics["xe"] = float(per["xe"].mean())
        per["reliance_gap"] = np.concatenate(gap)
        metrics["reliance_gap"] = float(per["reliance_gap"].mean())
        per["first_token_jsd"] = np.concatenate(jsd)
        metrics["first_token_jsd"] = float(per["first_token_jsd"].mean())
        metrics["soft_norm_ratio"] = float(np.mean(soft_norms)) / self.model.text_norm
        metrics.update({f"gate/{k}": v for k, v in self.model.fusion.gates().items()})
        metrics.update(injection_ratios(injected))
        ids = self.splits[split].ids[:n]
        predictions = [{"id": str(i), "prediction": p, "references": r} for i, p, r in zip(ids, preds, refs)]
        return Evaluation(metrics, per, extra={"predictions": predictions})

    def amp(self):
        """The training precision's autocast, for evaluation and decoding too: under bf16 the frozen
        LM is held in bf16 and the trainable parts in fp32."""
        from modalign.train.device import autocast

        return autocast(self.device, self.precision)

    def retention(self, frozen: bool) -> dict:
        """Text-only perplexity of the probe texts and greedy continuations of the probe prompts, by the
        frozen LM (`frozen`) or by the fused model without modality input."""
        import json

        import torch
        import torch.nn.functional as F

        probe = json.loads(PROBE.read_text())
        tok, model = self.lm.tokenizer, self.model
        bos = self.start_ids[:1] if self.lm_opts.template in ("plain", "assistant") else []
        ctx = model.frozen_lm() if frozen else _null()
        self.model.eval()
        with torch.no_grad(), ctx, self.amp():
            nll, count = 0.0, 0
            for text in probe["texts"]:
                ids = torch.tensor([bos + tok(text, add_special_tokens=False)["input_ids"] + [self.eos]],
                                   device=self.device)
                logits = model.text_logits(ids)[0, :-1]
                nll += float(F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
                count += ids.shape[1] - 1
            conts = []
            for prompt in probe["prompts"]:
                ids = torch.tensor([bos + tok(prompt, add_special_tokens=False)["input_ids"]], device=self.device)
                out = model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                        do_sample=False, num_beams=1, eos_token_id=self.eos, pad_token_id=self.eos)
                conts.append(out[0, ids.shape[1]:].tolist())
        self.model.train()
        return {"ppl": math.exp(nll / count), "continuations": conts, "probe_version": probe["version"]}

    def test(self, split: str | None = None) -> Evaluation:
        best = self.writer.load_checkpoint("best.pt")
        if best is not None:
            self.model.load_state_dict(best["model"])
        return self.evaluate(split or self.eval_cfg.split)

    def chance(self, split: str) -> dict[str, float]:
        return {}

    def write_facts(self, fit: dict, test: Evaluation, wall: float) -> dict:
        from modalign.eval.captioning import unavailable
        from modalign.runs.facts import build_summary

        split = self.eval_cfg.split
        metrics = dict(test.metrics)
        if self.retention_before is not None:
            after = self.retention(frozen=False)
            same = [a == b for a, b in zip(after["continuations"], self.retention_before["continuations"])]
            metrics.update({"retention/ppl_before": self.retention_before["ppl"], "retention/ppl_after": after["ppl"],
                            "retention/ppl_ratio": after["ppl"] / self.retention_before["ppl"],
                            "retention/exact_match": float(np.mean(same))})
        summary = build_summary(self.writer.run.info(), self.writer.run.read_metrics(), split, metrics, fit,
                                wall, chance={})
        preds = test.extra["predictions"]
        summary["samples"] = preds[: self.eval_cfg.samples_in_card]
        summary["unavailable"] = unavailable(self.eval_cfg.meteor is not False)
        self.writer.write_lines(f"facts/predictions_{split}.jsonl", preds)
        self.writer.write_facts(summary, split, self.splits[split], test.per_example)
        for p in summary["samples"][:3]:
            log.info("sample %s: %r (reference: %r)", p["id"], p["prediction"], p["references"][0])
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


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
