# .venv/bin/python benchmarks/bench_fuse.py --rounds 3 [--fuse RUN]     (smoke check: --quick)
"""Stage 3 (`fuse`): the recipe's training step against a bare transformers loop and against the code
before the stage-3 speed work, LM load times, greedy decoding against transformers' `generate`, and
the recipe's step in fp32 against bf16 (where the CPU has native bf16), side by side in one run.

Before. The recipe's fp32 step at its defaults, in a fresh process per round, with the code of the
git revision `--before` (default dd31c65, the last commit before the speed work: captions padded
to the longest in the data, the LM head on every position) against this checkout's at its defaults
and with `trainer.bucket_by_length=8`, alternating; each process times `--steps` + 4 steps after 2
warm-up steps.

Step. ours = `recipe.trainer._train_step()` of a real FuseRecipe (fusion=prefix, the default: k = 8
soft tokens from the MLP projector, batch 16 demo captions, fp32), composed as `modalign train
--recipe fuse` composes it. bare = a plain loop: a second copy of the same frozen SmolLM2 (loaded
from the same cache), a deep copy of the same projector and frozen stage-2 model, the same batches
from the same sampler, `inputs_embeds = [soft tokens, bos, caption]`, transformers' own
`labels=` loss, backward, `clip_grad_norm_`, one AdamW. The two alternate step by step (ABBA);
ratio = median bare step / median ours step (goal >= 0.9).

Load. `load_lm` in a fresh process: cold (an empty cache: GGUF read and dequantized, fp32 cache
written) and cached; the reference is transformers' own `from_pretrained(gguf_file=...)`.

Decode. Greedy captions of 128 test samples, up to 40 new tokens: `FusedLM.generate` (ours: its own
loop, finished captions leave the batch, a preallocated KV cache) at eval.batch_size (64) against
`lm.generate(inputs_embeds=...)` on the bare copy (what FusedLM.generate called before) at batch 32
(the old eval.batch_size) and at 64, alternating; captions per second, and how many of ours are the
reference's token for token. `--fuse RUN` decodes with the trained parts of a prefix fuse run (its
best.pt), so that captions end as a trained model's do; without it, the model after the step rounds.

The align run whose encoder is fused: `--align RUN`, else the demo's default align run, trained once
into benchmarks/.bench-cache/outputs (encoder.init_from=auto) and reused.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CACHE = common.HERE / ".bench-cache"


BEFORE = "dd31c65"

STEP_WORKER = """
import json, sys, time
from modalign.recipes.fuse import FuseRecipe
from modalign.recipes.launch import new_run
overrides, steps = json.loads(sys.argv[1]), int(sys.argv[2])
cfg, writer = new_run(overrides, "fuse")
r = FuseRecipe(cfg, writer, progress=False)
r.setup()
r.setup_training()
for _ in range(2):
    r.trainer._train_step()
ts = []
for _ in range(steps):
    t = time.perf_counter()
    r.trainer._train_step()
    ts.append(time.perf_counter() - t)
