# .venv/bin/python benchmarks/bench_flops.py --rounds 2      (smoke check: --quick)
"""Hardware efficiency: achieved FLOP/s of modalign's training step as a fraction of this machine's
matmul peak, both measured in the same run.

Step: `modalign.train.loop.Trainer._train_step()` (the recipe's trainer: autocast, objective, backward,
per-component gradient norms, clipping, AdamW, schedule) on an `AlignModel` with a transformer encoder
of width 256, 4 layers, 4 heads, MLP head (hidden 512, embed 256), 128 tokens (+ CLS) all valid,
batch 256, CLIP loss, synthetic batches with distinct captions (384-d frozen text vectors).
FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one step (matmuls, attention and their
backward, with torch's CUDA SDPA formulas applied to the CPU flash-attention kernels this layer runs;
elementwise ops and the optimizer are not counted, so the fraction is a lower bound).
Peak: the best of repeated 2048 x 2048 x 2048 matmuls (`torch.mm`) in the step's dtype (fp32, and bf16
for the bf16-autocast step), measured in the same worker right before and after its steps.

Workers: one fresh subprocess per (precision, allocator) measurement, alternating round by round:
  fp32 / bf16             the trainer's precision (bf16 = autocast, as `trainer.precision=auto` picks here)
  glibc default / tuned   tuned = what the recipes do with `env.malloc=tuned` (the default):
                          `modalign.train.allocator.tune_malloc("tuned")`, glibc's mallopt with no mmap
                          and no trimming, so freed heap is reused for the large activations instead of
                          mmap/munmap-ing each one (page faults are reported per step). default = the
                          worker leaves glibc alone (`env.malloc=default`).
All workers use --threads torch threads (default 2 = all cores).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/bench_flops.py --rounds 2"
CONFIGS = [("fp32", "default"), ("fp32", "tuned"), ("bf16", "default"), ("bf16", "tuned")]


def gemm_peak(dtype_name: str, n: int, reps: int) -> float:
    """Best GFLOP/s of n x n x n torch.mm in dtype over reps calls (after one warm-up)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


class FixedSampler:
    """One synthetic batch of fixed shape, as the trainer's sampler interface asks."""

    def __init__(self, batch: dict):
        self._batch = batch

    def batch(self, micro_step: int) -> dict:
        return self._batch

    def epoch_of(self, step: int) -> int:
        return 0


def build(precision: str, batch: int, tokens: int, width: int, depth: int):
    import torch

    from modalign.losses.objective import AlignObjective, LossConfig
    from modalign.models.align import AlignModel, AlignModelConfig, HeadConfig
    from modalign.models.encoders import EncoderConfig
    from modalign.train.loop import Trainer, TrainerConfig
    from modalign.train.optim import OptimConfig, build_optimizer, build_scheduler

    torch.manual_seed(0)
    enc = EncoderConfig(kind="transformer", width=width, depth=depth, heads=4, vocab_size=64, n_cont=2,
                        n_globals=3, max_len=max(512, tokens))
    cfg = AlignModelConfig(encoder=enc, head=HeadConfig(kind="mlp", embed_dim=256,
                                                        options={"layers": 2, "hidden": 512}), text_dim=384)
    model = AlignModel(cfg)
    objective = AlignObjective(LossConfig(kind="clip"), cfg.text_dim)
    opt = build_optimizer(model.components(), OptimConfig())
    sched = build_scheduler(opt, OptimConfig(), 10_000)
    g = torch.Generator().manual_seed(1)
    b = {"index": torch.arange(batch),
         "tokens_id": torch.randint(1, 64, (batch, tokens), generator=g),
         "tokens_cont": torch.randn(batch, tokens, 2, generator=g),
         "globals": torch.randn(batch, 3, generator=g),
         "mask": torch.ones(batch, tokens, dtype=torch.bool),
         "text": torch.nn.functional.normalize(torch.randn(batch, 384, generator=g), dim=-1),
         "groups": torch.arange(batch)}
    tcfg = TrainerConfig(max_steps=10_000, batch_size=batch, precision=precision)
    trainer = Trainer(model, objective, opt, sched, FixedSampler(b), lambda: {}, tcfg, [])
    return trainer, sum(p.numel() for p in model.parameters())


