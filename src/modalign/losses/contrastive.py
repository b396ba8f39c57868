"""Contrastive losses between modality and text embeddings. Each returns named terms.

Shared captions: when several samples of a batch are in the same caption group (the same text,
or the same label when captions are per-label), they are positives of each other, not negatives.
We use soft targets: row i's target distribution is uniform over every column of row i's group
(CLIP's one-hot target when all groups differ). For byte-identical captions this coincides with
one-hot cross-entropy, value and gradient, because the duplicate columns are equal; it matters
when a group holds different texts, and in the queue term, where same-group entries are masked.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(*tensors: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Each rank's local tensor (B_local, ...) -> the global one (B, ...), rank 0's rows first
    (open_clip's gather_features, kept apart from the losses that use it). world_size 1: as given.

    Gradients flow back to every rank's own rows (the autograd all-gather reduce-scatters, i.e.
    sums over ranks, the gradient of each rank's slice in its backward). Every rank then computes the
    same global loss, and DistributedDataParallel's gradient average gives the single-process
    gradient: each rank's local gradient is world x its share, divided by world.
    """
    if world_size <= 1:
        return list(tensors)
    from torch.distributed._functional_collectives import all_gather_single_autograd

    out = []
    for t in tensors:
        if t.requires_grad:
            out.append(all_gather_single_autograd(t.contiguous(), gather_dim=0, group=dist.group.WORLD))
        else:  # e.g. caption group ids, frozen text: no gradient to carry
            parts = [torch.empty_like(t) for _ in range(world_size)]
            dist.all_gather(parts, t.contiguous())
            out.append(torch.cat(parts, dim=0))
    return out


def global_count(n: torch.Tensor, world_size: int) -> torch.Tensor:
    """A count summed over ranks (e.g. masked positions), so a rank's sum over its own items divided
    by count / world_size averages, over ranks, to the single-process mean."""
    if world_size <= 1:
        return n
    n = n.detach().clone()
    dist.all_reduce(n)
    return n


def positives(groups_a: torch.Tensor, groups_b: torch.Tensor) -> torch.Tensor:
    """groups_a (A,), groups_b (B,) -> (A, B) bool, True where the captions are the same."""
    return groups_a[:, None] == groups_b[None, :]


def clip_loss(modality: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              groups: torch.Tensor | None = None, rows: slice | None = None) -> dict[str, torch.Tensor]:
    """Bidirectional InfoNCE with soft multi-positive targets.

    modality (B, D), text (B, D): L2-normalised, row i of each is a pair.
    logit_scale: scalar, already exponentiated and clamped.
    groups (B,) int: caption group per row; None = every caption distinct.
    rows: only these queries (a rank's own samples, open_clip's local loss), each against all B;
        None = every row.
    Returns {"clip_m2t", "clip_t2m", "clip"} with clip the mean of the two directions.
    """
    rows = rows if rows is not None else slice(None)
    m2t_logits = logit_scale * modality[rows] @ text.T  # (R, B)
    t2m_logits = logit_scale * text[rows] @ modality.T  # (R, B)
    if groups is None:
        target = torch.arange(len(modality), device=modality.device)[rows]
        m2t = F.cross_entropy(m2t_logits, target)
        t2m = F.cross_entropy(t2m_logits, target)
    else:
        pos = positives(groups[rows], groups).to(m2t_logits.dtype)  # (R, B); symmetric relation
        target = pos / pos.sum(1, keepdim=True)
        m2t = -(target * F.log_softmax(m2t_logits, dim=1)).sum(1).mean()
        t2m = -(target * F.log_softmax(t2m_logits, dim=1)).sum(1).mean()
    return {"clip_m2t": m2t, "clip_t2m": t2m, "clip": (m2t + t2m) / 2}


