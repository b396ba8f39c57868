# cd /work/main && .venv/bin/python -m pytest -q tests/test_checkpoint.py
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from modalign.errors import UserError
from modalign.train import checkpoint as ck
from modalign.train.checkpoint import (
    FORMAT_VERSION,
    list_checkpoints,
    load_checkpoint,
    prune_step_checkpoints,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _payload(step: int, fill: float | None = None) -> dict:
    w = torch.full((4, 3), float(step if fill is None else fill))
    return {"model_config": {"dim": 3, "name": "tiny"}, "model": {"w": w}, "epoch": 0}


def _one_line_naming(excinfo, file: Path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(file) in msg
    return msg


@pytest.fixture
def run(tmp_path: Path) -> Path:
    (tmp_path / "checkpoints").mkdir()
    return tmp_path


def test_round_trip_model_optimizer_scheduler_rng(run: Path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    payload = {
        "model_config": {"in_features": 3, "out_features": 2},
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng_state(),
        "epoch": 1,
        "best_metric": 0.5,
        "callbacks": {"early_stop": {"wait": 2, "best": 0.5}},
    }
    path = save_checkpoint(run / "checkpoints", "last.pt", payload, step=3, metric=0.5)
    expected = (torch.rand(4), random.random(), np.random.rand())

    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    ckpt = load_checkpoint(run)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["step"] == 3 and ckpt["epoch"] == 1
    model2 = torch.nn.Linear(**ckpt["model_config"])
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    # Build the scheduler before loading the optimizer: its constructor resets the lr.
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])

    assert torch.equal(torch.rand(4), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.last_epoch == sched.last_epoch == 3
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert ckpt["callbacks"] == payload["callbacks"]
    [entry] = list_checkpoints(run / "checkpoints")
    assert entry["name"] == "last.pt" and entry["step"] == 3 and entry["metric"] == 0.5
    assert entry["bytes"] == path.stat().st_size and len(entry["sha256"]) == 64


def test_resolve_checkpoint(run: Path):
    path = save_checkpoint(run / "checkpoints", "last.pt", _payload(1), step=1)
    assert resolve_checkpoint(run) == path
    assert resolve_checkpoint(run / "checkpoints") == path
    assert resolve_checkpoint(path) == path
    with pytest.raises(UserError) as e:
        resolve_checkpoint(run / "nope.pt")
    _one_line_naming(e, run / "nope.pt")
    with pytest.raises(UserError) as e:
        load_checkpoint(run / "checkpoints" / "missing")
    _one_line_naming(e, run / "checkpoints" / "missing")


def test_save_refuses_unloadable_payload(tmp_path: Path):
    with pytest.raises(TypeError, match=r"payload\['model'\]\['w'\].*numpy"):
        save_checkpoint(tmp_path, "last.pt", {"model_config": {}, "model": {"w": np.zeros(2)}}, step=0)
    with pytest.raises(ValueError, match="model_config"):
        save_checkpoint(tmp_path, "last.pt", {"model": {}}, step=0)
    assert not (tmp_path / "last.pt").exists()


def test_truncated_file_is_refused(run: Path):
    path = save_checkpoint(run / "checkpoints", "last.pt", _payload(1), step=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load_checkpoint(run)
    msg = _one_line_naming(e, path)
    assert "sha256" in msg and "truncated" in msg

    alone = run / "alone.pt"  # no manifest beside it: torch itself must notice
    alone.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load_checkpoint(alone)
    assert "not a torch checkpoint" in _one_line_naming(e, alone)


def test_bit_flipped_file_is_refused(run: Path):
    path = save_checkpoint(run / "checkpoints", "last.pt", _payload(1), step=1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "corrupted" in _one_line_naming(e, path)
    assert load_checkpoint(path, verify=False)["step"] == 1  # the flip hit tensor bytes


def test_text_file_renamed_pt_is_refused(tmp_path: Path):
    path = tmp_path / "notes.pt"
    path.write_text("epoch 3: loss 0.12\n")
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "not a torch checkpoint" in _one_line_naming(e, path)


class _Payload:
    """Unpickling this calls open(marker, "w"): code that runs on load."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "step": 0, "model_config": {}, "model": _Payload(marker)}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = _one_line_naming(e, path)
    assert "non-tensor objects" in msg and "only loads weights" in msg
    assert not marker.exists()

    # The payload is live: plain unpickling (what an unsafe load does) runs it.
    live = tmp_path / "live"
    pickle.loads(pickle.dumps({"model": _Payload(live)}))
    assert live.exists()


def test_format_version_and_required_keys(tmp_path: Path):
    cases = {
        "list.pt": ([1, 2], "not a dict"),
        "nover.pt": ({"step": 0, "model_config": {}, "model": {}}, "no format_version"),
        "v2.pt": ({"format_version": 2, "step": 0, "model_config": {}, "model": {}}, "format_version 2"),
        "nokeys.pt": ({"format_version": 1, "step": 0}, "model_config, model"),
    }
    for name, (obj, expected) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(UserError) as e:
            load_checkpoint(tmp_path / name)
        assert expected in _one_line_naming(e, tmp_path / name)


def test_file_outside_any_manifest_loads(run: Path, tmp_path: Path):
    src = save_checkpoint(run / "checkpoints", "best.pt", _payload(7), step=7, metric=0.9)
    copy = tmp_path / "copied.pt"
    copy.write_bytes(src.read_bytes())
    assert load_checkpoint(copy)["step"] == 7


# ---- interrupted saves: each leaves the previous or the new checkpoint, both loadable ----------


def _replace_fails_for(name: str, monkeypatch):
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == name:
            raise KeyboardInterrupt("killed")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(ck.os, "replace", replace)


def test_crash_before_manifest_pending_keeps_previous(run: Path, monkeypatch):
    ckdir = run / "checkpoints"
    save_checkpoint(ckdir, "last.pt", _payload(1), step=1)
    monkeypatch.setattr(ck, "_mark_pending", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckdir, "last.pt", _payload(2), step=2)
    assert list(ckdir.glob(".last.pt.tmp-*"))  # the temp file was written
    assert load_checkpoint(run)["step"] == 1


def test_crash_before_rename_keeps_previous(run: Path, monkeypatch):
    ckdir = run / "checkpoints"
    save_checkpoint(ckdir, "last.pt", _payload(1), step=1)
    with monkeypatch.context() as m:
        _replace_fails_for("last.pt", m)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(ckdir, "last.pt", _payload(2), step=2)
    manifest = json.loads((ckdir / "manifest.json").read_text())
    assert manifest["checkpoints"]["last.pt"]["pending"]["step"] == 2
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], _payload(1)["model"]["w"])
    assert [e["step"] for e in list_checkpoints(ckdir)] == [1]

    save_checkpoint(ckdir, "last.pt", _payload(3), step=3)  # the next save settles and cleans up
    assert load_checkpoint(run)["step"] == 3
    assert "pending" not in json.loads((ckdir / "manifest.json").read_text())["checkpoints"]["last.pt"]
    assert not list(ckdir.glob(".*.tmp-*"))


def test_crash_between_rename_and_manifest_commit_gives_new(run: Path, monkeypatch):
    ckdir = run / "checkpoints"
    save_checkpoint(ckdir, "last.pt", _payload(1), step=1)
    with monkeypatch.context() as m:
        m.setattr(ck, "_commit", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(ckdir, "last.pt", _payload(2), step=2)
    manifest = json.loads((ckdir / "manifest.json").read_text())
    assert manifest["checkpoints"]["last.pt"]["step"] == 1  # the manifest still names the old one
    assert load_checkpoint(run)["step"] == 2
    assert [e["step"] for e in list_checkpoints(ckdir)] == [2]

    save_checkpoint(ckdir, "best.pt", _payload(2), step=2, metric=0.1)  # settles last.pt too
    entries = json.loads((ckdir / "manifest.json").read_text())["checkpoints"]
    assert entries["last.pt"]["step"] == 2 and "pending" not in entries["last.pt"]
    assert load_checkpoint(run)["step"] == 2


def test_crash_during_first_save_leaves_no_checkpoint_then_recovers(run: Path, monkeypatch):
    ckdir = run / "checkpoints"
    with monkeypatch.context() as m:
        _replace_fails_for("last.pt", m)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(ckdir, "last.pt", _payload(1), step=1)
    with pytest.raises(UserError, match="no checkpoint here"):
        load_checkpoint(run)
    assert list_checkpoints(ckdir) == []
    save_checkpoint(ckdir, "last.pt", _payload(2), step=2)
    assert load_checkpoint(run)["step"] == 2


def test_manifest_crash_leaves_old_manifest(run: Path, monkeypatch):
    ckdir = run / "checkpoints"
    save_checkpoint(ckdir, "last.pt", _payload(1), step=1)
    before = (ckdir / "manifest.json").read_text()
    with monkeypatch.context() as m:
        _replace_fails_for("manifest.json", m)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(ckdir, "last.pt", _payload(2), step=2)
    assert (ckdir / "manifest.json").read_text() == before
    assert load_checkpoint(run)["step"] == 1


_WRITER = """
import sys, torch
from modalign.train.checkpoint import save_checkpoint
print("ready", flush=True)
step = 0
while True:
    step += 1
    w = torch.full((256, 1024), float(step))  # 1 MiB, so a kill often lands mid-write
    save_checkpoint(sys.argv[1], "last.pt", {"model_config": {}, "model": {"w": w}}, step=step)
"""


def _inside_a_write(d: Path) -> bool:
    """Whether the kill landed inside a save: its temp file is still there (killed while writing it
    or before the rename), or the manifest holds a pending entry (killed between rename and commit)."""
    if any(d.glob(".last.pt.tmp-*")):
        return True
    try:
        entry = json.loads((d / "manifest.json").read_text())["checkpoints"].get("last.pt", {})
    except (OSError, ValueError):
        return False
    return "pending" in entry


def test_sigkill_at_any_instant_leaves_a_complete_checkpoint(tmp_path: Path):
    """Writers saving 1 MiB checkpoints in a loop are SIGKILLed at staggered moments, in rounds of
    four until at least two kills landed inside a write (the test fails if none did in three
    rounds: then it would prove nothing). Every directory must then load a complete checkpoint."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    delays = [0.0, 0.05, 0.12, 0.25]
    inside = checked = 0
    for rnd in range(3):
        procs = []
        for i, _ in enumerate(delays):
            d = tmp_path / f"round{rnd}_run{i}" / "checkpoints"
            p = subprocess.Popen([sys.executable, str(script), str(d)], stdout=subprocess.PIPE)
            procs.append((p, d))
        for (p, d), delay in zip(procs, delays):
            assert p.stdout.readline().strip() == b"ready"
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
        for p, d in procs:
            p.wait()
            inside += _inside_a_write(d)
            if not (d / "last.pt").exists():
                continue  # killed during its first save: there is no checkpoint yet
            ckpt = load_checkpoint(d.parent)
            assert ckpt["step"] >= 1
            assert torch.equal(ckpt["model"]["w"], torch.full((256, 1024), float(ckpt["step"])))
            checked += 1
        if inside >= 2:
            break
    assert inside >= 2, f"only {inside} of {4 * (rnd + 1)} kills landed inside a checkpoint write"
    assert checked >= 1


def test_prune_keeps_newest_step_checkpoints(run: Path):
    ckdir = run / "checkpoints"
    for step in (100, 200, 300, 1000):
        save_checkpoint(ckdir, f"step_{step}.pt", _payload(step), step=step)
    save_checkpoint(ckdir, "last.pt", _payload(1000), step=1000)
    save_checkpoint(ckdir, "best.pt", _payload(100), step=100, metric=0.3)
    prune_step_checkpoints(ckdir, keep=2)
    names = {e["name"] for e in list_checkpoints(ckdir)}
    assert names == {"step_300.pt", "step_1000.pt", "last.pt", "best.pt"}
    assert sorted(p.name for p in ckdir.glob("*.pt")) == sorted(names)
    assert set(json.loads((ckdir / "manifest.json").read_text())["checkpoints"]) == names
    prune_step_checkpoints(run, keep=0)
    assert {e["name"] for e in list_checkpoints(ckdir)} == {"last.pt", "best.pt"}
