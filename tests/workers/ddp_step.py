"""Two optimizer-free training steps under torchrun, for tests/test_distributed.py:

    torchrun --nproc-per-node 2 tests/workers/ddp_step.py OUT.pt

Each rank builds the same seeded model and global batches, wraps the model in DDP, and for each loss
configuration (global and local contrastive loss; with the caption queue and the masked-modeling
term) runs two steps on its shard: inputs -> model -> objective -> backward. The second step's
queue holds the first step's gathered captions. Rank 0 saves the second step's loss (mean over
ranks) and synchronised gradients to OUT.pt, to compare with one process on the whole batches
(`run_steps` with the single-process world).
"""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from modalign.losses.objective import AlignObjective, LossConfig
from modalign.models.align import AlignModel, AlignModelConfig, HeadConfig
from modalign.models.encoders import EncoderConfig
from modalign.train.distributed import SINGLE, World, exit_process, init_from_env, leave, shard

B, T = 8, 6
CASES = {
    "global": LossConfig(),
    "local": LossConfig(local_loss=True),
    "queue+mlm": LossConfig(queue_size=6, mlm_weight=0.5, mlm_ratio=0.3),
    "queue+mlm, local": LossConfig(queue_size=6, mlm_weight=0.5, mlm_ratio=0.3, local_loss=True),
    # continuous series in patches of 2 steps (RevIN on), masked modeling of whole patches
    "patches+mlm": LossConfig(mlm_weight=0.5, mlm_ratio=0.3),
}


def model_and_batches(mlm: bool, patched: bool = False):
    torch.manual_seed(0)
    tokens = {"vocab_size": 0, "n_cont": 2, "patch_size": 2, "patch_stride": 2, "revin": True} if patched else \
        {"vocab_size": 20, "n_cont": 0}
    cfg = AlignModelConfig(encoder=EncoderConfig(kind="transformer", width=32, depth=1, heads=4, n_globals=3, **tokens),
                           head=HeadConfig("mlp", 16, {"layers": 2, "hidden": 32, "dropout": 0.0}), text_dim=8,
                           mlm_head=mlm, mlm_ratio=0.3)
    model = AlignModel(cfg)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        cont = torch.randn(B, T, 2, generator=g) if patched else torch.zeros(B, T, 0)
        batches.append({"tokens_id": torch.randint(0, 20, (B, T), generator=g), "tokens_cont": cont,
                        "globals": torch.randn(B, 3, generator=g), "mask": torch.arange(T)[None] < lengths[:, None],
                        "text": torch.randn(B, 8, generator=g), "token_noise": torch.rand(B, T, generator=g),
                        "groups": torch.tensor([0, 1, 2, 1, 3, 4, 5, 0]) + 10 * len(batches)})  # shared captions
    return model, batches


def run_steps(loss_cfg: LossConfig, world: World = SINGLE, patched: bool = False) -> dict:
    """Two steps of `loss_cfg` on this rank's shard. -> {"loss": the second step's loss (this
    rank's), "grads": {name: gradient}} (DDP-averaged under torchrun)."""
    model, batches = model_and_batches(loss_cfg.mlm_weight > 0, patched)
    net = DistributedDataParallel(model, find_unused_parameters=True) if world.distributed else model
    objective = AlignObjective(loss_cfg, 8, world.rank, world.size)
    for batch in batches:
        model.zero_grad(set_to_none=True)
        mine = {k: v[shard(B, world)] for k, v in batch.items()}
        mine = objective.inputs(mine)
        terms = objective(net(mine), mine)
        terms["loss"].backward()
    return {"loss": terms["loss"].detach().clone(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def main(out: str) -> None:
    world = init_from_env()
    results = {}
    for name, loss_cfg in CASES.items():
        r = run_steps(loss_cfg, world, patched=name.startswith("patches"))
        torch.distributed.all_reduce(r["loss"])
        results[name] = {"loss": float(r["loss"]) / world.size, "grads": r["grads"]}
    if world.is_main:
        torch.save(results, out)
    del r
    leave()
    exit_process(0)  # as `modalign train` ends a rank (see modalign.train.distributed.exit_process)


if __name__ == "__main__":
    main(sys.argv[1])
