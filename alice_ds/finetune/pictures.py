"""Overlay pictures for `alice-ds evaluate --pictures`: per case and organ one PNG with the axial,
coronal and sagittal slices through the organ's centroid, the label's outline in green and the
prediction's in red over the windowed CT (matplotlib, Agg backend: no display needed).

Arrays are RAS (x, y, z) on the evaluation grid; slices are drawn with x (or y) to the right and y
(or z) upwards, aspect ratios from the voxel spacing.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABEL_COLOUR = "#33dd33"
PRED_COLOUR = "#ff3030"
DPI = 100
PANEL_INCHES = 3.2


def _slices(volume: np.ndarray, centre) -> list[tuple[str, np.ndarray]]:
    """[X, Y, Z] -> the three planes through `centre` (voxel), each [horizontal, vertical]."""
    cx, cy, cz = centre
    return [("axial", volume[:, :, cz]), ("coronal", volume[:, cy, :]), ("sagittal", volume[cx, :, :])]


def _aspects(spacing) -> list[float]:
    sx, sy, sz = (float(s) for s in spacing)
    return [sy / sx, sz / sx, sz / sy]  # imshow aspect = vertical mm / horizontal mm per voxel


def draw_case(out_dir: Path, case_id: str, image: np.ndarray, label: np.ndarray, pred: np.ndarray,
              names: list[str], spacing) -> list[Path]:
    """image [X, Y, Z] in [0, 1], label and pred [X, Y, Z] class indices (1..len(names)) -> one PNG
    per class present in the label or the prediction: `<out_dir>/<case_id>_<name>.png`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for c, name in enumerate(names, start=1):
        lab, prd = label == c, pred == c
        source = lab if lab.any() else prd
        if not source.any():
            continue
        centre = [int(round(v)) for v in np.argwhere(source).mean(0)]  # voxel of the centroid
        inter = float((lab & prd).sum())
        total = float(lab.sum() + prd.sum())
        dice = 2 * inter / total if lab.any() else float("nan")
        fig, axes = plt.subplots(1, 3, figsize=(3 * PANEL_INCHES, PANEL_INCHES + 0.4), dpi=DPI)
        planes = zip(_slices(image, centre), _slices(lab, centre), _slices(prd, centre), _aspects(spacing), axes)
        for (plane, img), (_, lab2d), (_, prd2d), aspect, ax in planes:
            ax.imshow(img.T, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=aspect)
            for mask, colour in ((lab2d, LABEL_COLOUR), (prd2d, PRED_COLOUR)):
                if mask.any() and not mask.all():
                    ax.contour(mask.T.astype(float), levels=[0.5], colors=[colour], linewidths=1.2, origin="lower")
            ax.set_title(plane, fontsize=9)
            ax.set_axis_off()
        fig.suptitle(f"{case_id} {name}: Dice {dice:.3f}  (green label, red prediction)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{case_id}_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
