# .venv/bin/python benchmarks/bench_bf16.py --rounds 2      (smoke check: --quick)
"""Where the bf16 training step's time goes: a torch.profiler breakdown of `Trainer._train_step()`
under bf16 autocast, by kind of work, for the model of bench_flops.py (transformer width 256,
4 layers, 128 tokens, batch 256, MLP head, CLIP loss), and the step's fraction of the bf16 GEMM peak
measured in the same worker.

Kinds: GEMM (mm, addmm, bmm, linear), attention (the CPU flash-attention kernels), casts (to /
_to_copy / copy_: autocast's conversions to and from bf16), normalisation (layer norm and its
backward), activations (GELU and backward), other elementwise and reductions (add, mul, sum, ...),
optimizer (AdamW's foreach kernels), the rest. Self CPU time of each op, summed over the profiled
steps; shares of the total.

Workers: one fresh subprocess per configuration and round, alternating:
  flash attention     bf16 autocast with torch's default CPU attention kernel (flash): before
  math attention      bf16 autocast with the math SDPA path: what `trainer.precision=bf16` does now
                      (modalign.train.device.CPU_BF16_ATTENTION)
  math + fused AdamW  the same with AdamW's fused CPU kernel instead of its foreach one

Fractions use one peak for every configuration: the median over all workers of each worker's best
2048³ bf16 `torch.mm` (measured before and after its steps; single measurements range widely here).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

KINDS = [  # (kind, substrings of aten op names), first match wins
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn")),
    ("casts", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone")),
    ("normalisation", ("layer_norm",)),
    ("activations", ("gelu",)),
    ("optimizer", ("_foreach", "adam", "_fused")),
    ("elementwise and reductions", ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::sum", "aten::mean",
                                    "aten::norm", "aten::exp", "aten::log", "aten::sqrt", "aten::where",
                                    "aten::masked_fill", "aten::softmax", "aten::_softmax", "aten::cat",
                                    "aten::embedding", "aten::fill_", "aten::zero_", "aten::neg", "aten::pow",
                                    "aten::linalg_vector_norm", "aten::clamp", "aten::max", "aten::index",
                                    "aten::gather", "aten::scatter", "aten::eq", "aten::ge", "aten::lt")),
]
CONFIGS = ["flash attention", "math attention", "math + fused AdamW"]


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "rest"


def worker(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_flops import build, cpu_attention_formulas, gemm_peak
    from modalign.train.allocator import tune_malloc
    from torch.utils.flop_counter import FlopCounterMode

    from modalign.train import device

    tune_malloc("tuned")
    torch.set_num_threads(args.threads)
    device.CPU_BF16_ATTENTION = "flash" if args.config.startswith("flash") else "math"
    trainer, _ = build("bf16", args.batch, args.tokens, 256, args.depth)
    if args.config.endswith("fused AdamW"):
        for g in trainer.opt.param_groups:
            g["fused"], g["foreach"] = True, False
    peaks = [gemm_peak("bf16", 2048, 4 if args.quick else 8)]
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as fc:
        trainer._train_step()
    flops = fc.get_total_flops()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer._train_step()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            trainer._train_step()
    by_op: dict[str, float] = {}
    for e in prof.key_averages():
        by_op[e.key] = by_op.get(e.key, 0.0) + e.self_cpu_time_total / 1e6 / args.profile_steps
    peaks.append(gemm_peak("bf16", 2048, 4 if args.quick else 8))
    return {"flops": flops, "times": times, "peaks": peaks, "by_op": by_op, "precision": trainer.precision}


def main() -> int:
    p = common.bench_args(__doc__.split("\n")[0], 2)
    p.add_argument("--worker", action="store_true", help="(internal) one measurement")
    p.add_argument("--config", default="math attention")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args()
    if args.quick:
        args.batch, args.tokens, args.depth, args.steps, args.profile_steps, args.rounds = 32, 64, 2, 1, 1, 1
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    res = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for c in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
            print(f"# round {r + 1}/{args.rounds}: {c}", file=sys.stderr, flush=True)
            extra = ["--quick"] if args.quick else []
            res[c].append(common.run_worker([__file__, "--worker", "--config", c, "--threads", str(args.threads),
                                             "--steps", str(args.steps), "--profile-steps", str(args.profile_steps),
                                             "--batch", str(args.batch), "--tokens", str(args.tokens),
                                             "--depth", str(args.depth), *extra]))
    common.header("bf16 step: where the time goes", extra=f"{args.threads} torch threads, {args.rounds} rounds")
    flops = res[CONFIGS[0]][0]["flops"]
    print(f"Model: bench_flops.py's (transformer width 256, {args.depth} layers, {args.tokens} tokens + CLS, batch "
          f"{args.batch}, MLP head, CLIP loss); one step = {flops / 1e9:,.1f} GFLOP of matmuls and attention. "
          f"{args.steps} timed steps per worker after a warm-up, then {args.profile_steps} profiled.\n")
    rows = []
    peak = common.med([max(o["peaks"]) for c in CONFIGS for o in res[c]])
    low, high = min(p for c in CONFIGS for o in res[c] for p in o["peaks"]), max(p for c in CONFIGS for o in res[c] for p in o["peaks"])
    for c in CONFIGS:
        t = [x for o in res[c] for x in o["times"]]
        rows.append([c, common.fmt(min(t), 2), common.fmt(common.med(t), 2), f"{flops / min(t) / 1e9:,.0f}",
                     f"{peak:,.0f}", f"{flops / min(t) / 1e9 / peak:.2f}", f"{flops / common.med(t) / 1e9 / peak:.2f}"])
    common.table(["configuration", "step min (s)", "step median (s)", "GFLOP/s best", "bf16 GEMM peak GFLOP/s",
                  "fraction (best step)", "fraction (median step)"], rows)
    print(f"Peak: {peak:,.0f} GFLOP/s, the median of the workers' best; single measurements ranged "
          f"{low:,.0f}-{high:,.0f}.\n")
    for c in CONFIGS:
        kinds: dict[str, float] = {}
        ops: dict[str, float] = {}
        for o in res[c]:
            for name, s in o["by_op"].items():
                kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + s / len(res[c])
                ops[name] = ops.get(name, 0.0) + s / len(res[c])
        total = sum(kinds.values())
        print(f"Profile, {c}: self CPU seconds per step by kind (median worker's total {total:.2f} s; the "
              "profiler adds a little to each op):\n")
        common.table(["kind", "s per step", "share"],
                     [[k, common.fmt(v, 3), f"{100 * v / total:.1f}%"] for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])])
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
        print("Top ops: " + ", ".join(f"`{n}` {s:.3f} s ({kind_of(n)})" for n, s in top) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
