# .venv/bin/python benchmarks/bench_step.py --rounds 5      (smoke check: --quick; --encoders transformer,cnn)
"""Step overhead: the `align` recipe's training step against a bare PyTorch loop, side by side.

ours  = `recipe.trainer._train_step()` of a real AlignRecipe, composed as `modalign train` composes it
        (`modalign.recipes.launch.new_run` with the overrides below, then `AlignRecipe.setup()` and
        `setup_training()`), on the demo data, default config apart from the encoder.
bare  = a plain loop over a deep copy of the same AlignModel (same weights at the start): the same
        batches from the same sampler (`recipe.sampler.batch(step)`), encoder + head + text projection
        under the same autocast (the trainer's resolved precision), L2-normalised features in fp32,
        open_clip's `ClipLoss` with the same logit scale, backward, `clip_grad_norm_` at the recipe's
        grad_clip, one `torch.optim.AdamW` with the recipe's betas/eps/lr/weight decay. No scheduler,
        no logging, no per-component gradient norms, no soft targets.

Both run in this one process with the same `torch.set_num_threads`, alternating in ABBA order round
by round (ours, bare, bare, ours, ...), each round `--steps` optimizer steps after warm-up steps.
Throughput = batch_size x steps / wall seconds. If the ratio ours/bare is below 0.95, a profile of
both (torch.profiler, self CPU time by op) says which ops the recipe adds.

open_clip_torch is a bench-only dependency: benchmarks/common.py installs it with --no-deps into
benchmarks/.bench-deps (gitignored) and loads only open_clip/loss.py from its file.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/bench_step.py --rounds 5"


def build_recipe(overrides: list[str], root: str):
    from modalign.recipes.align import AlignRecipe
    from modalign.recipes.launch import new_run

    cfg, run = new_run([f"outputs={root}", *overrides], "align")
    recipe = AlignRecipe(cfg, run, progress=False)
    recipe.setup()
    recipe.setup_training()
    return recipe


class BareLoop:
    """The reference: what a minimal PyTorch CLIP training loop does per step."""

    def __init__(self, recipe, clip_loss_cls):
        import torch

        self.torch = torch
        self.model = copy.deepcopy(recipe.model)
        self.sampler = recipe.sampler
        t, o = recipe.trainer_cfg, recipe.optim_cfg
        g = o.groups["encoder"]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=g.lr, weight_decay=g.weight_decay,
                                     betas=tuple(o.betas), eps=o.eps)
        self.loss = clip_loss_cls()
        self.grad_clip = t.grad_clip
        self.precision = recipe.trainer.precision
        self.step = 0

    def features(self, batch):
        import torch.nn.functional as F

        m = self.model
        pooled, tokens = m.encoder(batch["tokens_id"], batch["tokens_cont"], batch["mask"], batch["globals"])
        emb = m.head(pooled, tokens, batch["mask"], batch["globals"])["embedding"]
        text = m.text_proj(batch["text"]) if m.text_proj is not None else batch["text"]
        return F.normalize(emb.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def train_step(self) -> float:
        torch = self.torch
        self.model.train()
        batch = self.sampler.batch(self.step)
        self.opt.zero_grad(set_to_none=True)
        if self.precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                img, txt = self.features(batch)
        else:
            img, txt = self.features(batch)
        scale = self.model.logit_scale.exp().clamp(max=self.model.cfg.max_logit_scale)
        loss = self.loss(img, txt, scale)  # fp32, outside autocast, as the recipe's objective
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.step += 1
        return loss.detach()


def timed(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - t0


def loss_agreement(recipe, bare) -> tuple[float, float, int]:
    """Both losses on the first batch with identical weights (before any step)."""
    import torch

    batch = recipe.sampler.batch(0)
    with torch.no_grad():
        with recipe.trainer._autocast():
            ours = float(recipe.objective(recipe.model, batch)["loss"])
        if bare.precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                img, txt = bare.features(batch)
        else:
            img, txt = bare.features(batch)
        scale = bare.model.logit_scale.exp().clamp(max=bare.model.cfg.max_logit_scale)
        ref = float(bare.loss(img, txt, scale))
    dup = len(batch["groups"]) - len(torch.unique(batch["groups"]))
    return ours, ref, dup


def profile(recipe, bare, steps: int, top: int = 12) -> list[tuple[str, float, float, int, int]]:
    """Self CPU ms per step by op for both loops; the ops where ours spends the most extra time."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    tables = []
    for fn in (recipe.trainer._train_step, bare.train_step):
        fn()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        agg = {}
        for e in prof.key_averages():
            agg[e.key] = (e.self_cpu_time_total / 1000 / steps, e.count / steps)
        tables.append(agg)
    ours, ref = tables
    rows = []
    for k in set(ours) | set(ref):
        a, ca = ours.get(k, (0.0, 0))
        b, cb = ref.get(k, (0.0, 0))
        rows.append((k, a, b, ca, cb))
    rows.sort(key=lambda r: r[1] - r[2], reverse=True)
    return rows[:top]


