"""Decathlon JSON datalists (DESIGN §3): build one from a folder of CTs, validate and load one.

`alice-ds datalist DATA_DIR -o pretrain.json` replaces the reference repository's missing
`create_json.ipynb`. Paths in the JSON are relative to DATA_DIR (as MONAI's
`load_decathlon_datalist(..., base_dir=DATA_DIR)` expects).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from alice_ds.console import console, table
from alice_ds.data import NIFTI_SUFFIXES, case_id_from_path, case_key
from alice_ds.errors import DataError, UserError
from alice_ds.files import atomic_write_text, read_json

SECTIONS = ("training", "validation")
FLARE_IMAGE_DIRS = ("imagesTr", "imagesTs")
FLARE_LABEL_DIR = "labelsTr"


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def _scan(data_dir: Path) -> list[dict]:
    """Entries `{"image": rel[, "label": rel]}` sorted by path: the FLARE layout when `imagesTr` or
    `imagesTs` exists (labels paired from `labelsTr` by case key), otherwise every NIfTI below
    `data_dir`."""
    flare = [data_dir / d for d in FLARE_IMAGE_DIRS if (data_dir / d).is_dir()]
    if flare:
        images = sorted(p for d in flare for p in d.iterdir() if _is_nifti(p))
    else:
        images = sorted(p for p in data_dir.rglob("*") if _is_nifti(p))
    labels = {}
    if (data_dir / FLARE_LABEL_DIR).is_dir():
        labels = {case_key(case_id_from_path(p)): p for p in (data_dir / FLARE_LABEL_DIR).iterdir() if _is_nifti(p)}
    entries = []
    for img in images:
        e = {"image": img.relative_to(data_dir).as_posix()}
        if img.parent.name == "imagesTr" and case_key(case_id_from_path(img)) in labels:
            e["label"] = labels[case_key(case_id_from_path(img))].relative_to(data_dir).as_posix()
        entries.append(e)
    return entries


def _split_rank(image: str, seed: int) -> str:
    """Deterministic pseudo-random order key: adding a case never reshuffles the others."""
    return hashlib.sha256(f"{seed}:{image}".encode()).hexdigest()


def build_datalist(data_dir, val_fraction: float = 0.05, seed: int = 0) -> dict:
    """Scan `data_dir` and split into `training` / `validation` (a fraction `val_fraction` of the
    cases, at least one when the fraction is positive and there are two or more cases)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(data_dir, "data directory not found")
    entries = _scan(data_dir)
    if not entries:
        raise DataError(data_dir, "no .nii or .nii.gz files found")
    n_val = round(val_fraction * len(entries))
    if val_fraction > 0 and len(entries) >= 2:
        n_val = min(max(n_val, 1), len(entries) - 1)
    val = {e["image"] for e in sorted(entries, key=lambda e: _split_rank(e["image"], seed))[:n_val]}
    return {"training": [e for e in entries if e["image"] not in val],
            "validation": [e for e in entries if e["image"] in val]}


def write_datalist(datalist: dict, path) -> Path:
    return atomic_write_text(path, json.dumps(datalist, indent=2) + "\n")


def _read(path: Path) -> dict:
    """The raw JSON object of a decathlon datalist (a `DataError` naming the file otherwise)."""
    raw = read_json(path, "datalist not found")
    if not isinstance(raw, dict) or "training" not in raw:
        raise DataError(path, 'not a decathlon datalist (expected an object with a "training" list)')
    return raw


def split_case_ids(path, split: str) -> list[str]:
    """Case ids of one list of a datalist (`training` | `validation`), in file order. Stages that
    read the cache or embeddings need the ids only, so image files are not checked here."""
    if split not in SECTIONS:
        raise ValueError(f"split must be one of {SECTIONS}, got {split!r}")
    path = Path(path)
    items = _read(path).get(split, [])
    try:
        return [case_id_from_path(e if isinstance(e, str) else e["image"]) for e in items]
    except (KeyError, TypeError) as e:
        raise DataError(path, f'every "{split}" entry needs an "image" path ({e!r})') from None


def load_datalist(path, data_dir, check_files: bool = True) -> dict[str, list[dict]]:
    """Read and validate a decathlon datalist; returns `{"training": [...], "validation": [...]}`
    with absolute paths. Every `image`/`label` must be a relative path that stays inside `data_dir`
    (and exist, when `check_files`). Errors are `UserError`s naming the file and the entry."""
    path, data_dir = Path(path), Path(data_dir)
    raw = _read(path)
    if not data_dir.is_dir():
        raise DataError(data_dir, "data directory not found")
    # Lexical check (no symlink resolution): `../` in a datalist is a mistake, a symlinked
    # imagesTr/ pointing at another disk is a normal setup.
    root = Path(os.path.abspath(data_dir))
    out: dict[str, list[dict]] = {}
    for section in SECTIONS:
        items = raw.get(section, [])
        if not isinstance(items, list):
            raise DataError(path, f'"{section}" must be a list, got {type(items).__name__}')
        out[section] = []
        for n, item in enumerate(items):
            if isinstance(item, str):
                item = {"image": item}
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                raise DataError(path, f'{section}[{n}] has no "image" path')
            resolved = dict(item)
            for key in ("image", "label"):
                if key not in item:
                    continue
                rel = item[key]
                if not isinstance(rel, str) or not rel:
                    raise DataError(path, f'{section}[{n}].{key} is not a path: {rel!r}')
                full = Path(os.path.normpath(root / rel))
                if os.path.isabs(rel) or not full.is_relative_to(root):
                    raise DataError(path, f"{section}[{n}].{key} {rel!r} escapes data_dir {data_dir}")
                if check_files and not full.is_file():
                    raise DataError(full, f"file not found (listed in {path} as {section}[{n}].{key})")
                resolved[key] = str(full)
            out[section].append(resolved)
    if not any(out.values()):
        raise DataError(path, "datalist is empty (no training or validation cases)")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("data_dir", help="folder to scan: FLARE layout (imagesTr/, imagesTs/, labelsTr/) "
                                         "or any folder of .nii/.nii.gz files (searched recursively)")
    parser.add_argument("-o", "--output", required=True,
                        help="datalist JSON to write (decathlon format, paths relative to DATA_DIR)")
    parser.add_argument("--val_fraction", type=float, default=0.05,
                        help="fraction of cases put in the validation list (deterministic per seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split")


def run(args) -> int:

    d = build_datalist(args.data_dir, val_fraction=args.val_fraction, seed=args.seed)
    path = write_datalist(d, args.output)
    labelled = sum("label" in e for s in SECTIONS for e in d[s])
    console.print(table(f"datalist {path}", ["list", "cases", "with label"],
                        [[s, len(d[s]), sum("label" in e for e in d[s])] for s in SECTIONS]
                        + [["total", len(d["training"]) + len(d["validation"]), labelled]]))
    return 0
