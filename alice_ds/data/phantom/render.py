"""Rendering one subject: body wall, muscles and solid organs here, then the vessels, bowel, lungs and
airway (`viscera.py`), the skeleton (`skeleton.py`), organ texture and CT noise.

The order of the steps is part of the output: later structures overwrite earlier ones, and every
random field is drawn from the case's generator in this order.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from alice_ds.data.phantom.anatomy import (
    _BACK_DEPTH_RATIO,
    _BACK_MUSCLE_MM,
    _BODY_RX,
    _BODY_RY,
    _BODY_Z,
    _HU_RANGE,
    _LIVER_TAPER,
    _SKIN_MM,
    ATLAS_Z_TOP,
    LABELS,
    PHASES,
    TISSUE_HU,
    _dome,
)
from alice_ds.data.phantom.painter import _SLAB, _ellipsoid, _Painter, _slabs
from alice_ds.data.phantom.skeleton import _pelvis, _ribs, _spine
from alice_ds.data.phantom.subject import Subject, _Grid
from alice_ds.data.phantom.viscera import _airway, _bowel, _lungs, _vessels


def _render(sub: Subject, rng: np.random.Generator):
    grid = _Grid(sub)
    pt = _Painter(grid)
    phase = {k: v * sub.hu_jitter for k, v in PHASES[sub.phase].items()}
    T = TISSUE_HU
    full = tuple(slice(0, n) for n in sub.shape)

    # Body wall: skin, subcutaneous fat, muscle (thicker at the back); inside it the cavity is
    # visceral fat until organs fill it. Depth below the skin is approximated from the ellipse radius.
    # Done in slabs of x so that the full-grid temporaries stay small.
    for sl in _slabs(full):
        _body_wall(grid, pt, sl)

    # Paraspinal muscles (whole spine) and psoas (lumbar, widening caudally).
    sl = grid.box((-70, -115, 40), (70, -20, ATLAS_Z_TOP))
    qx, qy, qz = grid.q(sl)
    para = ((np.abs(qx) - 36.0) / 22.0) ** 2 + ((qy + 82.0) / 17.0) ** 2 < 1.0
    psoas_r = np.clip(np.interp(qz, [130.0, 300.0], [22.0, 7.0]), 0, None) * (qz < 305)
    psoas = (np.abs(qx) - 42.0) ** 2 + (qy + 35.0) ** 2 < psoas_r ** 2
    muscles = (para | psoas) & pt.body[sl]
    pt.put(sl, muscles, T["muscle"])
    pt.cavity[sl][muscles] = False

    def organ_box(name, pad=0.0):
        o = sub.organs[name]
        s = grid.box(o.lo() - pad, o.hi() + pad)
        return s, grid.q(s), o

    # Liver (below the right dome): a wedge, thick on the right, thinning into the left lobe.
    sl, q, o = organ_box("liver")
    u = (q[0] - o.center[0]) / o.radii[0]                                   # -1 left tip .. 1 right edge
    taper = np.clip(_LIVER_TAPER[0] + _LIVER_TAPER[1] * u, 0.3, 1.0)
    e = u ** 2 + (((q[1] - o.center[1]) / o.radii[1]) ** 2 + ((q[2] - o.center[2]) / o.radii[2]) ** 2) / taper ** 2
    m = (e < 1) & (q[2] < _dome(q[0], q[1]) - 4) & pt.cavity[sl]
    pt.put(sl, m, phase["liver"], LABELS["liver"])
    sl, q, o = organ_box("gallbladder")
    pt.put(sl, (_ellipsoid(q, o) < 1) & pt.cavity[sl], T["bile"], LABELS["gallbladder"])
    # Spleen (below the left dome).
    sl, q, o = organ_box("spleen")
    m = (_ellipsoid(q, o) < 1) & (q[2] < _dome(q[0], q[1]) - 4) & pt.cavity[sl]
    pt.put(sl, m, phase["spleen"], LABELS["spleen"])
    # Kidneys: enhancing cortex around the medulla (cortico-medullary contrast in the arterial phase).
    for side in ("right", "left"):
        sl, q, o = organ_box(f"kidney_{side}")
        e = _ellipsoid(q, o)
        m = (e < 1) & pt.cavity[sl]
        pt.put(sl, m, phase["kidney_cortex"], LABELS[f"kidney_{side}"])
        pt.put(sl, m & (e < 0.55), phase["kidney_medulla"])
        medial = (q[0] - o.center[0]) * np.sign(o.center[0]) < 0
        hilum = m & (e < 0.3) & medial & (np.abs(q[2] - o.center[2]) < 0.5 * o.radii[2])
        pt.put(sl, hilum, TISSUE_HU["visceral_fat"])                        # renal sinus fat
    # Stomach: wall, fluid, and gas rising anteriorly (the patient is supine).
    sl, q, o = organ_box("stomach")
    e = _ellipsoid(q, o)
    m = (e < 1) & (q[2] < _dome(q[0], q[1]) - 4) & pt.cavity[sl]
    pt.put(sl, m, T["stomach_wall"], LABELS["stomach"])
    lumen = m & (e < 0.8)
    pt.put(sl, lumen, T["stomach_fluid"])
    pt.put(sl, lumen & (q[1] > o.center[1] + 0.3 * o.radii[1]), T["gas"])
    # Bladder.
    sl, q, o = organ_box("bladder")
    e = _ellipsoid(q, o)
    m = (e < 1) & pt.cavity[sl]
    pt.put(sl, m, T["stomach_wall"], LABELS["bladder"])
    pt.put(sl, m & (e < 0.8), T["urine"])
    # Heart: myocardium around the blood pool.
    sl, q, o = organ_box("heart")
    e = _ellipsoid(q, o)
    m = (e < 1) & pt.cavity[sl]
    pt.put(sl, m, T["myocardium"], LABELS["heart"])
    pt.put(sl, m & (e < 0.6), phase["heart_blood"])

    _vessels(grid, pt, phase)
    _bowel(grid, pt, rng)
    _lungs(grid, pt)
    _airway(grid, pt)
    _spine(grid, pt)
    _ribs(grid, pt, sub)
    _pelvis(grid, pt, sub)
    _organ_texture(grid, pt, rng)

    return grid, _add_noise(pt, sub, rng), pt.label


def _body_wall(grid: _Grid, pt: _Painter, sl) -> None:
    sub, T = grid.sub, TISSUE_HU
    qx, qy, qz = grid.q(sl)
    fat = np.float32(sub.fat_mm)
    rx = (np.interp(qz, _BODY_Z, _BODY_RX) + fat).astype(np.float32)             # [1, 1, nz]
    ry = np.interp(qz, _BODY_Z, _BODY_RY).astype(np.float32)
    ry_here = np.where(qy < 0, ry * np.float32(_BACK_DEPTH_RATIO) + fat, ry + fat)
    qx /= rx
    qx *= qx
    qy /= ry_here                                                                # signed y / radius
    depth = np.sqrt(qx + qy * qy)                                                # normalised radius r
    np.subtract(1.0, depth, out=depth)
    ry_here += rx
    ry_here *= np.float32(0.5)
    depth *= ry_here                                                             # (1 - r) * mean radius
    back = qy                                                                    # extra posterior muscle
    np.negative(back, out=back)
    back -= np.float32(0.2)
    np.clip(back, 0.0, 0.8, out=back)
    back *= np.float32(_BACK_MUSCLE_MM / 0.8)
    body = depth > 0
    hu = pt.hu[sl]
    hu[body] = T["skin"]
    hu[depth > _SKIN_MM] = T["subcutaneous_fat"]
    h = depth - (fat + np.float32(sub.muscle_mm)) - back
    hu[(depth > fat) & (h <= 0)] = T["muscle"]
    cavity = h > 0
    hu[cavity] = T["visceral_fat"]
    pt.body[sl], pt.h[sl], pt.cavity[sl] = body, h, cavity


def _add_noise(pt: _Painter, sub: Subject, rng: np.random.Generator) -> np.ndarray:
    """Add CT-like noise and return the int16 image. The noise is correlated in-plane: white noise
    summed over 2x2 neighbours (std x2, hence the 0.5), drawn slab by slab."""
    image = np.empty(sub.shape, dtype=np.int16)
    for x0 in range(0, sub.shape[0], _SLAB):
        sl = slice(x0, min(x0 + _SLAB, sub.shape[0]))
        noise = rng.standard_normal(pt.hu[sl].shape, dtype=np.float32)
        noise[1:] += noise[:-1]
        noise[:, 1:] += noise[:, :-1]
        noise *= np.float32(0.5 * sub.noise_hu)
        noise += pt.hu[sl]
        np.rint(noise, out=noise)
        np.clip(noise, *_HU_RANGE, out=noise)
        image[sl] = noise
    return image


_TEXTURE_GRID_MM = 8.0
"""Spacing of the random fields behind organ texture and liver vessels (features of ~15-25 mm)."""
_TEXTURE_HU = 6.0
"""Standard deviation of the smooth parenchymal texture of liver, spleen and kidneys."""
_TEXTURED = ("liver", "spleen", "kidney_right", "kidney_left")
_LIVER_VESSEL_WIDTH = 0.18
"""Liver vessels: where two smooth unit-variance fields are both within +-this of 0 (tubes ~3-5 mm)."""
_LIVER_VESSEL_HU = {"non_contrast": -12.0, "arterial": 15.0, "portal_venous": 55.0}
"""Vessel contrast against the parenchyma per phase (portal and hepatic veins light up in the
portal venous phase)."""


def _organ_texture(grid: _Grid, pt: _Painter, rng: np.random.Generator) -> None:
    """Mild smooth texture in solid organs and a vessel tree in the liver, from random fields in
    atlas mm (so both scale with the subject and look the same at every resolution)."""
    for name in _TEXTURED:
        o = grid.sub.organs[name]
        lo, hi = o.lo() - _TEXTURE_GRID_MM, o.hi() + _TEXTURE_GRID_MM
        dims = tuple(np.ceil((hi - lo) / _TEXTURE_GRID_MM).astype(int) + 2)
        fields = []
        for _ in range(3 if name == "liver" else 1):
            f = ndimage.gaussian_filter(rng.standard_normal(dims), 1.0)
            fields.append(f / f.std())
        for sl in _slabs(grid.box(lo, hi)):
            idx = np.nonzero(pt.label[sl] == LABELS[name])
            if idx[0].size == 0:
                continue
            q = grid.q_at(tuple(i + s.start for i, s in zip(idx, sl)))
            coords = np.stack([(q[a] - lo[a]) / _TEXTURE_GRID_MM for a in range(3)])   # [3, N] field units
            values = [ndimage.map_coordinates(f, coords, order=1, mode="nearest") for f in fields]
            hu = pt.hu[sl]
            add = _TEXTURE_HU * values[0]
            if name == "liver":
                vessel = (np.abs(values[1]) < _LIVER_VESSEL_WIDTH) & (np.abs(values[2]) < _LIVER_VESSEL_WIDTH)
                add = add + vessel * _LIVER_VESSEL_HU[grid.sub.phase]
            hu[idx] += add.astype(np.float32)
