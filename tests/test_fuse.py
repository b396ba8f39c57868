"""Stage 3 (`fuse`): fusion variants on a real transformers causal LM, the captioning metrics, the
offline LM loader with its dequantized cache, and whole runs through the CLI (resume after SIGKILL,
checkpoints without LM weights, bad input as one line)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from modalign.errors import UserError


def tiny_llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class FeatureModality(torch.nn.Module):
    """A stand-in stage-2 model with the AlignModel interface the fused model uses (encoder, head,
    encode_modality): the features are a linear map of the batch's globals."""

    def __init__(self):
        super().__init__()
        self.encoder, self.head = torch.nn.Linear(3, 16), torch.nn.Linear(16, 16)

    def encode_modality(self, batch):
        from types import SimpleNamespace

        return SimpleNamespace(embedding=self.head(self.encoder(batch["globals"])))


def fused(kind: str, options: dict, lm=None):
    from modalign.models.fusion import FusedLM, Projector, ProjectorOptions, auto_scale, build_fusion

    lm = lm or tiny_llama()
    fusion = build_fusion(kind, options, lm, 32)
    proj = Projector(ProjectorOptions(tokens=2, hidden=16), 16, 32, auto_scale(lm.get_input_embeddings().weight))
    return FusedLM(FeatureModality(), lm, proj if fusion.uses_modality else None, fusion, [1])


