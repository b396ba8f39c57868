import pytest
import torch

from modalign.eval.reconstruction import reconstruction_scores
from modalign.losses.reconstruction import autoencode_loss
from modalign.models.align import AlignModel, AlignModelConfig
from modalign.models.autoencoder import (AutoencoderConfig, BottleneckConfig, ModalityAutoencoder)
from modalign.models.encoders import EncoderConfig
from modalign.models.quantizer import VectorQuantizer, VQConfig, codebook_usage

B, T, V, C, G = 6, 10, 13, 3, 4


def make_batch(ids=True, cont=True, globals_=True, seed=0, equal_lengths=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((B,), T) if equal_lengths else torch.randint(3, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    tokens_id = torch.randint(1, V, (B, T), generator=g) * mask if ids else torch.zeros(B, T, dtype=torch.long)
    return {"tokens_id": tokens_id,
            "tokens_cont": torch.randn(B, T, C if cont else 0, generator=g) * mask[:, :, None],
            "globals": torch.randn(B, G if globals_ else 0, generator=g), "mask": mask}


def make_cfg(kind="vq", ids=True, cont=True, globals_=True, encoder="transformer", **vq):
    enc = EncoderConfig(kind=encoder, width=32, depth=1, heads=2, max_len=16, vocab_size=V if ids else 0,
                        n_cont=C if cont else 0, n_globals=G if globals_ else 0)
    return AutoencoderConfig(encoder=enc, decoder_depth=1, globals_head_hidden=16,
                             bottleneck=BottleneckConfig(kind=kind, latent_dim=8,
                                                         vq=VQConfig(codebook_size=16, dim=8, **vq)))


@pytest.mark.parametrize("kind,latent", [("none", 32), ("linear", 8), ("vq", 8)])
@pytest.mark.parametrize("ids,cont,globals_", [(True, True, True), (False, True, False)])
def test_shapes(kind, latent, ids, cont, globals_):
    torch.manual_seed(0)
    model = ModalityAutoencoder(make_cfg(kind, ids, cont, globals_))
    batch = make_batch(ids, cont, globals_)
    out = model(batch)
    assert out["latent"].shape == (B, T, latent)
    assert out["pooled"].shape == (B, latent)
    assert (out["rec_ids"].shape == (B, T, V)) if ids else out["rec_ids"] is None
    assert out["rec_cont"].shape == (B, T, C)
    assert (out["pred_globals"].shape == (B, G)) if globals_ else out["pred_globals"] is None
    assert bool(out["vq_info"]) == (kind == "vq")
    if kind == "vq":
        assert out["vq_info"]["codes"].shape == (B, T) and out["vq_info"]["codes"].dtype == torch.long
    terms = autoencode_loss(out, batch, globals_beta=1.0)
    assert torch.isfinite(terms["loss"]) and terms["loss"] is terms["total_loss"]
    assert ("rec_ce" in terms) == ids and "rec_mse" in terms
    assert ("vq_commit" in terms) == (kind == "vq")
    terms["loss"].backward()
    comps = model.components()
    assert set(comps) == {"encoder", "bottleneck", "decoder", "globals_head"}
    assert bool(comps["globals_head"]) == globals_ and bool(comps["bottleneck"]) == (kind != "none")
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for ps in comps.values() for p in ps) == n_params


def test_total_loss_combines_terms():
    torch.manual_seed(0)
    model = ModalityAutoencoder(make_cfg("vq", ema=False))
    batch = make_batch()
    terms = autoencode_loss(model(batch), batch, globals_beta=0.3)
    assert terms["rec_tokens"].item() == pytest.approx((terms["rec_ce"] + terms["rec_mse"]).item())
    want = terms["rec_tokens"] + 0.3 * terms["rec_globals"] + terms["vq_commit"] + terms["vq_codebook"]
    assert terms["total_loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert terms["vq_codebook"].item() > 0  # no EMA: the codebook loss is live


def test_config_round_trip():
    cfg = make_cfg("vq", decay=0.9)
    assert AutoencoderConfig.from_dict(cfg.to_dict()) == cfg


def test_vq_dim_must_match_latent_dim():
    cfg = make_cfg("vq")
    cfg.bottleneck.latent_dim = 4
    with pytest.raises(ValueError, match="bottleneck.vq.dim"):
        ModalityAutoencoder(cfg)


def test_straight_through_gives_encoder_gradients():
    vq = VectorQuantizer(VQConfig(codebook_size=8, dim=4)).eval()
    z = torch.randn(2, 5, 4, requires_grad=True)
    zq, _, info = vq(z)
    assert torch.allclose(zq, vq.codebook[info["codes"]], atol=1e-6)  # the forward value is the code
    zq.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # the backward is the identity

    torch.manual_seed(0)
    model = ModalityAutoencoder(make_cfg("vq"))
    batch = make_batch()
    autoencode_loss(model(batch), batch, globals_beta=1.0)["rec_tokens"].backward()
    grads = [p.grad for p in model.components()["encoder"] if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_ema_update_moves_used_codes_toward_their_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(VQConfig(codebook_size=4, dim=2, decay=0.5, restart_dead=False))
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]))
    vq.ema_embed_sum.copy_(vq.codebook)
    z = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])  # (1, 2, 2): both nearest to code 0
    before = vq.codebook.clone()
    vq.train()
    vq(z)
    assert vq.codebook[0, 0] > 0.5  # (1-0.5) * 2 * (1, 1) / smoothed(0.5 + 1) ~ (0.67, 0.67)
    assert torch.allclose(vq.codebook[1:], before[1:], rtol=1e-3)  # unused codes stay where they are
    vq.eval()
    c = vq.codebook.clone()
    vq(z)
    assert torch.equal(vq.codebook, c)  # no update outside training


