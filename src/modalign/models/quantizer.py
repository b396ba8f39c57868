"""A vector-quantized bottleneck (van den Oord et al. 2017, "Neural Discrete Representation
Learning") with EMA codebook updates (their appendix; Razavi et al. 2019) and dead-code restart
(Dhariwal et al. 2020, Jukebox).

Every statistic is taken over valid positions only: padding never moves a code, never counts as
a use, and is never picked as a restart vector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modalign.options import Options, at_least, between


@dataclass
class VQConfig(Options):
    codebook_size: int = 512  # K
    dim: int = 64  # D, the code vectors' width
    commitment_cost: float = 0.25  # beta of van den Oord et al.; they found 0.1-2.0 all work
    ema: bool = True  # EMA codebook (no codebook gradient); more stable than the codebook loss
    decay: float = 0.99  # EMA decay of cluster sizes and code sums
    eps: float = 1e-5  # Laplace smoothing of cluster sizes, so an unused code never divides by 0
    dead_code_threshold: float = 1.0  # EMA cluster size below which a code is dead (Jukebox: 1.0)
    restart_dead: bool = True  # replace dead codes with random encoder outputs of the batch

    def validate(self) -> None:
        at_least(self, "codebook_size", 2)
        at_least(self, "dim", 1)
        at_least(self, "commitment_cost", 0.0)
        between(self, "decay", 0.0, 1.0)
        at_least(self, "eps", 0.0)

    def to_dict(self) -> dict:
        return asdict(self)


def codebook_usage(codes: torch.Tensor, mask: torch.Tensor | None, codebook_size: int) -> torch.Tensor:
    """codes (B, T) long, mask (B, T) bool valid positions (None = all) -> counts (K,) long."""
    if mask is not None:
        codes = codes[mask]
    return torch.bincount(codes.reshape(-1), minlength=codebook_size)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """counts (K,) -> exp(entropy) of the code distribution: 1 (one code) .. K (all equally)."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class VectorQuantizer(nn.Module):
    """z (B, T, D) -> nearest code per position, with the straight-through gradient.

    Buffers (in the state dict, so a resumed run continues exactly):
      codebook (K, D)       a buffer with EMA updates, an nn.Parameter without
      cluster_size (K,)     EMA of assignments per batch; drives dead-code detection in both modes
      ema_embed_sum (K, D)  EMA of the sum of the vectors assigned to each code (EMA mode only)

    cluster_size starts at 1 and ema_embed_sum at the codebook (Jukebox), so the EMA codebook starts
    at its init. With threshold 1, every code not chosen in the first training batch is dead at once
    and restarted from that batch's encoder outputs, which amounts to a data-dependent init.
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.dim
        init = torch.randn(k, d)
        if cfg.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(k))

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None):
        """z (B, T, D), mask (B, T) bool valid positions (None = all valid).

        Returns z_q (B, T, D) with the straight-through gradient to z, terms
        {"vq_commit": beta * ||z - sg(e)||^2, "vq_codebook": ||sg(z) - e||^2 (0 with EMA)}, each a mean
        over valid positions and dims, and info {"codes" (B, T) long (padding positions get their
        nearest code too: mask them), "perplexity", "usage" (fraction of the K codes used in the
        batch), "restarted" (int, codes restarted by this call; 0 outside training), "sq_error"
        (B, T) each token's squared distance to its code, mean over dims (per-example VQ terms)}.
        """
        b, t, d = z.shape
        if mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=z.device)
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA sums in fp32 under bf16
            flat = z.float().reshape(b * t, d)  # (N, D)
            valid = mask.reshape(b * t)  # (N,)
            with torch.no_grad():
                e = self.codebook.float()  # (K, D)
                dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.T + e.pow(2).sum(1)[None]  # (N, K)
                codes = dist2.argmin(1)  # (N,)
            zq = F.embedding(codes, self.codebook.float())  # (N, D); gradient reaches the codebook parameter
            m = valid[:, None].to(flat.dtype)  # (N, 1)
            denom = (valid.sum() * d).clamp_min(1)
            commit = self.cfg.commitment_cost * ((flat - zq.detach()).pow(2) * m).sum() / denom
            if self.cfg.ema:
                codebook_term = torch.zeros((), device=z.device)
            else:
                codebook_term = ((flat.detach() - zq).pow(2) * m).sum() / denom
            zq_st = flat + (zq - flat).detach()  # straight-through: forward z_q, backward identity to z

            counts = codebook_usage(codes, valid, self.cfg.codebook_size)  # (K,)
            restarted = self._update(flat[valid].detach(), codes[valid]) if self.training else 0

        info = {"codes": codes.reshape(b, t), "perplexity": perplexity(counts),
                "usage": (counts > 0).float().mean(), "restarted": restarted,
                "sq_error": (flat - zq).detach().pow(2).mean(1).reshape(b, t)}  # (B, T) per token
        terms = {"vq_commit": commit, "vq_codebook": codebook_term}
        return zq_st.reshape(b, t, d).to(z.dtype), terms, info

    @torch.no_grad()
    def _update(self, x: torch.Tensor, codes: torch.Tensor) -> int:
        """x (Nv, D) valid encoder outputs, codes (Nv,) their codes. EMA step, then dead-code restart.

        Runs after the batch's terms are computed, so the update acts from the next step on.
        """
        cfg, k = self.cfg, self.cfg.codebook_size
        counts = torch.bincount(codes, minlength=k).float()  # (K,)
        sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, codes, x)  # (K, D)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:  # every rank applies the same update: statistics of the global batch
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
        if cfg.ema:
            self.ema_embed_sum.mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + cfg.eps) / (n + k * cfg.eps) * n  # (K,)
            self.codebook.copy_(self.ema_embed_sum / smoothed[:, None])

        if not cfg.restart_dead or len(x) == 0:
            return 0
        dead = self.cluster_size < cfg.dead_code_threshold  # (K,)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        # torch's global RNG, so a resumed run (which restores it) restarts the same codes the same way
        if len(x) >= n_dead:
            pick = torch.randperm(len(x), device=x.device)[:n_dead]
        else:
            pick = torch.randint(len(x), (n_dead,), device=x.device)
        new = x[pick]  # (n_dead, D)
        self.codebook.data[dead] = new.to(self.codebook.dtype)
        # a restarted code starts at the threshold: it stays alive while it is used about that often
        self.cluster_size[dead] = cfg.dead_code_threshold
        if cfg.ema:
            self.ema_embed_sum[dead] = new * cfg.dead_code_threshold
        if distributed:  # rank 0's restart vectors win, so the codebooks stay identical
            for buf in (self.codebook.data, self.cluster_size, *([self.ema_embed_sum] if cfg.ema else [])):
                dist.broadcast(buf, 0)
        return n_dead
