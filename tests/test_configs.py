"""Every config file composes, starts with the command that runs it, and instantiates: the typed
settings validate themselves and the components it describes are built with their real
constructors (data read, models, optimizer and schedule, objective, text encoder resolved, device
placed)."""

from pathlib import Path

import pytest
import yaml

from modalign.errors import UserError
from modalign.recipes.config import compose, to_container

CONF = Path(__file__).resolve().parents[1] / "src" / "modalign" / "conf"
FILES = sorted(CONF.rglob("*.yaml"))


def test_there_are_config_files():
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CONF)) for p in FILES])
def test_config_file_composes_instantiates_and_says_how_to_run_it(path, tmp_path, cache_dir, request):
    # Hydra's `# @package` directive must come first when there is one; the command comes next
    first = next(line for line in path.read_text().splitlines() if not line.startswith("# @"))
    assert first.startswith("# modalign "), f"{path} must start with the command that runs it"
    rel = path.relative_to(CONF)
    if rel.parts[0] == "plan":  # a plan: every job it knows before it starts composes and passes the run checks
        from modalign.plans.executor import Executor
        from modalign.plans.spec import load_plan

        plan = load_plan(rel.stem)
        assert Executor(plan, [], outputs=str(tmp_path)).check_all() >= len(plan.phases)
        return
    if rel.parts[0] == "experiment":
        from modalign.recipes.sweep import plan

        p = plan([f"experiment={rel.stem}"])
        assert p["grid"] and p["metric"].startswith(("test/", "val/")), p  # names its grid and its metric
        return
    # stage 3's files: the fusion group, its root and trainer, and the caption losses (kind xe or scst)
    stage3 = rel.parts[0] == "fusion" or rel.as_posix() in ("fuse.yaml", "trainer/fuse.yaml") or (
        rel.parts[0] == "loss" and yaml.safe_load(path.read_text())["kind"] in ("xe", "scst"))
    root = rel.stem if len(rel.parts) == 1 else \
        ("autoencode" if rel.parts[0] == "bottleneck" else "fuse" if stage3 else "align")
    overrides = [] if len(rel.parts) == 1 else [f"{rel.parts[0]}={rel.stem}"]
    if rel.parts[0] == "data" and rel.stem in ("npz", "file"):
        overrides.append("data.path=x.npz")
    if rel.parts[0] == "text" and rel.stem == "precomputed":
        overrides.append("text.path=x.npz")
    resolved = to_container(compose(overrides, root), "")
    if len(rel.parts) > 1:
        group = rel.parts[0]
        assert group in resolved, f"{group} missing after composing {overrides}"
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(resolved)
    if stage3:  # a tiny LM with SmolLM2's depth and tokenizer, and the session's tiny align run
        cfg.lm.path, cfg.encoder.init_from = str(request.getfixturevalue("tiny_lm")), str(request.getfixturevalue("tiny_run"))
        if cfg.loss.kind == "scst":  # fine-tunes a fuse run: read as far as its init_from check
            cfg.init_from = None
            from modalign.recipes.fuse import FuseRecipe
            from modalign.runs.writer import RunWriter

            with pytest.raises(UserError, match="loss=scst fine-tunes a trained fuse run: set init_from"):
                FuseRecipe(cfg, RunWriter(tmp_path / "run", rank=1), progress=False).read_config()
            return
    _instantiate(rel, cfg, tmp_path)


def test_unknown_key_is_a_user_error():
    with pytest.raises(UserError, match="trainer.max_stepz"):
        compose(["trainer.max_stepz=3"])


def test_unknown_group_option_is_a_user_error():
    with pytest.raises(UserError, match="encoder"):
        compose(["encoder=lstm"])


def test_missing_mandatory_value_names_the_key():
    with pytest.raises(UserError, match="data.path"):
        to_container(compose(["data=npz"]), "")


def _tiny_data(tmp_path):
    from modalign.data.demo import make_demo_data

    return make_demo_data(n_train=24, n_val=8, n_test=8, seed=0)


