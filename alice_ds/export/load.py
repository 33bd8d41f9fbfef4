"""`alice_ds.load_pretrained`: exported weights (either layout of `alice-ds convert`) into any MONAI
`SwinUNETR`, key by key, with a report of what was loaded, skipped, missing or unexpected."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from alice_ds.console import console, warn
from alice_ds.errors import DataError, UserError
from alice_ds.export.keys import LOAD_FROM_PREFIX, from_load_from_key

PT_SUFFIXES = (".pt", ".pth")
"""Output names that `convert` writes with `torch.save` (and `load_pretrained` reads with `torch.load`)."""
OUT_HEAD = "out."
"""Prefix of `SwinUNETR`'s output head; the only keys that may differ in shape (out_channels)."""


@dataclass
class LoadReport:
    """What `load_pretrained` did, key by key (MONAI names)."""

    path: str
    layout: str
    """"monai" (full SwinUNETR) or "monai-load-from" (Swin encoder only)."""
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """In the file and the model but not loaded: shapes differ (`out.*` for other out_channels)."""
    missing: list[str] = field(default_factory=list)
    """In the model, not in the file: left at the model's initialisation."""
    unexpected: list[str] = field(default_factory=list)
    """In the file, not in the model."""
    meta: dict = field(default_factory=dict)


class _FileTensors:
    """Shapes first, data on demand: safetensors via `safe_open` (nothing is read until `get`),
    `.pt`/`.pth` via `torch.load(weights_only=True)`."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise DataError(path, "no such weights file")
        if path.suffix in PT_SUFFIXES:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several types for truncated/foreign files
                raise DataError(path, f"cannot read as torch weights ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0]})") from None
            sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise DataError(path, "expected a dict of tensors (optionally under 'state_dict')")
            self.tensors = sd
            self.meta = obj.get("alice_ds", {}) if isinstance(obj, dict) else {}
            self.shapes = {k: tuple(v.shape) for k, v in sd.items()}
            self._file = None
        else:
            try:
                self._file = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise DataError(path, f"truncated or corrupt safetensors file ({e})") from None
            raw = self._file.metadata() or {}
            self.meta = {}
            for k, v in raw.items():
                try:
                    self.meta[k] = json.loads(v)
                except json.JSONDecodeError:
                    self.meta[k] = v
            self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}

    def get(self, key: str):
        if self._file is None:
            return self.tensors[key]
        try:
            return self._file.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise DataError(self.path, f"cannot read {key!r}: truncated or corrupt ({e})") from None


def _architecture_hint(file_shapes: dict, model_shapes: dict) -> str:
    key = "swinViT.patch_embed.proj.weight"  # [F, in_channels, 2, 2, 2]
    if key in file_shapes and key in model_shapes and file_shapes[key] != model_shapes[key]:
        f, m = file_shapes[key], model_shapes[key]
        if f[0] != m[0]:
            return f"the file has feature_size {f[0]}, the model feature_size {m[0]}"
        return f"the file has in_channels {f[1]}, the model in_channels {m[1]}"
    return "the file is for another SwinUNETR configuration"


def _group(keys: list[str], limit: int = 6) -> str:
    """`decoder1.* (6), decoder2.* (6)`: a short, readable list of many keys."""
    counts: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:1]) + ".*"
        counts[head] = counts.get(head, 0) + 1
    items = [f"{h} ({n})" for h, n in counts.items()]
    return ", ".join(items[:limit]) + (f", … (+{len(items) - limit})" if len(items) > limit else "")


def load_pretrained(model, path, strict: bool = True, verbose: bool = True) -> LoadReport:
    """Load alice-ds exported weights into a MONAI `SwinUNETR` (any `out_channels`), in place.

    Accepts both export layouts (`--format monai` safetensors; `--format monai-load-from`
    safetensors or `.pt`). Nothing is loaded silently and nothing is skipped silently: every key is
    loaded, skipped (`out.*` whose shape differs because the model has other output channels),
    missing (model keys the file lacks: the decoder with an encoder-only file) or unexpected, and a
    summary with those counts is printed. With `strict=True` (default) anything else - a shape
    mismatch outside `out.*`, an unexpected key, a full-layout file that lacks model keys - raises
    `UserError` naming the file before any weight is changed. Returns a `LoadReport`.
    """
    path = Path(path)
    src = _FileTensors(path)
    layout = "monai"
    names = {k: k for k in src.shapes}  # MONAI name -> file key
    if src.shapes and all(k.startswith(LOAD_FROM_PREFIX[1]) for k in src.shapes):
        layout = "monai-load-from"
        names = {from_load_from_key(k): k for k in src.shapes}
    target = model.state_dict(keep_vars=True)
    model_shapes = {k: tuple(v.shape) for k, v in target.items()}
    file_shapes = {m: src.shapes[f] for m, f in names.items()}

    report = LoadReport(path=str(path), layout=layout, meta=src.meta)
    mismatched = []
    for name, shape in file_shapes.items():
        if name not in target:
            report.unexpected.append(name)
        elif shape != model_shapes[name]:
            (report.skipped if name.startswith(OUT_HEAD) else mismatched).append(name)
        else:
            report.loaded.append(name)
    report.missing = [k for k in target if k not in file_shapes]

    problems = []
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} tensor(s) of another shape ({k}: file {list(file_shapes[k])}, "
                        f"model {list(model_shapes[k])}; {_architecture_hint(file_shapes, model_shapes)})")
    if report.unexpected:
        problems.append(f"{len(report.unexpected)} key(s) the model does not have ({_group(report.unexpected)})")
    if layout == "monai" and report.missing:
        problems.append(f"{len(report.missing)} model key(s) missing from the file ({_group(report.missing)})")
    if problems and strict:
        raise UserError(f"{path}: cannot load into {type(model).__name__}: " + "; ".join(problems))
    if not report.loaded:
        raise UserError(f"{path}: no tensor of the file matches {type(model).__name__}")
    report.skipped += mismatched

    with torch.no_grad():
        for name in report.loaded:
            dst = target[name]
            dst.copy_(src.get(names[name]).to(device=dst.device, dtype=dst.dtype))
    if verbose:
        _print_report(report, problems if not strict else [])
    return report


def _print_report(report: LoadReport, problems: list[str]) -> None:
    console.print(f"[bold]alice-ds[/bold] {report.path}: loaded {len(report.loaded)} tensors "
                  f"({report.layout}), skipped {len(report.skipped)}, missing {len(report.missing)}, "
                  f"unexpected {len(report.unexpected)}", highlight=False, soft_wrap=True)
    if report.skipped:
        warn(f"skipped (shape differs, kept the model's initialisation): {_group(report.skipped)}")
    if report.missing:
        warn(f"not in the file (kept the model's initialisation): {_group(report.missing)}")
    if report.unexpected:
        warn(f"in the file but not in the model (ignored): {_group(report.unexpected)}")
    for p in problems:
        warn(p)