def test_perplexity_between_one_and_k():
    torch.manual_seed(0)
    vq = VectorQuantizer(VQConfig(codebook_size=16, dim=4)).eval()
    _, _, info = vq(torch.randn(4, 20, 4))
    assert 1.0 <= info["perplexity"].item() <= 16.0
    _, _, info = vq(vq.codebook[3].expand(2, 5, 4).clone())  # one code only
    assert info["perplexity"].item() == pytest.approx(1.0)
    assert info["usage"].item() == pytest.approx(1 / 16)


def test_codebook_usage_counts_valid_positions():
    codes = torch.tensor([[0, 2, 2, 1], [3, 3, 0, 0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert codebook_usage(codes, mask, 5).tolist() == [1, 0, 2, 1, 0]


def _clustered(n_per=30, seed=0):
    """4 tight clusters in 8-d, plus padding sitting exactly on far code 4: (B, T, D), mask, codebook."""
    g = torch.Generator().manual_seed(seed)
    centers = 5 * torch.eye(8)[:4]  # (4, 8)
    x = centers.repeat_interleave(n_per, 0) + 0.3 * torch.randn(4 * n_per, 8, generator=g)  # (120, 8)
    codebook = torch.cat([centers, 100 + torch.randn(12, 8, generator=g)])  # (16, 8): 12 far codes
    z = torch.cat([x, codebook[4].expand(40, 8)]).reshape(8, 20, 8)  # last 40 positions = padding
    mask = torch.ones(160, dtype=torch.bool)
    mask[120:] = False
    return z, mask.reshape(8, 20), codebook


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_restart_revives_unused_codes(ema):
    used = {}
    for restart in (False, True):
        torch.manual_seed(0)
        vq = VectorQuantizer(VQConfig(codebook_size=16, dim=8, ema=ema, restart_dead=restart))
        z, mask, codebook = _clustered()
        with torch.no_grad():
            vq.codebook.copy_(codebook)
        if ema:
            vq.ema_embed_sum.copy_(codebook)
        _, _, info = vq.eval()(z, mask)
        assert int((codebook_usage(info["codes"], mask, 16) > 0).sum()) == 4
        vq.train()
        restarted = sum(vq(z, mask)[2]["restarted"] for _ in range(5))
        _, _, info = vq.eval()(z, mask)
        used[restart] = int((codebook_usage(info["codes"], mask, 16) > 0).sum())
        assert (restarted > 0) == restart
        assert (vq.codebook.abs().max() < 20) == restart  # restarts come from valid positions, never padding
    assert used[False] == 4
    assert used[True] > 4


def test_restart_is_deterministic_and_resume_is_exact():
    z, mask, codebook = _clustered()
    torch.manual_seed(0)
    a = VectorQuantizer(VQConfig(codebook_size=16, dim=8)).train()
    a(z, mask)
    assert {"codebook", "cluster_size", "ema_embed_sum"} <= set(a.state_dict())
    b = VectorQuantizer(VQConfig(codebook_size=16, dim=8)).train()
    b.load_state_dict(a.state_dict())
    rng = torch.get_rng_state()
    for _ in range(3):
        a(z + 0.1, mask)
    torch.set_rng_state(rng)
    for _ in range(3):
        b(z + 0.1, mask)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("kind", ["none", "vq"])
def test_globals_beta_zero_reports_but_does_not_train_globals(kind):
    torch.manual_seed(0)
    model = ModalityAutoencoder(make_cfg(kind))
    batch = make_batch()
    terms = autoencode_loss(model(batch), batch, globals_beta=0.0)
    assert terms["rec_globals"].item() > 0
    terms["loss"].backward()
    assert all(p.grad is None for p in model.components()["globals_head"])
    assert any(p.grad is not None for p in model.components()["encoder"])

    model.zero_grad()
    autoencode_loss(model(batch), batch, globals_beta=0.5)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.components()["globals_head"])


@pytest.mark.parametrize("kind", ["none", "linear", "vq"])
def test_tiny_overfit(kind):
    torch.manual_seed(0)
    model = ModalityAutoencoder(make_cfg(kind)).train()
    batch = make_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        terms = autoencode_loss(model(batch), batch, globals_beta=1.0)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = first if first is not None else {k: v.item() for k, v in terms.items()}
    assert terms["rec_tokens"].item() < 0.7 * first["rec_tokens"]
    assert terms["rec_globals"].item() < first["rec_globals"]


def test_bf16_autocast_forward_is_finite():
    torch.manual_seed(0)
    model = ModalityAutoencoder(make_cfg("vq")).train()
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = autoencode_loss(model(batch), batch, globals_beta=1.0)
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["loss"].dtype == torch.float32


@pytest.mark.parametrize("bottleneck", ["linear", "vq"])
def test_reconstruction_scores_per_example_agree_with_the_loss_at_equal_lengths(bottleneck):
    torch.manual_seed(0)
    model = ModalityAutoencoder(make_cfg(bottleneck)).eval()
    batch = make_batch(equal_lengths=True)
    out = model(batch)
    vq = model.cfg.bottleneck.vq
    scores = reconstruction_scores(out, batch, 2.0, vq.commitment_cost, vq.ema)
    terms = autoencode_loss(out, batch, globals_beta=2.0)
    names = ["rec_ce", "rec_mse", "rec_tokens", "rec_globals", "total_loss"]
    names += ["vq_commit", "vq_codebook"] if bottleneck == "vq" else []
    for name in names:
        assert scores[name].shape == (B,)
        assert scores[name].mean().item() == pytest.approx(terms[name].item(), rel=1e-5, abs=1e-7), name


def test_reconstruction_scores_are_means_over_each_samples_own_tokens():
    torch.manual_seed(0)
    model = ModalityAutoencoder(make_cfg("linear")).eval()
    batch = make_batch()  # lengths differ
    out = model(batch)
    scores = reconstruction_scores(out, batch, 1.0)
    for i in range(B):
        valid = batch["mask"][i]
        ce = torch.nn.functional.cross_entropy(out["rec_ids"][i][valid].float(), batch["tokens_id"][i][valid])
        acc = (out["rec_ids"][i][valid].argmax(-1) == batch["tokens_id"][i][valid]).float().mean()
        assert scores["rec_ce"][i].item() == pytest.approx(ce.item(), rel=1e-5)
        assert scores["token_acc"][i].item() == pytest.approx(acc.item(), rel=1e-6)


@pytest.mark.parametrize("encoder", ["transformer", "cnn"])
def test_encoder_loads_into_align_model(encoder):
    torch.manual_seed(0)
    ae = ModalityAutoencoder(make_cfg("vq", encoder=encoder))
    align = AlignModel(AlignModelConfig(encoder=ae.cfg.encoder))
    assert set(align.encoder.state_dict()) == set(ae.encoder.state_dict())
    align.encoder.load_state_dict(ae.encoder.state_dict())  # strict
    batch = make_batch()
    ae.eval(), align.eval()
    args = (batch["tokens_id"], batch["tokens_cont"], batch["mask"], batch["globals"])
    for x, y in zip(ae.encoder(*args), align.encoder(*args)):
        assert torch.equal(x, y)
