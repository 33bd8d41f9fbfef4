"""`PairLoader`: a DataLoader over a `PairDataset` that keeps the stream position and counters in the
main process; and the allocator setting its workers use."""

from __future__ import annotations

import ctypes
import signal
from typing import TYPE_CHECKING

from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from alice_ds.sampler.dataset import PairDataset

WORKER_MMAP_THRESHOLD = 256 * 2**20
"""Bytes: in a worker, glibc serves allocations below this from the heap and keeps freed memory
(see `tune_worker_allocator`)."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameter ids (malloc.h)
_allocator_tuned = False
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Stop signals a DataLoader worker ignores. Launchers and schedulers send them to every process of a
job, workers included; a worker killed that way makes the main process raise "DataLoader worker ...
is killed by signal" in the middle of the step it is finishing (torch's worker dies of a SIGTERM
that does not come from its parent). The main process decides when to stop and shuts its workers
down through the DataLoader (not by a signal)."""


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: this worker ignores `WORKER_IGNORED_SIGNALS`."""
    for s in WORKER_IGNORED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def tune_worker_allocator() -> bool:
    """Make glibc keep freed memory of this process (once; False where there is no glibc).

    A sample allocates a few 1.7-10 MB arrays (crops, float views, rotation grids). By default glibc
    maps each of them fresh (`mmap`) and unmaps it on free, so every sample pays ~1000 page faults
    per array; served from a heap that is not trimmed, they reuse pages already mapped. Measured
    on the benchmark phantoms, one core: 81 -> 95 pairs/CPU-s without augmentation. `PairDataset`
    calls this in each DataLoader worker; the worker's heap then stays at its peak (tens of MB)."""
    global _allocator_tuned
    if not _allocator_tuned:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = (libc.mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, 2 * WORKER_MMAP_THRESHOLD) == 1)
        except (OSError, AttributeError):
            ok = False
        _allocator_tuned = ok
    return _allocator_tuned



class PairLoader:
    """A DataLoader over a `PairDataset` that keeps the dataset's position and counters current in
    the main process (workers hold copies), so `state_dict()` after any batch resumes exactly and
    `stats()` covers what was consumed. Each worker makes whole batches of consecutive samples, so
    batches arrive in stream order for any `num_workers`. Re-iterating continues from the position.
    Workers ignore stop signals (`ignore_stop_signals`); closing the iterator (or dropping it) shuts
    them down, which a process must do before it exits."""

    def __init__(self, dataset: PairDataset, batch_size: int, num_workers: int = 0, **loader_kwargs):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.loader_kwargs = loader_kwargs
        dataset.batch_block = self.batch_size

    def __iter__(self):
        batches = iter(DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                  worker_init_fn=ignore_stop_signals, **self.loader_kwargs))
        try:
            for batch in batches:
                if self.num_workers > 0:
                    self.dataset.consumed(batch)
                yield batch
        finally:
            del batches  # the last reference: the DataLoader iterator shuts its workers down now

    def stats(self) -> dict:
        return self.dataset.stats()

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