writer.close()
print(json.dumps({"steps": ts}))
"""


def before_rows(args, rounds: int, steps: int):
    """The recipe's fp32 step at its defaults with the code of `args.before` and with this checkout's,
    each in fresh processes, alternating. -> (before step times, now step times)."""
    import subprocess

    root = common.HERE.parent
    overrides = [f"outputs={CACHE / 'outputs'}", f"encoder.init_from={args.align or 'auto'}", "data.n_val=64",
                 "data.n_test=200", "trainer.max_steps=1000", "eval.retention=false", "trainer.precision=fp32",
                 f"trainer.threads={args.threads}"]
    with tempfile.TemporaryDirectory() as d:
        tree = Path(d) / "before"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        try:
            times = {"before": [], "now": [], "buckets": []}
            for r in range(rounds):
                for side in (list(times) if r % 2 == 0 else list(reversed(times))):
                    src = tree / "src" if side == "before" else root / "src"
                    extra = ["trainer.bucket_by_length=8"] if side == "buckets" else []
                    m = common.run_worker(["-c", STEP_WORKER, json.dumps(overrides + extra), str(steps)],
                                          {"PYTHONPATH": str(src), "MODALIGN_CACHE": os.environ["MODALIGN_CACHE"]})
                    times[side] += m["steps"]
                print(f"# before/now round {r + 1}/{rounds}: " +
                      ", ".join(f"{k} {common.med(v):.2f} s" for k, v in times.items()), file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True)
    return times


def build_recipe(args, *extra: str):
    from modalign.recipes.fuse import FuseRecipe
    from modalign.recipes.launch import new_run

    out = CACHE / "outputs"
    init = args.align or "auto"
    overrides = [f"outputs={out}", f"encoder.init_from={init}", "data.n_val=64", "data.n_test=200",
                 "trainer.max_steps=1000", "eval.retention=false", f"trainer.threads={args.threads}", *extra]
    cfg, writer = new_run(overrides, "fuse")
    recipe = FuseRecipe(cfg, writer, progress=False)
    recipe.setup()
    recipe.setup_training()
    return recipe, writer


class BareLoop:
    def __init__(self, recipe):
        import torch

        from modalign.models.lm import load_lm

        self.torch = torch
        self.lm = load_lm(recipe.lm_opts).model  # a second copy, without modalign's hooks
        self.modality = copy.deepcopy(recipe.model.modality)
        self.projector = copy.deepcopy(recipe.model.projector)
        self.sampler, self.bos, self.eos = recipe.sampler, recipe.start_ids, recipe.eos
        g = recipe.optim_cfg.groups["projector"]
        self.opt = torch.optim.AdamW(self.projector.parameters(), lr=g.lr, weight_decay=g.weight_decay,
                                     betas=tuple(recipe.optim_cfg.betas), eps=recipe.optim_cfg.eps)
        self.clip = recipe.trainer_cfg.grad_clip
        self.step = 0

    def soft(self, batch):
        with self.torch.no_grad():
            feats = self.modality.encode_modality(batch).embedding
        return self.projector(feats.float())

    def inputs(self, batch, text):
        torch = self.torch
        soft = self.soft(batch)
        emb = self.lm.get_input_embeddings()
        b = soft.shape[0]
        start = emb(torch.tensor(self.bos)).unsqueeze(0).expand(b, -1, -1)
        parts, mask = [soft, start], [torch.ones(b, soft.shape[1] + len(self.bos), dtype=torch.long)]
        if text is not None:
            parts.append(emb(text.clamp(min=0)))
            mask.append((text >= 0).long())
        return torch.cat(parts, 1), torch.cat(mask, 1)

    def train_step(self):
        torch = self.torch
        batch = self.sampler.batch(self.step)
        text = batch["text"]
        self.opt.zero_grad(set_to_none=True)
        embeds, mask = self.inputs(batch, text)
        n_before = embeds.shape[1] - text.shape[1]
        # transformers' convention: labels[t] is the token at t, predicted from t-1 (it shifts itself)
        labels = torch.cat([torch.full((text.shape[0], n_before), -100), text.masked_fill(text < 0, -100)], 1)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.projector.parameters(), self.clip)
        self.opt.step()
        self.step += 1
        return float(out.loss.detach())

    def generate(self, batch, max_new_tokens):
        with self.torch.no_grad():
            embeds, mask = self.inputs(batch, None)
            return self.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, num_beams=1, eos_token_id=self.eos, pad_token_id=self.eos)


def step_rows(recipe, bare, rounds: int, steps: int):
    ours_t, bare_t = [], []
    for _ in range(2):  # warm-up
        recipe.trainer._train_step()
        bare.train_step()
    for r in range(rounds):
        for i in range(steps):
            order = (recipe.trainer._train_step, bare.train_step) if (r + i) % 2 == 0 else \
                (bare.train_step, recipe.trainer._train_step)
            for fn in order:
                t0 = time.perf_counter()
                fn()
                (ours_t if fn == recipe.trainer._train_step else bare_t).append(time.perf_counter() - t0)
        print(f"# step round {r + 1}/{rounds}: ours {common.med(ours_t):.2f} s, bare {common.med(bare_t):.2f} s",
              file=sys.stderr)
    return ours_t, bare_t


def precision_rows(fp32, bf16, rounds: int, steps: int):
    """The recipe's own step in fp32 and under bf16 autocast (trainer.precision=bf16), alternating."""
    a_t, b_t = [], []
    for _ in range(2):  # warm-up
        fp32.trainer._train_step()
        bf16.trainer._train_step()
    for r in range(rounds):
        for i in range(steps):
            order = (fp32, bf16) if (r + i) % 2 == 0 else (bf16, fp32)
            for rec in order:
                t0 = time.perf_counter()
                rec.trainer._train_step()
                (a_t if rec is fp32 else b_t).append(time.perf_counter() - t0)
        print(f"# precision round {r + 1}/{rounds}: fp32 {common.med(a_t):.2f} s, bf16 {common.med(b_t):.2f} s",
              file=sys.stderr)
    return a_t, b_t


