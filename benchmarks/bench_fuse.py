# .venv/bin/python benchmarks/bench_fuse.py --rounds 3      (smoke check: --quick)
"""Stage 3 (`fuse`): the recipe's training step against a bare transformers loop, LM load times, and
decoding throughput, and the recipe's step in fp32 against bf16 autocast, side by side in one run.

Step. ours = `recipe.trainer._train_step()` of a real FuseRecipe (fusion=prefix, the default: k = 8
soft tokens from the MLP projector, batch 16 demo captions, fp32), composed as `modalign train
--recipe fuse` composes it. bare = a plain loop: a second copy of the same frozen SmolLM2 (loaded
from the same cache), a deep copy of the same projector and frozen stage-2 model, the same batches
from the same sampler, `inputs_embeds = [soft tokens, bos, caption]`, transformers' own
`labels=` loss, backward, `clip_grad_norm_`, one AdamW. The two alternate step by step (ABBA);
ratio = median bare step / median ours step (goal >= 0.9).

Load. `load_lm` in a fresh process: cold (an empty cache: GGUF read and dequantized, fp32 cache
written) and cached; the reference is transformers' own `from_pretrained(gguf_file=...)`.

Decode. Greedy captions of 64 test samples, batch 32, up to 40 new tokens: `FusedLM.generate` (ours)
against `lm.generate(inputs_embeds=...)` on the bare copy, alternating; captions per second.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CACHE = common.HERE / ".bench-cache"


def build_recipe(args, *extra: str):
    from modalign.recipes.fuse import FuseRecipe
    from modalign.recipes.launch import new_run

    out = CACHE / "outputs"
    init = args.align or "auto"
    overrides = [f"outputs={out}", f"encoder.init_from={init}", "data.n_val=64", "data.n_test=200",
                 "trainer.max_steps=1000", "eval.retention=false", *extra]
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


def decode_rows(recipe, bare, rounds: int, n: int = 64, bs: int = 32, max_new: int = 40):
    import torch

    data = recipe.tensors["test"]
    ours_t, bare_t = [], []
    recipe.model.eval()
    for r in range(rounds):
        for side in (("ours", "bare") if r % 2 == 0 else ("bare", "ours")):
            t0 = time.perf_counter()
            for start in range(0, n, bs):
                batch = data.batch(torch.arange(start, start + bs))
                if side == "ours":
                    recipe.model.generate(batch, max_new, eos_token_id=recipe.eos, pad_token_id=recipe.eos)
                else:
                    bare.generate(batch, max_new)
            (ours_t if side == "ours" else bare_t).append(n / (time.perf_counter() - t0))
        print(f"# decode round {r + 1}/{rounds}", file=sys.stderr)
    return ours_t, bare_t


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
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 2
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODALIGN_CACHE", str(CACHE))
    loads = load_rows(1 if args.quick else args.rounds)
    recipe, writer = build_recipe(args)
    bare = BareLoop(recipe)
    ours_s, bare_s = step_rows(recipe, bare, args.rounds, args.steps)
    ours_d, bare_d = decode_rows(recipe, bare, max(1, args.rounds - 1))
    del bare
    low, low_writer = build_recipe(args, "trainer.precision=bf16")
    fp32_s, bf16_s = precision_rows(recipe, low, args.rounds, args.steps)
    writer.close()
    low_writer.close()

    common.header("Stage 3: fuse step, LM load, decoding", extra=f"{args.threads} torch threads")
    print(f"Prefix fusion (8 soft tokens, MLP projector {sum(p.numel() for p in recipe.model.projector.parameters()):,} "
          f"trainable parameters), SmolLM2-135M frozen, batch {recipe.trainer_cfg.batch_size} demo captions, fp32.\n")
    common.table(["step", "ours (s)", "bare transformers loop (s)", "ratio bare/ours (goal >= 0.9)"],
                 [["median", common.fmt(common.med(ours_s)), common.fmt(common.med(bare_s)),
                   common.fmt(common.med(bare_s) / common.med(ours_s))],
                  ["min", common.fmt(min(ours_s)), common.fmt(min(bare_s)), common.fmt(min(bare_s) / min(ours_s))]])
    common.table(["LM load (fresh process)", "load (s), median", "process wall (s)", "peak RSS (MiB)"],
                 [[name, common.fmt(common.med([x[0] for x in v])), common.fmt(common.med([x[1] for x in v])),
                   common.fmt(max(x[2] for x in v), 0)]
                  for name, v in (("ours, cold (GGUF dequantized, cache written)", loads["cold"]),
                                  ("ours, cached (fp32 safetensors)", loads["cached"]),
                                  ("transformers from_pretrained(gguf_file=...)", loads["bare"]))])
    common.table(["greedy decoding, 64 captions, batch 32, <= 40 tokens", "captions/s, median", "ratio ours/bare"],
                 [["ours (FusedLM.generate)", common.fmt(common.med(ours_d)), common.fmt(common.med(ours_d) / common.med(bare_d))],
                  ["bare (lm.generate with inputs_embeds)", common.fmt(common.med(bare_d)), ""]])
    common.table(["the recipe's step, same batches", "median (s)", "min (s)", "speed vs fp32"],
                 [["fp32 (trainer.precision=fp32, the fuse default)", common.fmt(common.med(fp32_s)),
                   common.fmt(min(fp32_s)), "1.00"],
                  ["bf16 autocast (trainer.precision=bf16)", common.fmt(common.med(bf16_s)), common.fmt(min(bf16_s)),
                   common.fmt(common.med(fp32_s) / common.med(bf16_s))]])
    print(json.dumps({"step_ratio": common.med(bare_s) / common.med(ours_s),
                      "bf16_speed": common.med(fp32_s) / common.med(bf16_s)}), file=sys.stderr)


if __name__ == "__main__":
    main()
