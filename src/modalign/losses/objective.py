"""The `align` recipe's objective: a contrastive loss plus optional auxiliaries, as named terms.

    batch = objective.inputs(batch)     # adds the caption queue's frozen texts when the queue is on
    out = model(batch)                  # AlignOutput: every tensor a loss needs (DDP sees all of it)
    terms = objective(out, batch)       # {"loss", "clip", "clip_m2t", ..., "queue", "mlm", ...}

The objective never calls the model. Under torchrun it gathers the features of every rank (the
global batch is the contrastive batch), fills the caption queue with the gathered global batch, as
MoCo does, and divides the masked-modeling sum by the global count of masked positions, so every
term and gradient equals one process on the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modalign.options import Options, at_least, between, one_of
from modalign.losses.contrastive import (TextQueue, clip_loss, gather_features, global_count, masked_token_loss,
                                         queue_loss, siglip_loss)


@dataclass
class LossConfig(Options):
    kind: str = "clip"  # clip (InfoNCE, both directions) | siglip (pairwise sigmoid)
    queue_size: int = 0  # hard-negative memory of recent captions; 0 = off
    queue_weight: float = 0.5  # weight of the queue term (modality -> text over batch + queue)
    mlm_ratio: float = 0.15  # fraction of valid tokens hidden for the masked-modeling auxiliary
    mlm_weight: float = 0.0  # weight of the masked-modeling term; 0 = off (saves a second encoder pass)
    local_loss: bool = False  # distributed: each rank's own rows against the global batch (open_clip's
    #                           local_loss; same gradient, B_local x B logits per rank instead of B x B)
    init_temperature: float = 0.07  # CLIP's: the model's learnable logit scale starts at 1 / 0.07
    max_logit_scale: float = 100.0  # CLIP clamps the logit scale at 100

    def validate(self) -> None:
        one_of(self, "kind", ("clip", "siglip"))
        at_least(self, "init_temperature", 1e-4)
        at_least(self, "max_logit_scale", 1.0)
        at_least(self, "queue_size", 0)
        at_least(self, "queue_weight", 0.0)
        between(self, "mlm_ratio", 0.0, 1.0)
        at_least(self, "mlm_weight", 0.0)


class AlignObjective(nn.Module):
    """objective(out, batch) -> {"loss", <term>: ...}. Holds the caption queue, so it has state."""

    def __init__(self, cfg: LossConfig, text_dim: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.queue = TextQueue(cfg.queue_size, text_dim) if cfg.queue_size > 0 else None

    def inputs(self, batch: dict) -> dict:
        """The training batch the model's forward needs: with the queue's frozen texts (Q, text_dim),
        a copy, since the push after the loss updates the buffer in place."""
        if self.queue is None or not self.training:
            return batch
        return {**batch, "queue_text": self.queue.text.clone()}

    def forward(self, out, batch: dict) -> dict[str, torch.Tensor]:
        """out: AlignOutput (modality, text (B, D) normalised; scale, bias; queue (Q, D) or None;
        mlm_pred / mlm_target / mlm_mask or None; aux terms). batch: this rank's batch."""
        with torch.autocast(out.modality.device.type, enabled=False):  # logits and softmax in fp32 under autocast
            return self._terms(out, batch)

    def _terms(self, out, batch: dict) -> dict[str, torch.Tensor]:
        m, t, scale, groups = out.modality.float(), out.text.float(), out.scale, batch["groups"]
        frozen_text = batch["text"]  # (B, text_dim): what the queue stores
        rows = None
        if self.world_size > 1:  # the global batch: every rank's features, with their gradients
            local = len(m)
            m, t, groups = gather_features(m, t, groups, world_size=self.world_size)
            if self.queue is not None and out.queue is not None:
                frozen_text = gather_features(frozen_text.detach(), world_size=self.world_size)[0]
            if self.cfg.local_loss:
                rows = slice(self.rank * local, (self.rank + 1) * local)
        if self.cfg.kind == "clip":
            terms = clip_loss(m, t, scale, groups, rows)
            loss = terms["clip"]
        else:
            terms = siglip_loss(m, t, scale, out.bias, groups)
            loss = terms["siglip"]
        if self.queue is not None and out.queue is not None:
            terms["queue"] = queue_loss(m, t, out.queue.float(), scale, groups, self.queue.groups, rows)
            loss = loss + self.cfg.queue_weight * terms["queue"]
            self.queue.push(frozen_text, groups)
        if out.mlm_pred is not None:
            count = global_count(out.mlm_mask.sum(), self.world_size) / self.world_size
            terms["mlm"] = masked_token_loss(out.mlm_pred, out.mlm_target, out.mlm_mask, count)
            loss = loss + self.cfg.mlm_weight * terms["mlm"]
        for name, term in out.aux.items():  # e.g. the register head's complementary reconstruction
            terms[name] = term.float()
            loss = loss + out.aux_weight * terms[name]
        terms["loss"] = loss
        return terms
