"""Files of a fine-tuning run (docs/interfaces.md "Fine-tuning run"):

```
O/config.json                      the resolved FinetuneConfig
O/metrics.jsonl                    one line per step and per validation
O/best.safetensors + best.json     the weights with the best mean validation Dice (+ config, Dice)
O/checkpoints/step_<N>/            model.safetensors, model.json (config, step, best Dice), optimizer.pt
O/checkpoints/latest               the name of the newest complete step_<N>
```
Weights are safetensors; the optimizer state (tensors, numbers, lists) is `torch.save`d and read with
`torch.load(weights_only=True)`. A checkpoint folder is written under a temporary name and renamed,
then `latest` is replaced: a killed run leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from monai.networks.nets import SwinUNETR
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from alice_ds.errors import DataError, UserError
from alice_ds.files import atomic_path, atomic_write_text, read_json
from alice_ds.finetune.config import FinetuneConfig

BEST = "best"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def build_model(cfg: FinetuneConfig) -> SwinUNETR:
    return SwinUNETR(in_channels=1, out_channels=cfg.num_classes, feature_size=cfg.feature_size,
                     use_v2=cfg.use_v2)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_weights(path: Path, model, info: dict) -> None:
    """`path` (safetensors; `info` also as its metadata) and `path.json` (`info`), each atomic."""
    with atomic_path(path) as tmp:
        save_file(_state(model), str(tmp), metadata={"alice_ds_finetune": json.dumps(info)})
    atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=2) + "\n")


def save_checkpoint(out: Path, step: int, model, optimizer, info: dict) -> Path:
    """A resumable `checkpoints/step_<step>/`; then `latest` names it and older step folders go
    (`best.safetensors` holds the weights worth keeping)."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp / MODEL_FILE, model, {**info, "step": step})
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, name + "\n")
    for old in root.glob("step_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    folder = out / CHECKPOINTS / pointer.read_text().strip()
    if not (folder / MODEL_FILE).is_file():
        raise DataError(pointer, f"names {folder.name}, which has no {MODEL_FILE}")
    return folder


def checkpoint_info(folder: Path) -> dict:
    """The `model.json` of a `step_<N>/` folder (config, step, best Dice so far)."""
    info = read_json(folder / "model.json", "checkpoint has no model.json")
    if not isinstance(info, dict) or "config" not in info or "step" not in info:
        raise DataError(folder / "model.json", "not a fine-tuning checkpoint (no 'config' or 'step')")
    return info


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Model and optimizer state of a `step_<N>/` folder, in place; returns its `model.json`."""
    info = checkpoint_info(folder)
    model.load_state_dict(read_weights(folder / MODEL_FILE))
    try:
        opt = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(folder / OPTIMIZER_FILE, "optimizer state missing") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise DataError(folder / OPTIMIZER_FILE, f"cannot read ({type(e).__name__})") from None
    optimizer.load_state_dict(opt)
    return info


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise DataError(path, "no such weights file") from None
    except (SafetensorError, OSError) as e:
        raise DataError(path, f"truncated or corrupt safetensors file ({e})") from None


def resolve_checkpoint(path) -> tuple[Path, FinetuneConfig, dict]:
    """`alice-ds evaluate --checkpoint`: a weights file with its `.json` beside it, or a run folder
    (its `best.safetensors`, else its latest checkpoint). Returns (weights, config, info)."""
    path = Path(path)
    if path.is_dir():
        best = path / f"{BEST}.safetensors"
        latest = latest_checkpoint(path)
        path = best if best.is_file() else (latest / MODEL_FILE if latest else best)
    info = read_json(path.with_suffix(".json"), f"no {path.with_suffix('.json').name} beside the weights "
                                                "(written by alice-ds finetune)")
    if not isinstance(info, dict) or "config" not in info:
        raise DataError(path.with_suffix(".json"), "not a fine-tuning checkpoint JSON (no 'config')")
    try:
        cfg = FinetuneConfig.from_json(info["config"])
    except (KeyError, TypeError, UserError) as e:
        raise DataError(path.with_suffix(".json"), f"config cannot be read ({e})") from None
    return path, cfg, info
