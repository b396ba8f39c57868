# .venv/bin/python benchmarks/bench_step.py --rounds 3      (smoke check: --quick; options: --threads 1,2 --encoders transformer,cnn --steps 10)
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

Both run in this one process with the same `torch.set_num_threads` (1 and 2 threads by default),
interleaved step by step in ABBA order (ours, bare, bare, ours, ...) so that both see the same load on
a shared machine; a round is `--steps` steps of each, after warm-up steps. Throughput = batch_size /
step seconds; the headline ratio ours/bare = median bare step / median ours step over all steps (also
shown: from the fastest steps, per round, and from the summed wall time). If the ratio ours/bare is below 0.95, a profile of
both (torch.profiler, self CPU time by op) says which ops the recipe adds.

open_clip_torch is a bench-only dependency: benchmarks/common.py installs it with --no-deps into
benchmarks/.bench-deps (gitignored) and loads only open_clip/loss.py from its file.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/bench_step.py --rounds 3"


def build_recipe(overrides: list[str], root: str):
    from modalign.recipes.align import AlignRecipe
    from modalign.recipes.launch import new_run

    cfg, writer = new_run([f"outputs={root}", *overrides], "align")
    recipe = AlignRecipe(cfg, writer, progress=False)
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

    def features_and_scale(self, batch):
        """Both sides' features (under bf16 autocast when the recipe uses it) and the logit scale."""
        torch = self.torch
        if self.precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                img, txt = self.features(batch)
        else:
            img, txt = self.features(batch)
        return img, txt, self.model.logit_scale.exp().clamp(max=self.model.cfg.max_logit_scale)

    def train_step(self) -> float:
        torch = self.torch
        self.model.train()
        batch = self.sampler.batch(self.step)
        self.opt.zero_grad(set_to_none=True)
        img, txt, scale = self.features_and_scale(batch)
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

    from modalign.train.device import autocast

    batch = recipe.sampler.batch(0)
    with torch.no_grad():
        with autocast(recipe.device, recipe.trainer.precision):
            ours = float(recipe.objective(recipe.model(batch), batch)["loss"])
        img, txt, scale = bare.features_and_scale(batch)
        ref = float(bare.loss(img, txt, scale))
    dup = len(batch["groups"]) - len(torch.unique(batch["groups"]))
    return ours, ref, dup


