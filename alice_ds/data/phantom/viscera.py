"""Painters of the vessels (aorta, iliac, renal and celiac arteries, IVC), the bowel, the lungs and
the airway."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from alice_ds.data.phantom.anatomy import (
    _AIRWAY_WALL_MM,
    _AORTA_R,
    _AORTA_X,
    _AORTA_Y,
    _AORTA_Z,
    _BRANCH_R,
    _BRONCHUS_END,
    _BRONCHUS_R,
    _CARINA,
    _CELIAC_LEN_MM,
    _CELIAC_Z,
    _ILIAC_END,
    _IVC,
    _TRACHEA_R,
    ATLAS_Z_TOP,
    LABELS,
    TISSUE_HU,
    _dome,
)
from alice_ds.data.phantom.painter import _Painter, _slabs, _tube
from alice_ds.data.phantom.subject import _Grid


def _vessels(grid: _Grid, pt: _Painter, phase: dict) -> None:
    # Aorta along its centre line (x, y, r interpolated per slice), capped at the arch.
    sl = grid.box((-60, -70, _AORTA_Z[0]), (20, 10, _AORTA_Z[-1]))
    qx, qy, qz = grid.q(sl)
    inside = (qz >= _AORTA_Z[0]) & (qz <= _AORTA_Z[-1])
    m = _tube(qx, qy, np.interp(qz, _AORTA_Z, _AORTA_X), np.interp(qz, _AORTA_Z, _AORTA_Y),
              np.interp(qz, _AORTA_Z, _AORTA_R)) & inside
    pt.put(sl, m & pt.body[sl], phase["aorta"], LABELS["aorta"])
    # Common iliac arteries from the bifurcation to the pelvis.
    e = _ILIAC_END
    sl = grid.box((-e["x"] - 15, -40, e["z"]), (e["x"] + 15, 10, _AORTA_Z[0]))
    qx, qy, qz = grid.q(sl)
    t = np.clip((_AORTA_Z[0] - qz) / (_AORTA_Z[0] - e["z"]), 0, 1)
    inside = (qz >= e["z"]) & (qz <= _AORTA_Z[0])
    for sign in (-1.0, 1.0):
        cx = _AORTA_X[0] + t * (sign * e["x"] - _AORTA_X[0])
        cy = _AORTA_Y[0] + t * (e["y"] - _AORTA_Y[0])
        pt.put(sl, _tube(qx, qy, cx, cy, e["r"]) & inside & pt.body[sl], phase["aorta"], LABELS["aorta"])
    # Renal arteries (aorta -> medial side of each kidney, at the kidney's centre z; the right one
    # passes behind the IVC) and the celiac trunk (anterior, at the celiac level): they mark the
    # aortic landmarks along an otherwise uniform tube.
    r = _BRANCH_R
    for side in ("right", "left"):
        k = grid.sub.organs[f"kidney_{side}"]
        z = k.center[2]
        a = np.array([np.interp(z, _AORTA_Z, _AORTA_X), np.interp(z, _AORTA_Z, _AORTA_Y), z])
        end = np.array([k.center[0] - np.sign(k.center[0]) * 0.5 * k.radii[0], k.center[1], z])
        lo, hi = np.minimum(a, end) - r, np.maximum(a, end) + r
        sl = grid.box(lo, hi)
        qx, qy, qz = grid.q(sl)
        t = (qx - a[0]) / (end[0] - a[0])                                  # 0 at the aorta, 1 at the hilum
        m = ((qy - (a[1] + t * (end[1] - a[1]))) ** 2 + (qz - z) ** 2 < r ** 2) & (t >= 0) & (t <= 1)
        pt.put(sl, m & pt.body[sl], phase["aorta"], LABELS["aorta"])
    a = np.array([np.interp(_CELIAC_Z, _AORTA_Z, _AORTA_X), np.interp(_CELIAC_Z, _AORTA_Z, _AORTA_Y), _CELIAC_Z])
    sl = grid.box(a - [r, 0, r], a + [r, _CELIAC_LEN_MM, r])
    qx, qy, qz = grid.q(sl)
    m = ((qx - a[0]) ** 2 + (qz - a[2]) ** 2 < r ** 2) & (qy >= a[1]) & (qy <= a[1] + _CELIAC_LEN_MM)
    pt.put(sl, m & pt.body[sl], phase["aorta"], LABELS["aorta"])
    # Inferior vena cava, right of the aorta, up into the right atrium.
    v = _IVC
    sl = grid.box((v["x"] - v["r"], v["y"] - v["r"], v["z0"]), (v["x"] + v["r"], v["y"] + v["r"], v["z1"]))
    qx, qy, qz = grid.q(sl)
    m = _tube(qx, qy, v["x"], v["y"], v["r"]) & (qz >= v["z0"]) & (qz <= v["z1"]) & pt.body[sl]
    pt.put(sl, m, phase["ivc"], LABELS["ivc"])


_BOWEL_Z = (40.0, 365.0)
_BOWEL_GRID_MM = 9.0
"""Spacing of the random field whose level sets form the bowel loops (loops are ~15-25 mm wide)."""


def _bowel(grid: _Grid, pt: _Painter, rng: np.random.Generator) -> None:
    """Small bowel and colon: the unfilled abdominal cavity becomes loops (wall, fluid, gas) and
    mesenteric fat, drawn from a smooth random field in atlas mm (so it scales with the subject)."""
    lo = np.array([-170.0, -60.0, _BOWEL_Z[0]])
    dims = np.ceil((np.array([170.0, 130.0, _BOWEL_Z[1]]) - lo) / _BOWEL_GRID_MM).astype(int) + 2
    fields = []
    for sigma in (1.0, 1.5):  # loops, and where they hold gas
        f = ndimage.gaussian_filter(rng.standard_normal(tuple(dims)), sigma)
        fields.append(f / f.std())
    for sl in _slabs(grid.box(lo, (170, 130, _BOWEL_Z[1]))):
        _bowel_slab(grid, pt, sl, lo, fields)


def _bowel_slab(grid: _Grid, pt: _Painter, sl, lo, fields) -> None:
    qz = grid.q(sl)[2]
    free = pt.cavity[sl] & (pt.label[sl] == 0) & (qz >= _BOWEL_Z[0]) & (qz <= _BOWEL_Z[1])
    idx = np.nonzero(free)
    if idx[0].size == 0:
        return
    qx, qy, qz = grid.q_at(tuple(i + s.start for i, s in zip(idx, sl)))
    keep = qy > -60.0  # loops stay anterior to the kidneys and the spine
    coords = np.stack([(qx - lo[0]), (qy - lo[1]), (qz - lo[2])]) / _BOWEL_GRID_MM   # [3, N] field grid units
    loop, gas = (ndimage.map_coordinates(f, coords, order=1, mode="nearest") for f in fields)
    wall = keep & (np.abs(loop - 0.2) < 0.18)
    lumen = keep & (loop > 0.2) & ~wall
    hu = pt.hu[sl]
    lab = pt.label[sl]
    sel = tuple(i[wall] for i in idx)
    hu[sel] = TISSUE_HU["bowel_wall"]
    lab[sel] = LABELS["bowel"]
    sel = tuple(i[lumen] for i in idx)
    hu[sel] = np.where(gas[lumen] > 0.6, TISSUE_HU["gas"], TISSUE_HU["bowel_content"])
    lab[sel] = LABELS["bowel"]


def _lungs(grid: _Grid, pt: _Painter) -> None:
    """Lungs fill the free thoracic cavity above the diaphragm, except the mediastinum."""
    for sl in _slabs(grid.box((-170, -130, 370), (170, 130, ATLAS_Z_TOP))):
        _lungs_slab(grid, pt, sl)


def _lungs_slab(grid: _Grid, pt: _Painter, sl) -> None:
    qx, qy, qz = grid.q(sl)
    mediastinum = (np.abs(qx + 8.0) < 32.0) & (qy > -75.0)
    paravertebral = (np.abs(qx) < 30.0) & (qy < -15.0)
    m = pt.cavity[sl] & (pt.label[sl] == 0) & (qz > _dome(qx, qy)) & ~mediastinum & ~paravertebral
    pt.put(sl, m & (qx > 0), TISSUE_HU["lung"], LABELS["lung_right"])
    pt.put(sl, m & (qx <= 0), TISSUE_HU["lung"], LABELS["lung_left"])


def _airway(grid: _Grid, pt: _Painter) -> None:
    """Trachea above the carina and the two main bronchi: air tubes with a soft-tissue wall, the
    landmark of the upper chest."""
    c, r = _CARINA, _TRACHEA_R + _AIRWAY_WALL_MM
    sl = grid.box((c[0] - r, c[1] - r, c[2]), (c[0] + r, c[1] + r, ATLAS_Z_TOP))
    qx, qy, qz = grid.q(sl)
    d2 = (qx - c[0]) ** 2 + (qy - c[1]) ** 2
    above = (qz >= c[2] - _TRACHEA_R) & pt.body[sl]
    pt.put(sl, above & (d2 < r ** 2), TISSUE_HU["stomach_wall"], LABELS["airway"])
    pt.put(sl, above & (d2 < _TRACHEA_R ** 2), TISSUE_HU["gas"])
    e = _BRONCHUS_END
    r = _BRONCHUS_R + _AIRWAY_WALL_MM
    sl = grid.box((-e["x"] - r, c[1] - r, e["z"]), (e["x"] + r, c[1] + r, c[2]))
    qx, qy, qz = grid.q(sl)
    t = np.clip((c[2] - qz) / (c[2] - e["z"]), 0, 1)                        # 0 at the carina
    inside = (qz >= e["z"]) & (qz <= c[2]) & pt.body[sl]
    for sign in (-1.0, 1.0):
        d2 = (qx - sign * e["x"] * t) ** 2 + (qy - c[1]) ** 2
        pt.put(sl, inside & (d2 < r ** 2), TISSUE_HU["stomach_wall"], LABELS["airway"])
        pt.put(sl, inside & (d2 < _BRONCHUS_R ** 2), TISSUE_HU["gas"])
