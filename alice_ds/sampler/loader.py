"""`PairLoader`: a DataLoader over a `PairDataset` that keeps the stream position and counters in the
main process."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from alice_ds.sampler.dataset import PairDataset

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
