"""`alice-ds convert`: ZeRO checkpoint -> MONAI `SwinUNETR` weights; `load_pretrained` for users.

Two output layouts:

- `--format monai` (default): the full `SwinUNETR(in_channels=1, out_channels=1, feature_size=F,
  use_v2=...)` state dict (`swinViT.*`, `encoder*`, `decoder*`, `out.*` = the 1-channel
  reconstruction head of pretraining), fp32 safetensors, plus the sidecar `W.json` (feature_size,
  use_v2, spacing, intensity window, roi, step, source checkpoint, teacher/student, version).
  `alice_ds.load_pretrained(model, "W.safetensors")` loads it into any `SwinUNETR`.
- `--format monai-load-from`: the Swin encoder only, in the layout of Tang et al.'s
  `model_swinvit.pt` that `SwinUNETR.load_from()` and public fine-tuning scripts read: `module.`
  instead of `swinViT.`, `mlp.fc1`/`mlp.fc2` instead of MONAI's `mlp.linear1`/`mlp.linear2`.
  `W.safetensors` (default) holds those flat keys; use it with
  `model.load_from({"state_dict": safetensors.torch.load_file(path)})`. Safetensors cannot hold the
  `{"state_dict": ...}` wrapper that `torch.load(path)["state_dict"]` scripts index, so an output
  name ending in `.pt`/`.pth` writes that wrapper with `torch.save`: a zip of tensors and plain
  dicts that loads with `torch.load(..., weights_only=True)` (torch's default since 2.6) and runs no
  code. Choose it only for scripts you cannot change.

The writer streams: tensors are read from the checkpoint and written to disk one at a time, so
peak memory is one tensor plus what DeepSpeed's `zero_to_fp32` holds for the student (ZeRO 1-2:
one concatenated fp32 copy of the trainable parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from alice_ds.errors import DataError, UserError
from alice_ds.files import atomic_path, atomic_write_text

FORMATS = ("monai", "monai-load-from")
MODELS = ("teacher", "student")
MASK_TOKEN = "mask_token"
"""Our backbone's learned mask token: pretraining only, not part of `SwinUNETR`."""
OUT_HEAD = "out."
"""Prefix of `SwinUNETR`'s output head; the only keys that may differ in shape (out_channels)."""
VERIFY_EDGE = 64
"""Input edge of the `--verify` forward: the smallest whose deepest stage (edge / 32) still has more
than one voxel, which InstanceNorm needs."""
VERIFY_SEED = 0
PT_SUFFIXES = (".pt", ".pth")

# MONAI SwinUNETR name <-> Tang et al. `model_swinvit.pt` name (what `SwinUNETR.load_from` indexes)
LOAD_FROM_PREFIX = ("swinViT.", "module.")
LOAD_FROM_RENAMES = ((".mlp.linear1.", ".mlp.fc1."), (".mlp.linear2.", ".mlp.fc2."))
V2_CONV_BLOCK = re.compile(r"^swinViT\.layers\dc\.")
"""SwinUNETR v2's per-stage convolution blocks: `load_from` never reads them, so that layout omits them."""

# torch dtype name -> safetensors dtype tag (only what SwinUNETR state dicts contain)
SAFETENSORS_DTYPES = {"float32": "F32", "int64": "I64", "float16": "F16", "bfloat16": "BF16", "bool": "BOOL"}
SAFETENSORS_ALIGN = 8
"""The safetensors header is padded with spaces to a multiple of 8 bytes."""


# ---------------------------------------------------------------------------------------------
# key mapping


def to_load_from_key(key: str) -> str:
    """`swinViT.layers1.0.blocks.0.mlp.linear1.weight` -> `module.layers1.0.blocks.0.mlp.fc1.weight`."""
    if not key.startswith(LOAD_FROM_PREFIX[0]):
        raise ValueError(f"only swinViT.* keys have a load_from name, got {key!r}")
    key = LOAD_FROM_PREFIX[1] + key[len(LOAD_FROM_PREFIX[0]):]
    for ours, theirs in LOAD_FROM_RENAMES:
        key = key.replace(ours, theirs)
    return key


def from_load_from_key(key: str) -> str:
    """Inverse of `to_load_from_key`."""
    if not key.startswith(LOAD_FROM_PREFIX[1]):
        raise ValueError(f"load_from keys start with 'module.', got {key!r}")
    key = LOAD_FROM_PREFIX[0] + key[len(LOAD_FROM_PREFIX[1]):]
    for ours, theirs in LOAD_FROM_RENAMES:
        key = key.replace(theirs, ours)
    return key


