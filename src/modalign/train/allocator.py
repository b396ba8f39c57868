"""glibc's malloc tuned for training: keep freed memory in the process instead of returning it.

With glibc's defaults every allocation above the mmap threshold (which adapts, up to 32 MiB) is
`mmap`ed and `munmap`ed again on free, and the top of the heap is trimmed back to the OS. A training
step allocates and frees the same large activations every step, so each step pays for fresh,
zeroed pages: 2 million minor page faults per step, about 30% of an fp32 step, for the benchmark
model of BENCHMARKS.md (hardware efficiency). `tune_malloc("tuned")` sets what
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> would set in the environment, through
`mallopt`: large blocks come from the heap and stay there to be reused. The price is a higher
resident set (the heap keeps its high-water mark until the process exits).

When: as early as possible, while the process has no busy threads. The training commands call
`tune_malloc(mode_from_overrides(...))` first thing, before torch or a process group starts.
Called at recipe setup instead, it crashed gloo's I/O thread inside malloc in 2 of about 20
two-rank torchrun launches here (set at start-up through the environment variables: 0 of 18).
The recipes call it again at setup from the composed `env.malloc`, for single-process runs started
some other way (a no-op once tuned), and never under torchrun.

No torch here.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: ~2 GiB of free heap top kept before trimming

_state = "default"


def tune_malloc(mode: str) -> str:
    """mode "tuned" | "default" -> the allocator setting now in effect for this process: "tuned",
    "default", or "default (not glibc)" where there is no glibc to tune.

    "default" leaves the allocator alone; once tuned, a process stays tuned (a sweep's later jobs
    in the same process reuse the heap its earlier jobs grew)."""
    global _state
    if mode not in ("tuned", "default"):
        raise ValueError(f"malloc mode must be 'tuned' or 'default', got {mode!r}")
    if mode == "default" or _state == "tuned":
        return _state
    if platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "default (mallopt refused)"
    _state = "tuned"
    return _state


def state() -> str:
    """The allocator setting in effect for this process: "tuned" or "default"."""
    return _state


def mode_from_overrides(overrides: list[str]) -> str:
    """The env.malloc a command's Hydra overrides ask for (the last one wins), else "tuned" (the
    config default); anything but "default" counts as "tuned" here, and the config check names a
    bad value later."""
    mode = "tuned"
    for o in overrides:
        key, sep, value = o.lstrip("+~").partition("=")
        if sep and key == "env.malloc":
            mode = "default" if value.strip() == "default" else "tuned"
    return mode
