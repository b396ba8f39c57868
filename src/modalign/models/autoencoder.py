"""The stage-1 modality autoencoder: encoder -> bottleneck -> decoder -> reconstruction heads.

The bottleneck is the research question: identity, a learned linear projection, or a
vector-quantized codebook. A globals head predicts the sample's global features from the pooled
latent; its loss weight (`globals_beta`, in the loss) decides how much the latent must keep of them.

The encoder is built by `build_encoder(EncoderConfig)`, the same as stage 2's, so
`AlignModel.encoder.load_state_dict(autoencoder.encoder.state_dict())` carries it over.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from modalign.models.encoders import EncoderConfig, build_encoder, masked_mean
from modalign.options import Options, at_least, one_of, require
from modalign.models.quantizer import VectorQuantizer, VQConfig

BOTTLENECKS = ("none", "linear", "vq")


@dataclass
class BottleneckConfig(Options):
    kind: str = "none"  # none (identity: latent = encoder tokens, width W) | linear | vq
    latent_dim: int = 64  # linear: L; vq: must equal vq.dim; none: ignored (L = encoder.width)
    vq: VQConfig = field(default_factory=VQConfig)

    def validate(self) -> None:
        one_of(self, "kind", BOTTLENECKS)
        at_least(self, "latent_dim", 1)
        if self.kind == "vq":
            require(self.vq.dim == self.latent_dim, "vq.dim", self.vq.dim,
                    f"it must equal latent_dim ({self.latent_dim})")


@dataclass
class DecoderOptions(Options):
    depth: int = 2  # transformer layers over the latent tokens; 0 = a per-token read-out (GELU + linear)

    def validate(self) -> None:
        at_least(self, "depth", 0)


@dataclass
class GlobalsHeadOptions(Options):
    hidden: int = 128  # hidden width of the MLP from the pooled latent to the globals

    def validate(self) -> None:
        at_least(self, "hidden", 1)


@dataclass
class AutoencoderConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    # transformer layers over the latent tokens, with the encoder's width and heads; 0 = a per-token MLP
    decoder_depth: int = 2
    globals_head_hidden: int = 128  # hidden width of the MLP from the pooled latent to the globals

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        b = dict(d["bottleneck"])
        bottleneck = BottleneckConfig(vq=VQConfig(**b.pop("vq")), **b)
        return cls(encoder=EncoderConfig(**d["encoder"]), bottleneck=bottleneck,
                   **{k: v for k, v in d.items() if k not in ("encoder", "bottleneck")})

    @property
    def latent_dim(self) -> int:
        """L, the width of the latent tokens."""
        if self.bottleneck.kind == "none":
            return self.encoder.width
        if self.bottleneck.kind == "vq":
            return self.bottleneck.vq.dim
        return self.bottleneck.latent_dim


class LatentDecoder(nn.Module):
    """latent tokens (B, T, L) + mask (B, T) -> features (B, T, W).

    Positions are added again: a code index alone does not say where its token sits.
    """

    def __init__(self, latent_dim: int, width: int, heads: int, depth: int, max_len: int, dropout: float):
        super().__init__()
        self.inp = nn.Linear(latent_dim, width)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        nn.init.normal_(self.pos, std=0.02)
        if depth > 0:
            layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        else:
            self.layers = nn.Sequential(nn.GELU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.inp(z) + self.pos[: z.shape[1]]  # (B, T, W)
        if isinstance(self.layers, nn.TransformerEncoder):
            # a sample with no valid position would attend to nothing (NaN); let it attend to all
            pad = ~mask & mask.any(1, keepdim=True)  # (B, T)
            x = self.layers(x, src_key_padding_mask=pad)
        else:
            x = x + self.layers(x)
        return self.norm(x)


class ModalityAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        kind, enc = cfg.bottleneck.kind, cfg.encoder
        if kind not in BOTTLENECKS:
            raise ValueError(f"unknown bottleneck.kind '{kind}' (expected none, linear or vq)")
        if kind == "vq" and cfg.bottleneck.latent_dim != cfg.bottleneck.vq.dim:
            raise ValueError(f"bottleneck.latent_dim={cfg.bottleneck.latent_dim} but bottleneck.vq.dim="
                             f"{cfg.bottleneck.vq.dim}: with kind=vq they must be equal")
        self.cfg = cfg
        latent = cfg.latent_dim
        self.encoder = build_encoder(enc)
        if kind == "none":
            self.bottleneck = nn.Identity()
        else:
            self.bottleneck = nn.Linear(enc.width, latent)
        self.quantizer = VectorQuantizer(cfg.bottleneck.vq) if kind == "vq" else None
        self.decoder = LatentDecoder(latent, enc.width, enc.heads, cfg.decoder_depth, enc.max_len, enc.dropout)
        self.id_head = nn.Linear(enc.width, enc.vocab_size) if enc.vocab_size else None
        self.cont_head = nn.Linear(enc.width, enc.n_cont) if enc.n_cont else None
        self.globals_head = None
        if enc.n_globals:
            self.globals_head = nn.Sequential(nn.Linear(latent, cfg.globals_head_hidden), nn.GELU(),
                                              nn.Linear(cfg.globals_head_hidden, enc.n_globals))

    def forward(self, batch: dict) -> dict:
        """batch: tokens_id (B, T), tokens_cont (B, T, C), globals (B, G), mask (B, T).

        -> {"latent" (B, T, L) after the bottleneck (quantized for vq), "pooled" (B, L) masked mean of
        the latent, "rec_ids" (B, T, V) logits or None, "rec_cont" (B, T, C) or None,
        "pred_globals" (B, G) or None, "vq_terms" {"vq_commit", "vq_codebook"} ({} unless vq),
        "vq_info" {"codes", "perplexity", "usage", "restarted"} ({} unless vq)}.
        """
        mask = batch["mask"]
        _, tokens = self.encoder(batch["tokens_id"], batch["tokens_cont"], mask, batch["globals"])  # (B, T, W)
        latent = self.bottleneck(tokens)  # (B, T, L)
        vq_terms, vq_info = {}, {}
        if self.quantizer is not None:
            latent, vq_terms, vq_info = self.quantizer(latent, mask)
        pooled = masked_mean(latent, mask)  # (B, L)
        h = self.decoder(latent, mask)  # (B, T, W)
        return {
            "latent": latent,
            "pooled": pooled,
            "rec_ids": self.id_head(h) if self.id_head is not None else None,
            "rec_cont": self.cont_head(h) if self.cont_head is not None else None,
            "pred_globals": self.globals_head(pooled) if self.globals_head is not None else None,
            "vq_terms": vq_terms,
            "vq_info": vq_info,
        }

    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component, for optimizer groups, gradient norms and parameter counts.
        A component without parameters (the identity bottleneck, no globals) is an empty list."""
        bottleneck = list(self.bottleneck.parameters())
        if self.quantizer is not None:
            bottleneck += list(self.quantizer.parameters())  # the codebook, when not EMA
        decoder = list(self.decoder.parameters())
        for head in (self.id_head, self.cont_head):
            if head is not None:
                decoder += list(head.parameters())
        return {"encoder": list(self.encoder.parameters()), "bottleneck": bottleneck, "decoder": decoder,
                "globals_head": list(self.globals_head.parameters()) if self.globals_head is not None else []}
