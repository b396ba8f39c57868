"""Distributed data parallel training: joining torchrun's process group, sharding the global
batch, and leaving cleanly. The feature gather of the contrastive loss lives with the losses
(`modalign.losses.contrastive.gather_features`).

    torchrun --nproc-per-node 2 -m modalign.recipes.align trainer.batch_size=256 ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init_from_env` joins the group. Where CUDA exists
the group has two backends, gloo for CPU tensors and nccl for CUDA tensors (each rank then trains
on the GPU of its LOCAL_RANK); elsewhere it is gloo alone. Each rank trains on its shard of every
global batch (batch_size / world samples), the model is wrapped in DistributedDataParallel, and the
losses see the global batch. Only rank 0 writes the run directory (`modalign.runs.writer`).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

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
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env() -> World:
    """Join torchrun's process group once; -> the world (SINGLE when not under torchrun)."""
    world = from_env()
    if world.distributed and not dist.is_initialized():
        # nccl joins lazily, at the first collective on a CUDA tensor: a CPU run never starts it
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
    return world


def broadcast_object(obj, world: World):
    """Rank 0's `obj` on every rank (e.g. the run directory it created)."""
    if not world.distributed:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int, world: World) -> slice:
    """Rank's contiguous slice of a global batch of n samples (n divisible by the world size)."""
    per = n // world.size
    return slice(world.rank * per, (world.rank + 1) * per)


def leave(clean: bool = True) -> None:
    """Leave the process group: free what still holds it (a DistributedDataParallel's reducer,
    pending collectives), wait until every rank got here, then destroy it. clean=False (this rank
    failed): no waiting for ranks that may be stuck in another collective. A rank then ends with
    `exit_process`, not by returning into the interpreter's shutdown."""
    if not dist.is_initialized():
        return
    gc.collect()
    if clean:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        dist.all_reduce(torch.zeros(1))  # a barrier on the CPU backend (dist.barrier would start nccl)
    dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a torchrun rank with `code`, skipping the interpreter's finalization.

    Why: gloo's worker threads outlive destroy_process_group (whatever still references the group
    keeps them), and one of them releases a finished collective's tensors a moment after the caller
    has moved on. Releasing a tensor that has a Python object takes the GIL; once the interpreter is
    finalizing, Python ends such a thread inside a noexcept destructor and the process aborts
    (`terminate called without an active exception`, SIGABRT, exit -6) although all its work was
    done: 1 launch in 4 to 9 here. Core dumps showed it every time: ProcessGroupGloo::runLoop ->
    ~AsyncAllreduceWork -> TensorImpl::decref_pyobject -> take_gil -> PyThread_exit_thread. Keeping
    the last tensor alive does not help (a live Python object is exactly what needs the GIL). Every
    file of the run is already closed and synced (the run writer writes atomically), so the rank
    flushes its streams and logs and leaves with os._exit."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