def monai_reference(feature_size: int, use_v2: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype name) of MONAI's own `SwinUNETR(1, 1, feature_size, use_v2)` state dict:
    the oracle an export is checked against. Built on CPU (MONAI's constructor cannot run on the meta
    device) and freed before any checkpoint tensor is read."""
    import torch
    from monai.networks.nets import SwinUNETR

    with torch.random.fork_rng(devices=[]):
        model = SwinUNETR(in_channels=1, out_channels=1, feature_size=feature_size, use_v2=use_v2)
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# streaming safetensors writer


def write_safetensors(path: Path, layout: dict[str, tuple[tuple[int, ...], str]],
                      get: Callable[[str], "torch.Tensor"], metadata: dict[str, str],
                      on_tensor: Callable[[str], None] | None = None) -> None:
    """Write a safetensors file tensor by tensor: the header is built from `layout` (name -> (shape,
    dtype name)) before any data is read, then `get(name)` is called once per tensor in order and
    checked against its promised shape/dtype. Written to a temporary name and renamed, so a failure
    leaves no partial file under `path`."""
    import torch

    header: dict[str, dict] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, (shape, dtype) in layout.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors tag here")
        nbytes = _numel(shape) * _itemsize(dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % SAFETENSORS_ALIGN)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))  # header length, u64 little endian
        f.write(blob)
        for name, (shape, dtype) in layout.items():
            t = get(name)
            if tuple(t.shape) != tuple(shape) or str(t.dtype).removeprefix("torch.") != dtype:
                raise DataError(path, f"{name}: got {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())  # [*shape] -> raw bytes
            if on_tensor is not None:
                on_tensor(name)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: str) -> int:
    import torch

    return getattr(torch, dtype).itemsize


# ---------------------------------------------------------------------------------------------
# convert


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    info: dict
    num_tensors: int
    num_params: int


def _sidecar_path(out: Path) -> Path:
    return out.with_suffix(".json")


def _model_config(ref) -> tuple[int, bool]:
    model_cfg = ref.state["config"].get("model", {})
    if "feature_size" not in model_cfg:
        raise DataError(ref.tag_dir / "alice_state.json", "config has no model.feature_size")
    return int(model_cfg["feature_size"]), bool(model_cfg.get("use_v2", False))


def _check_names(ref, which: str, have: list[str], want: list[str], feature_size: int, use_v2: bool) -> None:
    """The checkpoint's backbone must hold exactly the reference keys (+ mask_token)."""
    arch = f"SwinUNETR(feature_size={feature_size}, use_v2={use_v2})"
    have_set = set(have) - {MASK_TOKEN}
    missing = [k for k in want if k not in have_set]
    extra = sorted(have_set - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} key(s) of {arch} (e.g. {missing[0]})")
        if extra:
            parts.append(f"has {len(extra)} key(s) {arch} does not (e.g. {extra[0]})")
        raise DataError(ref.tag_dir, f"the {which} backbone " + " and ".join(parts)
                        + ": not a checkpoint of this architecture")


