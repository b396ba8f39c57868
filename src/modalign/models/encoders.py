"""Sequence encoders over the paired data model's tokens.

Both encoders take the same batch (tokens_id [B, T], tokens_cont [B, T, C], mask [B, T] True at
valid positions, globals [B, G]) and return (pooled [B, width], token features [B, T', width]).
T' = T, one token per step, unless `patch_size` > 0: then T' = N patches of consecutive steps
(modalign.models.patching), and `encoder.token_mask(mask)` gives the (B, N) mask of those tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from modalign.models.patching import Patching
from modalign.options import Options, at_least, between, one_of, require


@dataclass
class EncoderConfig(Options):
    kind: str = "transformer"  # transformer | cnn
    width: int = 128  # 128 trains the demo in about a minute on 2 CPU cores
    depth: int = 2  # transformer layers or conv blocks
    heads: int = 4  # transformer only; width must divide by it
    dropout: float = 0.0  # dropout costs 30-50% per CPU step; the demo does not need it
    pooling: str = "cls"  # cls | mean (transformer); the CNN always mean-pools over valid positions
    kernel_size: int = 5  # cnn only
    max_len: int = 512  # learned positions; sequences longer than this are rejected
    vocab_size: int = 0  # 0 = no categorical tokens
    n_cont: int = 0  # continuous features per token (C)
    n_globals: int = 0  # global features per sample (G)
    patch_size: Any = 0  # steps per token: 0 = one token per step; auto = chosen from the data (docs/data.md)
    patch_stride: int = 0  # steps between patch starts; 0 = patch_size (non-overlapping)
    revin: bool = False  # with patches: normalize each series per channel (removes its level and scale)

    def validate(self) -> None:
        one_of(self, "kind", ("transformer", "cnn"))
        p = self.patch_size
        require(p == "auto" or (isinstance(p, int) and not isinstance(p, bool) and p >= 0), "patch_size", p,
                "steps per token: an integer >= 0 (0 = one token per step) or auto")
        at_least(self, "patch_stride", 0)
        if isinstance(p, int) and p > 0:
            require(self.patch_stride <= p, "patch_stride", self.patch_stride,
                    f"at most patch_size ({p}): a larger stride would skip steps")
        for name in ("width", "depth", "heads", "kernel_size", "max_len"):
            at_least(self, name, 1)
        one_of(self, "pooling", ("cls", "mean"))
        between(self, "dropout", 0.0, 1.0)
        for name in ("vocab_size", "n_cont", "n_globals"):
            at_least(self, name, 0)
        if self.kind == "cnn":
            require(self.kernel_size % 2 == 1, "kernel_size", self.kernel_size,
                    "it must be odd (the CNN keeps the sequence length)")
        if self.kind == "transformer":
            require(self.width % self.heads == 0, "heads", self.heads, f"it must divide the width ({self.width})")

    def to_dict(self) -> dict:
        return asdict(self)


class TokenEmbedding(nn.Module):
    """Sum of id embedding, a linear map of the continuous features, and a learned position.

    With patches: the linear map takes each patch's steps (values and validity flags), and the ids
    of a patch's steps enter as the mean over its valid steps of (id embedding * a learned gain of
    the step's place in the patch + a learned offset of that place). The gain makes the token
    depend on the order of the events within the patch (a sum of embeddings alone would not)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        size = cfg.patch_size
        if size == "auto":
            raise ValueError("encoder.patch_size=auto is resolved from the data before the encoder is built")
        self.patch = Patching(size, cfg.patch_stride or size, cfg.n_cont, cfg.revin) if size else None
        self.id_emb = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=0) if cfg.vocab_size else None
        self.patch_pos = None
        if self.patch is not None:
            self.cont = nn.Linear(self.patch.features, cfg.width)
            if self.id_emb is not None:
                self.patch_pos = nn.Parameter(torch.zeros(size, cfg.width))
                self.patch_gain = nn.Parameter(torch.ones(size, cfg.width))
                nn.init.normal_(self.patch_pos, std=0.02)
                nn.init.normal_(self.patch_gain, mean=1.0, std=0.1)
        else:
            self.cont = nn.Linear(cfg.n_cont, cfg.width) if cfg.n_cont else None
        self.pos = nn.Parameter(torch.zeros(cfg.max_len, cfg.width))
        nn.init.normal_(self.pos, std=0.02)
        self.globals = nn.Linear(cfg.n_globals, cfg.width) if cfg.n_globals else None
        self.mask_token = nn.Parameter(torch.zeros(cfg.width))  # replaces masked positions (masked modeling)
        self.norm = nn.LayerNorm(cfg.width)

    def token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) step mask -> (B, T') mask of the encoder's tokens."""
        return self.patch.mask(mask) if self.patch is not None else mask

    def token_targets(self, tokens_cont: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What masked modeling reconstructs at each token: (B, T, C) values, or (B, N, P * C) with patches."""
        return self.patch.targets(tokens_cont, mask) if self.patch is not None else tokens_cont

    def _patch_ids(self, tokens_id, mask):
        e = self.patch._windows(self.id_emb(tokens_id)) * self.patch_gain + self.patch_pos  # (B, N, P, W)
        valid = self.patch._windows(mask[:, :, None].to(e.dtype))  # (B, N, P, 1)
        return (e * valid).sum(2) / valid.sum(2).clamp_min(1.0)

    def forward(self, tokens_id, tokens_cont, globals_, masked=None, mask=None):
        x = None
        if self.patch is not None:
            x = self.cont(self.patch(tokens_cont, mask)[0])  # (B, N, W)
            if self.id_emb is not None:
                x = x + self._patch_ids(tokens_id, mask)
        else:
            if self.id_emb is not None:
                x = self.id_emb(tokens_id)  # (B, T, W)
            if self.cont is not None:
                c = self.cont(tokens_cont)  # (B, T, W)
                x = c if x is None else x + c
        if masked is not None:
            x = torch.where(masked[:, :, None], self.mask_token.to(x.dtype), x)
        x = x + self.pos[: x.shape[1]]
        g = self.globals(globals_) if self.globals is not None else None  # (B, W)
        return self.norm(x), g


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"encoder.width={cfg.width} is not divisible by encoder.heads={cfg.heads}")
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, dim_feedforward=4 * cfg.width,
                                           dropout=cfg.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    def token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return self.embed.token_mask(mask)

    def token_targets(self, tokens_cont: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.embed.token_targets(tokens_cont, mask)

    def forward(self, tokens_id, tokens_cont, mask, globals_, masked=None):
        x, g = self.embed(tokens_id, tokens_cont, globals_, masked, mask)  # (B, T', W), (B, W)
        mask = self.embed.token_mask(mask)
        cls = self.cls.expand(x.shape[0], -1, -1)
        if g is not None:
            cls = cls + g[:, None, :]  # globals enter through the CLS token
        x = torch.cat([cls, x], dim=1)  # (B, 1+T, W)
        valid = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        x = self.norm(self.layers(x, src_key_padding_mask=~valid))
        tokens = x[:, 1:]  # (B, T, W)
        if self.cfg.pooling == "cls":
            pooled = x[:, 0]
        else:
            pooled = masked_mean(tokens, mask)
        return pooled, tokens


class CNNEncoder(nn.Module):
    """Residual 1-D convolutions over time; padding is zeroed before every conv."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg)
        pad = cfg.kernel_size // 2
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(cfg.width, cfg.width, cfg.kernel_size, padding=pad), nn.GELU(),
                          nn.Dropout(cfg.dropout))
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width)

    def token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return self.embed.token_mask(mask)

    def token_targets(self, tokens_cont: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.embed.token_targets(tokens_cont, mask)

    def forward(self, tokens_id, tokens_cont, mask, globals_, masked=None):
        x, g = self.embed(tokens_id, tokens_cont, globals_, masked, mask)  # (B, T', W)
        mask = self.embed.token_mask(mask)
        m = mask[:, :, None].to(x.dtype)  # (B, T', 1)
        h = (x * m).transpose(1, 2)  # (B, W, T)
        for block in self.blocks:
            h = (h + block(h)) * m.transpose(1, 2)
        tokens = self.norm(h.transpose(1, 2))  # (B, T, W)
        pooled = masked_mean(tokens, mask)
        if g is not None:
            pooled = pooled + g
        return pooled, tokens


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, T, W), mask (B, T) bool -> (B, W) mean over valid positions."""
    m = mask[:, :, None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    if cfg.kind == "transformer":
        return TransformerEncoder(cfg)
    if cfg.kind == "cnn":
        return CNNEncoder(cfg)
    raise ValueError(f"unknown encoder.kind '{cfg.kind}' (expected transformer or cnn)")


def init_logit_scale(init_temperature: float = 0.07) -> nn.Parameter:
    return nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
