"""env.malloc=tuned: glibc serves large blocks from its heap and keeps them when freed, so the
activations a training step allocates and frees again are reused, not mapped afresh every step.

Checked with glibc's own accounting (mallinfo2) in a fresh process per mode, on a 33 MiB block:
above the largest threshold (32 MiB) under which glibc's default would stop mapping blocks of a
size it has seen freed.

Run: cd /work/main && .venv/bin/python -m pytest -q tests/test_allocator.py
"""

import json
import platform
import subprocess
import sys

import pytest

from modalign.train.allocator import mode_from_overrides, tune_malloc

PROBE = """
import ctypes, json, sys
import numpy as np
from modalign.train.allocator import mode_from_overrides, tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
state = tune_malloc(sys.argv[1])
before = libc.mallinfo2().hblkhd
block = np.ones(33 * 2**20 // 8)
mapped = libc.mallinfo2().hblkhd - before  # bytes of the block that glibc mmapped
del block
kept = libc.mallinfo2().fordblks  # free bytes glibc kept in its heap after the free
print(json.dumps({"state": state, "mapped_mib": mapped / 2**20, "kept_mib": kept / 2**20}))
"""


def probe(mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc; there is no glibc here")
def test_tuned_malloc_serves_large_blocks_from_the_heap_and_keeps_them():
    default, tuned = probe("default"), probe("tuned")
    assert default["state"] == "default" and tuned["state"] == "tuned"
    # default: the block is mmapped, and munmapped on free (nothing of it kept)
    assert default["mapped_mib"] >= 33 and default["kept_mib"] < 1, default
    # tuned: no mmap, and the freed 33 MiB stay in the heap for the next step
    assert tuned["mapped_mib"] == 0 and tuned["kept_mib"] >= 33, tuned


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="tuned"):
        tune_malloc("jemalloc")


def test_the_command_reads_env_malloc_from_its_overrides():
    # The training commands tune before torch starts threads, so they read the overrides themselves.
    assert mode_from_overrides([]) == "tuned"  # the config default
    assert mode_from_overrides(["seed=1", "env.malloc=default"]) == "default"
    assert mode_from_overrides(["env.malloc=default", "++env.malloc=tuned"]) == "tuned"  # the last one wins
    assert mode_from_overrides(["env.device=cpu", "head=mlp"]) == "tuned"
