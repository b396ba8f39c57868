"""glibc's malloc tuned for training: keep freed memory in the process instead of returning it.

With glibc's defaults every allocation above the mmap threshold (which adapts, up to 32 MiB) is
`mmap`ed and `munmap`ed again on free, and the top of the heap is trimmed back to the OS. A training
step allocates and frees the same large activations every step, so each step pays for fresh,
zeroed pages: 2 million minor page faults per step, about 30% of an fp32 step, for the benchmark
model of BENCHMARKS.md (hardware efficiency). `tune_malloc("tuned")` sets what
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> would set in the environment, through
`mallopt`: large blocks come from the heap and stay there to be reused. The price is a higher
resident set (the heap keeps its high-water mark until the process exits).

No torch here; called by the recipes at setup from `env.malloc`.
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