def _model_for(settings, data):
    from modalign.models.align import AlignModel

    return AlignModel(settings.model_config(data, text_dim=384))  # all-MiniLM-L6-v2's width


def _instantiate(rel: Path, cfg, tmp_path) -> None:
    """Build what the config file describes, with the real constructors, as a run's setup does."""
    import torch

    from modalign.recipes.settings import read_env, read_settings, read_training

    group = rel.parts[0] if len(rel.parts) > 1 else None
    if group == "data":
        from modalign.recipes.align import load_data

        if rel.stem in ("npz", "file"):  # file: any format; HDF5 kept on disk here
            from modalign.data.formats import write_data

            path = tmp_path / ("tiny.npz" if rel.stem == "npz" else "tiny.h5")
            write_data(_tiny_data(tmp_path), str(path))
            cfg.data.path = str(path)
            if rel.stem == "file":
                cfg.data.lazy = True
        elif rel.stem == "demo":
            cfg.data.n_train, cfg.data.n_val, cfg.data.n_test = 24, 8, 8
        data = load_data(cfg).validate()
        assert len(data) > 0 and data.lazy == (rel.stem == "file")
        return
    if group == "checks":
        from modalign.analysis.checks import settings_of, validate

        validate(to_container(cfg.checks, "checks"))
        assert settings_of(to_container(cfg, ""))["loss_falls"]["min_drop"] > 0
        return
    if group == "env":
        from modalign.train.device import resolve_device

        assert resolve_device(read_env(cfg).device).type in ("cpu", "cuda", "mps")
        return
    if group == "text":
        t = read_settings(cfg).text
        if t.kind == "precomputed":  # a file of the user's vectors: read and looked up as a run does
            import numpy as np

            from modalign.data.text_embeddings import lookup

            np.savez(tmp_path / "emb.npz", texts=np.array(["a caption"]), embeddings=np.ones((1, 8), np.float32))
            assert lookup(tmp_path / "emb.npz", ["a caption"])[0].shape == (1, 8)
            return
        from modalign.models.text_encoder import TextEmbedder

        TextEmbedder(t.model, precision=t.precision, batch_size=t.batch_size)  # resolves the installed model
        return
    if cfg.get("recipe") == "fuse":
        from modalign.recipes.fuse import FuseRecipe
        from modalign.runs.writer import RunWriter

        cfg.data.n_train, cfg.data.n_val, cfg.data.n_test = 24, 8, 8
        recipe = FuseRecipe(cfg, RunWriter(tmp_path / "run", rank=1), progress=False)  # writes nothing
        recipe.setup()
        batch = recipe.tensors["train"].batch(torch.arange(4))
        batch = recipe.objective.inputs(batch)
        assert recipe.objective(recipe.model(batch), batch)["loss"].isfinite()
        from modalign.train.optim import build_optimizer

        build_optimizer(recipe.model.components(), recipe.optim_cfg)
        return
    if rel.stem == "autoencode" or group == "bottleneck":
        from modalign.recipes.autoencode import AutoencodeRecipe
        from modalign.runs.writer import RunWriter

        cfg.data.n_train, cfg.data.n_val, cfg.data.n_test = 24, 8, 8
        recipe = AutoencodeRecipe(cfg, RunWriter(tmp_path / "run", rank=1), progress=False)  # writes nothing
        recipe.setup()
        batch = recipe.tensors["train"].batch(torch.arange(4))
        assert recipe.objective(recipe.model(batch), batch)["loss"].isfinite()
        return
    settings = read_settings(cfg)  # align root, encoder, head, loss, trainer
    data = _tiny_data(tmp_path)
    model = _model_for(settings, data)
    if group == "trainer" or rel.stem == "align":
        from modalign.train.optim import build_optimizer, build_scheduler

        _, t, o = read_training(cfg, ("encoder", "heads", "logit_scale"))
        build_scheduler(build_optimizer(model.components(), o), o, t.max_steps)
    if group == "loss" or rel.stem == "align":
        from modalign.losses.objective import AlignObjective

        AlignObjective(settings.loss, model.cfg.text_dim)
    assert sum(p.numel() for p in model.parameters()) > 0
