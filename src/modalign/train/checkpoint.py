"""Self-describing checkpoints, written so that a kill at any instant leaves a loadable one.

A checkpoint is a `torch.save`d dict that `torch.load(weights_only=True)` can read back:

    format_version  int, FORMAT_VERSION (added by save_checkpoint)
    step            int (added by save_checkpoint)
    model_config    dict of primitives: enough to rebuild the model with no run dir
    model           the model's state dict
    optional        optimizer, scheduler (state dicts), rng (see rng_state), epoch, best_metric,
                    callbacks ({name: plain dict}), and anything else of tensors / primitives

`checkpoints/manifest.json` lists every checkpoint in the directory:

    {"format_version": 1,
     "checkpoints": {"last.pt": {"sha256", "step", "metric", "time", "bytes"[, "pending": {...}]}}}

Atomicity. One writer per checkpoint directory (rank 0). save_checkpoint takes four steps, each
durable (fsync) before the next:

    1. write `.<name>.tmp-<pid>` (flush, fsync)         on disk: old file, manifest: old entry
    2. manifest: the old entry + "pending": new entry    on disk: old file, manifest accepts both
    3. os.replace(tmp, name), fsync the directory        on disk: new file, manifest accepts both
    4. manifest: the new entry, "pending" dropped        on disk: new file, manifest: new entry

Every manifest write is itself atomic (temp, fsync, os.replace, fsync dir). The loader accepts a
file whose sha256 equals either the entry's or its pending entry's, so a kill at any instant leaves
`name` holding the previous complete checkpoint or the new complete one, and the manifest vouches
for whichever it is; any other content (truncated, bit-flipped, swapped) is refused. The next save
settles a leftover "pending" by hashing the file once and removes stale temp files. A kill during
the very first save of `last.pt` leaves no `last.pt`: there is no checkpoint yet, and loading the
run says so.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalign.errors import UserError
from modalign import faults

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format_version", "step", "model_config", "model")

_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.pt$")
_STEP_NAME = re.compile(r"^step_(\d+)\.pt$")
# Leaves torch.load(weights_only=True) rebuilds without any allowlisting.
_LEAVES = (
    torch.Tensor, bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size
)


# ---- save -----------------------------------------------------------------------------------


def save_checkpoint(
    ckpt_dir: str | Path, name: str, payload: dict, *, step: int, metric: float | None = None
) -> Path:
    """Write ckpt_dir/name (e.g. "last.pt", "best.pt", "step_200.pt") atomically and record it in
    the manifest (see the module docstring for the order). payload must hold only tensors,
    numbers, strings, bools, None and lists/tuples/dicts of those, plus the keys "model_config"
    and "model"; "format_version" and "step" are added. Returns the path written.
    """
    ckpt_dir = Path(ckpt_dir)
    if not _NAME.match(name):
        raise ValueError(f"checkpoint name {name!r} must be a plain file name ending in .pt")
    payload = _stamp(payload, step)
    final = ckpt_dir / name
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp, entry = _write_temp(ckpt_dir, name, payload, step=step, metric=metric)
        faults.kill_if("kill:checkpoint_tmp")
        _mark_pending(ckpt_dir, name, entry)
    except OSError as e:  # a full disk, a quota, a vanished mount: the previous file stays as it was
        for stale in ckpt_dir.glob(f".{name}.tmp-*"):
            stale.unlink(missing_ok=True)  # give the space back
        raise CheckpointWriteError(f"{final}: cannot write the checkpoint of step {step} ({e.strerror or e}); "
                                   f"{_previous(ckpt_dir, name)}") from None
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    faults.kill_if("kill:checkpoint_rename")
    _commit(ckpt_dir, name, entry)
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. no space left); the previous one is intact."""


def _previous(ckpt_dir: Path, name: str) -> str:
    try:
        entry = _read_manifest(ckpt_dir)["checkpoints"].get(name)
    except (UserError, OSError):
        entry = None
    if entry and (ckpt_dir / name).exists():
        return f"the previous {name} (step {entry.get('step')}) is intact"
    return f"there was no previous {name}"


