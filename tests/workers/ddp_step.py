"""One optimizer-free training step under torchrun, for tests/test_distributed.py:

    torchrun --nproc-per-node 2 tests/workers/ddp_step.py OUT.pt

Each rank builds the same seeded model and global batch, wraps the model in DDP, computes the
objective on its shard (global and local contrastive loss), backpropagates, and rank 0 saves
the loss and the synchronised gradients to OUT.pt, to compare with one process on the whole batch.
"""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from modalign.losses.objective import AlignObjective, LossConfig
from modalign.models.align import AlignModel, AlignModelConfig, HeadConfig
from modalign.models.encoders import EncoderConfig
from modalign.train.distributed import init_from_env, shard

B, T = 8, 6


def model_and_batch():
    torch.manual_seed(0)
    cfg = AlignModelConfig(encoder=EncoderConfig(kind="transformer", width=32, depth=1, heads=4, vocab_size=20,
                                                 n_cont=0, n_globals=3),
                           head=HeadConfig("mlp", 16, {"layers": 2, "hidden": 32, "dropout": 0.0}), text_dim=8)
    model = AlignModel(cfg)
    lengths = torch.tensor([6, 3, 5, 6, 2, 4, 6, 1])
    batch = {"tokens_id": torch.randint(0, 20, (B, T)), "tokens_cont": torch.zeros(B, T, 0),
             "globals": torch.randn(B, 3), "mask": torch.arange(T)[None] < lengths[:, None],
             "text": torch.randn(B, 8), "groups": torch.tensor([0, 1, 2, 1, 3, 4, 5, 0])}  # shared captions
    return model, batch


def main(out: str) -> None:
    world = init_from_env()
    results = {}
    for local_loss in (False, True):
        model, batch = model_and_batch()
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        objective = AlignObjective(LossConfig(local_loss=local_loss), 8, world)
        mine = {k: v[shard(B, world)] for k, v in batch.items()}
        terms = objective(ddp, mine)
        terms["loss"].backward()
        loss = terms["loss"].detach().clone()
        torch.distributed.all_reduce(loss)
        results[local_loss] = {"loss": float(loss) / world.size,
                               "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    if world.is_main:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