def decode_rows(recipe, bare, rounds: int, n: int = 128, max_new: int = 40):
    """Greedy captions of the first n test samples: ours at eval.batch_size, the bare lm.generate at
    batch 32 and 64, alternating. -> ({side: [captions/s]}, {side: identical to bare-32 (count)})."""
    import torch

    data = recipe.tensors["test"]
    eos, ours_bs = recipe.eos, recipe.eval_cfg.batch_size
    recipe.model.eval()

    def run(side):
        out = []
        bs = ours_bs if side == "ours" else int(side.split("-")[1])
        for start in range(0, n, bs):
            batch = data.batch(torch.arange(start, min(n, start + bs)))
            if side == "ours":
                out += recipe.model.generate(batch, max_new, eos_token_id=eos, pad_token_id=eos)
            else:  # the same inputs (our soft tokens and start) through transformers' generate on the bare LM
                soft = recipe.model.soft_tokens(batch)
                embeds, mask, _ = recipe.model._inputs(soft, soft.shape[0], None)
                seqs = bare.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new,
                                        do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=eos)
                out += [s[: s.index(eos)] if eos in s else s for s in seqs.tolist()]
        return out

    speed = {"ours": [], "bare-32": [], "bare-64": []}
    same = {}
    with torch.no_grad():
        reference = run("bare-32")
        for r in range(rounds):
            for side in (list(speed) if r % 2 == 0 else list(reversed(speed))):
                t0 = time.perf_counter()
                out = run(side)
                speed[side].append(n / (time.perf_counter() - t0))
                same[side] = sum(a == b for a, b in zip(out, reference))
            print(f"# decode round {r + 1}/{rounds}", file=sys.stderr)
    lengths = [len(x) for x in reference]
    return speed, same, lengths


LOAD_OURS = "import json,sys,time; t=time.perf_counter(); from modalign.models.lm import LMOptions, load_lm; " \
            "lm=load_lm(LMOptions(cache_dir=sys.argv[1])); print(json.dumps({'s': time.perf_counter()-t, 'cached': lm.cached}))"
LOAD_BARE = "import json,time; t=time.perf_counter(); from transformers import AutoModelForCausalLM, AutoTokenizer; " \
            "from modalign.models.lm import default_lm_file; f=default_lm_file(); " \
            "AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name); " \
            "AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name); print(json.dumps({'s': time.perf_counter()-t}))"


def load_rows(rounds: int):
    rows = {"cold": [], "cached": [], "bare": []}
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            for kind in ("cold", "cached"):
                m = common.run_worker(["-c", LOAD_OURS, d], {"TQDM_DISABLE": "1"})
                rows[kind].append((m["s"], m["process_wall_s"], m["process_maxrss_mib"]))
        m = common.run_worker(["-c", LOAD_BARE], {"TQDM_DISABLE": "1"})
        rows["bare"].append((m["s"], m["process_wall_s"], m["process_maxrss_mib"]))
        print(f"# load round {r + 1}/{rounds}", file=sys.stderr)
    return rows


