"""Checkpoints: DeepSpeed's files (model/optimizer states per rank) plus everything an exact resume
needs that DeepSpeed does not hold. File names and the ZeRO-3 partition arithmetic are in
`checkpoint_layout` (shared with the exporter; docs/interfaces.md "Training module and checkpoints").
No pickle of ours: tensors in safetensors, the rest in JSON; DeepSpeed's pickles are loaded with
`weights_only=True`. A save is crash-safe (a temporary folder renamed when every rank finished); a
resume is decided by rank 0 and checked on every rank.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.checkpoint import constants as ds_constants
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alice_ds import __version__
from alice_ds.engine import checkpoint_layout as layout
from alice_ds.engine.checkpoint_layout import LATEST
from alice_ds.errors import DataError, UserError
from alice_ds.files import atomic_write_text, fsync_path


def _universal_info() -> dict:
    """The `universal_checkpoint_info` entry DeepSpeed's `ds_to_universal` requires in the model states
    (Megatron-DeepSpeed writes it; plain engines do not, and the converter then needs
    `--inject_missing_state`), so our checkpoints convert to universal ones as they are."""
    return {ds_constants.UNIVERSAL_CHECKPOINT_INFO:
            {ds_constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds_constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


STEP_TAG = re.compile(r"^step_(\d+)$")
BEST_TAG = "best"


def step_tag(step: int) -> str:
    return f"step_{step}"


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) of the process-global RNGs: torch (CPU and accelerator), numpy, python."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, cached],
                     "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_teacher(path: Path, ema, zero3: bool) -> None:
    """`teacher_fp32_rank<r>.safetensors` as the export reads it: full fp32 tensors, or under ZeRO-3
    this rank's flat padded partition plus `zero3_shapes` (name -> full shape) in the metadata."""
    tensors = {n: t.contiguous() for n, t in ema.local_state().items()}
    meta = {"format": "alice-ds-teacher-fp32", "zero3": json.dumps(zero3)}
    if zero3:
        meta[layout.ZERO3_SHAPES] = json.dumps({n: list(p.ds_shape) for n, p in zip(ema.names, ema.teacher)})
    save_file(tensors, str(path), metadata=meta)


