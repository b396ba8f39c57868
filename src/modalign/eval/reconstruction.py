"""Reconstruction metrics of the `autoencode` recipe (stage 1), one value per example.

Each metric is a per-example function whose mean over the evaluated split is the summary value, so
facts/summary.json equals the means of facts/scores.parquet's columns and paired statistics work on
stage-1 runs as on stage-2 ones. Per example, over that sample's valid (unpadded) tokens:

    rec_ce       mean cross-entropy of the token-id logits (data with ids)
    rec_mse      mean over tokens of the squared error averaged over channels (continuous data)
    rec_tokens   rec_ce + rec_mse (the parts the data has)
    rec_globals  squared error of the predicted globals, mean over the G features (data with globals)
    token_acc    fraction of tokens whose id is predicted exactly (data with ids)
    vq_commit    commitment_cost x the mean squared distance of its tokens to their codes (vq only)
    vq_codebook  the same distance unweighted, 0 with EMA codebook updates (vq only)
    total_loss   rec_tokens + globals_beta x rec_globals + vq_commit + vq_codebook

The training loss (losses/reconstruction.py) pools tokens over the batch instead; the two agree
when every sample has the same length. See docs/metrics.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROTOCOL_VERSION = 2  # 2: per-example means (1 pooled tokens over the batch); runs of different versions are not comparable


@torch.no_grad()
def reconstruction_scores(out: dict, batch: dict, globals_beta: float, commitment_cost: float = 0.25,
                          ema: bool = True) -> dict[str, torch.Tensor]:
    """out: ModalityAutoencoder's forward; batch: the batch it saw. -> {metric: (B,) float32}."""
    mask = batch["mask"]  # (B, T)
    m = mask.float()
    n = m.sum(1).clamp_min(1)  # (B,) valid tokens per sample
    scores: dict[str, torch.Tensor] = {}
    rec = torch.zeros(len(mask), device=mask.device)
    if out["rec_ids"] is not None:
        logits = out["rec_ids"].float()  # (B, T, V)
        ce = F.cross_entropy(logits.transpose(1, 2), batch["tokens_id"], reduction="none")  # (B, T)
        scores["rec_ce"] = (ce * m).sum(1) / n
        scores["token_acc"] = ((logits.argmax(-1) == batch["tokens_id"]).float() * m).sum(1) / n
        rec = rec + scores["rec_ce"]
    if out["rec_cont"] is not None:
        se = (out["rec_cont"].float() - batch["tokens_cont"].float()).pow(2).mean(2)  # (B, T)
        scores["rec_mse"] = (se * m).sum(1) / n
        rec = rec + scores["rec_mse"]
    scores["rec_tokens"] = rec
    total = rec.clone()
    if out["pred_globals"] is not None:
        scores["rec_globals"] = (out["pred_globals"].float() - batch["globals"].float()).pow(2).mean(1)
        total = total + globals_beta * scores["rec_globals"]
    info = out.get("vq_info") or {}
    if "sq_error" in info:
        dist = (info["sq_error"].float() * m).sum(1) / n  # (B,)
        scores["vq_commit"] = commitment_cost * dist
        scores["vq_codebook"] = torch.zeros_like(dist) if ema else dist
        total = total + scores["vq_commit"] + scores["vq_codebook"]
    scores["total_loss"] = total
    return scores
