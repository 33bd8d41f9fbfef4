"""`alice_ds.memory.keep_freed_memory`: after it, an array allocated again after a free reuses pages
that are already mapped (few page faults) instead of a fresh mapping (one fault per 4 KiB page)."""

import json
import platform
import subprocess
import sys

import pytest

from alice_ds.memory import (
    COMPUTE_MMAP_THRESHOLD,
    WORKER_MMAP_THRESHOLD,
    freed_memory_kept,
    keep_freed_memory,
    release_freed_memory,
)

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A fresh interpreter: while a 64 MiB array lives, the bytes glibc holds in separate mappings
# (mallinfo2's hblkhd) and the page faults of allocating it again after a free; before and after
# keep_freed_memory.
PROBE = """
import ctypes, json, resource, sys
import numpy as np
from alice_ds.memory import keep_freed_memory, release_freed_memory

libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info

def probe():
    a = np.ones(8 * 2**20)  # 64 MiB, above glibc's default mmap threshold (at most 32 MiB)
    mapped = libc.mallinfo2().hblkhd
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(8 * 2**20)
    return mapped, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = probe()
ok = keep_freed_memory(int(sys.argv[1]))
kept = probe()
release_freed_memory()
print(json.dumps({"default": default, "ok": ok, "kept": kept, "released": probe()}))
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE, str(COMPUTE_MMAP_THRESHOLD)], capture_output=True,
                         text=True, check=True)
    r = json.loads(out.stdout)
    size = 64 * 2**20
    assert r["ok"] is True
    assert r["default"][0] >= size, r  # by default the array is a mapping of its own, unmapped on free
    assert r["kept"][0] < size // 64, r  # kept: it comes from the heap
    assert r["kept"][1] < 100, r  # and its pages, already mapped, fault no more (4 KiB pages: 16384)
    assert r["released"][0] >= size, r  # released: a mapping of its own again, as by default


def test_idempotent_and_the_larger_threshold_stays():
    if not GLIBC:
        assert keep_freed_memory(WORKER_MMAP_THRESHOLD) is False
        return
    try:
        assert keep_freed_memory(WORKER_MMAP_THRESHOLD) is True
        assert keep_freed_memory(COMPUTE_MMAP_THRESHOLD) is True
        assert keep_freed_memory(WORKER_MMAP_THRESHOLD) is True
    finally:
        release_freed_memory()  # the test session does not keep its peak memory


def test_a_block_keeps_freed_memory_then_releases_it():
    from alice_ds import memory

    with freed_memory_kept() as kept:
        assert kept is GLIBC and memory._applied == (COMPUTE_MMAP_THRESHOLD if GLIBC else 0)
    assert memory._applied == 0