def component_costs(recipe, reps: int = 20) -> dict[str, float]:
    """ms per call of the recipe-only pieces, timed alone after a real backward."""
    import torch

    from modalign.losses.contrastive import clip_loss
    from modalign.train.loop import grad_norms

    tr = recipe.trainer
    batch = recipe.sampler.batch(0)
    with tr._autocast():
        out, t, scale, _ = recipe.model(batch)
    m = out.embedding.detach().float().requires_grad_()
    t = t.detach().float().requires_grad_()
    loss = recipe.objective(recipe.model, batch)["loss"]
    loss.backward()
    comps = recipe.model.components()
    res = {}
    t0 = time.perf_counter()
    for _ in range(reps):
        grad_norms(comps)
    res["grad_norms per component (3 groups, float() each)"] = (time.perf_counter() - t0) / reps * 1000
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.nn.utils.clip_grad_norm_(recipe.model.parameters(), 1.0)
    res["clip_grad_norm_ (both loops)"] = (time.perf_counter() - t0) / reps * 1000
    s = scale.detach()
    ocl = common.load_clip_loss_module().ClipLoss()
    for name, fn in (("soft-target clip_loss fwd+bwd (ours)", lambda: clip_loss(m, t, s, batch["groups"])["clip"]),
                     ("open_clip ClipLoss fwd+bwd (bare)", lambda: ocl(m, t, s))):
        t0 = time.perf_counter()
        for _ in range(reps):
            m.grad = t.grad = None
            fn().backward()
        res[name] = (time.perf_counter() - t0) / reps * 1000
    return res


def run_encoder(encoder: str, args, clip_loss_cls) -> dict:
    import torch

    root = tempfile.mkdtemp(prefix="modalign-bench-step-")
    overrides = [f"encoder={encoder}", f"trainer.threads={args.threads}", "trainer.max_steps=100000"]
    if args.quick:
        overrides += ["data.n_train=1024", "data.n_val=256", "data.n_test=256"]
    recipe = build_recipe(overrides, root)
    torch.set_num_threads(args.threads)
    bare = BareLoop(recipe, clip_loss_cls)
    ours_loss, ref_loss, dup = loss_agreement(recipe, bare)
    for _ in range(args.warmup):
        recipe.trainer._train_step()
        bare.train_step()
    fns = {"ours": recipe.trainer._train_step, "bare": bare.train_step}
    secs = {"ours": [], "bare": []}
    for r in range(args.rounds):
        order = ("ours", "bare") if r % 2 == 0 else ("bare", "ours")
        for name in order:
            secs[name].append(timed(fns[name], args.steps))
        print(f"  {encoder} round {r + 1}/{args.rounds}: ours {secs['ours'][-1]:.2f} s, bare {secs['bare'][-1]:.2f} s "
              f"({args.steps} steps each)", file=sys.stderr)
    b = recipe.sampler.batch_size
    res = {"encoder": encoder, "batch": b, "precision": recipe.trainer.precision, "threads": torch.get_num_threads(),
           "secs": secs, "ours_loss": ours_loss, "ref_loss": ref_loss, "dup": dup,
           "params": sum(p.numel() for p in recipe.model.parameters())}
    ratio = [(b * args.steps / o) / (b * args.steps / r) for o, r in zip(secs["ours"], secs["bare"])]
    res["ratios"] = ratio
    if common.med(ratio) < 0.95 or args.profile:
        res["profile"] = profile(recipe, bare, steps=3 if args.quick else 5)
        res["components"] = component_costs(recipe)
    return res


