"""What happens around a training run: the pre-flight checks of everything the user gave, before any
process group exists, then the distributed runtime's start and teardown in one place.

    cfg, ds_config = preflight(cfg, env)   # user mistakes: one line, exit 2, no rendezvous
    with distributed(env): Trainer(cfg, env, ds_config).run()
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import deepspeed
import torch

from alice_ds.data.cache import list_cases, read_meta
from alice_ds.data.datalist import split_case_ids
from alice_ds.engine.config import TrainConfig, resolve
from alice_ds.engine.distenv import DistEnv, release_cpu_allreduce_buffer
from alice_ds.engine.ds_config import resolve_ds_config
from alice_ds.errors import DataError
from alice_ds.memory import freed_memory_kept


def on_cpu() -> bool:
    """Whether DeepSpeed's accelerator is the CPU (`DS_ACCELERATOR=cpu`, or no GPU)."""
    return deepspeed.get_accelerator().device_name() == "cpu"


def cache_spacing(cache_dir) -> tuple[float, float, float]:
    """The voxel spacing of a preprocessed cache (every case has the cache's spacing)."""
    cases = list_cases(cache_dir)
    if not cases:
        raise DataError(cache_dir, "no cached cases (run `alice-ds preprocess` first)")
    return tuple(float(s) for s in read_meta(cache_dir, cases[0])["spacing"])


def preflight(cfg: TrainConfig, env: DistEnv) -> tuple[TrainConfig, dict]:
    """(resolved config, DeepSpeed JSON) once every input is known good: the cache, the datalist's
    splits, the derived values (`engine.config.resolve`) and the DeepSpeed JSON. Every rank runs it
    on the same inputs, so every rank stops with the same one-line error before any rendezvous."""
    resolved = resolve(cfg, env.world_size, not on_cpu(), cache_spacing(cfg.data.cache_dir))
    for split, needed in (("training", True), ("validation", cfg.run.val_every > 0)):
        if needed and not split_case_ids(cfg.data.json_list, split):
            raise DataError(cfg.data.json_list, f"no cases in the {split!r} split")
    monitor = str(Path(cfg.run.output_dir) / "monitor")
    return resolved, resolve_ds_config(cfg.run.deepspeed_config, resolved, env.world_size, monitor)


@contextlib.contextmanager
def distributed(env: DistEnv):
    """The process group of the run: DeepSpeed's rendezvous on entry (on the CPU also the release of
    its shared-memory all-reduce buffer names, `distenv.release_cpu_allreduce_buffer`, and an allocator
    that keeps freed memory, `alice_ds.memory`), the group's destruction on exit (NCCL warns at exit
    otherwise)."""
    deepspeed.init_distributed()
    cpu = on_cpu()
    try:
        # on the CPU each step's large activations reuse mapped pages, given back when the run ends
        with freed_memory_kept(enabled=cpu):
            if cpu:  # a world of one has a buffer too
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()  # every rank has mapped the others' shared-memory buffers
                release_cpu_allreduce_buffer(env.rank)
            yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
