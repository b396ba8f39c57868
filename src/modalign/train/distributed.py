"""Distributed data parallel training: the process group, and the feature gather of the
contrastive loss (in the manner of open_clip's `gather_features`, kept apart from the loss).

    torchrun --nproc-per-node 2 -m modalign.recipes.align trainer.batch_size=256 ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init_from_env` joins the group (gloo: CPU). Each rank trains on its shard of every global batch (batch_size / world samples),
the model is wrapped in DistributedDataParallel, and the contrastive loss sees the global batch:
features are gathered from all ranks with their gradients, so the logits are the single-process
logits and the gradients equal a single process on the same global batch. Only rank 0 writes the
run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_env() -> World:
    """The world torchrun describes in the environment, without joining it (SINGLE outside torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    # gloo: modalign trains on the CPU today; nccl comes with GPU placement (docs/scale-out.md)
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")), "gloo")


def init_from_env() -> World:
    """Join torchrun's process group once; -> the world (SINGLE when not under torchrun)."""
    world = from_env()
    if world.distributed and not dist.is_initialized():
        dist.init_process_group(backend=world.backend, rank=world.rank, world_size=world.size)
    return world


def broadcast_object(obj, world: World):
    """Rank 0's `obj` on every rank (e.g. the run directory it created)."""
    if not world.distributed:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_features(*tensors: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Each local tensor (B_local, ...) -> the global one (B, ...), rank 0's rows first.

    Gradients flow back to every rank's own rows (the autograd all-gather reduce-scatters, i.e.
    sums over ranks, the gradient of each rank's slice in its backward). Every rank then computes the
    same global loss, and DistributedDataParallel's gradient average gives the single-process
    gradient: each rank's local gradient is world x its share, divided by world.
    """
    if not world.distributed:
        return list(tensors)
    from torch.distributed._functional_collectives import all_gather_single_autograd

    out = []
    for t in tensors:
        if t.requires_grad:
            out.append(all_gather_single_autograd(t.contiguous(), gather_dim=0, group=dist.group.WORLD))
        else:  # e.g. caption group ids: no gradient to carry
            parts = [torch.empty_like(t) for _ in range(world.size)]
            dist.all_gather(parts, t.contiguous())
            out.append(torch.cat(parts, dim=0))
    return out


def shard(n: int, world: World) -> slice:
    """Rank's contiguous slice of a global batch of n samples (n divisible by the world size)."""
    per = n // world.size
    return slice(world.rank * per, (world.rank + 1) * per)
