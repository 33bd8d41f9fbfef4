"""`alice-ds convert`: one backbone of a ZeRO checkpoint -> MONAI `SwinUNETR` weights (the layouts are
described in `alice_ds.export`), the `--verify` round trip through MONAI, and the command itself."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import SwinUNETR

from alice_ds import __version__
from alice_ds.args import positive_int
from alice_ds.console import console, progress, table, warn
from alice_ds.engine.checkpoint_layout import ALICE_STATE
from alice_ds.engine.export_zero import locate, open_backbone
from alice_ds.errors import DataError, UserError
from alice_ds.export.keys import LOAD_FROM_PREFIX, V2_CONV_BLOCK, from_load_from_key, monai_reference, to_load_from_key
from alice_ds.export.load import PT_SUFFIXES, _FileTensors, _group, load_pretrained
from alice_ds.export.safetensors_stream import write_safetensors
from alice_ds.files import atomic_path, atomic_write_text

FORMATS = ("monai", "monai-load-from")
MODELS = ("teacher", "student")
MASK_TOKEN = "mask_token"
"""Our backbone's learned mask token: pretraining only, not part of `SwinUNETR`."""
VERIFY_EDGE = 64
"""Input edge of the `--verify` forward: the smallest whose deepest stage (edge / 32) still has more
than one voxel, which InstanceNorm needs."""
VERIFY_SEED = 0


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
        raise DataError(ref.tag_dir / ALICE_STATE, "config has no model.feature_size")
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
    """Export one backbone of an alice-ds checkpoint; see `alice_ds.export` for the layouts.

    Raises `DataError` naming the file for a missing tag, a missing/truncated file or a checkpoint
    whose tensors do not match the architecture its `alice_state.json` declares.
    """
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
    sampler_cfg = config.get("sampler", data_cfg)  # checkpoints before the sampler section kept these in data
    info = {
        "format": fmt,
        "model": which,
        "architecture": "monai.networks.nets.SwinUNETR",
        "feature_size": feature_size,
        "use_v2": use_v2,
        "in_channels": 1,
        "out_channels": 1,
        "spacing": data_cfg.get("spacing"),
        "intensity_window": sampler_cfg.get("hu_window"),
        "roi": sampler_cfg.get("roi"),
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
    num_params = sum(math.prod(s) for k, (s, d) in layout.items() if d != "int64")
    return ExportResult(path=out, sidecar=sidecar, info=info, num_tensors=len(layout), num_params=num_params)


def verify(result: ExportResult, out_channels: int = 1) -> list[list[str]]:
    """Build MONAI `SwinUNETR` from the sidecar, load the export strictly (only `out.*` may be skipped
    when `out_channels` != 1), check every loaded tensor equals the file, run one forward on a
    [1, 1, 64, 64, 64] input. Returns the summary rows; raises `DataError` on any failure."""
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
    parser.add_argument("--verify_out_channels", type=positive_int, default=1, metavar="N",
                        help="output channels of the SwinUNETR that --verify builds; other than 1, the "
                             "reconstruction head out.* is skipped (as when fine-tuning for N classes)")


def run(args: argparse.Namespace) -> int:
    result = convert(args.checkpoint_dir, args.out, tag=args.tag, which=args.model, fmt=args.fmt)
    console.print(f"wrote {result.path} ({result.num_tensors} tensors, {result.num_params:,} parameters, "
                  f"{args.model} @ step {result.info['step']}) and {result.sidecar}", highlight=False)
    if args.verify:
        rows = verify(result, out_channels=args.verify_out_channels)
        console.print(table("alice-ds convert --verify: OK", ["check", "result"], rows))
    return 0
