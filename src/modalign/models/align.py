"""The stage-2 alignment model: modality encoder + projection head, a projection of the frozen
text embeddings, and a learnable logit scale.

The text encoder itself is not part of this module: its embeddings are computed once (and cached)
by `modalign.models.text_encoder`, so the model sees text as fixed vectors [B, text_dim].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from modalign.losses.contrastive import random_token_mask
from modalign.options import Options, at_least
from modalign.models.encoders import EncoderConfig, build_encoder


@dataclass
class HeadConfig(Options):
    kind: str = "mlp"  # a registered head variant: linear | mlp | registers | your own
    embed_dim: int = 256  # shared embedding space; ignored when the text side is not projected
    options: dict = field(default_factory=dict)  # the variant's own keys (its Options dataclass)

    def validate(self) -> None:
        at_least(self, "embed_dim", 1)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        """Also reads the flat form of checkpoints written before variants ({kind, layers, hidden, ...})."""
        d = dict(d)
        options = dict(d.pop("options", {}) or {})
        kind, embed_dim = d.pop("kind", "mlp"), d.pop("embed_dim", 256)
        if kind == "linear":
            d = {}
        options.update(d)
        return cls(kind=kind, embed_dim=embed_dim, options=options)


@dataclass
class AlignModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    text_dim: int = 384  # all-MiniLM-L6-v2
    text_projection: bool = True  # trainable linear map of the frozen text embeddings
    init_temperature: float = 0.07  # CLIP's initial temperature: logit scale 1/0.07
    max_logit_scale: float = 100.0  # CLIP clamps the scale at 100
    siglip_bias: float = -10.0  # SigLIP's initial logit bias (used by the sigmoid loss only)
    mlm_head: bool = False  # predict masked tokens from token features (masked-modeling auxiliary)
    mlm_ratio: float = 0.15  # fraction of each sample's valid tokens hidden in the masked-modeling pass

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AlignModelConfig":
        return cls(encoder=EncoderConfig(**d["encoder"]), head=HeadConfig.from_dict(d["head"]),
                   **{k: v for k, v in d.items() if k not in ("encoder", "head")})

    @property
    def embed_dim(self) -> int:
        return self.head.embed_dim if self.text_projection else self.text_dim


def build_head(cfg: HeadConfig, in_dim: int, out_dim: int, n_globals: int = 0) -> nn.Module:
    """The registered head variant `cfg.kind` with its options (see `modalign.models.heads`)."""
    from modalign.registry import get_variant

    variant = get_variant("head", cfg.kind)
    options = variant.obj.Options(**cfg.options)
    return variant.obj(options, in_dim=in_dim, out_dim=out_dim, n_globals=n_globals)


class ModalityOutput(NamedTuple):
    embedding: torch.Tensor  # (B, D) L2-normalised
    tokens: torch.Tensor  # (B, T, W) encoder token features
    aux: dict  # {name: scalar} auxiliary terms of the head (weighted by head.aux_weight)


class AlignOutput(NamedTuple):
    """Everything the losses need from one training forward (see modalign.losses.objective)."""
    modality: torch.Tensor  # (B, D) L2-normalised modality embeddings
    text: torch.Tensor  # (B, D) L2-normalised projected caption embeddings
    scale: torch.Tensor  # () logit scale, exponentiated and clamped
    bias: torch.Tensor  # () SigLIP logit bias
    aux: dict  # {name: () term} the head's auxiliary losses
    aux_weight: float  # their weight (head.aux_weight)
    queue: torch.Tensor | None  # (Q, D) the caption queue projected with today's weights, when given
    mlm_pred: torch.Tensor | None  # (B, T, V) id logits or (B, T, C) features at every position
    mlm_target: torch.Tensor | None  # (B, T) ids or (B, T, C) features to reconstruct
    mlm_mask: torch.Tensor | None  # (B, T) bool, the positions hidden from the encoder


class AlignModel(nn.Module):
    def __init__(self, cfg: AlignModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder)
        self.head = build_head(cfg.head, cfg.encoder.width, cfg.embed_dim, cfg.encoder.n_globals)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False) if cfg.text_projection else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.siglip_bias))
        self.mlm_head = None
        if cfg.mlm_head:
            if cfg.encoder.vocab_size and cfg.encoder.patch_size:
                raise ValueError("masked modeling of event ids within patches is not supported")
            out = cfg.encoder.vocab_size if cfg.encoder.vocab_size else cfg.encoder.n_cont * max(1, cfg.encoder.patch_size)
            self.mlm_head = nn.Linear(cfg.encoder.width, out)

    def encode_modality(self, batch: dict, masked: torch.Tensor | None = None) -> ModalityOutput:
        """-> normalised embedding (B, D), token features (B, T, W), the head's auxiliary loss terms."""
        pooled, tokens = self.encoder(batch["tokens_id"], batch["tokens_cont"], batch["mask"],
                                      batch["globals"], masked)
        out = self.head(pooled, tokens, self.encoder.token_mask(batch["mask"]), batch["globals"])
        return ModalityOutput(F.normalize(out["embedding"].float(), dim=-1), tokens, out.get("aux", {}))

    def forward(self, batch: dict) -> AlignOutput:
        """One training forward: every tensor a loss needs, so DistributedDataParallel sees every
        parameter the loss uses in the graph of forward's outputs. batch may add "queue_text"
        (Q, text_dim) frozen queue texts to project, and "token_noise" (B, T) uniform values that
        choose the masked-modeling positions."""
        mod = self.encode_modality(batch)
        queue = self.encode_text(batch["queue_text"]) if "queue_text" in batch else None
        mlm_pred = mlm_target = hidden = None
        if self.mlm_head is not None and self.training:  # a second encoder pass over masked tokens
            mask = self.encoder.token_mask(batch["mask"])  # (B, T') the encoder's tokens: steps or patches
            noise = batch.get("token_noise")
            hidden = random_token_mask(mask, self.cfg.mlm_ratio, None if noise is None else noise[:, :mask.shape[1]])
            tokens = self.encode_modality(batch, masked=hidden).tokens  # (B, T', W)
            mlm_pred = self.mlm_head(tokens)
            mlm_target = batch["tokens_id"] if self.cfg.encoder.vocab_size else \
                self.encoder.token_targets(batch["tokens_cont"], batch["mask"])
        # the bias goes out as a clone: a leaf parameter returned as it is gets marked ready twice by
        # DDP's unused-parameter search (once as unused at the end of forward, once by its gradient)
        return AlignOutput(mod.embedding, self.encode_text(batch["text"]), self.scale(), self.logit_bias.clone(),
                           mod.aux, float(getattr(self.head, "aux_weight", 0.0)), queue, mlm_pred, mlm_target, hidden)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, text_dim) frozen sentence embeddings -> normalised (B, D)."""
        if self.text_proj is not None:
            text = self.text_proj(text)
        return F.normalize(text.float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component, for optimizer groups, gradient norms and parameter counts."""
        heads = list(self.head.parameters())
        if self.text_proj is not None:
            heads += list(self.text_proj.parameters())
        if self.mlm_head is not None:
            heads += list(self.mlm_head.parameters())
        return {"encoder": list(self.encoder.parameters()), "heads": heads,
                "logit_scale": [self.logit_scale, self.logit_bias]}
