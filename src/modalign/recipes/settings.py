"""The `align` recipe's config, read into typed settings and checked in one place, up front.

A bad value is a UserError naming its key before any data is loaded or any caption is encoded.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modalign.data.paired import PairedData
from modalign.errors import UserError
from modalign.options import Options, at_least, one_of, require
from modalign.recipes.config import to_container, typed

if TYPE_CHECKING:  # torch-side types; imported for real inside read_settings()
    from modalign.losses.objective import LossConfig
    from modalign.models.align import HeadConfig
    from modalign.models.encoders import EncoderConfig
    from modalign.train.loop import TrainerConfig
    from modalign.train.optim import OptimConfig


@dataclass
class EvalSettings(Options):
    protocol: str = "auto"  # auto | exact_text | same_facts | same_label
    split: str = "test"
    export_embeddings: bool = False
    batch_size: int = 1024

    def validate(self) -> None:
        one_of(self, "split", ("train", "val", "test"))
        one_of(self, "protocol", ("auto", "exact_text", "same_facts", "same_label"))
        at_least(self, "batch_size", 1)


@dataclass
class TextSettings(Options):
    kind: str = "sentence_transformers"  # sentence_transformers (a local or packaged model) | precomputed (text.path)
    model: str = "all-MiniLM-L6-v2"
    precision: str = "auto"
    batch_size: int = 128
    cache_dir: str | None = None
    path: str | None = None  # kind=precomputed: the .npz of texts and embeddings (modalign.data.text_embeddings)

    def validate(self) -> None:
        one_of(self, "kind", ("sentence_transformers", "precomputed"))
        one_of(self, "precision", ("auto", "fp32", "bf16"))
        at_least(self, "batch_size", 1)
        require(self.kind != "precomputed" or bool(self.path), "path", self.path,
                "text=precomputed needs the file of vectors: text.path=EMB.npz")


DEVICE_FORM = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


@dataclass
class EnvSettings(Options):
    device: str = "auto"  # auto (cuda when visible, else cpu) | cpu | cuda | cuda:N | mps
    tf32: bool = False  # TF32 matmuls on Ampere+ GPUs; off so that fp32 means fp32
    malloc: str = "tuned"  # tuned | default: glibc keeps freed memory for reuse (modalign.train.allocator)

    def validate(self) -> None:
        # whether the device exists is checked where the recipe places the model (train.device.resolve_device)
        require(bool(DEVICE_FORM.match(self.device)), "device", self.device, "expected cpu, cuda, cuda:N, mps or auto")
        one_of(self, "malloc", ("tuned", "default"))


def read_env(cfg) -> EnvSettings:
    """The `env` group: where and how the process runs."""
    return typed(EnvSettings, to_container(cfg.env, "env") if "env" in cfg else {}, "env")


@dataclass
class AlignSettings:
    seed: int
    trainer: TrainerConfig
    optim: OptimConfig
    eval: EvalSettings
    text: TextSettings
    loss: LossConfig
    encoder: EncoderConfig  # the data's sizes are filled in by model_config()
    head: HeadConfig
    text_projection: bool
    init_temperature: float
    max_logit_scale: float
    encoder_init_from: str | None = None  # a stage-1 run dir or checkpoint whose encoder we start from
    encoder_freeze: bool = False

    def model_config(self, data: PairedData, text_dim: int):
        from modalign.models.align import AlignModelConfig

        encoder = encoder_for_data(self.encoder, data)
        if encoder.patch_size and encoder.vocab_size and self.loss.mlm_weight > 0:
            raise UserError(f"config: 'loss.mlm_weight'={self.loss.mlm_weight} (masked modeling) with "
                            f"'encoder.patch_size'={encoder.patch_size}: masked modeling of event ids within patches "
                            f"is not supported ({data.source} has categorical tokens); set one of them to 0")
        return AlignModelConfig(encoder=encoder, head=self.head, text_dim=text_dim,
                                text_projection=self.text_projection, init_temperature=self.init_temperature,
                                max_logit_scale=self.max_logit_scale, mlm_head=self.loss.mlm_weight > 0,
                                mlm_ratio=self.loss.mlm_ratio)


def encoder_for_data(encoder: "EncoderConfig", data: PairedData) -> "EncoderConfig":
    """The encoder settings with the data's sizes filled in and `patch_size=auto` resolved
    (modalign.models.patching.auto_patch_size; the choice is logged)."""
    import logging

    from modalign.models.patching import auto_patch_size, patch_count

    size = encoder.patch_size
    if size == "auto":
        size = auto_patch_size(data.seq_len, data.vocab_size > 0)
        logging.getLogger("modalign").info(
            "encoder.patch_size=auto -> %d (%d steps per series -> %d tokens)", size, data.seq_len,
            patch_count(data.seq_len, size, size) if size else data.seq_len)
    if size and data.n_cont == 0 and data.vocab_size == 0:
        raise UserError(f"config: 'encoder.patch_size'={size}: {data.source} has no per-step tokens to patch")
    return dataclasses.replace(encoder, vocab_size=data.vocab_size, n_cont=data.n_cont, n_globals=data.n_globals,
                               max_len=max(512, data.seq_len), patch_size=size,
                               patch_stride=(encoder.patch_stride or size) if size else 0)


def patching_record(encoder: "EncoderConfig", seq_len: int, auto: bool) -> dict:
    """run.json's `patching`: how the encoder cut the series into tokens."""
    from modalign.models.patching import patch_count

    size = encoder.patch_size
    tokens = patch_count(seq_len, size, encoder.patch_stride) if size else seq_len
    return {"patch_size": size, "patch_stride": encoder.patch_stride, "revin": encoder.revin if size else False,
            "steps": seq_len, "tokens": tokens, "chosen_by": "auto" if auto else "config"}