def _stamp(payload: dict, step: int) -> dict:
    if not isinstance(payload, dict):
        raise TypeError(f"checkpoint payload must be a dict, got {type(payload).__name__}")
    missing = [k for k in ("model_config", "model") if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {', '.join(missing)}")
    if not isinstance(payload["model_config"], dict):
        raise TypeError("checkpoint payload['model_config'] must be a dict of primitives")
    if "step" in payload and payload["step"] != step:
        raise ValueError(f"payload['step']={payload['step']} disagrees with step={step}")
    _check_loadable(payload, "payload")
    return {**payload, "format_version": FORMAT_VERSION, "step": int(step)}


def _check_loadable(obj: Any, where: str) -> None:
    """Fail at save time, naming the key, rather than write a file weights_only would refuse."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is {type(k).__name__}, not str or int")
            _check_loadable(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
    elif not isinstance(obj, _LEAVES):
        raise TypeError(
            f"{where} is {type(obj).__module__}.{type(obj).__qualname__}: checkpoints hold only "
            "tensors, numbers, strings, bools, None and lists/tuples/dicts of those"
        )


def _write_temp(ckpt_dir: Path, name: str, payload: dict, *, step: int, metric: float | None):
    """Step 1: the new file under a temp name, durable; returns (temp path, manifest entry)."""
    for stale in ckpt_dir.glob(f".{name}.tmp-*"):
        stale.unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    tmp = ckpt_dir / f".{name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    entry = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "step": int(step),
        # JSON has no NaN; a non-finite metric is recorded as null.
        "metric": float(metric) if metric is not None and math.isfinite(metric) else None,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bytes": len(data),
    }
    return tmp, entry


def _mark_pending(ckpt_dir: Path, name: str, entry: dict) -> None:
    """Step 2: keep the current entry valid and add the new one as pending."""
    manifest = _read_manifest(ckpt_dir)
    settled = {}
    for other, old in manifest["checkpoints"].items():
        old = _settle(ckpt_dir / other, old)
        if old is not None:
            settled[other] = old
    settled[name] = {**settled.get(name, {}), "pending": entry}
    manifest["checkpoints"] = settled
    _write_manifest(ckpt_dir, manifest)


def _commit(ckpt_dir: Path, name: str, entry: dict) -> None:
    """Step 4: the new file is in place; its entry replaces the old one."""
    manifest = _read_manifest(ckpt_dir)
    manifest["checkpoints"][name] = entry
    _write_manifest(ckpt_dir, manifest)


def _settle(file: Path, entry: dict) -> dict | None:
    """The entry that describes `file` as it is on disk after an interrupted save; None if the file
    is gone. Hashes the file only when a save was interrupted (a "pending" is left)."""
    if not file.is_file():
        return None
    pending = entry.get("pending")
    if pending is None:
        return entry
    sha = _sha256_file(file)
    if sha == pending["sha256"]:
        return pending
    committed = {k: v for k, v in entry.items() if k != "pending"}
    # Neither matches: keep an sha the file fails, so loading reports the mismatch.
    return committed if "sha256" in committed else pending


# ---- load -----------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, *, verify: bool = True) -> dict:
    """Load a checkpoint on CPU with torch.load(weights_only=True) and check it.

    path may be a .pt file, a checkpoints dir or a run dir (then its last.pt). With verify, the
    file's sha256 must match its entry in the manifest beside it (either the entry or, after an
    interrupted save, its pending entry). A file that no manifest lists (e.g. copied alone) is
    loaded without the sha256 check, but still only through weights_only, which refuses anything
    that would run code. Every failure is a UserError with one line naming the file.
    """
    file = resolve_checkpoint(path)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise UserError(f"{file}: cannot read checkpoint ({e.strerror})") from e
    if verify:
        _verify_sha(file, data)
    obj = _torch_load(file, data)
    _check_keys(file, obj)
    return obj


def resolve_checkpoint(path: str | Path) -> Path:
    """run dir -> run/checkpoints/last.pt, checkpoints dir -> last.pt, file -> file."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.pt", p / "last.pt"):
            if candidate.is_file():
                return candidate
        raise UserError(f"{p}: no checkpoint here (looked for checkpoints/last.pt and last.pt)")
    raise UserError(f"{p}: checkpoint not found")


def _verify_sha(file: Path, data: bytes) -> None:
    manifest_path = file.parent / MANIFEST
    if not manifest_path.is_file():
        return
    entry = _read_manifest(file.parent)["checkpoints"].get(file.name)
    if entry is None:
        return
    accepted = [e for e in (entry, entry.get("pending")) if e and e.get("sha256")]
    sha = hashlib.sha256(data).hexdigest()
    if any(e["sha256"] == sha for e in accepted):
        return
    expected = accepted[0] if accepted else {"sha256": "?", "bytes": "?"}
    size = f"{len(data)} bytes, manifest says {expected.get('bytes', '?')}"
    short = isinstance(expected.get("bytes"), int) and len(data) < expected["bytes"]
    what = "truncated" if short else "corrupted"
    raise UserError(
        f"{file}: sha256 {sha[:16]} does not match {manifest_path} ({expected['sha256'][:16]}; "
        f"{size}): the file is {what}"
    )


