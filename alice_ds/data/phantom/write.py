"""Generating a case (render, storage orientation, landmarks in world mm) and writing it and whole
datasets in the FLARE layout (`imagesTr/`, `labelsTr/`, `landmarks/`, `dataset.json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from alice_ds.data import case_id_from_path, case_key
from alice_ds.data.datalist import build_datalist, write_datalist
from alice_ds.data.phantom.anatomy import LABELS
from alice_ds.data.phantom.landmarks import _LANDMARK_MARGIN_MM, LANDMARK_DECIMALS, _atlas_landmarks
from alice_ds.data.phantom.render import _render
from alice_ds.data.phantom.subject import _Grid, _subject_and_rng
from alice_ds.files import atomic_path


@dataclass
class PhantomCase:
    """One generated case in its *storage* orientation (the affine maps voxels to RAS world mm)."""

    case_id: str
    image: np.ndarray      # int16 HU [X, Y, Z]
    label: np.ndarray      # uint8 [X, Y, Z], values of LABELS
    affine: np.ndarray     # 4x4 float64
    landmarks: dict        # name -> [x, y, z] world mm (inside the field of view only)
    info: dict


def _to_storage(image, label, grid: _Grid, orientation: str):
    """Flip the RAS grid into the storage orientation; returns arrays and the 4x4 affine."""
    sub = grid.sub
    affine = np.diag([*sub.spacing, 1.0])
    affine[:3, 3] = sub.grid_origin
    for axis, code in enumerate(orientation[:2]):
        if code in "LP":                         # RAS axis 0 stored as L, axis 1 as P
            image = np.flip(image, axis)
            label = np.flip(label, axis)
            affine[:3, 3] += affine[:3, axis] * (sub.shape[axis] - 1)
            affine[:3, axis] *= -1
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine


def generate_case(index: int, seed: int = 0, small: bool = False, shape: tuple[int, int, int] | None = None
                  ) -> PhantomCase:
    """Case number `index` (1-based) of the dataset with `seed`. Deterministic: the case draws from
    its own generator seeded by (seed, index). `shape` overrides the matrix (keeping the field of
    view, so the voxel size changes); used for timing."""
    sub, rng = _subject_and_rng(index, seed, small)
    if shape is not None:
        fov = sub.spacing * np.array(sub.shape)
        sub.shape = tuple(int(s) for s in shape)
        sub.spacing = fov / np.array(sub.shape)
        sub.grid_origin[:2] = -sub.spacing[:2] * (np.array(sub.shape[:2]) - 1) / 2
    grid, image, label = _render(sub, rng)
    image, label, affine = _to_storage(image, label, grid, sub.orientation)
    names = list(_atlas_landmarks(sub))
    world = grid.atlas_to_world(np.stack(list(_atlas_landmarks(sub).values())))
    lo = sub.grid_origin + _LANDMARK_MARGIN_MM
    hi = sub.grid_origin + sub.spacing * (np.array(sub.shape) - 1) - _LANDMARK_MARGIN_MM
    landmarks = {n: [round(float(v), LANDMARK_DECIMALS) for v in p] for n, p in zip(names, world)
                 if (p >= lo).all() and (p <= hi).all()}
    info = dict(phase=sub.phase, orientation=sub.orientation, spacing=[round(float(s), 4) for s in sub.spacing],
                shape=list(sub.shape), atlas_z_range=[round(v, 1) for v in sub.z_range],
                noise_hu=round(float(sub.noise_hu), 2), scale=[round(float(s), 4) for s in sub.scale],
                generator=dict(seed=int(seed), index=int(index), small=bool(small)))
    return PhantomCase(f"Case_{index:05d}", image, label, affine, landmarks, info)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def write_case(case: PhantomCase, out_dir) -> None:
    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "landmarks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _save_nifti(case.image, case.affine, out / "imagesTr" / f"{case.case_id}_0000.nii.gz")
    _save_nifti(case.label, case.affine, out / "labelsTr" / f"{case.case_id}.nii.gz")
    (out / "landmarks" / f"{case.case_id}.json").write_text(json.dumps(
        {"case_id": case.case_id, "frame": "RAS world mm", "landmarks": case.landmarks, "info": case.info},
        indent=1))


def write_dataset(out_dir, num: int, seed: int = 0, small: bool = False, on_case=None) -> list[str]:
    """Write `num` phantom cases in the FLARE layout plus a decathlon `dataset.json`; returns the
    case ids (`Case_00001`, ...). `on_case(case)` is called after each case is written (progress)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    out = Path(out_dir)
    ids = []
    for i in range(1, num + 1):
        case = generate_case(i, seed=seed, small=small)
        write_case(case, out)
        ids.append(case.case_id)
        if on_case is not None:
            on_case(case)
    datalist = build_datalist(out, val_fraction=0.0, seed=seed)
    # only this run's cases (a folder reused with a smaller --num keeps older files on disk)
    written = set(ids)
    datalist["training"] = [e for e in datalist["training"] if case_key(case_id_from_path(e["image"])) in written]
    datalist.update(name="alice-ds phantom", description=f"synthetic abdominal/thoracic CT, seed {seed}",
                    labels={str(v): k for k, v in LABELS.items()}, numTraining=len(datalist["training"]))
    write_datalist(datalist, out / "dataset.json")
    return ids
