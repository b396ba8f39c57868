"""Stage-2 heads: what turns the modality encoder's output into the shared embedding.

Every head is a registered variant (`modalign.registry`) with an `Options` dataclass (its own config
keys, from `conf/head/<name>.yaml`) and the interface

    head = Head(options, in_dim=W, out_dim=D, n_globals=G)
    out = head(pooled [B, W], tokens [B, T, W], mask [B, T] bool (True = valid), globals_ [B, G] or None)
    out["embedding"]  (B, D), not yet normalised
    out["aux"]        optional {name: scalar loss term}, weighted by head.aux_weight in the objective

Options validate themselves when built (`modalign.options`): a bad value raises one line naming the
key, which the config edge reports as `config: 'head.<key>' is ...`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modalign.options import Options, at_least, one_of, require
from modalign.registry import register_variant

TEAM = "modalign maintainers"
# status "validated" is what tests/test_report.py::test_validated_builtin_heads_are_what_this_test_verifies
# checks: every demo run with the head completes and beats chance; a head it does not cover stays experimental
MODEL = "modalign heads"


@dataclass
class LinearOptions(Options):
    pass


@register_variant("head", "linear", created_by=TEAM, model=MODEL, date="2026-11-21", experiment_id="M1-align",
                  version="1.0", status="validated", approach="one linear map of the pooled encoder features",
                  key_features=["pooled features", "no hidden layer"])
class LinearHead(nn.Module):
    Options = LinearOptions
    aux_weight = 0.0

    def __init__(self, options: LinearOptions, in_dim: int, out_dim: int, n_globals: int = 0):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, pooled, tokens, mask, globals_=None) -> dict:
        return {"embedding": self.proj(pooled)}  # (B, D)


@dataclass
class MLPOptions(Options):
    layers: int = 2  # linear layers: 2 (CLIP-style projection MLP) or 3
    hidden: int = 512  # hidden width
    dropout: float = 0.0

    def validate(self) -> None:
        require(self.layers in (2, 3), "layers", self.layers, "an mlp head has 2 or 3 layers")
        at_least(self, "hidden", 1)
        require(self.dropout == self.dropout and 0.0 <= self.dropout < 1.0, "dropout", self.dropout,
                "it must be in [0, 1)")


@register_variant("head", "mlp", created_by=TEAM, model=MODEL, date="2026-11-21", experiment_id="M1-align",
                  version="1.0", status="validated", approach="a 2- or 3-layer GELU MLP over the pooled encoder features",
                  key_features=["pooled features", "GELU hidden layers", "dropout"])
class MLPHead(nn.Module):
    Options = MLPOptions
    aux_weight = 0.0

    def __init__(self, options: MLPOptions, in_dim: int, out_dim: int, n_globals: int = 0):
        super().__init__()
        dims = [in_dim] + [options.hidden] * (options.layers - 1)
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.GELU(), nn.Dropout(options.dropout)]
        self.net = nn.Sequential(*mods, nn.Linear(dims[-1], out_dim))

    def forward(self, pooled, tokens, mask, globals_=None) -> dict:
        return {"embedding": self.net(pooled)}  # (B, D)


# register tokens ---------------------------------------------------------------------------------
@dataclass
class RegisterOptions(Options):
    registers: int = 4  # K learnable register tokens
    overlap: int = 3  # K_o: registers 0..K_o-1 are aligned with text; the rest are complementary
    depth: int = 2  # cross-attention layers
    heads: int = 4  # attention heads (must divide the encoder width)
    mlp_ratio: int = 2  # feed-forward width = mlp_ratio * encoder width
    dropout: float = 0.0
    nested_dropout: str = "uniform"  # prefix length k during training: uniform | geometric | none
    geometric_p: float = 0.5  # geometric schedule: P(k) proportional to (1 - p)^(k - 1)
    aux_weight: float = 0.1  # weight of the complementary registers' reconstruction loss; 0 = off
    aux_target: str = "auto"  # what the complementary registers reconstruct: globals | pooled | auto

    def validate(self) -> None:
        at_least(self, "registers", 1)
        require(1 <= self.overlap <= self.registers, "overlap", self.overlap,
                f"it must be in [1, registers={self.registers}]")
        for name in ("depth", "heads", "mlp_ratio"):
            at_least(self, name, 1)
        one_of(self, "nested_dropout", ("uniform", "geometric", "none"))
        require(self.geometric_p == self.geometric_p and 0.0 < self.geometric_p <= 1.0, "geometric_p",
                self.geometric_p, "it must be in (0, 1]")
        at_least(self, "aux_weight", 0.0)
        one_of(self, "aux_target", ("globals", "pooled", "auto"))
        require(self.dropout == self.dropout and 0.0 <= self.dropout < 1.0, "dropout", self.dropout,
                "it must be in [0, 1)")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention, written out: with a handful of queries (the registers) this
    is a few small batched matmuls, where nn.MultiheadAttention's reshapes cost more than the math.

    q (B, h, Q, d), k and v (B, h, L, d), blocked broadcastable to (B, h, Q, L), True = may not attend.
    -> (B, h, Q, d)
    """
    scores = torch.einsum("bhqd,bhld->bhql", q, k) * q.shape[-1] ** -0.5  # (B, h, Q, L)
    scores = scores.float().masked_fill(blocked, float("-inf"))
    return torch.einsum("bhql,bhld->bhqd", scores.softmax(-1).to(v.dtype), v)