def main() -> None:
    p = common.bench_args(__doc__.split("\n")[0], default_rounds=5)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per round (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both loops (default 2)")
    p.add_argument("--encoders", default="transformer,cnn", help="encoder configs to measure (default transformer,cnn)")
    p.add_argument("--profile", action="store_true", help="profile even when the goal is met")
    args = p.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 2)
    args.steps = args.steps or (3 if args.quick else 20)

    clip_mod = common.load_clip_loss_module()
    results = [run_encoder(e, args, clip_mod.ClipLoss) for e in args.encoders.split(",") if e]

    common.header("Step overhead: align recipe vs a bare PyTorch + open_clip ClipLoss loop", COMMAND,
                  f"open_clip_torch {common.open_clip_version()} (bench-only, --no-deps)")
    print(f"{args.rounds} rounds x {args.steps} optimizer steps per loop, ABBA order, after {args.warmup} warm-up "
          f"steps each; demo data{' (quick: 1,024 train samples)' if args.quick else ''}, default config "
          "(head mlp, loss clip, grad_clip 1.0).\n")
    rows = []
    for r in results:
        b = r["batch"]
        thr = {k: [b * args.steps / s for s in v] for k, v in r["secs"].items()}
        rows.append([f"{r['encoder']} ({r['params'] / 1e6:.2f} M params)", b, r["precision"], r["threads"],
                     common.fmt(min(r["secs"]["ours"]) / args.steps * 1000, 0),
                     common.fmt(common.med(r["secs"]["ours"]) / args.steps * 1000, 0),
                     common.fmt(common.med(r["secs"]["bare"]) / args.steps * 1000, 0),
                     common.fmt(max(thr["ours"]), 0), common.fmt(common.med(thr["ours"]), 0),
                     common.fmt(max(thr["bare"]), 0), common.fmt(common.med(thr["bare"]), 0),
                     f"{common.med(r['ratios']):.3f} ({min(r['ratios']):.3f}–{max(r['ratios']):.3f})",
                     "yes" if common.med(r["ratios"]) >= 0.95 else "**no**"])
    common.table(["encoder", "batch", "precision", "threads", "ours ms/step min", "ours ms/step median",
                  "bare ms/step median", "ours samples/s best", "ours samples/s median", "bare samples/s best",
                  "bare samples/s median", "ratio ours/bare: median of rounds (range)", "≥ 0.95"], rows)
    print("Loss on the first batch with identical weights (the recipe's soft-target loss equals ClipLoss "
          "when no two captions of the batch are identical):\n")
    common.table(["encoder", "ours (recipe objective)", "open_clip ClipLoss", "identical captions in batch"],
                 [[r["encoder"], f"{r['ours_loss']:.5f}", f"{r['ref_loss']:.5f}", r["dup"]] for r in results])
    for r in results:
        if "profile" in r:
            print(f"Where the recipe's extra time goes ({r['encoder']}): self CPU time per step by op, ours - bare "
                  "(torch.profiler, top ops by difference):\n")
            common.table(["op", "ours ms/step", "bare ms/step", "ours calls/step", "bare calls/step"],
                         [[f"`{k}`", f"{a:.1f}", f"{b:.1f}", f"{ca:.0f}", f"{cb:.0f}"] for k, a, b, ca, cb in r["profile"]])
            print(f"Recipe-only pieces timed alone ({r['encoder']}, ms per call):\n")
            common.table(["piece", "ms"], [[k, f"{v:.2f}"] for k, v in r["components"].items()])


if __name__ == "__main__":
    main()
