"""The `autoencode` recipe's loss: token reconstruction + weighted globals + VQ terms, as named terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def autoencode_loss(out: dict, batch: dict, globals_beta: float) -> dict[str, torch.Tensor]:
    """out: ModalityAutoencoder's forward; batch: the batch dict it saw.

    rec_tokens = rec_ce + rec_mse, an unweighted sum of the parts the data has:
      rec_ce  cross-entropy of the id logits (B, T, V) over valid positions (when the data has ids),
      rec_mse MSE of the continuous features (B, T, C), mean over valid positions and channels
              (when the data has continuous features).
    rec_globals: MSE of the predicted globals (B, G), mean over samples and features; 0 when G = 0.
      At globals_beta=0 rec_globals is still reported (the untrained head's error), it just is not
      optimized: it is computed on a detached prediction, so the globals head gets no gradient.
    vq_commit, vq_codebook: the quantizer's terms (vq bottleneck only), already weighted.
    total_loss = rec_tokens + globals_beta * rec_globals + vq_commit + vq_codebook; loss = total_loss.
    vq_perplexity, vq_usage, vq_restarted: detached codebook diagnostics, not part of the loss.
    """
    mask = batch["mask"]  # (B, T)
    terms: dict[str, torch.Tensor] = {}
    with torch.autocast(mask.device.type, enabled=False):  # losses in fp32 under bf16 autocast
        rec = torch.zeros((), device=mask.device)
        if out["rec_ids"] is not None:
            terms["rec_ce"] = F.cross_entropy(out["rec_ids"][mask].float(), batch["tokens_id"][mask])
            rec = rec + terms["rec_ce"]
        if out["rec_cont"] is not None:
            terms["rec_mse"] = F.mse_loss(out["rec_cont"][mask].float(), batch["tokens_cont"][mask].float())
            rec = rec + terms["rec_mse"]
        terms["rec_tokens"] = rec

        pred = out["pred_globals"]
        if pred is None:
            terms["rec_globals"] = torch.zeros((), device=mask.device)
        elif globals_beta == 0:
            with torch.no_grad():
                terms["rec_globals"] = F.mse_loss(pred.detach().float(), batch["globals"].float())
        else:
            terms["rec_globals"] = F.mse_loss(pred.float(), batch["globals"].float())

        total = terms["rec_tokens"] + globals_beta * terms["rec_globals"]
        for name, value in out["vq_terms"].items():
            terms[name] = value
            total = total + value
    info = out["vq_info"]
    if info:
        terms["vq_perplexity"] = info["perplexity"].detach()
        terms["vq_usage"] = info["usage"].detach()
        terms["vq_restarted"] = torch.tensor(float(info["restarted"]), device=mask.device)
    terms["total_loss"] = total
    terms["loss"] = total
    return terms