def save(engine, module, ema, ckpt_root: Path, tag: str, *, step: int, config: dict, zero_stage: int,
         rank_state: dict, keep_last: int, update_latest: bool = True, faults=None) -> Path:
    """Every rank calls this. `rank_state`: this rank's JSON state (sampler state, counters).
    `update_latest=False` for `best`, which `--resume auto` must not pick over a newer step
    checkpoint. `faults`: `engine.faults.Faults` (tests). Returns the checkpoint directory.

    Crash-safe: every rank writes into `.<tag>.tmp` and fsyncs its files; after a barrier rank 0 writes
    `alice_state.json` (the "finished" marker), fsyncs it and renames the folder to `<tag>` (an
    existing `<tag>`, e.g. `best`, is swapped out, never overwritten in place), then moves `latest`.
    A rank that dies or a disk that fills up leaves at most `.<tag>.tmp`, which is never read and
    is replaced by the next save of that tag. An OSError writing our files (disk full) is a
    `UserError` naming the checkpoint (exit 2; the launcher then stops the ranks waiting for this
    one)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    d = ckpt_root / tag
    tmp = layout.tmp_dir(ckpt_root, tag)
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers; DeepSpeed's barrier comes next
    try:
        engine.save_checkpoint(str(ckpt_root), tag=tmp.name, client_state={"step": step, **_universal_info()},
                               save_latest=False)
        if faults is not None:
            faults.in_save(step)
        if rank in layout.teacher_shard_ranks(zero_stage, world):
            save_teacher(layout.teacher_shard(tmp, rank), ema, zero_stage == 3)
        rng_tensors, rng_json = rng_state()
        buffers = {f"buffer.{n}": b.detach().cpu().contiguous() for n, b in module.named_buffers()
                   if b is not None and n in module.state_dict()}
        state_tensors, state_json = layout.rank_state(tmp, rank)
        save_file({**buffers, **rng_tensors}, str(state_tensors))
        atomic_write_text(state_json, json.dumps({"step": step, "rng": rng_json, **rank_state}))
        for f in layout.rank_files(tmp, rank):
            fsync_path(f)
    except OSError as e:
        raise UserError(f"{d}: cannot write the checkpoint ({e.strerror or e}); the previous checkpoints are "
                        "untouched") from None
    dist.barrier()  # every rank's files are on the disk
    if rank == 0:
        atomic_write_text(layout.state_path(tmp), json.dumps(
            {"step": step, "world_size": world, "zero_stage": zero_stage, "config": config,
             "alice_ds_version": __version__}, indent=2), durable=True)
        _publish(tmp, d)
        if update_latest:
            atomic_write_text(ckpt_root / LATEST, tag, durable=True)
            prune(ckpt_root, keep_last)
    dist.barrier()
    return d


def _publish(tmp: Path, d: Path) -> None:
    """Rename the finished folder `tmp` to `d`. An existing `d` is first renamed aside and removed
    after: a crash between the two renames leaves both complete folders (`.<tag>.old`, `.<tag>.tmp`),
    never a mixed one."""
    old = d.with_name(f".{d.name}.old")
    if d.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(d, old)
    os.replace(tmp, d)
    fsync_path(d.parent)
    shutil.rmtree(old, ignore_errors=True)


def step_tags(ckpt_root: Path) -> list[tuple[int, str]]:
    """(step, tag) of the `step_<N>` checkpoints that finished (have `alice_state.json`), oldest first."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = STEP_TAG.match(p.name)
        if m and layout.state_path(p).is_file():
            out.append((int(m.group(1)), p.name))
    return sorted(out)


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` step checkpoints (0 keeps all); never `best` or the
    tag `latest` names."""
    if keep_last <= 0:
        return
    latest = (ckpt_root / LATEST).read_text().strip() if (ckpt_root / LATEST).is_file() else None
    tags = step_tags(ckpt_root)
    for _, tag in tags[:-keep_last]:
        if tag != latest:
            shutil.rmtree(ckpt_root / tag, ignore_errors=True)


def resolve_resume(ckpt_root: Path, resume: str | None) -> str | None:
    """The tag to resume from: `auto` -> the `latest` pointer (None when the run is fresh), a tag ->
    itself (an error naming it when it is not a finished checkpoint)."""
    if resume is None:
        return None
    if resume == "auto":
        pointer = ckpt_root / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
    else:
        tag = resume
    if not layout.state_path(ckpt_root / tag).is_file():
        raise DataError(ckpt_root / tag, "no finished checkpoint here (alice_state.json missing); "
                        f"available: {[t for _, t in step_tags(ckpt_root)] or 'none'}")
    return tag


def agree_on_resume(ckpt_root: Path, resume: str | None) -> str | None:
    """`resolve_resume` as rank 0 sees it, on every rank (rank 0 decides and broadcasts): ranks that
    read `latest` on their own can pick different tags on node-local or stale storage. Rank 0's
    error is raised on every rank."""
    answer: list = [None]
    if dist.get_rank() == 0:
        try:
            answer = [("tag", resolve_resume(ckpt_root, resume))]
        except DataError as e:
            answer = [("error", e.path, e.problem)]
    dist.broadcast_object_list(answer, src=0)
    if answer[0][0] == "error":
        raise DataError(answer[0][1], answer[0][2])
    return answer[0][1]


def check_loaded_steps(d: Path, steps: tuple[int, int, int]) -> int:
    """The step every rank loaded from checkpoint `d`: `steps` is this rank's (alice_state.json,
    its state_rank<r>.json, DeepSpeed's client state); all ranks must agree on all three, else every
    rank stops with one error listing what each rank read."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(steps))
    if any(s != everyone[0] for s in everyone) or len(set(everyone[0])) != 1:
        raise DataError(d, "ranks loaded different steps (per rank: alice_state.json, state_rank<r>.json, "
                        f"DeepSpeed) {everyone}: every rank must see the same checkpoint files (stale or "
                        "node-local storage?)")
    return everyone[0][0]


def _full_teacher(d: Path, saved: dict) -> dict[str, torch.Tensor]:
    """Full fp32 teacher tensors of a checkpoint, reassembled from its ZeRO-3 shards if need be."""
    files = layout.teacher_shards(d, saved["zero_stage"], saved["world_size"])
    parts = [load_file(str(f)) for f in files]
    if saved["zero_stage"] != 3:
        return parts[0]
    shapes = json.loads(read_teacher_metadata(files[0])[layout.ZERO3_SHAPES])
    return {n: layout.zero3_unpartition([p[n] for p in parts], shapes[n]) for n in shapes}


def _local_teacher(full: dict[str, torch.Tensor], ema, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's view of full teacher tensors: whole, or its padded ZeRO-3 partition."""
    return {n: layout.zero3_partition(full[n], rank, world) if hasattr(p, "ds_tensor") else full[n]
            for n, p in zip(ema.names, ema.teacher)}


def load(engine, module, ema, ckpt_root: Path, tag: str, zero_stage: int) -> tuple[dict, dict]:
    """Restore DeepSpeed state, the fp32 teacher, buffers and RNG states. Returns
    (alice_state, this rank's JSON state) so the trainer restores step, sampler and counters.
    Every rank checks every DeepSpeed file's pickle before any is loaded, and all ranks must have
    loaded the same step (`check_loaded_steps`). Another world size or ZeRO stage needs a universal
    checkpoint (README "Scaling out"); from one, the teacher is reassembled and re-partitioned for this
    run, and ranks beyond the saved ones take rank 0's state."""
    rank, world = dist.get_rank(), dist.get_world_size()
    d = ckpt_root / tag
    alice_state = json.loads(layout.state_path(d).read_text())
    same_layout = alice_state["world_size"] == world and alice_state["zero_stage"] == zero_stage
    if not same_layout and not engine.load_universal_checkpoint():
        raise UserError(f"{d}: saved with world size {alice_state['world_size']} and ZeRO-"
                        f"{alice_state['zero_stage']}, this run has {world} and ZeRO-{zero_stage}; convert it "
                        "with DeepSpeed's ds_to_universal and resume with \"checkpoint\": {\"load_universal\": "
                        "true} (README 'Scaling out')")
    if engine.load_universal_checkpoint() and zero_stage == 3 and alice_state["zero_stage"] != 3:
        raise UserError(f"{d}: written by a ZeRO-{alice_state['zero_stage']} run; DeepSpeed 0.19 loads a universal "
                        "checkpoint under ZeRO-3 only when a ZeRO-3 run wrote it (it looks for ZeRO-3's file names)")
    saved_rank = rank if rank < alice_state["world_size"] else 0
    state_tensors, state_json = layout.rank_state(d, saved_rank)
    ours = layout.teacher_shards(d, alice_state["zero_stage"], alice_state["world_size"]) + [state_tensors, state_json]
    for f in ours:
        if not f.is_file():
            raise DataError(f, "missing from the checkpoint (a universal checkpoint needs alice_state.json, "
                               "teacher_fp32_rank*.safetensors and state_rank* copied beside it)")
    for f in sorted(d.rglob("*.pt")):  # the universal layout nests them
        layout.check_deepspeed_file(f)
    load_path, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag, load_module_strict=True)
    if load_path is None:
        raise DataError(d, "DeepSpeed could not load this checkpoint")
    if engine.load_universal_checkpoint() and zero_stage == 3:
        _unshare_adam_steps(engine.optimizer.optimizer)
    rank_state = json.loads(state_json.read_text())
    check_loaded_steps(d, (alice_state["step"], rank_state["step"], (client_state or {}).get("step")))
    if same_layout and not engine.load_universal_checkpoint():
        teacher_file = layout.teacher_shard(d, rank if zero_stage == 3 else 0)
        ema.load_local_state(load_file(str(teacher_file)), str(teacher_file))
    else:  # a universal checkpoint: reassembled, then cut for this run's layout
        ema.load_local_state(_local_teacher(_full_teacher(d, alice_state), ema, rank, world), str(d))
    tensors = load_file(str(state_tensors))
    with torch.no_grad():
        for n, b in module.named_buffers():
            key = f"buffer.{n}"
            if key in tensors:
                b.copy_(tensors[key])
    set_rng_state(tensors, rank_state["rng"])
    return alice_state, rank_state


def _unshare_adam_steps(optimizer: torch.optim.Optimizer) -> None:
    """DeepSpeed 0.19's universal-checkpoint load under ZeRO-3 puts one and the same `step` tensor into
    the Adam state of every parameter sub-group; torch's Adam increments it in place once per
    sub-group, so the second group's bias correction saw step 3 at step 2, the third step 4 (measured:
    updates 14 % and 22 % too small, where the uninterrupted run and this fix agree to 1e-5). Each
    state gets its own copy."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save / torch.load checkpoint engine, loading with `weights_only=True` and only
    the DeepSpeed classes of `checkpoint_layout.DEEPSPEED_PICKLE_GLOBALS` allowed (DeepSpeed's own
    engine unpickles anything: a checkpoint folder could run code on every rank)."""

    def __init__(self, zipfile_serialization: bool):
        super().__init__(None)
        self.zipfile_serialization = zipfile_serialization

    def load(self, path: str, map_location=None):
        allowed = [getattr(importlib.import_module(g.rsplit(".", 1)[0]), g.rsplit(".", 1)[1])
                   for g in sorted(layout.DEEPSPEED_PICKLE_GLOBALS)]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise DataError(path, f"refusing to unpickle ({str(e).splitlines()[0]})") from None


def load_weights_only(engine) -> None:
    """Make `engine` load its checkpoint files with `WeightsOnlyCheckpointEngine`. Only DeepSpeed's
    default (torch) checkpoint engine is supported: the `checkpoint.writer` and DataStates engines
    of the DeepSpeed JSON are refused."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise UserError(f"DeepSpeed checkpoint engine {type(current).__name__} is not supported (alice-ds loads "
                        "checkpoints with weights_only=True); remove 'checkpoint.writer' / 'datastates' from the "
                        "DeepSpeed JSON")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(current.zipfile_serialization)


def read_teacher_metadata(path: Path) -> dict:
    """Metadata of a `teacher_fp32_rank<r>.safetensors` file (`zero3`, `zero3_shapes`)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