def main() -> None:
    p = common.bench_args(__doc__.splitlines()[0], 3)
    p.add_argument("--steps", type=int, default=6, help="training steps of each side per round (default 6)")
    p.add_argument("--align", default=None, help="an align run to fuse (default: the demo's, trained once)")
    p.add_argument("--fuse", default=None, help="a trained prefix fuse run whose parts decode (default: none)")
    p.add_argument("--before", default=BEFORE, help=f"the git revision of the 'before' step (default {BEFORE})")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 2
    import torch

    from modalign.train.device import cpu_has_bf16

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODALIGN_CACHE", str(CACHE))
    loads = load_rows(1 if args.quick else max(1, args.rounds - 1))
    steps = before_rows(args, args.rounds, args.steps + 4)
    before_s, now_s, buckets_s = steps["before"], steps["now"], steps["buckets"]
    recipe, writer = build_recipe(args, *([f"init_from={args.fuse}"] if args.fuse else []))
    bare = BareLoop(recipe)
    ours_s, bare_s = step_rows(recipe, bare, args.rounds, args.steps)
    speed, same, lengths = decode_rows(recipe, bare, max(1, args.rounds - 1), n=64 if args.quick else 128)
    del bare
    native_bf16 = cpu_has_bf16()
    if native_bf16:
        low, low_writer = build_recipe(args, "trainer.precision=bf16")
        fp32_s, bf16_s = precision_rows(recipe, low, args.rounds, args.steps)
        low_writer.close()
    writer.close()

    common.header("Stage 3: fuse step, LM load, decoding", extra=f"{args.threads} torch threads")
    print(f"Prefix fusion (8 soft tokens, MLP projector {sum(p.numel() for p in recipe.model.projector.parameters()):,} "
          f"trainable parameters), SmolLM2-135M frozen, batch {recipe.trainer_cfg.batch_size} demo captions, fp32.\n")
    common.table(["the recipe's fp32 step, fresh process per round", "median (s)", "min (s)", "speed-up (medians)"],
                 [[f"before ({args.before}: padded to the data's longest caption, LM head on every position)",
                   common.fmt(common.med(before_s)), common.fmt(min(before_s)), "1.00"],
                  ["now, default (a batch pads to its own longest caption, LM head on caption tokens only)",
                   common.fmt(common.med(now_s)), common.fmt(min(now_s)),
                   common.fmt(common.med(before_s) / common.med(now_s))],
                  ["now, trainer.bucket_by_length=8 (batches grouped by caption length)",
                   common.fmt(common.med(buckets_s)), common.fmt(min(buckets_s)),
                   common.fmt(common.med(before_s) / common.med(buckets_s))]])
    common.table(["step, same process, same batches", "ours (s)", "bare transformers loop (s)",
                  "ratio bare/ours (goal >= 0.9)"],
                 [["median", common.fmt(common.med(ours_s)), common.fmt(common.med(bare_s)),
                   common.fmt(common.med(bare_s) / common.med(ours_s))],
                  ["min", common.fmt(min(ours_s)), common.fmt(min(bare_s)), common.fmt(min(bare_s) / min(ours_s))]])
    common.table(["LM load (fresh process)", "load (s), median", "process wall (s)", "peak RSS (MiB)"],
                 [[name, common.fmt(common.med([x[0] for x in v])), common.fmt(common.med([x[1] for x in v])),
                   common.fmt(max(x[2] for x in v), 0)]
                  for name, v in (("ours, cold (GGUF dequantized, cache written)", loads["cold"]),
                                  ("ours, cached (fp32 safetensors)", loads["cached"]),
                                  ("transformers from_pretrained(gguf_file=...)", loads["bare"]))])
    n = len(lengths)
    print(f"Decoded with {'the trained parts of ' + args.fuse if args.fuse else 'the model after the step rounds'}; "
          f"caption lengths (tokens, reference): median {int(np.median(lengths))}, "
          f"{sum(x >= 40 for x in lengths)} of {n} reach the 40-token limit.\n")
    base = common.med(speed["bare-32"])
    common.table([f"greedy decoding, {n} test captions, <= 40 tokens, fp32", "captions/s, median",
                  "speed vs lm.generate batch 32", f"identical to it (of {n})"],
                 [[f"ours (FusedLM.generate, batch {recipe.eval_cfg.batch_size})", common.fmt(common.med(speed['ours'])),
                   common.fmt(common.med(speed["ours"]) / base), same["ours"]],
                  ["lm.generate(inputs_embeds=...), batch 32 (before)", common.fmt(base), "1.00", same["bare-32"]],
                  ["lm.generate(inputs_embeds=...), batch 64", common.fmt(common.med(speed["bare-64"])),
                   common.fmt(common.med(speed["bare-64"]) / base), same["bare-64"]]])
    if native_bf16:
        common.table(["the recipe's step, same batches", "median (s)", "min (s)", "speed vs fp32"],
                     [["fp32 (trainer.precision=fp32, the fuse default)", common.fmt(common.med(fp32_s)),
                       common.fmt(min(fp32_s)), "1.00"],
                      ["bf16 (frozen LM held in bf16, trainable parts fp32)", common.fmt(common.med(bf16_s)),
                       common.fmt(min(bf16_s)), common.fmt(common.med(fp32_s) / common.med(bf16_s))]])
    else:
        print("bf16 step: not measured, this CPU has no native bf16 (no avx512_bf16/amx_bf16 in /proc/cpuinfo); "
              "torch's bf16 matmuls run through a reference kernel here, tens of times slower than fp32.\n")
    print(json.dumps({"before_speedup": common.med(before_s) / common.med(now_s),
                      "step_ratio": common.med(bare_s) / common.med(ours_s),
                      "decode_speedup": common.med(speed["ours"]) / base}), file=sys.stderr)


if __name__ == "__main__":
    main()
