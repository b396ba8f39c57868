"""The `align` recipe's objective: a contrastive loss plus optional auxiliaries, as named terms."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modalign.losses.contrastive import (TextQueue, clip_loss, masked_token_loss, queue_loss,
                                         random_token_mask, siglip_loss)
from modalign.train.distributed import SINGLE, World, gather_features


@dataclass
class LossConfig:
    kind: str = "clip"  # clip (InfoNCE, both directions) | siglip (pairwise sigmoid)
    queue_size: int = 0  # hard-negative memory of recent captions; 0 = off
    queue_weight: float = 0.5  # weight of the queue term (modality -> text over batch + queue)
    mlm_ratio: float = 0.15  # fraction of valid tokens hidden for the masked-modeling auxiliary
    mlm_weight: float = 0.0  # weight of the masked-modeling term; 0 = off (saves a second forward pass)
    local_loss: bool = False  # distributed: each rank's own rows against the global batch (open_clip's
    #                           local_loss; same gradient, B_local x B logits per rank instead of B x B)


class AlignObjective(nn.Module):
    """objective(model, batch) -> {"loss", <term>: ...}. Holds the queue, so it has state."""

    def __init__(self, cfg: LossConfig, text_dim: int, world: World = SINGLE):
        super().__init__()
        if cfg.kind not in ("clip", "siglip"):
            raise ValueError(f"unknown loss.kind '{cfg.kind}' (expected clip or siglip)")
        self.cfg = cfg
        self.world = world
        self.queue = TextQueue(cfg.queue_size, text_dim) if cfg.queue_size > 0 else None

    def forward(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """model: the AlignModel, or DistributedDataParallel around it (called once, through forward)."""
        core = getattr(model, "module", model)
        out, t, scale, bias = model(batch)  # modality output, text (B, D), logit scale and bias
        m, aux = out.embedding, out.aux  # (B, D), the head's auxiliary terms
        mlm = None
        if self.cfg.mlm_weight > 0:
            hidden = random_token_mask(batch["mask"], self.cfg.mlm_ratio)  # (B, T)
            tokens = core.encode_modality(batch, masked=hidden).tokens
            mlm = (core.mlm_head(tokens), hidden)  # (B, T, V or C), (B, T)
        with torch.autocast("cpu", enabled=False):  # logits and softmax in fp32 even under bf16 autocast
            return self._terms(core, batch, m.float(), t.float(), scale, bias, mlm, aux)

    def _terms(self, model, batch: dict, m: torch.Tensor, t: torch.Tensor, scale, bias, mlm,
               aux: dict) -> dict[str, torch.Tensor]:
        groups = batch["groups"]
        rows = None
        if self.world.distributed:  # the global batch: every rank's features, with their gradients
            local = len(m)
            m, t, groups = gather_features(m, t, groups, world=self.world)
            if self.cfg.local_loss:
                rows = slice(self.world.rank * local, (self.world.rank + 1) * local)
        if self.cfg.kind == "clip":
            terms = clip_loss(m, t, scale, groups, rows)
            loss = terms["clip"]
        else:
            terms = siglip_loss(m, t, scale, bias, groups)
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