def cpu_attention_formulas() -> dict:
    """FlopCounterMode has formulas for the CUDA SDPA kernels, not for the CPU flash kernels the
    transformer layers run here: give those the same counts (forward 2 bmm, backward 5 bmm)."""
    import torch
    from torch.utils import flop_counter as fcm

    def shape(x):
        return tuple(x.shape)

    def fwd(query, key, value, *args, out_val=None, **kwargs):
        return fcm.sdpa_flop_count(shape(query), shape(key), shape(value))

    def bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return fcm.sdpa_backward_flop_count(shape(grad_out), shape(query), shape(key), shape(value))

    fwd._get_raw = bwd._get_raw = True  # called with the tensors themselves
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def worker(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from modalign.train.allocator import tune_malloc

    malloc = tune_malloc(args.malloc)
    torch.set_num_threads(args.threads)
    trainer, params = build(args.precision, args.batch, args.tokens, args.width, args.depth)
    peaks = [gemm_peak(args.precision, args.gemm_n, args.gemm_reps)]
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as fc:
        trainer._train_step()  # also the warm-up step
    flops = fc.get_total_flops()
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    times, faults = [], []
    for _ in range(args.steps):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        trainer._train_step()
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults.append((r1.ru_minflt - r0.ru_minflt) + (r1.ru_majflt - r0.ru_majflt))
    peaks.append(gemm_peak(args.precision, args.gemm_n, args.gemm_reps))
    return {"flops": flops, "by_op": by_op, "times": times, "faults": faults, "peaks": peaks,
            "threads": torch.get_num_threads(), "params": params, "trainer_precision": trainer.precision,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "malloc": malloc}


def main() -> None:
    p = common.bench_args(__doc__.split("\n")[0], default_rounds=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed steps per worker (default 2; --quick 2)")
    p.add_argument("--worker", action="store_true", help=argparse_suppress())
    p.add_argument("--precision", default="fp32")
    p.add_argument("--malloc", default="default", choices=("default", "tuned"))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--gemm-reps", type=int, default=None)
    p.add_argument("--configs", default=",".join(f"{a}/{b}" for a, b in CONFIGS),
                   help="precision/allocator pairs (default all four)")
    args = p.parse_args()
    args.batch = args.batch or (32 if args.quick else 256)
    args.tokens = args.tokens or (64 if args.quick else 128)
    args.width = args.width or 256
    args.depth = args.depth or (2 if args.quick else 4)
    args.steps = args.steps or 2
    args.gemm_reps = args.gemm_reps or (3 if args.quick else 8)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.rounds = min(args.rounds, 1)
    configs = [tuple(c.split("/")) for c in args.configs.split(",") if c]
    res = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for prec, alloc in order:
            out = common.run_worker([__file__, "--worker", "--precision", prec, "--threads", str(args.threads),
                                     "--batch", str(args.batch), "--tokens", str(args.tokens), "--width",
                                     str(args.width), "--depth", str(args.depth), "--steps", str(args.steps),
                                     "--gemm-n", str(args.gemm_n), "--gemm-reps", str(args.gemm_reps),
                                     "--malloc", alloc])
            assert out["malloc"] == alloc, out["malloc"]
            res[(prec, alloc)].append(out)
            print(f"  round {r + 1}/{args.rounds} {prec} {alloc:7s}: step {common.med(out['times']):.2f} s, "
                  f"peak {max(out['peaks']):.0f} GFLOP/s", file=sys.stderr)

    any_out = next(iter(res.values()))[0]
    gflop = any_out["flops"] / 1e9
    common.header("Hardware efficiency: training step FLOP/s vs this machine's matmul peak", COMMAND,
                  f"{args.threads} torch threads")
    print(f"Model: transformer encoder width {args.width}, {args.depth} layers, 4 heads, {args.tokens} tokens + CLS, "
          f"batch {args.batch}, MLP head, CLIP loss; {any_out['params'] / 1e6:.2f} M parameters. "
          f"One step = {gflop:,.1f} GFLOP (FlopCounterMode, forward + backward). {args.rounds} rounds, "
          f"{args.steps} timed steps per worker after one warm-up step (the counted one); peak = best {args.gemm_n}³ `torch.mm` of "
          f"{args.gemm_reps} in the same worker, before and after its steps.\n")
    peak = {prec: max(pk for (pp, _), outs in res.items() if pp == prec for o in outs for pk in o["peaks"])
            for prec in {c[0] for c in configs}}
    rows = []
    for (prec, alloc), outs in res.items():
        times = [t for o in outs for t in o["times"]]
        faults = [f for o in outs for f in o["faults"]]
        peaks = [pk for o in outs for pk in o["peaks"]]
        best, medt = min(times), common.med(times)
        rows.append([prec + (" (autocast)" if prec == "bf16" else ""),
                     "glibc default" if alloc == "default" else "tuned: env.malloc=tuned (mallopt: no mmap, no trim)",
                     f"{best:.2f}", f"{medt:.2f}", f"{gflop / best:.0f}", f"{gflop / medt:.0f}",
                     f"{common.med(peaks):.0f} / {peak[prec]:.0f}",
                     f"{gflop / best / peak[prec]:.2f}", f"{gflop / medt / peak[prec]:.2f}",
                     f"{common.med(faults) / 1e3:,.0f}k", f"{max(o['rss_mib'] for o in outs):,.0f}"])
    common.table(["precision", "allocator", "step min (s)", "step median (s)", "GFLOP/s best", "GFLOP/s median",
                  "GEMM peak GFLOP/s median / best", "fraction of peak (best step / best peak)",
                  "fraction (median step / best peak)", "page faults per step", "peak RSS (MiB)"], rows)
    ops = sorted(any_out["by_op"].items(), key=lambda kv: -kv[1])
    print("FLOPs of one step by op: " + ", ".join(f"`{k}` {v / 1e9:,.1f} G" for k, v in ops) + "\n")


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