def profile(recipe, bare, steps: int, top: int = 12, windows: int = 2) -> list[tuple[str, float, float, int, int]]:
    """Self CPU ms per step by op for both loops (torch.profiler), each profiled in `windows`
    alternating windows of `steps` steps, keeping each op's smallest time (the least disturbed by other
    jobs); -> the ops where ours spends the most extra time."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    fns = {"ours": recipe.trainer._train_step, "bare": bare.train_step}
    best: dict[str, dict[str, tuple[float, float]]] = {"ours": {}, "bare": {}}
    for w in range(windows):
        for name in (("ours", "bare") if w % 2 == 0 else ("bare", "ours")):
            fns[name]()
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    fns[name]()
            for e in prof.key_averages():
                ms, calls = e.self_cpu_time_total / 1000 / steps, e.count / steps
                old = best[name].get(e.key)
                best[name][e.key] = (ms, calls) if old is None else (min(old[0], ms), calls)
    ours, ref = best["ours"], best["bare"]
    rows = []
    for k in set(ours) | set(ref):
        a, ca = ours.get(k, (0.0, 0))
        b, cb = ref.get(k, (0.0, 0))
        rows.append((k, a, b, ca, cb))
    rows.sort(key=lambda r: r[1] - r[2], reverse=True)
    return rows[:top]


def component_costs(recipe, reps: int = 20) -> dict[str, float]:
    """ms per call of the recipe-only pieces and their counterparts, timed alone after a real backward
    (interleaved repetitions, the minimum of each)."""
    import torch

    from modalign.losses.contrastive import clip_loss
    from modalign.train.loop import grad_norms

    from modalign.train.device import autocast

    tr = recipe.trainer
    batch = recipe.sampler.batch(0)
    with autocast(recipe.device, tr.precision):
        out = recipe.model(batch)
    m = out.modality.detach().float().requires_grad_()
    t = out.text.detach().float().requires_grad_()
    scale = out.scale
    loss = recipe.objective(recipe.model(batch), batch)["loss"]
    loss.backward()
    comps = recipe.model.components()
    s = scale.detach()
    ocl = common.load_clip_loss_module().ClipLoss()

    def soft():
        m.grad = t.grad = None
        clip_loss(m, t, s, batch["groups"])["clip"].backward()

    def hard():
        m.grad = t.grad = None
        ocl(m, t, s).backward()

    pieces = {"grad_norms per component (3 groups, float() each)": lambda: grad_norms(comps),
              "clip_grad_norm_ (both loops)": lambda: torch.nn.utils.clip_grad_norm_(recipe.model.parameters(), 1e9),
              "soft-target clip_loss fwd+bwd (ours)": soft,
              "open_clip ClipLoss fwd+bwd (bare)": hard}
    best = {k: float("inf") for k in pieces}
    for _ in range(reps):  # interleaved, the minimum of each: the cost without interference
        for k, fn in pieces.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: v * 1000 for k, v in best.items()}


def run_encoder(encoder: str, threads: int, args, clip_loss_cls) -> dict:
    import torch

    root = tempfile.mkdtemp(prefix="modalign-bench-step-")
    overrides = [f"encoder={encoder}", f"trainer.threads={threads}", "trainer.max_steps=100000"]
    if args.quick:
        overrides += ["data.n_train=1024", "data.n_val=256", "data.n_test=256"]
    recipe = build_recipe(overrides, root)
    torch.set_num_threads(threads)
    bare = BareLoop(recipe, clip_loss_cls)
    ours_loss, ref_loss, dup = loss_agreement(recipe, bare)
    for _ in range(args.warmup):
        recipe.trainer._train_step()
        bare.train_step()
    fns = {"ours": recipe.trainer._train_step, "bare": bare.train_step}
    steps = {"ours": [], "bare": []}  # per round, the seconds of each step
    for r in range(args.rounds):
        cur = {"ours": [], "bare": []}
        for i in range(args.steps):  # interleaved step by step, ABBA: both loops see the same load
            for name in (("ours", "bare") if (r * args.steps + i) % 2 == 0 else ("bare", "ours")):
                t0 = time.perf_counter()
                fns[name]()
                cur[name].append(time.perf_counter() - t0)
        for name in cur:
            steps[name].append(cur[name])
        print(f"  {encoder} {threads} thread(s) round {r + 1}/{args.rounds}: step median ours "
              f"{common.med(cur['ours']) * 1000:.0f} ms, bare {common.med(cur['bare']) * 1000:.0f} ms "
              f"({args.steps} steps each)", file=sys.stderr)
    b = recipe.sampler.batch_size
    res = {"encoder": encoder, "batch": b, "precision": recipe.trainer.precision, "threads": torch.get_num_threads(),
           "steps": steps, "ours_loss": ours_loss, "ref_loss": ref_loss, "dup": dup,
           "params": sum(p.numel() for p in recipe.model.parameters())}
    allsteps = {k: [x for rnd in v for x in rnd] for k, v in steps.items()}
    res["all"] = allsteps
    # throughput ratio ours / bare = bare step time / ours step time: per round (medians), over all steps
    res["ratios"] = [common.med(b_) / common.med(o) for o, b_ in zip(steps["ours"], steps["bare"])]
    res["ratio_med"] = common.med(allsteps["bare"]) / common.med(allsteps["ours"])
    res["ratio_min"] = min(allsteps["bare"]) / min(allsteps["ours"])
    res["ratio_sum"] = sum(allsteps["bare"]) / sum(allsteps["ours"])
    res["components"] = component_costs(recipe)
    if res["ratio_med"] < 0.95 or args.profile:
        res["profile"] = profile(recipe, bare, steps=3 if args.quick else 5)
    shutil.rmtree(root, ignore_errors=True)  # the run directory new_run made
    return res


def main() -> None:
    p = common.bench_args(__doc__.split("\n")[0], default_rounds=3)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per loop per round (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", default="1,2", help="torch intra-op threads for both loops, a list (default 1,2)")
    p.add_argument("--encoders", default="transformer,cnn", help="encoder configs to measure (default transformer,cnn)")
    p.add_argument("--profile", action="store_true", help="profile even when the goal is met")
    args = p.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 2)
    args.steps = args.steps or (3 if args.quick else 10)

    clip_mod = common.load_clip_loss_module()
    results = [run_encoder(e, int(th), args, clip_mod.ClipLoss) for th in args.threads.split(",") if th
               for e in args.encoders.split(",") if e]

    common.header("Step overhead: align recipe vs a bare PyTorch + open_clip ClipLoss loop", COMMAND,
                  f"open_clip_torch {common.open_clip_version()} (bench-only, --no-deps)")
    print(f"{args.rounds} rounds x {args.steps} optimizer steps per loop, the two loops interleaved step by step in "
          f"ABBA order, after {args.warmup} warm-up steps each; demo data{' (quick: 1,024 train samples)' if args.quick else ''}, default config "
          "(head mlp, loss clip, grad_clip 1.0).\n")
    rows = []
    for r in results:
        b, a = r["batch"], r["all"]
        rows.append([f"{r['encoder']} ({r['params'] / 1e6:.2f} M params)", b, r["precision"], r["threads"],
                     f"{min(a['ours']) * 1000:.0f} / {common.med(a['ours']) * 1000:.0f}",
                     f"{min(a['bare']) * 1000:.0f} / {common.med(a['bare']) * 1000:.0f}",
                     f"{b / common.med(a['ours']):,.0f}", f"{b / common.med(a['bare']):,.0f}",
                     f"**{r['ratio_med']:.3f}**", f"{r['ratio_min']:.3f}",
                     f"{min(r['ratios']):.3f}–{max(r['ratios']):.3f}", f"{r['ratio_sum']:.3f}",
                     "yes" if r["ratio_med"] >= 0.95 else "**no**"])
    common.table(["encoder", "batch", "precision", "threads", "ours ms/step min / median",
                  "bare ms/step min / median", "ours samples/s (median step)", "bare samples/s (median step)",
                  "ratio ours/bare (median steps)", "ratio (min steps)", "ratio per round (range)",
                  "ratio (summed wall)", "≥ 0.95"], rows)
    print("The ratio is throughput ours / bare = bare step time / ours step time. The headline uses the median "
          "over all interleaved steps; the summed wall time is sensitive to the few steps that another job "
          "pre-empts (on 2 threads one pre-empted thread stalls the other at every parallel region).\n")
    print("Loss on the first batch with identical weights (the recipe's soft-target loss equals ClipLoss "
          "when no two captions of the batch are identical):\n")
    common.table(["encoder", "threads", "ours (recipe objective)", "open_clip ClipLoss", "identical captions in batch"],
                 [[r["encoder"], r["threads"], f"{r['ours_loss']:.5f}", f"{r['ref_loss']:.5f}", r["dup"]]
                  for r in results])
    print("What the recipe adds per step, timed alone (ms per call, the minimum of 20 interleaved repetitions "
          "after a real backward): its per-component gradient norms, and its soft-target CLIP loss in place of "
          "open_clip's ClipLoss (forward + backward); `clip_grad_norm_` is in both loops. Added = grad_norms + "
          "(soft-target - ClipLoss); expected ratio = bare step / (bare step + added).\n")
    rows = []
    for r in results:
        c = r["components"]
        g, clip, soft, hard = (c[k] for k in c)
        extra = g + soft - hard
        bare_ms = common.med(r["all"]["bare"]) * 1000
        rows.append([r["encoder"], r["threads"], f"{g:.2f}", f"{clip:.2f}", f"{soft:.2f}", f"{hard:.2f}",
                     f"{extra:.2f}", f"{extra / bare_ms:.2%}", f"{bare_ms / (bare_ms + extra):.3f}"])
    common.table(["encoder", "threads", "grad_norms (ms)", "clip_grad_norm_ (ms)", "soft-target clip_loss (ms)",
                  "ClipLoss (ms)", "added per step (ms)", "of a bare step", "expected ratio"], rows)
    for r in results:
        if "profile" in r:
            print(f"Where the recipe's extra time goes ({r['encoder']}, {r['threads']} thread(s)): self CPU time per "
                  "step by op (torch.profiler; the smaller of 2 alternating windows per loop), the ops with the "
                  "largest ours - bare:\n")
            common.table(["op", "ours ms/step", "bare ms/step", "ours calls/step", "bare calls/step"],
                         [[f"`{k}`", f"{a:.1f}", f"{b:.1f}", f"{ca:.0f}", f"{cb:.0f}"] for k, a, b, ca, cb in r["profile"]])


if __name__ == "__main__":
    main()