class RegisterBlock(nn.Module):
    """Pre-norm block: causal self-attention among registers, cross-attention to the tokens, MLP.

    Causal: register i attends to registers 0..i only. So the overlapping registers (0..K_o-1)
    never see the complementary ones, and the contrastive loss, which reads only the overlapping
    registers, sends them no gradient; and a prefix of registers does not depend on what follows
    it, which is what nested dropout orders.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm_self = nn.LayerNorm(width)
        self.qkv_self = nn.Linear(width, 3 * width)
        self.out_self = nn.Linear(width, width)
        self.norm_q = nn.LayerNorm(width)
        self.q_cross = nn.Linear(width, width)
        # Keys and values of the tokens are never materialised (see cross_attend): a key bias would
        # add the same score to every token of a query, which softmax removes, so there is none.
        self.k_cross = nn.Linear(width, width, bias=False)
        self.v_cross = nn.Linear(width, width)
        self.out_cross = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor, parts: int) -> list[torch.Tensor]:
        b, n, _ = x.shape  # (B, N, parts * W) -> parts x (B, h, N, d)
        x = x.view(b, n, parts, self.heads, -1).permute(2, 0, 3, 1, 4)
        return list(x.unbind(0))

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape  # (B, h, N, d) -> (B, N, W)
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, r, kv_tokens, pad, causal):
        # r (B, K, W) registers; kv_tokens (B, T, W) normalised tokens; pad (B, T) True = padding;
        # causal (K, K) True = blocked
        q, k, v = self._split(self.qkv_self(self.norm_self(r)), 3)  # (B, h, K, d) each
        r = r + self.drop(self.out_self(self._merge(attend(q, k, v, causal))))
        q = self._split(self.q_cross(self.norm_q(r)), 1)[0]  # (B, h, K, d)
        r = r + self.drop(self.out_cross(self._merge(self.cross_attend(q, kv_tokens, pad))))
        return r + self.mlp(self.norm_mlp(r))  # (B, K, W)

    def cross_attend(self, q: torch.Tensor, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of a few queries over many tokens, with the projections folded:
        q·(W_k x) = (W_k^T q)·x, and sum_t a_t (W_v x_t + b_v) = W_v (sum_t a_t x_t) + b_v. The tokens
        are read by two batched matmuls and never projected, so the cost is O(B·h·K·T·W) instead of
        O(B·T·W²), with no (B, T, W)-sized intermediate (the register count K is tiny).

        q (B, h, K, d), x (B, T, W) normalised tokens, pad (B, T) True = padding -> (B, h, K, d)
        """
        b, h, k, d = q.shape
        w = x.shape[-1]
        wk = self.k_cross.weight.view(h, d, w)  # head i's rows of W_k
        qk = torch.einsum("bhkd,hdw->bhkw", q, wk.to(q.dtype)).reshape(b, h * k, w)  # (B, hK, W)
        x = x.to(qk.dtype)
        scores = torch.bmm(qk, x.transpose(1, 2)).float() * d ** -0.5  # (B, hK, T)
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        ctx = torch.bmm(scores.softmax(-1).to(x.dtype), x).view(b, h, k, w)  # (B, h, K, W)
        wv = self.v_cross.weight.view(h, d, w)
        out = torch.einsum("bhkw,hdw->bhkd", ctx, wv.to(ctx.dtype))  # (B, h, K, d)
        return out + self.v_cross.bias.view(1, h, 1, d).to(out.dtype)


@register_variant("head", "registers", created_by=TEAM, model=MODEL, date="2026-11-22",
                  experiment_id="M1-registers", version="0.2.0",
                  approach="K learnable register tokens cross-attend to the encoder's tokens; the first K_o "
                           "align with text under nested dropout, the rest reconstruct the modality",
                  key_features=["cross-attention over token features", "causal attention among registers",
                                "nested dropout over the overlapping registers",
                                "complementary registers reconstruct globals (or pooled features)",
                                "retrieval reported per number of registers kept"])
