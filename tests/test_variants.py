"""The variant registry (metadata, plugins from a separate package, `modalign variants`) and the
register-token head (shapes, padding, nested dropout, gradient isolation)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import SMALL, run_cli
from modalign.models.heads import RegisterHead, RegisterOptions
from modalign.registry import VariantError, register_variant

GOOD = dict(created_by="A. Researcher", model="hand-written", date="2026-11-20", experiment_id="EXP-1",
            version="0.1.0", approach="a test head")


# registry --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, expected", [
    ({"date": "20/11/2026"}, "metadata 'date' must be YYYY-MM-DD"),
    ({"date": "2026-02-30"}, "not a calendar date"),
    ({"created_by": ""}, "metadata 'created_by' must be a non-empty string"),
    ({"model": None}, "metadata 'model' must be a non-empty string"),
    ({"version": "latest"}, "metadata 'version' must look like 1, 1.2 or 1.2.3"),
    ({"approach": "two\nlines"}, "'approach' must be one line"),
    ({"key_features": "fast"}, "'key_features' must be a list of non-empty strings"),
    ({"status": "great"}, "metadata 'status' must be one of"),
    ({"author": "me"}, "unknown metadata 'author'"),
])
def test_bad_metadata_is_refused_at_registration(change, expected):
    meta = {**GOOD, **change}
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(VariantError) as e:
        @register_variant("head", "bad_head", **meta)
        class BadHead(torch.nn.Module):
            pass
    msg = str(e.value)
    assert "\n" not in msg and "variant head 'bad_head'" in msg and expected in msg, msg


def test_bad_kind_and_name_and_a_taken_name_are_refused():
    with pytest.raises(VariantError, match="kind must be one of head"):
        register_variant("optimizer", "x", **GOOD)(type("X", (), {}))
    with pytest.raises(VariantError, match="lower_snake_case"):
        register_variant("head", "My-Head", **GOOD)(type("X", (), {}))
    with pytest.raises(VariantError, match="the name is taken by modalign.models.heads.MLPHead"):
        from modalign.models import heads  # noqa: F401 — registers the built-ins

        register_variant("head", "mlp", **GOOD)(type("Impostor", (), {}))


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """A head variant package in a folder of its own, made by `modalign variants new`."""
    root = tmp_path_factory.mktemp("lab")
    p = run_cli(["variants", "new", "gated_mlp", "--dir", str(root / "plugins"), "--created-by", "A. Researcher",
                 "--model", "hand-written", "--experiment-id", "EXP-14"], root, root)
    assert p.returncode == 0, p.stderr
    pkg = root / "plugins" / "gated_mlp"
    assert {f.name for f in pkg.iterdir()} >= {"__init__.py", "conf", "README.md"}
    assert (pkg / "conf" / "head" / "gated_mlp.yaml").read_text().startswith("# modalign train head=gated_mlp")
    assert "| experiment id | EXP-14 |" in (pkg / "README.md").read_text()
    return pkg


def test_a_plugin_variant_trains_by_name_and_is_recorded(plugin, tmp_path, cache_dir):
    env = {"MODALIGN_PLUGINS": str(plugin)}
    p = run_cli(["train", "--quiet", "head=gated_mlp", "head.hidden=64", *SMALL], tmp_path, cache_dir, env_extra=env)
    assert p.returncode == 0, p.stderr
    run = next((tmp_path / "outputs" / "runs").iterdir())
    info = json.loads((run / "run.json").read_text())
    v = info["variant"]
    assert (v["kind"], v["name"], v["created_by"], v["model"], v["experiment_id"], v["version"]) == \
        ("head", "gated_mlp", "A. Researcher", "hand-written", "EXP-14", "0.1.0")
    import hashlib

    assert v["source_sha256"] == hashlib.sha256((plugin / "__init__.py").read_bytes()).hexdigest()

    # the experiment log lists it, with its metadata, its completed run and its best R@1
    p = run_cli(["variants", "--outputs", str(tmp_path / "outputs")], tmp_path, cache_dir,
                env_extra={**env, "COLUMNS": "400"})
    assert p.returncode == 0, p.stderr
    row = next(line for line in p.stdout.splitlines() if "gated_mlp" in line)
    assert "A. Researcher" in row and "EXP-14" in row and "0.1.0" in row
    r1 = json.loads((run / "facts" / "summary.json").read_text())["test"]["m2t_R@1"]
    assert row.split("│")[-3].strip() == "1" and row.split("│")[-2].strip() == f"{r1:.3f}"
    for builtin in ("linear", "mlp", "registers"):
        assert any(f" {builtin} " in line for line in p.stdout.splitlines())

    # without the plugin the name is unknown: one line, exit 2
    p = run_cli(["train", "--quiet", "head=gated_mlp", *SMALL], tmp_path, cache_dir, env_extra={"MODALIGN_PLUGINS": ""})
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "no option 'gated_mlp' in group 'head'" in p.stderr


def test_a_plugin_with_bad_metadata_is_one_line_exit_2(plugin, tmp_path, cache_dir):
    bad = tmp_path / "bad_head"
    bad.mkdir()
    (bad / "__init__.py").write_text((plugin / "__init__.py").read_text()
                                     .replace('"gated_mlp"', '"bad_head"').replace("2026-", "26-"))
    p = run_cli(["variants"], tmp_path, cache_dir, env_extra={"MODALIGN_PLUGINS": str(bad)})
    assert p.returncode == 2
    line = p.stderr.strip()
    assert len(line.splitlines()) == 1 and "metadata 'date' must be YYYY-MM-DD" in line and "Traceback" not in line


def test_variants_new_refuses_to_overwrite(plugin, tmp_path, cache_dir):
    p = run_cli(["variants", "new", "gated_mlp", "--dir", str(plugin.parent)], tmp_path, cache_dir)
    assert p.returncode == 2 and "already exists" in p.stderr


# the register head ------------------------------------------------------------------------------
def _head(**kw) -> RegisterHead:
    torch.manual_seed(0)
    return RegisterHead(RegisterOptions(**kw), in_dim=32, out_dim=16, n_globals=5)


def _inputs(b=3, t=7):
    torch.manual_seed(1)
    tokens = torch.randn(b, t, 32)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 4:] = False  # sample 0 has 4 valid tokens
    return torch.randn(b, 32), tokens, mask, torch.randn(b, 5)


def test_register_head_shapes_and_aux_term():
    head = _head()
    out = head(*_inputs())
    assert out["embedding"].shape == (3, 16)
    assert out["registers"].shape == (3, 4, 32)
    assert set(out["aux"]) == {"reg_rec_globals"} and out["aux"]["reg_rec_globals"].ndim == 0
    pooled = _head(aux_target="pooled")
    assert set(pooled(*_inputs())["aux"]) == {"reg_rec_pooled"}
    assert "aux" not in _head(registers=3, overlap=3)(*_inputs())  # no complementary registers, no term


def test_padded_tokens_are_masked_out():
    head = _head().eval()
    pooled, tokens, mask, g = _inputs()
    before = head(pooled, tokens, mask, g)["embedding"]
    tokens2 = tokens.clone()
    tokens2[0, 4:] = 1e3 * torch.randn(3, 32)  # garbage in the padding of sample 0
    after = head(pooled, tokens2, mask, g)["embedding"]
    assert torch.allclose(before, after, atol=1e-5)
    tokens2[0, 2] = torch.randn(32)  # a valid token does matter (not a constant shift: LayerNorm removes that)
    assert not torch.allclose(before[0], head(pooled, tokens2, mask, g)["embedding"][0], atol=1e-5)


def test_nested_dropout_keeps_a_prefix():
    head = _head(registers=6, overlap=5)
    head.train()
    torch.manual_seed(3)
    m = head.prefix_mask(2000, "cpu")  # (B, K_o)
    assert m.shape == (2000, 5)
    assert torch.all(m[:, 0] == 1)  # the first register is always kept
    assert torch.all(m[:, 1:] <= m[:, :-1])  # kept registers form a prefix: 1...1 0...0
    k = m.sum(1)
    assert set(k.int().tolist()) == {1, 2, 3, 4, 5}  # uniform: every prefix length occurs
    geo = _head(registers=6, overlap=5, nested_dropout="geometric", geometric_p=0.5)
    geo.train()
    kg = geo.prefix_mask(4000, "cpu").sum(1)
    assert (kg == 1).float().mean() > 0.4 > (kg == 2).float().mean() > (kg == 3).float().mean()
    head.eval()
    head.keep = 2
    assert head.prefix_mask(4, "cpu").tolist() == [[1, 1, 0, 0, 0]] * 4
    # with nested dropout off, training keeps every overlapping register
    off = _head(nested_dropout="none").train()
    assert torch.all(off.prefix_mask(8, "cpu") == 1)


def test_registers_after_the_prefix_do_not_change_the_embedding():
    head = _head().eval()
    inputs = _inputs()
    head.keep = 1
    e1 = head(*inputs)["embedding"]
    with torch.no_grad():
        head.registers[1:] += 5.0  # later registers, overlapping or complementary
    assert torch.allclose(e1, head(*inputs)["embedding"], atol=1e-5)


def test_complementary_registers_get_no_gradient_from_the_contrastive_term():
    head = _head().train()
    out = head(*_inputs())
    text = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    m = torch.nn.functional.normalize(out["embedding"], dim=-1)
    logits = 10 * m @ text.T
    contrastive = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    contrastive.backward(retain_graph=True)
    g = head.registers.grad  # (K, W)
    assert g[:3].abs().sum() > 0  # the overlapping registers learn from it
    assert torch.all(g[3:] == 0)  # the complementary register does not
    assert head.reconstruct.weight.grad is None or torch.all(head.reconstruct.weight.grad == 0)
    head.zero_grad()
    out["aux"]["reg_rec_globals"].backward()
    assert head.registers.grad[3:].abs().sum() > 0  # the reconstruction term does reach it


def test_register_head_trains_and_reports_retrieval_per_registers_kept(tmp_path, cache_dir):
    p = run_cli(["train", "--quiet", "head=registers", "head.depth=1", *SMALL], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    run = next((tmp_path / "outputs" / "runs").iterdir())
    test = json.loads((run / "facts" / "summary.json").read_text())["test"]
    for k in (1, 2, 3):
        assert 0.0 <= test[f"registers_{k}/m2t_R@1"] <= 1.0
    assert "registers_4/m2t_R@1" not in test  # the complementary register is not part of the embedding
    assert test["registers_3/m2t_R@1"] == pytest.approx(test["m2t_R@1"])  # all K_o kept = the headline
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["name"] == "reg_rec_globals" and r["split"] == "train" for r in rows)


@pytest.mark.parametrize("override, expected", [
    ("head.overlap=5", "'head.overlap' is 5; it must be in [1, registers=4]"),
    ("head.heads=5", "'head.heads'=5 does not divide 'encoder.width'"),
    ("head.nested_dropout=random", "'head.nested_dropout' is 'random'; expected one of uniform, geometric, none"),
    ("head.layers=4", "unknown key 'head.layers'"),
])
def test_bad_register_options_are_one_line_exit_2(override, expected, tmp_path, cache_dir):
    p = run_cli(["train", "--quiet", "head=registers", override, *SMALL], tmp_path, cache_dir)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and expected in p.stderr, p.stderr
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a refused config must leave no run directory"


def test_old_flat_head_config_still_loads():
    from modalign.models.align import HeadConfig

    old = {"kind": "mlp", "layers": 3, "hidden": 64, "embed_dim": 32, "dropout": 0.0}
    assert HeadConfig.from_dict(old) == HeadConfig("mlp", 32, {"layers": 3, "hidden": 64, "dropout": 0.0})
    assert HeadConfig.from_dict({"kind": "linear", "layers": 1, "hidden": 512, "embed_dim": 8}).options == {}
    assert os.environ.get("MODALIGN_PLUGINS", "") == ""  # the tests above set it only for their subprocesses
