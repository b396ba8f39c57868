"""Stage 3 at speed, on the real code paths: greedy decoding that drops finished captions gives
transformers' `generate` token for token; a batch pads to its own captions and length buckets keep
an epoch's samples; the packed caption loss equals the padded one; a frozen LM held in bf16 keeps
its exact-retention guarantee; a frozen encoder is encoded once per run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from test_fuse import FAST, batch, fused, only_run, tiny_llama


def _hf_greedy(model, b, n, eos):
    """What FusedLM.generate returned before its own loop: transformers' generate on the same inputs."""
    soft = model.soft_tokens(b)
    embeds, mask, _ = model._inputs(soft, b["globals"].shape[0], None)
    with torch.no_grad(), model._signal(soft):
        out = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, num_beams=1,
                                do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return [s[: s.index(eos)] if eos in s else s for s in out.tolist()]


@pytest.mark.parametrize("kind,options", [("prefix", {}), ("cross_attn", {"layers": [0, 2], "heads": 4}),
                                          ("additive", {"layers": [1, 3], "lora_rank": 2})])
def test_greedy_decoding_drops_finished_captions_and_matches_transformers_generate(kind, options):
    model = fused(kind, options).eval()
    with torch.no_grad():  # open the gates and spread the soft tokens: the modality steers the decoding
        for name, p in model.fusion.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
            elif name.endswith(".B"):
                p.normal_(0, 0.1)
        for p in model.projector.parameters():
            p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(3)
    b = {"tokens_id": torch.zeros(12, 5, dtype=torch.long), "globals": torch.randn(12, 3, generator=g) * 3}
    free = _hf_greedy(model, b, 12, eos=None)

    def ends(t):
        return [row.index(t) if t in row else None for row in free]

    # as "eos", the token the captions reach at the most different steps: some finish early, some late
    eos = max(range(120), key=lambda t: len(set(ends(t))))
    assert len(set(ends(eos))) >= 2 and min(e for e in ends(eos) if e is not None) < 11, free
    ours = model.generate(b, 12, eos_token_id=eos, pad_token_id=eos)
    assert ours == _hf_greedy(model, b, 12, eos)
    assert model.fusion.signal is None  # the loop leaves no stale signal behind
    with_eos = model.generate(b, 12, eos_token_id=eos, with_eos=True)
    assert [r[:-1] if r and r[-1] == eos else r for r in with_eos] == ours


def test_a_batch_pads_to_its_own_captions_and_buckets_keep_each_sample_once_per_epoch():
    from modalign.data.batches import EpochSampler, PairedTensors
    from modalign.data.demo import make_demo_data
    from modalign.errors import UserError

    data = make_demo_data(n_train=160, n_val=8, n_test=8, seed=0).subset("train")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 30, (len(data),), generator=g)
    table = torch.full((len(data), 31), -1)
    for i, n in enumerate(lengths.tolist()):
        table[i, :n] = 7  # caption i: n tokens, then -1 padding
    rows = np.arange(len(data))[:, None]
    tensors = PairedTensors(data, rows, table, torch.arange(len(data)), token_text=True)
    plain, bucketed = EpochSampler(tensors, 16, seed=1), EpochSampler(tensors, 16, seed=1, bucket=4)
    spread = {}
    for name, sampler in (("plain", plain), ("bucketed", bucketed)):
        seen, widths = [], []
        for step in range(sampler.steps_per_epoch):
            b = sampler.batch(step)
            n = (b["text"] >= 0).sum(1)
            assert b["text"].shape[1] == int(n.max())  # no column that is padding in every caption
            seen += b["index"].tolist()
            widths.append(int(n.max() - n.min()))
        assert sorted(seen) == list(range(len(data)))  # every sample once per epoch
        spread[name] = np.mean(widths)
    assert spread["bucketed"] < 0.5 * spread["plain"], spread
    again = EpochSampler(tensors, 16, seed=1, bucket=4)  # a resumed run draws the same batches
    assert all(torch.equal(again.batch(s)["index"], bucketed.batch(s)["index"]) for s in (0, 7, 12))
    vectors = PairedTensors(data, rows, torch.randn(len(data), 4), torch.arange(len(data)))
    with pytest.raises(UserError, match="trainer.bucket_by_length"):
        EpochSampler(vectors, 16, seed=1, bucket=4)  # align's text is vectors: nothing to bucket by


