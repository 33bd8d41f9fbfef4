"""Fine-tuning data: which cases (the first K labelled ones of the datalist's `training` list), which
classes (label values selected or merged into 1..C-1), the preprocessing of the pretrained weights
(spacing and HU window from the sidecar `W.json` that `alice-ds convert` writes), and the MONAI
dictionary transforms that turn a NIfTI pair into training crops or a whole validation volume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandRotate90d,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from alice_ds.data.cache import VIEW_HU_WINDOW
from alice_ds.data.datalist import load_datalist
from alice_ds.data.preprocess import DEFAULT_SPACING, RAS_LABELS
from alice_ds.errors import DataError, UserError
from alice_ds.files import read_json
from alice_ds.models.swin import SIDE_DIVISOR

FLIP_PROB = 0.5
ROT90_PROB = 0.5


@dataclass(frozen=True)
class ClassMap:
    """Output class c (1..C-1) is the union of label values `values[c-1]`; every other value is
    background (0). `names[c-1]` names it in tables, metrics and pictures."""

    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]

    @property
    def num_classes(self) -> int:
        """Including background."""
        return len(self.names) + 1

    def lookup(self, max_value: int) -> np.ndarray:
        """Label value -> class index, for values 0..max_value ([max_value + 1] int64)."""
        table = np.zeros(max_value + 1, dtype=np.int64)
        for c, group in enumerate(self.values, start=1):
            for v in group:
                if v <= max_value:
                    table[v] = c
        return table

    def to_json(self) -> dict:
        return {"names": list(self.names), "values": [list(v) for v in self.values]}

    @classmethod
    def from_json(cls, d: dict) -> ClassMap:
        return cls(tuple(d["names"]), tuple(tuple(int(x) for x in v) for v in d["values"]))


def parse_classes(specs: list[str] | None, num_classes: int | None) -> ClassMap:
    """`--classes liver=1 kidneys=2,7` (merge 2 and 7 into one class) or `--num_classes C` (label
    values 1..C-1 as they are). Both: C must be len(classes) + 1."""
    if not specs:
        if num_classes is None or num_classes < 2:
            raise UserError(f"--num_classes must be >= 2 (background + 1 class) without --classes, got {num_classes}")
        return ClassMap(tuple(f"class_{v}" for v in range(1, num_classes)),
                        tuple((v,) for v in range(1, num_classes)))
    names, values, seen = [], [], {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        try:
            group = tuple(int(v) for v in rest.split(","))
        except ValueError:
            group = ()
        if not sep or not name or not group or min(group) < 1:
            raise UserError(f"--classes entries are NAME=V[,V...] with label values >= 1, got {spec!r}")
        for v in group:
            if v in seen:
                raise UserError(f"--classes: label value {v} is in both {seen[v]!r} and {name!r}")
            seen[v] = name
        names.append(name)
        values.append(group)
    cmap = ClassMap(tuple(names), tuple(values))
    if num_classes is not None and num_classes != cmap.num_classes:
        raise UserError(f"--num_classes {num_classes} disagrees with --classes ({len(names)} classes + "
                        f"background = {cmap.num_classes})")
    return cmap


class RemapLabelsd(MapTransform):
    """Label values -> class indices of a `ClassMap` (unlisted values -> 0). A label that is not a
    set of non-negative integers is a `DataError` naming its file."""

    def __init__(self, keys, cmap: ClassMap):
        super().__init__(keys)
        self.cmap = cmap

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            arr = torch.as_tensor(x)
            source = getattr(x, "meta", {}).get("filename_or_obj", key)
            if arr.numel() and (arr.min() < 0 or not torch.equal(arr, arr.round())):
                raise DataError(source, "label holds negative or non-integer values: not a label map")
            ints = arr.long()
            table = torch.as_tensor(self.cmap.lookup(int(ints.max()) if ints.numel() else 0))
            out = arr.clone()  # keeps a MetaTensor's affine and history; dtype is cast later
            out.copy_(table[ints])  # [1, X, Y, Z] label values -> class indices
            d[key] = out
        return d


@dataclass(frozen=True)
class Preprocessing:
    """Resampling and intensity window; with pretrained weights, those of pretraining."""

    spacing: tuple[float, float, float]
    hu_window: tuple[float, float]
    source: str
    """Where they come from: the sidecar file, or "defaults"/"flags"."""


def read_sidecar(weights: str | None) -> tuple[dict, str | None]:
    """The JSON sidecar `W.json` that `alice-ds convert` writes beside `W.safetensors` and its path;
    ({}, None) without weights or sidecar (older exports). One that cannot be read is a `DataError`."""
    if not weights:
        return {}, None
    sidecar = Path(weights).with_suffix(".json")
    if not sidecar.is_file():
        return {}, None
    side = read_json(sidecar, "sidecar not found")
    if not isinstance(side, dict):
        raise DataError(sidecar, "sidecar is not a JSON object")
    return side, str(sidecar)


def preprocessing_for(weights: str | None, spacing=None, hu_window=None) -> Preprocessing:
    """Spacing and HU window: flags win; else the sidecar of the weights (`read_sidecar`); else the
    defaults (`DEFAULT_SPACING`, `VIEW_HU_WINDOW`)."""
    side, sidecar = read_sidecar(weights)
    source = sidecar or "defaults"
    chosen_spacing = spacing or side.get("spacing") or DEFAULT_SPACING
    chosen_window = hu_window or side.get("intensity_window") or VIEW_HU_WINDOW
    if spacing or hu_window:
        source = "flags" if not side else f"flags + {source}"
    out = Preprocessing(tuple(float(s) for s in chosen_spacing), tuple(float(v) for v in chosen_window), source)
    if len(out.spacing) != 3 or min(out.spacing) <= 0:
        raise UserError(f"spacing must be three positive mm values, got {list(out.spacing)} ({source})")
    if len(out.hu_window) != 2 or out.hu_window[0] >= out.hu_window[1]:
        raise UserError(f"HU window must be LO < HI, got {list(out.hu_window)} ({source})")
    return out


def select_cases(json_list, data_dir, labelled: int | None, split: str = "training") -> list[dict]:
    """Entries `{"image", "label"}` (absolute paths) of one datalist list that have a label; with
    `labelled`, the first K of them in file order (so K=1 is a subset of K=2)."""
    lists = load_datalist(json_list, data_dir)
    if split not in lists:
        raise UserError(f"--split must be one of {sorted(lists)}, got {split!r}")
    cases = [e for e in lists[split] if "label" in e]
    if not cases:
        raise DataError(json_list, f'no labelled case in the "{split}" list (entries need a "label" path)')
    if labelled is not None:
        if labelled > len(cases):
            raise DataError(json_list, f'--labelled {labelled} but the "{split}" list has {len(cases)} labelled cases')
        cases = cases[:labelled]
    return [{"image": e["image"], "label": e["label"]} for e in cases]


def check_roi(roi: int) -> int:
    if roi < SIDE_DIVISOR or roi % SIDE_DIVISOR:
        raise UserError(f"--roi must be a positive multiple of {SIDE_DIVISOR}, got {roi}")
    return roi


def base_transforms(prep: Preprocessing, cmap: ClassMap, roi: int | None) -> list:
    """Deterministic part: load, RAS, resample, HU window -> [0, 1], labels -> classes, and (for
    training) pad to at least one ROI so that every crop fits."""
    keys = ["image", "label"]
    lo, hi = prep.hu_window
    out = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS),
        Spacingd(keys=keys, pixdim=prep.spacing, mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        RemapLabelsd(keys="label", cmap=cmap),
        EnsureTyped(keys=keys, dtype=(torch.float32, torch.uint8), track_meta=True),
    ]
    if roi is not None:
        out.append(SpatialPadd(keys=keys, spatial_size=(roi,) * 3))
    return out


def random_transforms(cmap: ClassMap, roi: int, crops_per_case: int) -> Compose:
    """Label-balanced crops (each class, background included, equally likely as a crop centre; a
    class absent from a case gets ratio 0 with MONAI's warning), flips on every axis, 90° turns in
    the axial plane."""
    keys = ["image", "label"]
    return Compose([
        RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=(roi,) * 3,
                                num_classes=cmap.num_classes, num_samples=crops_per_case,
                                ratios=[1] * cmap.num_classes, warn=False),
        *[RandFlipd(keys=keys, prob=FLIP_PROB, spatial_axis=a) for a in range(3)],
        RandRotate90d(keys=keys, prob=ROT90_PROB, max_k=3, spatial_axes=(0, 1)),
    ])


def unwrap_transform_error(e: BaseException) -> BaseException:
    """MONAI wraps an exception raised in a transform in `RuntimeError("applying transform ...")`:
    the `UserError` inside, when there is one, is what the user should read."""
    seen = e
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e
