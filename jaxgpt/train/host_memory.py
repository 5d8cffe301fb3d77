"""Keep freed host memory in the process, so XLA:CPU stops page-faulting its buffers every step.

XLA:CPU allocates a compiled function's temporaries with malloc on every call: one block of ~12 MB for the
train step of nanoGPT's CPU recipe, 857 MB at the shakespeare_char shape with batch 8. glibc serves blocks
that large with mmap and unmaps them on free (or trims its heap), so every step touches fresh pages that the
kernel must zero-fill: 11,900 page faults a step at the CPU recipe, 218,000 at shakespeare_char, a third of
the step on a 2-core VM. `retain_freed_memory()` has glibc serve large blocks from its heap and never give
the heap back, so a step reuses the previous step's pages; and it keeps every thread on glibc's main heap,
because the per-thread heaps ("arenas") of XLA's worker threads are unmapped whenever they fall empty. The
price is that the process keeps its peak host memory until it exits, as device allocators (XLA's BFC,
PyTorch's caching allocator) do on accelerators. Call it early: threads started before it keep their arenas.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory for reuse (one heap, no mmap for large blocks, no trimming).

    Process-wide and idempotent. Returns True when applied, False where the C library is not glibc (macOS,
    musl) — there it does nothing, and nothing else changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only  # noqa: B018
    except (OSError, AttributeError):
        return False
    # mallopt takes an int; -1 reaches glibc as SIZE_MAX: never trim the heap, however large its free top.
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    ok_mmap = libc.mallopt(M_MMAP_MAX, 0) == 1  # large blocks from the heap, so that they stay mapped
    ok_arena = libc.mallopt(M_ARENA_MAX, 1) == 1  # threads started from now on share the main heap
    return ok_trim and ok_mmap and ok_arena
