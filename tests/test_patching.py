"""Patches of time steps as encoder tokens (`encoder.patch_size`): the windows and their masks, the
encoders' invariance to padding, `auto`, RevIN, and training through the CLI on a bundled series set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli
from modalign.models.encoders import EncoderConfig, build_encoder
from modalign.models.patching import Patching, auto_patch_size, patch_count


def series(b=3, t=10, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, c, generator=g)


def test_windows_hold_each_steps_values_and_a_validity_flag():
    x = series(2, 10, 2)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False  # the second series has 7 steps
    patches, pmask = Patching(4, 4, 2)(x, mask)
    assert patches.shape == (2, 3, 4 * 3) and patch_count(10, 4, 4) == 3
    w = patches.reshape(2, 3, 4, 3)  # (B, N, P, C + flag)
    torch.testing.assert_close(w[0, 1, :, :2], x[0, 4:8])
    assert w[0, 2, :, 2].tolist() == [1, 1, 0, 0]  # steps 8-9 real, then padding to the whole patch
    assert w[1, 1, :, 2].tolist() == [1, 1, 1, 0] and (w[1, 1, 3] == 0).all()  # partial patch: zeros, flag 0
    assert pmask.tolist() == [[True, True, True], [True, True, False]]  # no real step -> masked
    # overlapping windows (stride 2)
    over, omask = Patching(4, 2, 2)(x, mask)
    assert over.shape[1] == patch_count(10, 4, 2) == 4
    torch.testing.assert_close(over.reshape(2, 4, 4, 3)[0, 1, :, :2], x[0, 2:6])
    # a series no longer than a patch is one patch
    assert Patching(16, 16, 2)(x, mask)[0].shape == (2, 1, 16 * 3)


def test_revin_normalizes_each_series_over_its_valid_steps_only():
    x = series(2, 12, 3) * 5 + 7
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    x[1, 9:] = 1000.0  # garbage at padding must not move the statistics
    norm = Patching(4, 4, 3, revin=True).normalize(x, mask)
    for b, n in ((0, 12), (1, 9)):
        v = norm[b, :n]
        torch.testing.assert_close(v.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(v.std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    assert (norm[1, 9:] == 0).all()


@pytest.mark.parametrize("kind,vocab", [("transformer", 0), ("cnn", 0), ("transformer", 10)],
                         ids=["transformer", "cnn", "transformer-events"])
def test_padding_a_batch_changes_no_sample_embedding(kind, vocab):
    """The same series, in a batch padded to 20 steps or to 33 (a different number of patches and
    a different partial last patch): identical pooled features. The masks are right."""
    torch.manual_seed(0)
    cfg = EncoderConfig(kind=kind, width=32, depth=2, heads=4, pooling="mean", n_cont=2, patch_size=4, revin=True,
                        vocab_size=vocab)
    enc = build_encoder(cfg).eval()
    x = series(3, 20, 2)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 13:] = False
    mask[2, 5:] = False
    x = x * mask[:, :, None]
    ids = torch.randint(1, max(vocab, 2), (3, 20), generator=torch.Generator().manual_seed(2)) * mask
    longer = torch.cat([x, torch.zeros(3, 13, 2)], dim=1)
    lmask = torch.cat([mask, torch.zeros(3, 13, dtype=torch.bool)], dim=1)
    g = torch.zeros(3, 0)
    with torch.no_grad():
        a, ta = enc(ids, x, mask, g)
        b, tb = enc(torch.cat([ids, torch.zeros(3, 13, dtype=torch.long)], dim=1), longer, lmask, g)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ta.shape[1] == 5 and tb.shape[1] == 9  # patches of 4 steps: the encoder's tokens
    assert enc.token_mask(mask).tolist() == [[True] * 5, [True] * 4 + [False], [True] * 2 + [False] * 3]


def test_categorical_events_in_patches_are_order_aware():
    """Event ids within a patch: each step's id embedding plus its place in the patch, so swapping
    two events of a patch changes the token."""
    torch.manual_seed(0)
    cfg = EncoderConfig(kind="transformer", width=32, depth=1, heads=4, vocab_size=10, n_cont=1, patch_size=4)
    enc = build_encoder(cfg).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    swapped = torch.tensor([[2, 1, 3, 4, 5, 6, 7, 8]])
    cont, mask, g = torch.zeros(1, 8, 1), torch.ones(1, 8, dtype=torch.bool), torch.zeros(1, 0)
    with torch.no_grad():
        a, _ = enc(ids, cont, mask, g)
        b, _ = enc(swapped, cont, mask, g)
    assert (a - b).abs().max() > 1e-4


def test_auto_patch_size():
    assert [auto_patch_size(t, False) for t in (24, 64, 100, 512, 1344, 100_000)] == [0, 0, 4, 16, 32, 64]
    assert auto_patch_size(512, True) == 0  # categorical event tokens keep one token per event


def test_bad_patch_options_are_user_errors():
    from modalign.errors import UserError

    for kw, needle in (({"patch_size": -1}, "patch_size"), ({"patch_size": "big"}, "patch_size"),
                       ({"patch_size": 4, "patch_stride": 5}, "patch_stride")):
        with pytest.raises(UserError, match=needle):
            EncoderConfig(n_cont=2, **kw).validate()


def _only_run(cwd):
    (run,) = (cwd / "outputs" / "runs").iterdir()
    return run


def test_auto_patches_a_long_series_set_through_the_cli_and_records_the_choice(tmp_path, cache_dir):
    """BasicMotions (100 steps, 6 channels) under auto gets patches of 4: 25 tokens instead of 100,
    recorded in run.json; eval rebuilds the same patched encoder from the checkpoint. (Also the
    sktime reader's end-to-end run.)"""
    pytest.importorskip("sktime", reason="the optional extra is not installed: pip install 'modalign[sktime]'")
    p = run_cli(["train", "--quiet", "data=sktime", "data.dataset=BasicMotions", "encoder.patch_size=auto",
                 "encoder.revin=true", "trainer.max_steps=4", "trainer.batch_size=16", "trainer.eval_every=4"],
                tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    run = _only_run(tmp_path)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["data"]["source"] == "sktime:BasicMotions"
    assert info["patching"] == {"patch_size": 4, "patch_stride": 4, "revin": True, "steps": 100, "tokens": 25,
                                "chosen_by": "auto"}
    assert "encoder.patch_size=auto -> 4 (100 steps per series -> 25 tokens)" in (run / "run.log").read_text()
    summary = json.loads((run / "facts" / "summary.json").read_text())
    assert np.isfinite(summary["test"]["zeroshot_acc"])
    # `modalign eval` rebuilds the patched encoder from the checkpoint: the same test metrics
    p = run_cli(["eval", str(run)], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    ev = json.loads((run / "facts" / "eval_test.json").read_text())
    assert ev["metrics"]["zeroshot_acc"] == pytest.approx(summary["test"]["zeroshot_acc"])


@pytest.mark.parametrize("extra,needle", [
    (["encoder.patch_size=4", "loss.mlm_weight=0.1"], "loss.mlm_weight"),
    (["encoder.patch_size=0.5"], "encoder.patch_size"),
    (["encoder.patch_size=8", "encoder.patch_stride=9"], "encoder.patch_stride"),
], ids=["mlm-with-event-patches", "fraction", "stride-over-size"])
def test_bad_patch_settings_are_one_line_and_exit_2(tmp_path, cache_dir, extra, needle):
    p = run_cli(["train", "--quiet", *TINY, "trainer.max_steps=2", *extra], tmp_path, cache_dir)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())