def read_training(cfg, components: tuple[str, ...]) -> tuple[int, "TrainerConfig", "OptimConfig"]:
    """seed, trainer and optimizer settings, shared by every recipe. `components` names the model's
    parameter groups; each needs trainer.optim.<component> {lr, weight_decay}."""
    from modalign.train.loop import TrainerConfig
    from modalign.train.optim import GroupConfig, OptimConfig

    seed = cfg.seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"config: 'seed' must be an integer, got {seed!r}")

    tcfg = to_container(cfg.trainer, "trainer")
    optim = tcfg.pop("optim")
    t = typed(TrainerConfig, tcfg, "trainer")
    groups = {}
    for k in components:
        if k not in optim:
            raise UserError(f"config: 'trainer.optim.{k}' is missing (lr and weight_decay of the {k})")
        groups[k] = typed(GroupConfig, optim.pop(k), f"trainer.optim.{k}")
    for k in [k for k, v in optim.items() if isinstance(v, dict)]:
        optim.pop(k)  # another recipe's component (e.g. heads when autoencoding): not used here
    o = typed(OptimConfig, optim, "trainer.optim", groups=groups)
    return seed, t, o


def read_encoder(cfg) -> tuple["EncoderConfig", str | None, bool]:
    """encoder settings, and where to initialise it from (stage 1 -> stage 2) and whether to freeze it."""
    from modalign.models.encoders import EncoderConfig

    node = to_container(cfg.encoder, "encoder")
    init_from, freeze = node.pop("init_from", None), node.pop("freeze", False)
    if init_from is not None and not isinstance(init_from, str):
        raise UserError(f"config: 'encoder.init_from' must be a run directory or checkpoint path, got {init_from!r}")
    if not isinstance(freeze, bool):
        raise UserError(f"config: 'encoder.freeze' must be true or false, got {freeze!r}")
    enc = typed(EncoderConfig, node, "encoder")
    return enc, init_from, freeze


def read_head(head: dict):
    """conf/head/*.yaml (minus text_projection) -> HeadConfig: `kind` names a registered variant,
    `embed_dim` the shared space, every other key is the variant's own option, typed and checked
    by its Options dataclass."""
    from dataclasses import asdict

    from modalign.models.align import HeadConfig
    from modalign.registry import get_variant

    kind = head.pop("kind", None)
    if not isinstance(kind, str):
        raise UserError(f"config: 'head.kind' must be a head variant name, got {kind!r}")
    embed_dim = head.pop("embed_dim", 256)
    variant = get_variant("head", kind)
    options = typed(variant.obj.Options, head, "head")  # validates itself (modalign.options)
    problem = options.check() if hasattr(options, "check") else None  # a plugin written before that
    if problem:
        key, _, why = problem.partition(": ")
        raise UserError(f"config: 'head.{key}' {why}")
    return typed(HeadConfig, {"kind": kind, "embed_dim": embed_dim}, "head", options=asdict(options))


def read_settings(cfg) -> AlignSettings:
    from modalign.losses.objective import LossConfig

    seed, t, o = read_training(cfg, ("encoder", "heads", "logit_scale"))

    ev = typed(EvalSettings, to_container(cfg.eval, "eval"), "eval")
    text = typed(TextSettings, to_container(cfg.text, "text"), "text")

    lc = typed(LossConfig, to_container(cfg.loss, "loss"), "loss")

    enc, init_from, freeze = read_encoder(cfg)

    head = to_container(cfg.head, "head")
    text_projection = head.pop("text_projection", True)
    if not isinstance(text_projection, bool):
        raise UserError(f"config: 'head.text_projection' must be true or false, got {text_projection!r}")
    hc = read_head(head)
    heads = hc.options.get("heads")
    if isinstance(heads, int) and heads > 0 and enc.width % heads:
        raise UserError(f"config: 'head.heads'={heads} does not divide 'encoder.width'={enc.width}")

    return AlignSettings(seed=seed, trainer=t, optim=o, eval=ev, text=text, loss=lc, encoder=enc, head=hc,
                         text_projection=text_projection, init_temperature=lc.init_temperature,
                         max_logit_scale=lc.max_logit_scale, encoder_init_from=init_from, encoder_freeze=freeze)