def siglip_loss(modality: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023): every pair is a binary problem.

    modality (B, D), text (B, D) normalised; pairs with the same caption group are positives.
    Returns {"siglip"}: the sum over pairs divided by B, as in the paper.
    """
    logits = logit_scale * modality @ text.T + logit_bias  # (B, B)
    if groups is None:
        labels = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    else:
        labels = 2 * positives(groups, groups).to(logits.dtype) - 1
    return {"siglip": -F.logsigmoid(labels * logits).sum() / len(logits)}


class TextQueue(nn.Module):
    """A FIFO memory of recent frozen text embeddings used as extra negatives.

    It stores the *frozen* sentence embeddings and their caption groups, and the loss projects
    them with the current text projection, so the negatives never go stale. Buffers live in the
    state dict, so a resumed run continues with the same queue.
    """

    def __init__(self, size: int, text_dim: int):
        super().__init__()
        self.register_buffer("text", torch.zeros(size, text_dim))  # (Q, text_dim)
        self.register_buffer("groups", torch.full((size,), -1, dtype=torch.long))  # -1 = empty slot
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, text: torch.Tensor, groups: torch.Tensor) -> None:
        q = len(self.groups)
        idx = (self.ptr + torch.arange(len(groups))) % q
        self.text[idx] = text.float()
        self.groups[idx] = groups
        self.ptr.copy_((self.ptr + len(groups)) % q)


def queue_loss(modality: torch.Tensor, text: torch.Tensor, queued_text: torch.Tensor,
               logit_scale: torch.Tensor, groups: torch.Tensor, queued_groups: torch.Tensor,
               rows: slice | None = None) -> torch.Tensor:
    """Modality->text InfoNCE over the batch's texts plus a queue of extra negatives.

    modality (B, D), text (B, D), queued_text (Q, D) projected + normalised, groups (B,),
    queued_groups (Q,) with -1 for empty slots. Queue entries with the query's caption group, and
    empty slots, are masked out: they are not negatives. rows: only these queries (local loss).
    """
    rows = rows if rows is not None else slice(None)
    batch_logits = logit_scale * modality[rows] @ text.T  # (R, B)
    queue_logits = logit_scale * modality[rows] @ queued_text.T  # (R, Q)
    drop = positives(groups[rows], queued_groups) | (queued_groups < 0)[None, :]
    queue_logits = queue_logits.masked_fill(drop, float("-inf"))
    logits = torch.cat([batch_logits, queue_logits], dim=1)  # (R, B+Q)
    pos = positives(groups[rows], groups).to(logits.dtype)
    target = torch.cat([pos / pos.sum(1, keepdim=True), torch.zeros_like(queue_logits)], dim=1)
    logp = F.log_softmax(logits, dim=1).masked_fill(target == 0, 0.0)
    return -(target * logp).sum(1).mean()


def masked_token_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor,
                      count: torch.Tensor | None = None) -> torch.Tensor:
    """Masked-modeling auxiliary: reconstruct masked tokens from the encoder's token features.

    pred (B, T, V) logits over token ids when target is (B, T) int ids, else (B, T, C) continuous
    features for a (B, T, C) float target; masked (B, T) bool, True at positions hidden from the
    encoder. Cross-entropy on ids, MSE (mean over channels) on features, summed over masked
    positions and divided by `count` (default: the number of masked positions, i.e. their mean;
    distributed: the global count over the world size, see `global_count`).
    """
    count = masked.sum() if count is None else count
    if target.dtype in (torch.int64, torch.int32):
        total = F.cross_entropy(pred[masked].float(), target[masked], reduction="sum")
    else:
        total = F.mse_loss(pred[masked].float(), target[masked].float(), reduction="sum") / max(target.shape[-1], 1)
    return total / count.clamp_min(1)


def random_token_mask(mask: torch.Tensor, ratio: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """mask (B, T) valid positions -> (B, T) bool: about `ratio` of each sample's valid positions,
    at least one per sample: those with the smallest `noise` (B, T) uniform values (drawn here when
    not given; the sampler gives them so the mask does not depend on the number of ranks)."""
    r = noise.to(mask.device, torch.float32) if noise is not None else torch.rand(mask.shape, device=mask.device)
    r = r.masked_fill(~mask, 2.0)
    n = (mask.sum(1).float() * ratio).clamp_min(1).long()  # (B,)
    kth = torch.sort(r, dim=1).values.gather(1, (n - 1)[:, None])  # (B, 1)
    return (r <= kth) & mask
