"""The DeepSpeed JSON of a run (`--deepspeed_config`, ds_configs/*.json): the engine's own config.
The trainer fills only the batch fields and the monitor paths, and refuses what would break its
invariants (an fp16/bf16 mode that casts the fp32 teacher, a JSON optimizer, a ZeRO-3 persistence
threshold that keeps small parameters whole), with the reason (ds_configs/README.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from alice_ds.engine.config import TrainConfig, global_batch
from alice_ds.errors import UserError


def resolve_ds_config(path: str, cfg: TrainConfig, world_size: int, monitor_dir: str) -> dict:
    """Read the DeepSpeed JSON and fill the batch fields from the command line. A number written in
    the JSON must agree with the command line (or be "auto"); anything else is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: DeepSpeed config not found")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    want = {
        "train_micro_batch_size_per_gpu": cfg.run.batch_size,
        "gradient_accumulation_steps": cfg.run.grad_accum,
        "train_batch_size": global_batch(cfg, world_size),
    }
    for key, value in want.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise UserError(f"{path}: {key} is {given} but the command line gives {value} "
                            "(--batch_size x --grad_accum x world size); set it to \"auto\"")
        ds[key] = value
    if "optimizer" in ds or "scheduler" in ds:
        raise UserError(f"{path}: remove the 'optimizer'/'scheduler' sections; the trainer builds AdamW "
                        "with per-step lr/wd/momentum schedules itself")
    if ds.get("fp16", {}).get("enabled"):
        raise UserError(f"{path}: fp16 is not supported (use torch_autocast bf16, see ds_configs/README.md)")
    if ds.get("bf16", {}).get("enabled"):
        raise UserError(f"{path}: 'bf16' casts the teacher to bf16, where its EMA rounds away; use "
                        "\"torch_autocast\": {\"enabled\": true, \"dtype\": \"bfloat16\"} (ds_configs/README.md)")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage", 0) == 3 and zero.get("stage3_param_persistence_threshold", 1) != 0:
        raise UserError(f"{path}: ZeRO-3 needs \"stage3_param_persistence_threshold\": 0 so student and "
                        "teacher shards line up for the EMA")
    ds["csv_monitor"] = {"enabled": True, "output_path": monitor_dir, "job_name": "alice"}
    if importlib.util.find_spec("tensorboard") is not None:
        ds["tensorboard"] = {"enabled": True, "output_path": monitor_dir, "job_name": "alice"}
    return ds
