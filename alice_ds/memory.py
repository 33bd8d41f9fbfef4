"""glibc allocator settings for processes that do heavy work on the CPU: freed memory is kept for
the next allocation instead of being handed back to the OS.

By default glibc serves every block above a (dynamic, <= 32 MiB) threshold with a fresh `mmap` and
unmaps it on free, so an array that is allocated again at each step pays its page faults again: one
page fault per 4 KiB, the kernel zeroing each page (system time), serialised between the threads of
the process. A SwinUNETR step at 64³ allocates window-attention matrices of ~350 MB; with freed
memory kept, the heap reuses pages that are already mapped. Measured on the 2-core CPU (see
benchmarks/README.md): fine-tuning step 5.2 -> 3.5 s, tiny Alice pretraining step 11.7 -> 9.5 s.
The cost: a process stays at its peak memory (plus fragmentation) while the setting holds;
`freed_memory_kept` sets it for a block of work and gives the memory back after it.
"""

from __future__ import annotations

import contextlib
import ctypes

WORKER_MMAP_THRESHOLD = 256 * 2**20
"""Bytes, DataLoader workers of the pair sampler: their arrays are 1.7-10 MB crops, float views and
rotation grids (measured, one core: 81 -> 95 pairs/CPU-s without augmentation)."""
COMPUTE_MMAP_THRESHOLD = 2**30
"""Bytes, processes that train or predict on the CPU: below 1 GiB, the attention matrices of a 64³
SwinUNETR step (~350 MB) would still be mapped and unmapped at every step."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameter ids (malloc.h)
GLIBC_DEFAULT_THRESHOLD = 128 * 1024
"""Bytes: glibc's initial mmap and trim thresholds, set back by `release_freed_memory`."""
_applied = 0
"""The largest threshold set in this process so far (0: none)."""


def keep_freed_memory(threshold: int = COMPUTE_MMAP_THRESHOLD) -> bool:
    """Serve allocations below `threshold` bytes from a heap that keeps freed memory (trimmed only
    beyond twice the threshold). Idempotent; a smaller threshold than one already set is ignored.
    False where there is no glibc (nothing is changed then)."""
    global _applied
    if _applied >= threshold:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, min(2 * int(threshold), 2**31 - 1)) == 1)
    except (OSError, AttributeError):
        return False
    if ok:
        _applied = threshold
    return ok


def release_freed_memory() -> None:
    """Undo `keep_freed_memory`: glibc's initial thresholds again, and the heap's free pages handed
    back to the OS (`malloc_trim`). Without glibc, nothing to do."""
    global _applied
    if not _applied:
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
    libc.malloc_trim(0)
    _applied = 0


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True, threshold: int = COMPUTE_MMAP_THRESHOLD):
    """`keep_freed_memory` for a block of work (a training run, an evaluation); on exit
    `release_freed_memory`, so that a process that lives on (a notebook, a test session running many
    fine-tunings) does not stay at the block's peak. `enabled` False: nothing (work on a GPU)."""
    kept = enabled and keep_freed_memory(threshold)
    try:
        yield kept
    finally:
        if kept:
            release_freed_memory()