def test_the_packed_caption_loss_equals_the_padded_cross_entropy():
    from modalign.models.fusion import caption_loss, per_example_xe

    model = fused("prefix", {})
    b = batch()
    out = model(b)
    assert out.logits.shape == (int((b["text"] >= 0).sum()), 120)  # the LM head ran on real tokens only
    # the same logits through the LM itself, padded, scored position by position
    with torch.no_grad():
        soft = model.soft_tokens(b)
        embeds, mask, n_before = model._inputs(soft, 3, b["text"][:, :-1])
        full = model.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, n_before - 1:]  # (B, L, V)
    text = b["text"]
    ce = torch.nn.functional.cross_entropy(full.transpose(1, 2), text.clamp(min=0), reduction="none")
    valid = (text >= 0).float()
    expected = (ce * valid).sum(1) / valid.sum(1)
    torch.testing.assert_close(per_example_xe(out).detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caption_loss(out)["xe"], (ce * valid).sum() / valid.sum(), rtol=1e-5, atol=1e-5)


def test_a_frozen_lm_held_in_bf16_trains_fp32_parts_and_closed_gates_equal_the_bf16_lm():
    from modalign.models.fusion import caption_loss
    from modalign.train.device import autocast

    reference = tiny_llama().to(torch.bfloat16)
    model = fused("cross_attn", {"layers": [0, 2], "heads": 4, "lora_rank": 2})
    model.hold_frozen_lm_in(torch.bfloat16)
    frozen = [p for p in model.lm.parameters() if not p.requires_grad]
    trained = [p for ps in model.components().values() for p in ps]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trained and all(p.dtype == torch.float32 for p in trained)  # fp32 master weights
    cpu = torch.device("cpu")
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 2]])
    with torch.no_grad(), autocast(cpu, "bf16"), model._signal(model.soft_tokens(batch(2))):
        assert torch.equal(model.lm(input_ids=ids).logits, reference(input_ids=ids).logits)  # tanh gates at 0
    with autocast(cpu, "bf16"):
        loss = caption_loss(model(batch()))["loss"]
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trained)
    assert sum(float(p.grad.norm()) for p in model.fusion.parameters() if p.grad is not None) > 0
    with torch.no_grad(), autocast(cpu, "bf16"):  # decoding through the bf16 LM and fp32 adapters
        assert len(model.generate(batch(), 4, eos_token_id=2)) == 3


def test_a_fuse_run_encodes_its_frozen_encoder_once_and_a_resume_sees_the_same_features(tmp_path, cache_dir,
                                                                                         tiny_lm, tiny_run):
    from modalign.models import fusion
    from modalign.recipes.fuse import FuseRecipe
    from modalign.recipes.launch import new_run

    args = [f"outputs={tmp_path / 'outputs'}", f"lm.path={tiny_lm}", f"encoder.init_from={tiny_run}", *FAST,
            "fusion=prefix"]
    fusion._FROZEN_FEATURES.clear()
    cfg, writer = new_run(args, "fuse")
    recipe = FuseRecipe(cfg, writer, progress=False)
    calls = []
    encode = fusion.FusedLM.encode

    def counting(self, b):
        calls.append(len(b["index"]))
        return encode(self, b)

    fusion.FusedLM.encode = counting
    try:
        recipe.setup()
        recipe.setup_training()
        n = sum(t.n for t in recipe.tensors.values())
        assert sum(calls) == n  # every sample of every split once, at setup
        train = recipe.tensors["train"]
        b = train.batch(torch.tensor([3, 0, 5]))
        recipe.model.eval()
        with torch.no_grad():
            direct = encode(recipe.model, {k: v for k, v in b.items() if k != "features"})
        torch.testing.assert_close(b["features"], direct.float(), rtol=1e-5, atol=1e-6)
        recipe.trainer.fit(None)
        recipe.writer.close()
        assert sum(calls) == n  # training and evaluation encoded nothing again
    finally:
        fusion.FusedLM.encode = encode
    # a second run on the same data and align run (a sweep's next in-process job) reuses them
    cfg, writer = new_run([*args, "seed=1"], "fuse")
    FuseRecipe(cfg, writer, progress=False).setup()
    writer.close()
    assert sum(calls) == n


