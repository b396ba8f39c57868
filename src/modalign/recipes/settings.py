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
from modalign.recipes.config import check_range, to_container, typed

if TYPE_CHECKING:  # torch-side types; imported for real inside read_settings()
    from modalign.losses.objective import LossConfig
    from modalign.models.align import HeadConfig
    from modalign.models.encoders import EncoderConfig
    from modalign.train.loop import TrainerConfig
    from modalign.train.optim import OptimConfig


@dataclass
class EvalSettings:
    protocol: str = "auto"  # auto | exact_text | same_facts | same_label
    split: str = "test"
    export_embeddings: bool = False
    batch_size: int = 1024


@dataclass
class TextSettings:
    model: str = "all-MiniLM-L6-v2"
    precision: str = "auto"
    batch_size: int = 128
    cache_dir: str | None = None


@dataclass
class EnvSettings:
    device: str = "auto"  # auto (cuda when visible, else cpu) | cpu | cuda | cuda:N | mps
    tf32: bool = False  # TF32 matmuls on Ampere+ GPUs; off so that fp32 means fp32
    malloc: str = "tuned"  # tuned | default: glibc keeps freed memory for reuse (modalign.train.allocator)


DEVICE_FORM = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


def read_env(cfg) -> EnvSettings:
    """The `env` group: where and how the process runs. Whether the device exists is checked when
    the recipe places the model (modalign.train.device.resolve_device)."""
    env = typed(EnvSettings, to_container(cfg.env, "env") if "env" in cfg else {}, "env")
    if not DEVICE_FORM.match(env.device):
        raise UserError(f"config: 'env.device' is {env.device!r}; expected cpu, cuda, cuda:N, mps or auto")
    check_range("env.malloc", env.malloc, choices=("tuned", "default"))
    return env


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

        encoder = dataclasses.replace(self.encoder, vocab_size=data.vocab_size, n_cont=data.n_cont,
                                      n_globals=data.n_globals, max_len=max(512, data.seq_len))
        return AlignModelConfig(encoder=encoder, head=self.head, text_dim=text_dim,
                                text_projection=self.text_projection, init_temperature=self.init_temperature,
                                max_logit_scale=self.max_logit_scale, mlm_head=self.loss.mlm_weight > 0,
                                mlm_ratio=self.loss.mlm_ratio)


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
    for key, low in (("max_steps", 1), ("batch_size", 2), ("accumulate", 1), ("eval_every", 1), ("log_every", 1),
                     ("checkpoint_every", 0), ("keep_checkpoints", 0), ("grad_clip", 0), ("threads", 0),
                     ("early_stop_patience", 0), ("max_nonfinite_skips", 0)):
        check_range(f"trainer.{key}", getattr(t, key), min_value=low)
    check_range("trainer.precision", t.precision, choices=("auto", "fp32", "bf16", "fp16"))
    check_range("trainer.monitor_mode", t.monitor_mode, choices=("max", "min"))
    check_range("trainer.on_nonfinite", t.on_nonfinite, choices=("stop", "skip"))
    groups = {}
    for k in components:
        if k not in optim:
            raise UserError(f"config: 'trainer.optim.{k}' is missing (lr and weight_decay of the {k})")
        groups[k] = typed(GroupConfig, optim.pop(k), f"trainer.optim.{k}")
        check_range(f"trainer.optim.{k}.lr", groups[k].lr, min_value=0)
        check_range(f"trainer.optim.{k}.weight_decay", groups[k].weight_decay, min_value=0)
    for k in [k for k, v in optim.items() if isinstance(v, dict)]:
        optim.pop(k)  # another recipe's component (e.g. heads when autoencoding): not used here
    o = typed(OptimConfig, optim, "trainer.optim", groups=groups)
    check_range("trainer.optim.warmup_steps", o.warmup_steps, min_value=0)
    check_range("trainer.optim.min_lr_ratio", o.min_lr_ratio, min_value=0.0, max_value=1.0)
    check_range("trainer.optim.eps", o.eps, min_value=1e-12)
    if len(o.betas) != 2:
        raise UserError(f"config: 'trainer.optim.betas' must be two numbers, got {list(o.betas)}")
    for i, b in enumerate(o.betas):
        check_range(f"trainer.optim.betas[{i}]", b, min_value=0.0, max_value=0.999999)
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
    check_range("encoder.kind", enc.kind, choices=("transformer", "cnn"))
    for key in ("width", "depth", "heads", "kernel_size"):
        check_range(f"encoder.{key}", getattr(enc, key), min_value=1)
    check_range("encoder.pooling", enc.pooling, choices=("cls", "mean"))
    check_range("encoder.dropout", enc.dropout, min_value=0.0, max_value=1.0)
    if enc.kind == "cnn" and enc.kernel_size % 2 == 0:
        raise UserError(f"config: 'encoder.kernel_size'={enc.kernel_size} must be odd (the CNN keeps the sequence length)")
    if enc.kind == "transformer" and enc.width % enc.heads:
        raise UserError(f"config: 'encoder.width'={enc.width} is not divisible by 'encoder.heads'={enc.heads}")
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
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int):
        raise UserError(f"config: 'head.embed_dim' must be an integer, got {embed_dim!r}")
    check_range("head.embed_dim", embed_dim, min_value=1)
    variant = get_variant("head", kind)
    options = typed(variant.obj.Options, head, "head")
    problem = options.check()
    if problem:
        key, _, why = problem.partition(": ")
        raise UserError(f"config: 'head.{key}' {why}")
    return HeadConfig(kind=kind, embed_dim=embed_dim, options=asdict(options))


def read_settings(cfg) -> AlignSettings:
    from modalign.losses.objective import LossConfig

    seed, t, o = read_training(cfg, ("encoder", "heads", "logit_scale"))

    ev = typed(EvalSettings, to_container(cfg.eval, "eval"), "eval")
    check_range("eval.split", ev.split, choices=("train", "val", "test"))
    check_range("eval.protocol", ev.protocol, choices=("auto", "exact_text", "same_facts", "same_label"))
    check_range("eval.batch_size", ev.batch_size, min_value=1)

    text = typed(TextSettings, to_container(cfg.text, "text"), "text")
    check_range("text.precision", text.precision, choices=("auto", "fp32", "bf16"))
    check_range("text.batch_size", text.batch_size, min_value=1)

    loss = to_container(cfg.loss, "loss")
    init_t, max_scale = loss.pop("init_temperature", 0.07), loss.pop("max_logit_scale", 100.0)
    lc = typed(LossConfig, loss, "loss")
    check_range("loss.kind", lc.kind, choices=("clip", "siglip"))
    check_range("loss.queue_size", lc.queue_size, min_value=0)
    check_range("loss.queue_weight", lc.queue_weight, min_value=0.0)
    check_range("loss.mlm_ratio", lc.mlm_ratio, min_value=0.0, max_value=1.0)
    check_range("loss.mlm_weight", lc.mlm_weight, min_value=0.0)
    for key, value in (("init_temperature", init_t), ("max_logit_scale", max_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config: 'loss.{key}' must be a number, got {value!r}")
    check_range("loss.init_temperature", init_t, min_value=1e-4)
    check_range("loss.max_logit_scale", max_scale, min_value=1.0)

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
                         text_projection=text_projection, init_temperature=float(init_t),
                         max_logit_scale=float(max_scale), encoder_init_from=init_from, encoder_freeze=freeze)