def batch(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return {"tokens_id": torch.zeros(n, 5, dtype=torch.long), "globals": torch.randn(n, 3, generator=g),
            "text": torch.tensor([[5, 6, 7, 2], [8, 9, 2, -1], [4, 2, -1, -1]])[:n]}


GATED = [("additive", {"layers": [1, 3], "lora_rank": 2}), ("cross_attn", {"layers": [0, 2], "heads": 4, "lora_rank": 2}),
         ("safe", {"layers": [0, 2], "heads": 4, "lora_rank": 4}), ("hybrid", {"layers": [1], "heads": 4, "lora_rank": 2})]


@pytest.mark.parametrize("kind,options", GATED, ids=[k for k, _ in GATED])
def test_closed_gates_give_the_frozen_lms_logits_exactly(kind, options):
    reference = tiny_llama()
    model = fused(kind, options, tiny_llama())
    with torch.no_grad():
        if kind in ("additive", "safe"):
            for a in model.fusion.gate_parameters().values():
                a.zero_()  # cross_attn's and hybrid's tanh gates start at 0 already
        loras = [m for m in model.fusion.modules() if type(m).__name__ == "LoRA"]
        assert loras and all(torch.count_nonzero(lora.B) == 0 for lora in loras)  # LoRA B starts at 0
        ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 2], [1, 4, 2, 3]])
        with model._signal(model.soft_tokens(batch())):
            ours = model.lm(input_ids=ids).logits
        assert torch.equal(ours, reference(input_ids=ids).logits)
        # and with the gates open the modality changes them: the hooks are really in the path
        for lora in loras:
            lora.B.normal_()
        for g in model.fusion.gate_parameters().values():
            g.fill_(0.5)
        with model._signal(model.soft_tokens(batch())):
            assert not torch.equal(model.lm(input_ids=ids).logits, reference(input_ids=ids).logits)
        with model.frozen_lm(), model._signal(model.soft_tokens(batch())):  # the retention baseline: all hooks off
            assert torch.equal(model.lm(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("kind,options", [("prefix", {}), ("none", {"tokens": 3}), ("partial_unfreeze", {"blocks": 1}),
                                          *GATED], ids=["prefix", "none", "partial_unfreeze", *[k for k, _ in GATED]])
def test_every_variant_trains_its_parts_and_checkpoints_no_frozen_lm_weight(kind, options):
    model = fused(kind, options)
    out = model(batch())
    from modalign.models.fusion import caption_loss

    caption_loss(out)["loss"].backward()
    comps = model.components()
    assert comps, kind
    for name, params in comps.items():
        if kind in ("cross_attn", "hybrid") and name in ("projector", "adapter", "lora"):
            continue  # behind tanh gates at 0 and LoRA B = 0 they get gradients once the gates open (Flamingo)
        assert sum(float(p.grad.norm()) for p in params if p.grad is not None) > 0, (kind, name)
    state = model.state_dict()
    lm_keys = [k for k in state if k.startswith("lm.")]
    if kind == "partial_unfreeze":
        assert lm_keys and all(k.startswith(("lm.model.layers.3.", "lm.model.norm.")) for k in lm_keys)
    else:
        assert lm_keys == []
    assert not any(k.startswith("modality.") for k in state)  # the frozen encoder is its parent's, not ours
    again = fused(kind, options)
    again.load_state_dict(state)  # strict: every trainable tensor is there
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(RuntimeError, match="missing"):
        again.load_state_dict({k: v for k, v in list(state.items())[1:]})


def test_the_contrastive_term_pulls_each_soft_token_toward_its_own_captions_words():
    """XE+contrastive: the caption side is the mean input embedding of the caption's words (eos and
    padding left out); the term alone, minimised, makes each sample's soft token nearest its own caption."""
    from modalign.models.fusion import soft_text_contrastive

    model = fused("prefix", {})
    b = batch()
    emb = model.lm.get_input_embeddings().weight
    caption = model.caption_embedding(b["text"])
    assert torch.allclose(caption[1], (emb[8] + emb[9]) / 2) and torch.allclose(caption[2], emb[4])
    groups = torch.arange(3)
    params = list(model.projector.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    first = None
    for _ in range(60):
        loss = soft_text_contrastive(model(b), caption, groups, temperature=0.1)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    with torch.no_grad():
        soft = torch.nn.functional.normalize(model(b).soft.mean(1), dim=-1)
    sims = soft @ torch.nn.functional.normalize(caption, dim=-1).T
    assert sims.argmax(1).tolist() == [0, 1, 2]


def test_generation_is_batched_and_beam_search_keeps_samples_apart():
    model = fused("additive", {"layers": [1, 3]})
    b = batch()
    greedy = model.generate(b, 5, num_beams=1, eos_token_id=2, pad_token_id=2)
    beams = model.generate(b, 5, num_beams=3, eos_token_id=2, pad_token_id=2)
    assert len(greedy) == len(beams) == 3
    for i in range(3):  # one sample at a time gives the same greedy caption as the batch
        alone = model.generate({k: v[i:i + 1] for k, v in b.items()}, 5, eos_token_id=2, pad_token_id=2)
        assert alone[0] == greedy[i]


def test_soft_tokens_are_bounded_by_the_scale_and_the_auto_scale_matches_the_embedding_norm():
    from modalign.models.fusion import auto_scale

    emb = torch.randn(1000, 64) * 0.1
    s = auto_scale(emb)
    # units uniform in (-1, 1) have rms 1/sqrt(3): such a soft token has the mean embedding norm
    u = (torch.rand(20000, 64) * 2 - 1) * s
    assert float(u.norm(dim=-1).mean()) == pytest.approx(float(emb.norm(dim=-1).mean()), rel=0.02)
    model = fused("prefix", {})
    soft = model.soft_tokens(batch())
    assert soft.shape == (3, 2, 32) and soft.abs().max() <= model.projector.scale


# --- captioning metrics ------------------------------------------------------------------------


def test_the_scst_reward_is_cider_d_with_fixed_document_frequencies():
    from modalign.eval.captioning import CiderD, cider_d

    refs = [["a person cooks in the kitchen in the morning", "someone makes breakfast in the kitchen"],
            ["the resident sleeps in the bedroom at night"], ["a person watches tv in the living room", "tv time"]]
    preds = ["a person cooks in the kitchen", "a person sleeps", "someone watches tv in the living room"]
    # with the scored set as the corpus it is pycocoevalcap's CIDEr-D
    np.testing.assert_allclose(CiderD(refs).scores(preds, refs), cider_d(preds, refs), rtol=1e-12)
    # with a fixed corpus a sample's reward does not depend on the rest of its batch
    corpus = CiderD(refs)
    assert corpus.scores(preds[:1], refs[:1])[0] == corpus.scores(preds, refs)[0]
    assert cider_d(preds[:1], refs[:1])[0] != cider_d(preds, refs)[0]


def test_caption_metrics_perfect_empty_and_means():
    from modalign.eval.captioning import caption_scores

    refs = [["a person cooks in the kitchen in the morning", "someone makes breakfast in the kitchen"],
            ["the resident sleeps in the bedroom at night"], ["a person watches tv in the living room"]]
    preds = ["a person cooks in the kitchen in the morning", "", "someone watches tv in the living room"]
    metrics, per = caption_scores(preds, refs)
    assert per["bleu_4"][0] == pytest.approx(100.0, abs=1e-6) and per["rouge_l"][0] == pytest.approx(100.0)
    assert per["cider_d"][1] == 0 and per["bleu_4"][1] == pytest.approx(0, abs=1e-3) and per["rouge_l"][1] == 0
    assert metrics["cider_d"] == pytest.approx(per["cider_d"].mean()) and metrics["rouge_l"] == pytest.approx(per["rouge_l"].mean())
    assert 0 < metrics["bleu_4"] < 100 and per["cider_d"][0] > 0 and per["cider_d"][2] > 0
    assert "meteor" not in metrics and "spice" not in metrics  # never substituted under another name


@pytest.mark.skipif(shutil.which("java") is None,
                    reason="METEOR needs a Java runtime and none is on PATH (apt-get install default-jre-headless)")
def test_meteor_runs_the_packaged_jar_where_java_exists():
    from modalign.eval.captioning import meteor

    corpus, per = meteor(["a person cooks in the kitchen", "", "the cat sat"],
                         [["a person cooks in the kitchen"], ["someone sleeps"], ["a dog ran away"]])
    assert per[0] > 90 and per[1] == 0 and 0 <= per[2] < per[0] and 0 < corpus < 100


# --- the LM loader -----------------------------------------------------------------------------


def test_the_real_smollm2_loads_offline_and_the_dequantized_cache_gives_the_same_model(smollm2):
    from modalign.models.lm import LMOptions, default_lm_file, load_lm
    from modalign.runs.provenance import sha256_file

    cold, cache = smollm2  # loaded from the GGUF file with HF_HUB_OFFLINE=1, into an empty cache
    assert not cold.cached and cold.identity["layers"] == 30 and cold.identity["width"] == 576
    assert cold.identity["sha256"] == sha256_file(default_lm_file())
    ids = torch.tensor([cold.tokenizer("The sun rises in the east.")["input_ids"]])
    with torch.no_grad():
        a = cold.model(input_ids=ids).logits
    warm = load_lm(LMOptions(cache_dir=str(cache)))
    assert warm.cached and not any(p.requires_grad for p in warm.model.parameters())
    with torch.no_grad():
        assert torch.equal(warm.model(input_ids=ids).logits, a)
    assert list(cache.glob("*.tmp*")) == []  # no half-written cache left behind


def test_an_lm_path_that_is_not_there_is_one_line(tmp_path):
    from modalign.models.lm import LMOptions, load_lm

    with pytest.raises(UserError, match="never downloads"):
        load_lm(LMOptions(path=str(tmp_path / "HuggingFaceTB/SmolLM2-135M")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        load_lm(LMOptions(path=str(tmp_path / "empty")))


# --- whole runs through the CLI ------------------------------------------------------------------

DATA = ["data.n_train=256", "data.n_val=64", "data.n_test=64"]  # the tiny_run fixture's data
FAST = [*DATA, "data.n_val=16", "data.n_test=16", "trainer.batch_size=8", "trainer.max_steps=8",
        "trainer.eval_every=4", "trainer.log_every=2", "eval.val_samples=8", "decode.max_new_tokens=6",
        "eval.meteor=false", "eval.retention=false"]


def fuse_args(tiny_lm, tiny_run, *extra):
    return ["train", "--quiet", "--recipe", "fuse", f"lm.path={tiny_lm}", f"encoder.init_from={tiny_run}", *FAST,
            "fusion=additive", "fusion.layers=[4,12,20]", "fusion.lora_rank=2", *extra]


def only_run(cwd: Path) -> Path:
    runs = list((cwd / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_a_fuse_run_writes_captions_metrics_retention_and_provenance(tmp_path, cache_dir, tiny_lm, tiny_run):
    from modalign.eval.captioning import meteor_available

    p = run_cli(fuse_args(tiny_lm, tiny_run, "eval.meteor=auto", "eval.retention=true", "loss=xe_contrastive"),
                tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    run = only_run(tmp_path)
    summary = json.loads((run / "facts" / "summary.json").read_text())
    test = summary["test"]
    # METEOR where Java is installed, else listed as unavailable with the reason (never a 0)
    assert ("meteor" in test) == meteor_available()[0] and ("meteor" in summary["unavailable"]) != meteor_available()[0]
    assert "Stanford CoreNLP" in summary["unavailable"]["spice"]
    for k in ("cider_d", "bleu_4", "rouge_l", "xe", "soft_norm_ratio", "retention/ppl_ratio", "retention/exact_match"):
        assert np.isfinite(test[k]), k
    assert any(k.startswith("gate/alpha_") for k in test)
    preds = [json.loads(line) for line in (run / "facts" / "predictions_test.jsonl").read_text().splitlines()]
    assert len(preds) == 16 and all(set(r) == {"id", "prediction", "references"} and r["references"] for r in preds)
    import pandas as pd

    scores = pd.read_parquet(run / "facts" / "scores.parquet")
    assert len(scores) == 16 and scores["cider_d"].mean() == pytest.approx(test["cider_d"])
    info = json.loads((run / "run.json").read_text())
    roles = {p["role"]: p for p in info["parents"]}
    assert roles["encoder"]["path"].startswith(str(tiny_run)) and len(roles["lm"]["sha256"]) == 64
    assert info["variant"]["name"] == "additive" and info["status"] == "completed"
    from modalign.train.checkpoint import load_checkpoint

    payload = load_checkpoint(run / "checkpoints" / "last.pt")  # sha256-verified, weights_only
    assert not any(k.startswith("lm.") for k in payload["model"])  # trainable parameters only
    assert payload["lm_sha256"] == roles["lm"]["sha256"]
    assert "## Sample captions" in (run / "card.md").read_text()
    # the gradient of every trainable component was logged, and is non-zero
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    grads = {r["name"] for r in rows if r["name"].startswith("grad_norm/") and r["value"] > 0}
    assert {"grad_norm/projector", "grad_norm/adapter", "grad_norm/lora", "grad_norm/gates"} <= grads
    # each gate's own gradient, and what each hooked block injects (batch-mean vs per-sample part)
    assert {f"grad_norm/gate/alpha_{i}" for i in (4, 12, 20)} <= {r["name"] for r in rows}
    for i in (4, 12, 20):
        assert test[f"inject/{i}/per_sample"] > 0 and np.isfinite(test[f"inject/{i}/batch_mean"])
    # XE+contrastive: both terms logged, the loss their weighted sum (weight 0.5)
    train = {}
    for r in rows:
        if r["split"] == "train":
            train.setdefault(r["step"], {})[r["name"]] = r["value"]
    last = train[max(train)]
    assert last["loss"] == pytest.approx(last["xe"] + 0.5 * last["contrastive"], rel=1e-5)
    # `modalign eval` decodes the best checkpoint again: the same captions and CIDEr-D
    before = (run / "facts" / "predictions_test.jsonl").read_text()
    p = run_cli(["eval", str(run)], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    assert (run / "facts" / "predictions_test.jsonl").read_text() == before
    ev = json.loads((run / "facts" / "eval_test.json").read_text())
    assert ev["metrics"]["cider_d"] == pytest.approx(test["cider_d"])
    p = run_cli(["runs", str(tmp_path / "outputs")], tmp_path, cache_dir)
    assert p.returncode == 0 and "cider_d" in p.stdout and "additive" in p.stdout, p.stdout
    # self-critical fine-tuning starts from this run's best checkpoint, recorded as a parent
    p = run_cli(fuse_args(tiny_lm, tiny_run, "loss=scst", f"init_from={run}", "trainer.max_steps=2",
                          "trainer.eval_every=2", "name=scst"), tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    scst = next(r for r in (tmp_path / "outputs" / "runs").iterdir() if r.name.endswith("_fuse_scst"))
    info = json.loads((scst / "run.json").read_text())
    init = next(x for x in info["parents"] if x["role"] == "init")
    assert init["path"] == str((run / "checkpoints" / "best.pt").resolve()) and len(init["sha256"]) == 64
    rows = [json.loads(line) for line in (scst / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "reward_greedy"} <= {r["name"] for r in rows if r["split"] == "train"}
    # projector.init_from: another fusion (safe) starts from this run's projector, and only that
    safe = ["fusion=safe", "fusion.layers=[4,20]", "fusion.heads=4", "fusion.lora_rank=4", f"projector.init_from={run}"]
    p = run_cli(fuse_args(tiny_lm, tiny_run, *safe, "trainer.max_steps=1", "trainer.eval_every=1",
                          "trainer.optim.projector.lr=0", "name=warm"), tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    warm = next(r for r in (tmp_path / "outputs" / "runs").iterdir() if r.name.endswith("_fuse_warm"))
    source = load_checkpoint(run / "checkpoints" / "best.pt")["model"]
    mine = load_checkpoint(warm / "checkpoints" / "last.pt")["model"]
    proj = [k for k in source if k.startswith("projector.")]
    assert proj and all(torch.equal(mine[k], source[k]) for k in proj)  # lr 0: still the additive run's
    info = json.loads((warm / "run.json").read_text())
    assert next(x for x in info["parents"] if x["role"] == "projector")["path"] == str((run / "checkpoints" / "best.pt").resolve())
    p = run_cli(fuse_args(tiny_lm, tiny_run, *safe, "projector.tokens=3", "name=bad"), tmp_path, cache_dir)
    assert p.returncode == 2 and "its projector.tokens is 8, this run's 3" in p.stderr and "Traceback" not in p.stderr


def test_a_fuse_run_killed_or_stopped_by_sigterm_resumes_to_identical_predictions(tmp_path, cache_dir, tiny_lm,
                                                                                     tiny_run):
    straight = tmp_path / "straight"
    straight.mkdir()
    assert run_cli(fuse_args(tiny_lm, tiny_run), straight, cache_dir).returncode == 0
    expected = only_run(straight)
    where = tmp_path / "interrupted"
    where.mkdir()
    # SIGKILL after step 6 (nothing of it logged; last.pt holds step 4)
    p = run_cli(fuse_args(tiny_lm, tiny_run), where, cache_dir, env_extra={"MODALIGN_FAULTS": "kill:step@6"})
    assert p.returncode == -9, p.stderr
    run = only_run(where)
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "facts" / "summary.json").exists()
    # resumed, then SIGTERM after step 7 (as SLURM sends before a time limit: the step is finished,
    # last.pt written, the run marked interrupted, exit 143)
    resume = ["train", "--quiet", "--recipe", "fuse", f"resume={run}"]
    p = run_cli(resume, where, cache_dir, env_extra={"MODALIGN_FAULTS": "term:step@7"})
    assert p.returncode == 143, p.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and "SIGTERM" in info["error"] and "Traceback" not in p.stderr
    manifest = json.loads((run / "checkpoints" / "manifest.json").read_text())
    assert manifest["checkpoints"]["last.pt"]["step"] == 7 and not (run / "facts" / "summary.json").exists()
    # resumed to the end: the captions and metrics of the run nothing interrupted
    p = run_cli(resume, where, cache_dir)
    assert p.returncode == 0, p.stderr
    assert (run / "facts" / "predictions_test.jsonl").read_text() == (expected / "facts" / "predictions_test.jsonl").read_text()
    sa = json.loads((expected / "facts" / "summary.json").read_text())["test"]
    sb = json.loads((run / "facts" / "summary.json").read_text())["test"]
    assert sa == sb


@pytest.mark.parametrize("extra,needle", [
    (["encoder.init_from=null"], "'encoder.init_from' is required for fusion=additive"),
    (["fusion.layers=[4,99]"], "'fusion.layers' has layer 99, but the LM has layers 0..29"),
], ids=["no-encoder", "layer-out-of-range"])
def test_bad_fuse_input_is_one_line_and_exit_2(tmp_path, cache_dir, tiny_lm, tiny_run, extra, needle):
    p = run_cli(fuse_args(tiny_lm, tiny_run, *extra), tmp_path, cache_dir)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())


@pytest.mark.parametrize("extra,needle", [
    (["fusion=additive", "fusion.init=2.0"], "config: 'fusion.init' is 2.0; it must be within [-max, max] (max=1.0)"),
    (["projector.tokens=0"], "config: 'projector.tokens' is 0; it must be >= 1"),
    (["projector.scale=-1"], "config: 'projector.scale' is -1.0; it must be > 0"),
    (["decode.num_beams=0"], "config: 'decode.num_beams' is 0; it must be >= 1"),
    (["lm.template=alpaca"], "config: 'lm.template' is 'alpaca'; expected one of plain, assistant, chat"),
    (["fusion=cross_attn", "fusion.heads=7"], None),
    (["+encoder.width=64"], "config: unknown key 'encoder.width'"),
    (["encoder.init_from=auto", "data=npz", "data.path=x.npz"], "'encoder.init_from'=auto trains an align run on the demo data only"),
    (["loss=xe_contrastive", "fusion=none"], "config: 'loss.contrastive'=0.5 needs a modality input, and fusion=none has none"),
    (["loss=scst", "+loss.contrastive=0.5", "init_from=/x"], "config: 'loss.contrastive' is 0.5; the contrastive term goes with loss.kind=xe"),
    (["loss=xe_contrastive", "loss.temperature=0"], "config: 'loss.temperature' is 0.0; it must be > 0"),
], ids=["alpha-init", "tokens", "scale", "beams", "template", "heads-ok-until-built", "encoder-key", "auto-on-own-data",
        "contrastive-without-modality", "contrastive-with-scst", "temperature"])
def test_bad_fuse_options_are_refused_before_any_model_is_loaded(tmp_path, extra, needle):
    """The options are read and checked first (FuseRecipe.read_config), before data, LM or encoder."""
    from omegaconf import OmegaConf

    from modalign.recipes.config import compose, to_container
    from modalign.recipes.fuse import FuseRecipe
    from modalign.runs.writer import RunWriter

    cfg = OmegaConf.create(to_container(compose(["encoder.init_from=/nowhere", f"outputs={tmp_path}", *extra], "fuse"), ""))
    recipe = FuseRecipe(cfg, RunWriter(tmp_path / "run", rank=1), progress=False)
    if needle is None:
        recipe.read_config()  # 7 heads is a valid option; the LM's width decides when the fusion is built
        return
    with pytest.raises(UserError) as e:
        recipe.read_config()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_an_autoencode_checkpoint_is_refused_as_a_stage3_encoder(tmp_path, cache_dir, tiny_lm):
    from modalign.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", "best.pt", {"recipe": "autoencode", "model_config": {"encoder": {}},
                                                   "model": {}}, step=1)
    ckpt = tmp_path / "ckpt" / "best.pt"
    p = run_cli(["train", "--quiet", "--recipe", "fuse", f"lm.path={tiny_lm}", f"encoder.init_from={ckpt}", *FAST],
                tmp_path, cache_dir)
    assert p.returncode == 2 and "not an align run's checkpoint" in p.stderr, p.stderr


OVERFIT = [("prefix", {}), ("additive", {"layers": [1, 3]}), ("cross_attn", {"layers": [1, 3], "heads": 4}),
           ("safe", {"layers": [1, 3], "heads": 4, "lora_rank": 4}), ("hybrid", {"layers": [1], "heads": 4})]


@pytest.mark.parametrize("kind,options", OVERFIT, ids=[k for k, _ in OVERFIT])
def test_every_modality_variant_overfits_four_captions_by_reading_its_input(kind, options):
    """Four samples with four distinct captions: each variant learns them through its own path (the
    optimizer groups of conf/trainer/fuse.yaml, their learning rates in proportion), so its reliance gap is positive
    for every sample and its four greedy captions differ, one per input. `none` stays at 0."""
    from omegaconf import OmegaConf

    from modalign.models.fusion import caption_loss, reliance_gap

    lrs = OmegaConf.load(Path(__file__).parents[1] / "src/modalign/conf/trainer/fuse.yaml").optim
    g = torch.Generator().manual_seed(5)
    b = {"tokens_id": torch.zeros(4, 5, dtype=torch.long), "globals": torch.randn(4, 3, generator=g) * 2,
         "text": torch.tensor([[5, 6, 7, 2], [8, 9, 10, 2], [11, 12, 2, -1], [13, 14, 15, 2]])}
    model = fused(kind, options)
    # the lrs of conf/trainer/fuse.yaml, x3: a tiny random LM, a short budget
    opt = torch.optim.Adam([{"params": ps, "lr": 3 * float(lrs[name].lr)} for name, ps in model.components().items()])
    for _ in range(150):
        loss = caption_loss(model(b))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        gap = reliance_gap(model, b, model(b))
    assert float(gap.min()) > 0.05, (kind, gap)
    captions = model.generate(b, 4, eos_token_id=2, pad_token_id=2)
    assert len({tuple(c) for c in captions}) == 4, (kind, captions)


def test_the_resampler_turns_per_step_outputs_into_k_tokens_and_never_reads_padding():
    from modalign.models.fusion import Projector, ProjectorOptions, pack_tokens, pad_tokens

    torch.manual_seed(0)
    proj = Projector(ProjectorOptions(features="tokens", tokens=3, resampler_layers=2), 16, 32, 0.5)
    tokens, mask = torch.randn(2, 7, 16), torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    proj.requires_grad_(False)
    soft = proj(pack_tokens(tokens, mask))
    assert soft.shape == (2, 3, 32) and float(soft.abs().max()) <= 0.5  # tanh·scale bounds them
    noisy = tokens.clone()
    noisy[1, 4:] = 1e3  # what lies under the padding changes nothing
    assert torch.allclose(proj(pack_tokens(noisy, mask)), soft, atol=1e-6)
    # the cache pads shorter chunks (patches of other lengths) with masked positions: same soft tokens
    short = pack_tokens(tokens[1:, :4], mask[1:, :4])
    assert torch.allclose(proj(pad_tokens([short, pack_tokens(tokens[:1], mask[:1])]))[0], soft[1], atol=1e-6)
    assert not torch.allclose(soft[0], soft[1])  # and different inputs, different tokens


def test_a_fuse_run_resamples_the_encoders_per_step_outputs(tmp_path, cache_dir, tiny_lm, tiny_run):
    """projector.features=tokens end to end: the frozen encoder's per-step outputs are cached for the
    run and resampled into k soft tokens; the gated adapter reads them and the run completes."""
    p = run_cli(["train", "--quiet", "--recipe", "fuse", f"lm.path={tiny_lm}", f"encoder.init_from={tiny_run}", *FAST,
                 "fusion=safe", "fusion.layers=[4,20]", "fusion.heads=4", "fusion.lora_rank=4",
                 "projector.features=tokens", "projector.tokens=4"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    run = only_run(tmp_path)
    test = json.loads((run / "facts" / "summary.json").read_text())["test"]
    assert np.isfinite(test["reliance_gap"]) and test["soft_norm_ratio"] > 0.25
    assert "frozen encoder features of" in (run / "run.log").read_text()
    info = json.loads((run / "run.json").read_text())
    assert info["params"]["by_component"]["projector"] > 0 and info["variant"]["name"] == "safe"


def test_each_template_puts_its_start_before_the_caption(tiny_lm):
    """plain: the bos alone (SmolLM2's bos is <|im_start|>, an unfinished role header: gated variants
    cannot steer the first caption token from that attention-sink position); assistant: the chat
    template's assistant header; chat: a whole user turn, then that header."""
    from transformers import AutoTokenizer

    from modalign.models.lm import LMOptions
    from modalign.recipes.fuse import FuseRecipe

    tok = AutoTokenizer.from_pretrained(str(tiny_lm), local_files_only=True)
    recipe = FuseRecipe.__new__(FuseRecipe)
    starts = {}
    for template in ("plain", "assistant", "chat"):
        recipe.lm_opts = LMOptions(template=template)
        starts[template] = recipe._start_ids(tok)
    assert starts["plain"] == [tok.bos_token_id] and tok.decode(starts["plain"]) == "<|im_start|>"
    assert tok.decode(starts["assistant"]) == "<|im_start|>assistant\n"
    assert tok.decode(starts["chat"]).endswith("Describe the recording.<|im_end|>\n<|im_start|>assistant\n")