def _torch_load(file: Path, data: bytes) -> Any:
    # torch.save has written zip archives since torch 1.6; anything else is not ours or is cut
    # short (the zip directory sits at the end of the file).
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise UserError(
            f"{file}: not a torch checkpoint "
            "(no zip archive: truncated, or not written by torch.save)"
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL (\S+) was not an allowed global", msg)
        if found:
            raise UserError(
                f"{file}: refused: it contains non-tensor objects ({found.group(1)}) and modalign "
                "only loads weights (torch.load weights_only=True)"
            ) from e
        detail = re.search(r"WeightsUnpickler error: ([^\n]*)", msg)
        raise UserError(
            f"{file}: refused by torch.load(weights_only=True): "
            f"{detail.group(1) if detail else _first_line(e)}"
        ) from e
    except Exception as e:  # noqa: BLE001 - zip / storage / pickle errors all mean a bad file
        raise UserError(f"{file}: corrupt torch checkpoint ({_first_line(e)})") from e


def _check_keys(file: Path, obj: Any) -> None:
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise UserError(f"{file}: not a modalign checkpoint (holds a {kind}, not a dict)")
    if "format_version" not in obj:
        raise UserError(f"{file}: not a modalign checkpoint (no format_version)")
    if obj["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"{file}: checkpoint format_version {obj['format_version']!r}; this modalign reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise UserError(f"{file}: checkpoint lacks required keys: {', '.join(missing)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# ---- manifest -------------------------------------------------------------------------------


def list_checkpoints(ckpt_dir: str | Path) -> list[dict]:
    """The manifest's entries for files present, as {"name", "sha256", "step", "metric", "time",
    "bytes"}, ordered by step then name. Accepts a run dir too."""
    ckpt_dir = _as_ckpt_dir(ckpt_dir)
    out = []
    for name, entry in _read_manifest(ckpt_dir)["checkpoints"].items():
        entry = _settle(ckpt_dir / name, entry)
        if entry is not None:
            out.append({"name": name, **{k: v for k, v in entry.items() if k != "pending"}})
    return sorted(out, key=lambda e: (e["step"], e["name"]))


def prune_step_checkpoints(ckpt_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step_<n>.pt files (by n) and drop them from the manifest.

    Files go first, then the manifest: a kill in between leaves entries for missing files, which
    list_checkpoints skips and the next manifest write drops; never an unlisted file."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    ckpt_dir = _as_ckpt_dir(ckpt_dir)
    manifest = _read_manifest(ckpt_dir)
    names = set(manifest["checkpoints"]) | {p.name for p in ckpt_dir.glob("step_*.pt")}
    steps = sorted((int(m.group(1)), n) for n in names if (m := _STEP_NAME.match(n)))
    doomed = [n for _, n in steps[: max(len(steps) - keep, 0)]]
    if not doomed:
        return
    for n in doomed:
        (ckpt_dir / n).unlink(missing_ok=True)
    _fsync_dir(ckpt_dir)
    for n in doomed:
        manifest["checkpoints"].pop(n, None)
    _write_manifest(ckpt_dir, manifest)


def _as_ckpt_dir(path: str | Path) -> Path:
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def _read_manifest(ckpt_dir: Path) -> dict:
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return {"format_version": FORMAT_VERSION, "checkpoints": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable checkpoint manifest ({_first_line(e)})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("checkpoints"), dict):
        raise UserError(f"{path}: not a checkpoint manifest (no 'checkpoints' mapping)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: manifest format_version {manifest.get('format_version')!r}; this modalign "
            f"reads version {FORMAT_VERSION}"
        )
    return manifest


def _write_manifest(ckpt_dir: Path, manifest: dict) -> None:
    data = (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    tmp = ckpt_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / MANIFEST)
    _fsync_dir(ckpt_dir)


def _fsync_dir(d: Path) -> None:
    """Make a rename in d durable. Not possible on Windows, where os.replace is already atomic."""
    if os.name != "posix":
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- RNG ------------------------------------------------------------------------------------


def rng_state() -> dict:
    """The global RNG states as weights_only-safe values: {"torch": uint8 tensor, "python": ...,
    "numpy": ...[, "cuda": list of uint8 tensors]}."""
    version, mt, gauss_next = random.getstate()  # mt: 624 words + position, all < 2**32
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "state": torch.tensor(mt, dtype=torch.int64),  # [625]
            "gauss_next": gauss_next,
        },
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(keys.astype(np.int64)),  # [624]
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state captured; keys that are absent are left alone."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8))
    if "python" in state:
        py = state["python"]
        mt = tuple(int(x) for x in py["state"].tolist())
        random.setstate((py["version"], mt, py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        np.random.set_state(
            (
                npy["algorithm"],
                npy["keys"].numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            )
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
