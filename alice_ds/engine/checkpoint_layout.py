"""The files of an alice-ds checkpoint and the ZeRO-3 partition arithmetic of its teacher shards: the one
place both the trainer's `checkpoint` (writes, resumes) and `export_zero` (`alice-ds convert`) read them
from (docs/interfaces.md "Training module and checkpoints").

```
<output_dir>/checkpoints/<tag>/            tag = step_<N> | best
    alice_state.json                       step, world_size, zero_stage, resolved config, version
    teacher_fp32_rank<r>.safetensors       fp32 teacher (every rank under ZeRO-3, rank 0 otherwise)
    state_rank<r>.safetensors / .json      buffers (loss centers), RNG states, sampler state, counters
<output_dir>/checkpoints/.<tag>.tmp/       a save in progress (or killed): never read
<output_dir>/checkpoints/latest            the tag, written by rank 0 after every rank finished
```
A save writes every file into `.<tag>.tmp`, fsyncs it, waits for every rank, then rank 0 writes
`alice_state.json` and renames the folder to `<tag>`: a tag folder is always complete.

A ZeRO-3 parameter of `numel` elements is held by rank r of w as the flat slice
`flat[r*n:(r+1)*n]` of the parameter flattened and zero padded to `w*n` elements, n = ceil(numel / w)
(DeepSpeed's `param.ds_tensor`); the full tensor is `cat(partitions over ranks)[:numel].view(shape)`.
No DeepSpeed import: the exporter reads checkpoints through this module without one.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import torch

from alice_ds.errors import DataError

ALICE_STATE = "alice_state.json"
"""Written by rank 0 last: a tag folder with this file is a finished checkpoint."""
LATEST = "latest"
"""`<output_dir>/checkpoints/latest`: a text file naming the newest finished step tag."""
TEACHER_SHARD = "teacher_fp32_rank{rank}.safetensors"
STATE_TENSORS = "state_rank{rank}.safetensors"
STATE_JSON = "state_rank{rank}.json"
ZERO3_SHAPES = "zero3_shapes"
"""Teacher shard metadata under ZeRO-3: JSON name -> full shape, what reassembly needs."""
DEEPSPEED_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 runs
    "deepspeed.utils.tensor_fragment.fragment_address",
})
"""The only non-tensor classes DeepSpeed 0.19 (setup.cfg) pickles into its checkpoint files. Resume loads the
files with `weights_only=True` and these allowed; every reader first lists the globals a file would
import (without executing anything) and refuses a file that asks for anything else."""


def tmp_dir(ckpt_root: Path, tag: str) -> Path:
    """Where a save of `tag` writes before its rename to `ckpt_root / tag`."""
    return ckpt_root / f".{tag}.tmp"


def state_path(tag_dir: Path) -> Path:
    return tag_dir / ALICE_STATE


def teacher_shard(tag_dir: Path, rank: int) -> Path:
    return tag_dir / TEACHER_SHARD.format(rank=rank)


def rank_state(tag_dir: Path, rank: int) -> tuple[Path, Path]:
    """(tensors, JSON) files of one rank's resume state."""
    return tag_dir / STATE_TENSORS.format(rank=rank), tag_dir / STATE_JSON.format(rank=rank)


def rank_files(tag_dir: Path, rank: int) -> list[Path]:
    """The files rank `rank` wrote into a checkpoint folder: ours and DeepSpeed's
    (`zero_pp_rank_<r>_mp_rank_*`; rank 0 also `mp_rank_*_model_states.pt`)."""
    ours = [*rank_state(tag_dir, rank), teacher_shard(tag_dir, rank)]
    deepspeed = list(tag_dir.glob(f"zero_pp_rank_{rank}_mp_rank_*"))
    if rank == 0:
        deepspeed += tag_dir.glob("mp_rank_*_model_states.pt")
    return [p for p in ours if p.is_file()] + deepspeed


def check_deepspeed_file(path: Path) -> None:
    """A DeepSpeed `.pt` file must be a complete zip archive that unpickles only known DeepSpeed
    classes (`DEEPSPEED_PICKLE_GLOBALS`). Truncation loses the zip's central directory, which this
    detects without a full read."""
    try:
        zipfile.ZipFile(path).close()  # reads only the central directory at the end of the file
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as e:
        raise DataError(path, f"truncated or corrupt DeepSpeed checkpoint file ({type(e).__name__})") from None
    unknown = sorted(set(unsafe) - DEEPSPEED_PICKLE_GLOBALS)
    if unknown:
        raise DataError(path, f"refusing to unpickle unexpected classes {unknown}")


def teacher_shard_ranks(zero_stage: int, world_size: int) -> range:
    """Ranks that write a teacher shard: every rank under ZeRO-3 (each holds a partition), rank 0
    otherwise (every rank holds the full teacher)."""
    return range(world_size) if zero_stage == 3 else range(1)


def teacher_shards(tag_dir: Path, zero_stage: int, world_size: int) -> list[Path]:
    """Every teacher shard file of a checkpoint, in rank order."""
    return [teacher_shard(tag_dir, r) for r in teacher_shard_ranks(zero_stage, world_size)]


def zero3_unpartition(parts: list[torch.Tensor], shape) -> torch.Tensor:
    """The full tensor of `shape` from the flat padded partitions of every rank, in rank order.
    Raises `ValueError` when the partitions hold fewer elements than `shape` needs."""
    numel = math.prod(shape)
    flat = torch.cat(parts)  # [world_size * ceil(numel / world_size)], padded at the end
    if flat.numel() < numel:
        raise ValueError(f"partitions hold {flat.numel()} elements, shape {shape} needs {numel}")
    return flat[:numel].view(shape)


def zero3_partition(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s flat padded partition of `full` (the inverse of `zero3_unpartition`)."""
    size = -(-full.numel() // world_size)  # ceil, in integers
    flat = torch.zeros(size * world_size, dtype=full.dtype)  # [world_size * size], zero padded
    flat[:full.numel()] = full.reshape(-1)
    return flat[rank * size:(rank + 1) * size]