class RegisterHead(nn.Module):
    """Register tokens in the style of FluxTalk: K registers read the modality's token features
    through cross-attention; the overlapping ones (0..K_o-1) make the shared embedding, the
    complementary ones (K_o..K-1) are kept modality-specific by reconstructing the sample's
    globals (or, with no globals, its detached mean-pooled token features).

    The embedding from the first k overlapping registers is W_e · [r_0, ..., r_{k-1}, 0, ..., 0]:
    each register adds its own linear contribution, so any prefix is an embedding on its own.
    Nested dropout (Rippel et al. 2014) draws k per sample during training (uniform or geometric),
    so the first registers learn to carry the most. `keep` sets k at evaluation (None = all K_o).
    """

    Options = RegisterOptions

    def __init__(self, options: RegisterOptions, in_dim: int, out_dim: int, n_globals: int = 0):
        super().__init__()
        if in_dim % options.heads:
            raise ValueError(f"head.heads={options.heads} must divide the encoder width {in_dim}")
        self.options = options
        self.n_overlap = options.overlap
        self.aux_weight = options.aux_weight if options.registers > options.overlap else 0.0
        self.keep: int | None = None
        self.registers = nn.Parameter(torch.randn(options.registers, in_dim) * 0.02)  # (K, W)
        self.blocks = nn.ModuleList(RegisterBlock(in_dim, options.heads, options.mlp_ratio, options.dropout)
                                    for _ in range(options.depth))
        self.norm_tokens = nn.LayerNorm(in_dim)  # once for all blocks: each block projects its own keys/values
        self.norm = nn.LayerNorm(in_dim)
        self.embed = nn.Linear(options.overlap * in_dim, out_dim)  # W_e over the concatenated prefix
        n_comp = options.registers - options.overlap
        target = options.aux_target if options.aux_target != "auto" else ("globals" if n_globals else "pooled")
        if target == "globals" and not n_globals:
            raise ValueError("head.aux_target=globals but the data has no globals (use pooled or auto)")
        self.aux_target = target
        self.reconstruct = nn.Linear(n_comp * in_dim, n_globals if target == "globals" else in_dim) if n_comp else None
        causal = torch.triu(torch.ones(options.registers, options.registers, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)  # (K, K) True = may not attend

    def prefix_mask(self, batch: int, device) -> torch.Tensor:
        """(B, K_o) float: 1 for the registers kept. Training: a prefix length k per sample from the
        schedule; evaluation: the first `keep` (all when keep is None)."""
        k_o = self.n_overlap
        if self.training and self.options.nested_dropout != "none":
            if self.options.nested_dropout == "uniform":
                k = torch.randint(1, k_o + 1, (batch,), device=device)  # (B,)
            else:
                p = self.options.geometric_p
                probs = torch.tensor([(1 - p) ** i for i in range(k_o)], device=device)
                k = torch.multinomial(probs / probs.sum(), batch, replacement=True) + 1  # (B,)
        else:
            k = torch.full((batch,), self.keep or k_o, device=device)
        return (torch.arange(k_o, device=device)[None, :] < k[:, None]).float()  # (B, K_o)

    def forward(self, pooled, tokens, mask, globals_=None) -> dict:
        b, _, w = tokens.shape
        r = self.registers[None].expand(b, -1, -1)  # (B, K, W)
        pad = ~mask  # (B, T) True = padding
        kv = self.norm_tokens(tokens)  # (B, T, W)
        for block in self.blocks:
            r = block(r, kv, pad, self.causal)
        r = self.norm(r)  # (B, K, W)
        overlap = r[:, :self.n_overlap] * self.prefix_mask(b, r.device)[:, :, None]  # (B, K_o, W)
        out = {"embedding": self.embed(overlap.reshape(b, -1)), "registers": r}  # (B, D)
        if self.reconstruct is not None and self.aux_weight > 0:
            pred = self.reconstruct(r[:, self.n_overlap:].reshape(b, -1))  # (B, G) or (B, W)
            if self.aux_target == "globals":
                target = globals_.float()
            else:
                m = mask[:, :, None].float()
                target = ((tokens * m).sum(1) / m.sum(1).clamp_min(1.0)).detach()  # (B, W)
            out["aux"] = {f"reg_rec_{self.aux_target}": (pred.float() - target.float()).pow(2).mean()}
        return out
