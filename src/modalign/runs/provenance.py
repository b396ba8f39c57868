"""Where a run came from: code version, environment. No torch import here (callers pass versions)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import modalign


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace")


def code_info() -> dict:
    """package_version, and the git commit / dirty flag / sha256 of the diff of the checkout the
    package is imported from (an editable install); None where the code is not in a git checkout."""
    src = Path(modalign.__file__).resolve().parent
    info = {"package_version": modalign.__version__, "git_commit": None, "git_dirty": None, "diff_sha256": None}
    commit = _git(["rev-parse", "HEAD"], src)
    if commit is None:
        return info
    info["git_commit"] = commit.strip()
    diff = _git(["diff", "HEAD", "--", "."], Path(_git(["rev-parse", "--show-toplevel"], src).strip()))
    status = _git(["status", "--porcelain", "--untracked-files=no"], src) or ""
    info["git_dirty"] = bool(status.strip())
    info["diff_sha256"] = hashlib.sha256((diff or "").encode()).hexdigest() if info["git_dirty"] else None
    return info


def host_info() -> dict:
    """The machine and interpreter (run.json env; the device side is modalign.train.device.env_info)."""
    return {"host": platform.node(), "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count()}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
