"""Phantom landmarks: named points of the atlas (organ centroids and poles, aortic branches, vertebral
levels, femoral heads, carina), the organ each lies in, and the redraw of a case's Subject from its
landmark file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alice_ds.data.landmarks import read_landmark_file
from alice_ds.data.phantom.anatomy import (
    _AORTA_X,
    _AORTA_Y,
    _AORTA_Z,
    _CARINA,
    _CELIAC_Z,
    _FEMUR_HEADS,
    _LEVEL_NAMES,
    _LEVEL_Y,
    _LEVEL_Z,
)
from alice_ds.data.phantom.subject import Subject, _Grid, draw_subject
from alice_ds.errors import DataError


def _atlas_landmarks(sub: Subject) -> dict[str, np.ndarray]:
    """Named landmarks in atlas mm (subject variation of organs included)."""
    o = sub.organs
    lm = {f"{n}_centroid": o[n].center for n in ("liver", "spleen", "kidney_right", "kidney_left",
                                                   "stomach", "bladder", "heart", "gallbladder")}
    for side in ("right", "left"):
        k = o[f"kidney_{side}"]
        lm[f"kidney_{side}_upper_pole"] = k.center + [0, 0, 0.75 * k.radii[2]]
        lm[f"kidney_{side}_lower_pole"] = k.center - [0, 0, 0.75 * k.radii[2]]
    # aorta_renal: the left renal artery origin (the left kidney sits higher).
    for name, z in (("aorta_bifurcation", _AORTA_Z[0] + 8), ("aorta_renal", o["kidney_left"].center[2]),
                    ("aorta_celiac", _CELIAC_Z), ("aorta_thoracic", 530.0)):
        lm[name] = np.array([np.interp(z, _AORTA_Z, _AORTA_X), np.interp(z, _AORTA_Z, _AORTA_Y), z])
    for name, z, y in zip(_LEVEL_NAMES, _LEVEL_Z, _LEVEL_Y):
        lm[f"vertebra_{name}"] = np.array([0.0, y, z])
    lm.update({k: np.array(v) for k, v in _FEMUR_HEADS.items()})
    lm["carina"] = _CARINA + [0.0, 0.0, 3.0]
    return lm


LANDMARK_LABELS = {
    **{f"{n}_centroid": n for n in ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "bladder",
                                    "heart", "gallbladder")},
    **{f"kidney_{s}_{p}_pole": f"kidney_{s}" for s in ("right", "left") for p in ("upper", "lower")},
    **{f"aorta_{n}": "aorta" for n in ("bifurcation", "renal", "celiac", "thoracic")},
    **{f"vertebra_{n}": "vertebrae" for n in _LEVEL_NAMES},
    **{k: "pelvis" for k in _FEMUR_HEADS},
    "carina": "airway",
}
"""Landmark name -> the LABELS organ it lies in."""

ATLAS_FIXED_LANDMARKS = frozenset(
    [n for n, organ in LANDMARK_LABELS.items() if organ in ("vertebrae", "pelvis", "airway")]
    + ["aorta_bifurcation", "aorta_celiac", "aorta_thoracic"])
"""Landmarks placed by the atlas alone: they move with the subject map but not with any organ's own
shift and size (the others, organ centroids and poles and the renal aorta, do: up to 9 mm per axis),
so a geometric correspondence can find them exactly."""

_LANDMARK_MARGIN_MM = 3.0
"""A case's landmark file keeps only the landmarks at least this far inside its field of view."""
LANDMARK_DECIMALS = 3
"""Landmark files store mm rounded to this many decimals."""
_REDRAW_TOLERANCE_MM = 0.01
"""A redrawn subject's landmarks must agree with the file's this well (20x the rounding)."""


def subject_for_landmarks(landmark_file) -> Subject:
    """The Subject of a phantom case from its landmark file (`info.generator`: seed, index, small),
    checked against the file: every landmark within _REDRAW_TOLERANCE_MM and the info's shape and
    spacing. Raises DataError naming the file when it is no phantom landmark file or when the redrawn
    case differs (another generator version, or a case written with a `shape` override)."""
    path = Path(landmark_file)
    _, marks = read_landmark_file(path)
    try:
        info = json.loads(path.read_text())["info"]
        gen = info["generator"]
        seed, index, small = gen["seed"], gen["index"], gen["small"]
        shape, spacing = tuple(info["shape"]), np.asarray(info["spacing"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(path, f"not a phantom landmark file: no info.generator {{seed, index, small}}, "
                              f"info.shape, info.spacing ({e!r})") from None
    if not (type(seed) is int and type(index) is int and type(small) is bool):
        raise DataError(path, f"info.generator must hold an int seed and index and a bool small, got {gen}")
    sub = draw_subject(index, seed, small)
    if shape != tuple(sub.shape) or not np.allclose(spacing, sub.spacing, atol=1e-3):
        raise DataError(path, f"info shape {list(shape)} / spacing {spacing.tolist()} differ from the redrawn "
                              f"phantom {gen}: {list(sub.shape)} / {np.round(sub.spacing, 4).tolist()}")
    atlas = _atlas_landmarks(sub)
    names = [n for n in atlas if n in marks]
    if not names:
        raise DataError(path, f"none of its landmarks is a phantom landmark ({sorted(marks)[:5]} ...)")
    world = _Grid(sub).atlas_to_world(np.stack([atlas[n] for n in names]))  # [L, 3]
    err = float(np.abs(world - np.asarray([marks[n] for n in names])).max())
    if not err <= _REDRAW_TOLERANCE_MM:
        raise DataError(path, f"landmarks differ from the redrawn phantom {gen} by up to {err:.2f} mm "
                              "(written by another generator version?)")
    return sub