def test_a_bf16_fuse_run_through_the_cli_records_its_precision_and_reliance(tmp_path, cache_dir, tiny_lm, tiny_run):
    p = run_cli(["train", "--quiet", "--recipe", "fuse", f"lm.path={tiny_lm}", f"encoder.init_from={tiny_run}",
                 *FAST, "fusion=cross_attn", "fusion.layers=[4,20]", "fusion.lora_rank=2", "trainer.precision=bf16",
                 "trainer.max_steps=2", "trainer.eval_every=2", "eval.retention=true"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    run = only_run(tmp_path)
    summary = json.loads((run / "facts" / "summary.json").read_text())
    assert summary["precision"] == "bf16"
    assert np.isfinite(summary["test"]["retention/ppl_ratio"]) and np.isfinite(summary["test"]["cider_d"])
    # the reliance instruments: per example in scores.parquet, their means in the summary, and the check
    import pandas as pd

    scores = pd.read_parquet(run / "facts" / "scores.parquet")
    for name in ("reliance_gap", "first_token_jsd"):
        assert scores[name].mean() == pytest.approx(summary["test"][name], rel=1e-4, abs=1e-6)
    checks = {c["name"]: c for c in json.loads((run / "run.json").read_text())["checks"]}
    assert checks["modality_used"]["value"] == pytest.approx(summary["test"]["reliance_gap"], abs=1e-5)


def test_the_reliance_gap_is_zero_without_modality_and_positive_once_captions_depend_on_it():
    """A prefix model overfit on four samples with distinct captions needs its own soft tokens to
    caption (gap > 0 for every sample); the no-modality floor's gap is exactly 0."""
    from modalign.models.fusion import caption_loss, first_token_jsd, reliance_gap

    g = torch.Generator().manual_seed(5)
    b = {"tokens_id": torch.zeros(4, 5, dtype=torch.long), "globals": torch.randn(4, 3, generator=g) * 2,
         "text": torch.tensor([[5, 6, 7, 2], [8, 9, 10, 2], [11, 12, 2, -1], [13, 14, 15, 2]])}
    floor = fused("none", {"tokens": 3})
    out = floor(b)
    assert torch.equal(reliance_gap(floor, b, out), torch.zeros(4))
    assert float(first_token_jsd(out).max()) < 1e-6  # every sample's first token: the same distribution
    model = fused("prefix", {})
    params = [p for ps in model.components().values() for p in ps]
    opt = torch.optim.Adam(params, lr=3e-3)
    before = reliance_gap(model, b, model(b))
    for _ in range(150):
        loss = caption_loss(model(b))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        gap = reliance_gap(model, b, model(b))
    assert float(gap.min()) > 0.05 and float(gap.mean()) > 3 * abs(float(before.mean())), (before, gap)
    with torch.no_grad():  # the four captions start with four different words: so do the distributions
        jsd = first_token_jsd(model(b))  # (small: a random tiny LM's logits are near-uniform whatever its input)
    assert float(jsd.min()) > 1e-4 and float(jsd.max()) <= math.log(2), jsd
    # the first sample's mismatched input can come from outside the batch (the previous batch's last)
    with torch.no_grad():
        out = model(b)
        assert torch.allclose(reliance_gap(model, b, out, donor=out.soft[-1:]), gap)
        assert float(reliance_gap(model, b, out, donor=out.soft[:1])[0]) == pytest.approx(0.0, abs=1e-6)