def convert(checkpoint_dir: str | Path, out: str | Path, tag: str = "latest", which: str = "teacher",
            fmt: str = "monai") -> ExportResult:
    """Export one backbone of an alice-ds checkpoint; see the module docstring for the layouts.

    Raises `DataError` naming the file for a missing tag, a missing/truncated file or a checkpoint
    whose tensors do not match the architecture its `alice_state.json` declares.
    """
    import torch

    from alice_ds import __version__
    from alice_ds.console import progress
    from alice_ds.engine.export_zero import locate, open_backbone

    if which not in MODELS:
        raise UserError(f"--model must be one of {MODELS}, got {which!r}")
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    as_pt = out.suffix in PT_SUFFIXES
    if as_pt and fmt != "monai-load-from":
        raise UserError(f"{out}: --format monai writes safetensors only; name the output *.safetensors")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: output folder does not exist")

    ref = locate(checkpoint_dir, tag)
    feature_size, use_v2 = _model_config(ref)
    reference = monai_reference(feature_size, use_v2)
    source = open_backbone(ref, which)
    _check_names(ref, which, source.names(), list(reference), feature_size, use_v2)

    if fmt == "monai":
        layout = reference
        get = source.get
    else:
        layout = {to_load_from_key(k): v for k, v in reference.items()
                  if k.startswith(LOAD_FROM_PREFIX[0]) and not V2_CONV_BLOCK.match(k)}
        if use_v2:
            from alice_ds.console import warn

            warn("SwinUNETR.load_from() does not read the v2 convolution blocks (swinViT.layers*c): they "
                 "stay at initialisation in that layout; --format monai + alice_ds.load_pretrained keeps them")
        def get(name: str):
            return source.get(from_load_from_key(name))

    def checked(name: str):
        t = get(name)
        shape, dtype = layout[name]
        if tuple(t.shape) != shape:
            raise DataError(ref.tag_dir, f"{which} tensor {name} has shape {list(t.shape)}, "
                                         f"SwinUNETR(feature_size={feature_size}) expects {list(shape)}: "
                                         "a checkpoint of another architecture than its alice_state.json says")
        return t.to(getattr(torch, dtype))

    config = ref.state["config"]
    data_cfg = config.get("data", {})
    info = {
        "format": fmt,
        "model": which,
        "architecture": "monai.networks.nets.SwinUNETR",
        "feature_size": feature_size,
        "use_v2": use_v2,
        "in_channels": 1,
        "out_channels": 1,
        "spacing": data_cfg.get("spacing"),
        "intensity_window": data_cfg.get("hu_window"),
        "roi": data_cfg.get("roi"),
        "step": ref.state["step"],
        "source_checkpoint": str(ref.tag_dir.resolve()),
        "tag": ref.tag,
        "zero_stage": ref.zero_stage,
        "world_size": ref.world_size,
        "trained_with": ref.state.get("alice_ds_version"),
        "alice_ds_version": __version__,
    }
    with progress() as bar:
        task = bar.add_task(f"export {which}", total=len(layout))

        def advance(_name: str) -> None:
            bar.advance(task)

        if as_pt:
            tensors = {}
            for name in layout:
                tensors[name] = checked(name).clone()
                advance(name)
            with atomic_path(out) as tmp:
                torch.save({"state_dict": tensors, "alice_ds": info}, tmp)
        else:
            metadata = {k: json.dumps(v) for k, v in info.items()}
            write_safetensors(out, layout, checked, metadata, on_tensor=advance)
    source.close()
    sidecar = _sidecar_path(out)
    info["file"] = out.name
    atomic_write_text(sidecar, json.dumps(info, indent=2) + "\n")
    num_params = sum(_numel(s) for k, (s, d) in layout.items() if d != "int64")
    return ExportResult(path=out, sidecar=sidecar, info=info, num_tensors=len(layout), num_params=num_params)


# ---------------------------------------------------------------------------------------------
# load_pretrained


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
        import torch

        self.path = path
        if not path.is_file():
            raise DataError(path, "no such weights file")
        if path.suffix in PT_SUFFIXES:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several types for truncated/foreign files
                raise DataError(path, f"cannot read as torch weights ({type(e).__name__}: {str(e).splitlines()[0]})") from None
            sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise DataError(path, "expected a dict of tensors (optionally under 'state_dict')")
            self.tensors = sd
            self.meta = obj.get("alice_ds", {}) if isinstance(obj, dict) else {}
            self.shapes = {k: tuple(v.shape) for k, v in sd.items()}
            self._file = None
        else:
            from safetensors import SafetensorError, safe_open

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
        from safetensors import SafetensorError

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
    import torch

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
    from alice_ds.console import console, warn

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


# ---------------------------------------------------------------------------------------------
# verify


