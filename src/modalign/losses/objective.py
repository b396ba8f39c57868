"""The `align` recipe's objective: a contrastive loss plus optional auxiliaries, as named terms."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modalign.losses.contrastive import (TextQueue, clip_loss, masked_token_loss, queue_loss,
                                         random_token_mask, siglip_loss)


@dataclass
class LossConfig:
    kind: str = "clip"  # clip (InfoNCE, both directions) | siglip (pairwise sigmoid)
    queue_size: int = 0  # hard-negative memory of recent captions; 0 = off
    queue_weight: float = 0.5  # weight of the queue term (modality -> text over batch + queue)
    mlm_ratio: float = 0.15  # fraction of valid tokens hidden for the masked-modeling auxiliary
    mlm_weight: float = 0.0  # weight of the masked-modeling term; 0 = off (saves a second forward pass)


class AlignObjective(nn.Module):
    """objective(model, batch) -> {"loss", <term>: ...}. Holds the queue, so it has state."""

    def __init__(self, cfg: LossConfig, text_dim: int):
        super().__init__()
        if cfg.kind not in ("clip", "siglip"):
            raise ValueError(f"unknown loss.kind '{cfg.kind}' (expected clip or siglip)")
        self.cfg = cfg
        self.queue = TextQueue(cfg.queue_size, text_dim) if cfg.queue_size > 0 else None

    def forward(self, model, batch: dict) -> dict[str, torch.Tensor]:
        m, _, aux = model.encode_modality(batch)  # (B, D), _, head's auxiliary terms
        t = model.encode_text(batch["text"])  # (B, D)
        mlm = None
        if self.cfg.mlm_weight > 0:
            hidden = random_token_mask(batch["mask"], self.cfg.mlm_ratio)  # (B, T)
            tokens = model.encode_modality(batch, masked=hidden).tokens
            mlm = (model.mlm_head(tokens), hidden)  # (B, T, V or C), (B, T)
        with torch.autocast("cpu", enabled=False):  # logits and softmax in fp32 even under bf16 autocast
            return self._terms(model, batch, m.float(), t.float(), mlm, aux)

    def _terms(self, model, batch: dict, m: torch.Tensor, t: torch.Tensor, mlm, aux: dict) -> dict[str, torch.Tensor]:
        scale, groups = model.scale(), batch["groups"]
        if self.cfg.kind == "clip":
            terms = clip_loss(m, t, scale, groups)
            loss = terms["clip"]
        else:
            terms = siglip_loss(m, t, scale, model.logit_bias, groups)
            loss = terms["siglip"]
        if self.queue is not None:
            if self.training:
                # (Q, D), projected with today's weights; a copy, since push() below updates the buffer in place
                queued = model.encode_text(self.queue.text.clone())
                terms["queue"] = queue_loss(m, t, queued, scale, groups, self.queue.groups)
                loss = loss + self.cfg.queue_weight * terms["queue"]
                self.queue.push(batch["text"].detach(), groups)
        if mlm is not None:
            pred, hidden = mlm
            has_ids = model.cfg.encoder.vocab_size > 0
            terms["mlm"] = masked_token_loss(pred, batch["tokens_id"] if has_ids else None,
                                             batch["tokens_cont"], hidden)
            loss = loss + self.cfg.mlm_weight * terms["mlm"]
        for name, term in aux.items():  # e.g. the register head's complementary reconstruction
            terms[name] = term.float()
            loss = loss + model.head.aux_weight * terms[name]
        terms["loss"] = loss
        return terms
