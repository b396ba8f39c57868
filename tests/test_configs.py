"""Every config file composes, starts with the command that runs it, and builds typed settings."""

from pathlib import Path

import pytest

from modalign.errors import UserError
from modalign.recipes.config import compose, to_container

CONF = Path(__file__).resolve().parents[1] / "src" / "modalign" / "conf"
FILES = sorted(CONF.rglob("*.yaml"))


def test_there_are_config_files():
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CONF)) for p in FILES])
def test_config_file_composes_and_says_how_to_run_it(path):
    # Hydra's `# @package` directive must come first when there is one; the command comes next
    first = next(line for line in path.read_text().splitlines() if not line.startswith("# @"))
    assert first.startswith("# modalign "), f"{path} must start with the command that runs it"
    rel = path.relative_to(CONF)
    if rel.parts[0] == "experiment":
        from modalign.recipes.sweep import plan

        p = plan([f"experiment={rel.stem}"])
        assert p["grid"] and p["metric"].startswith(("test/", "val/")), p  # names its grid and its metric
        return
    root = rel.stem if len(rel.parts) == 1 else ("autoencode" if rel.parts[0] == "bottleneck" else "align")
    overrides = [] if len(rel.parts) == 1 else [f"{rel.parts[0]}={rel.stem}"]
    if rel.parts[0] == "data" and rel.stem == "npz":
        overrides.append("data.path=x.npz")
    cfg = to_container(compose(overrides, root), "")
    if len(rel.parts) > 1:
        group = rel.parts[0]
        assert group in cfg, f"{group} missing after composing {overrides}"


def test_unknown_key_is_a_user_error():
    with pytest.raises(UserError, match="trainer.max_stepz"):
        compose(["trainer.max_stepz=3"])


def test_unknown_group_option_is_a_user_error():
    with pytest.raises(UserError, match="encoder"):
        compose(["encoder=lstm"])


def test_missing_mandatory_value_names_the_key():
    with pytest.raises(UserError, match="data.path"):
        to_container(compose(["data=npz"]), "")