def verify(result: ExportResult, out_channels: int = 1) -> list[list[str]]:
    """Build MONAI `SwinUNETR` from the sidecar, load the export strictly (only `out.*` may be skipped
    when `out_channels` != 1), check every loaded tensor equals the file, run one forward on a
    [1, 1, 64, 64, 64] input. Returns the summary rows; raises `DataError` on any failure."""
    import torch
    from monai.networks.nets import SwinUNETR

    info = result.info
    torch.manual_seed(VERIFY_SEED)
    model = SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=info["feature_size"],
                      use_v2=info["use_v2"])
    src = _FileTensors(result.path)
    if info["format"] == "monai":
        # strict: raises on anything but an `out.*` of another shape
        report = load_pretrained(model, result.path, strict=True, verbose=False)
        pairs = {k: k for k in report.loaded}
        skipped, missing = report.skipped, report.missing
    else:
        # exactly what public scripts do: SwinUNETR.load_from({"state_dict": ...})
        model.load_from({"state_dict": {k: src.get(k) for k in src.shapes}})
        pairs = {from_load_from_key(k): k for k in src.shapes}
        skipped = []
        missing = [k for k in model.state_dict() if k not in pairs]  # the convolutional encoder/decoder
        lost = [k for k in missing if k.startswith(LOAD_FROM_PREFIX[0]) and not V2_CONV_BLOCK.match(k)]
        if lost:
            raise DataError(result.path, f"verify: {len(lost)} Swin tensor(s) not in the file (e.g. {lost[0]})")
    loaded = len(pairs)
    state = model.state_dict()
    differ = [m for m, f in pairs.items() if not torch.equal(state[m], src.get(f).to(state[m].dtype))]
    if differ:
        raise DataError(result.path, f"verify: {len(differ)} tensor(s) differ after loading (e.g. {differ[0]})")
    model.eval()
    x = torch.rand(1, 1, VERIFY_EDGE, VERIFY_EDGE, VERIFY_EDGE, generator=torch.Generator().manual_seed(VERIFY_SEED))
    with torch.no_grad():
        y = model(x)
    if not torch.isfinite(y).all():
        raise DataError(result.path, "verify: the forward pass produced non-finite values")
    rows = [
        ["file", str(result.path)],
        ["layout", info["format"]],
        ["model", f"{info['model']} @ step {info['step']} ({info['tag']}, ZeRO-{info['zero_stage']}, "
                  f"{info['world_size']} rank(s))"],
        ["architecture", f"SwinUNETR(feature_size={info['feature_size']}, use_v2={info['use_v2']}, "
                         f"out_channels={out_channels})"],
        ["tensors loaded / in file", f"{loaded} / {len(src.shapes)} (all equal to the file)"],
        ["parameters exported", f"{result.num_params:,}"],
        ["skipped (out.*)", str(len(skipped))],
        ["left at initialisation", _group(missing) if missing else "none"],
        ["forward", f"{list(x.shape)} -> {list(y.shape)}, mean {y.mean().item():.4g}, std {y.std().item():.4g}"],
    ]
    return rows


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint_dir", help="the run's output folder, its checkpoints/ folder or one tag "
                                               "folder of it (written by `deepspeed launch/train.py`)")
    parser.add_argument("--out", required=True, help="output weights file: W.safetensors (a W.json sidecar "
                                                     "is written next to it); .pt/.pth only with "
                                                     "--format monai-load-from, for scripts that call torch.load")
    parser.add_argument("--tag", default="latest", help="checkpoint tag: latest (what checkpoints/latest names), "
                                                        "best, or step_<N>")
    parser.add_argument("--model", choices=MODELS, default="teacher",
                        help="which network to export; the EMA teacher is the one to release (DINO-style)")
    parser.add_argument("--format", choices=FORMATS, default="monai", dest="fmt",
                        help="monai: full SwinUNETR state dict for alice_ds.load_pretrained / load_state_dict; "
                             "monai-load-from: Swin encoder only, Tang et al. layout for SwinUNETR.load_from()")
    parser.add_argument("--verify", action="store_true",
                        help="build MONAI SwinUNETR, load the export strictly, compare every tensor, run a "
                             "forward pass and print a summary table")
    parser.add_argument("--verify-out-channels", type=int, default=1, metavar="N",
                        help="output channels of the SwinUNETR that --verify builds; other than 1, the "
                             "reconstruction head out.* is skipped (as when fine-tuning for N classes)")


def run(args: argparse.Namespace) -> int:
    from alice_ds.console import console, table

    if args.verify_out_channels < 1:
        raise UserError(f"--verify-out-channels must be >= 1, got {args.verify_out_channels}")
    result = convert(args.checkpoint_dir, args.out, tag=args.tag, which=args.model, fmt=args.fmt)
    console.print(f"wrote {result.path} ({result.num_tensors} tensors, {result.num_params:,} parameters, "
                  f"{args.model} @ step {result.info['step']}) and {result.sidecar}", highlight=False)
    if args.verify:
        rows = verify(result, out_channels=args.verify_out_channels)
        console.print(table("alice-ds convert --verify: OK", ["check", "result"], rows))
    return 0


__all__ = ["convert", "load_pretrained", "LoadReport", "ExportResult", "verify", "to_load_from_key",
           "from_load_from_key", "write_safetensors"]
