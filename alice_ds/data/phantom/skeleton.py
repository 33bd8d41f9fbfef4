"""Painters of the skeleton: spine (the level ruler of every slice), ribs and sternum, pelvis and
femoral heads."""

from __future__ import annotations

import math

import numpy as np

from alice_ds.data.phantom.anatomy import (
    _BODY_HEIGHT_FRACTION,
    _FEMUR_HEADS,
    _FEMUR_RADIUS,
    _FUSED_LEVELS,
    _LEVEL_RADIUS,
    _LEVEL_Y,
    _LEVEL_Z,
    _SPINOUS_MM,
    _T12_INDEX,
    _THORACIC_STEP,
    ATLAS_Z_TOP,
    LABELS,
    TISSUE_HU,
)
from alice_ds.data.phantom.painter import _Painter, _slabs
from alice_ds.data.phantom.subject import Subject, _Grid


def _spine(grid: _Grid, pt: _Painter) -> None:
    """Vertebral bodies (cortical shell, cancellous core), discs, posterior arch, spinous and
    transverse processes, and the canal. Levels differ in radius and spacing along z, so the spine is
    a ruler that tells the level of every slice."""
    T = TISSUE_HU
    sl = grid.box((-75, -135, 0), (75, -10, ATLAS_Z_TOP))
    qx, qy, qz = grid.q(sl)
    z = qz[0, 0]
    lvl = np.abs(z[:, None] - _LEVEL_Z[None, :]).argmin(axis=1)        # nearest level per slice
    dz = (z - _LEVEL_Z[lvl])[None, None, :]
    step = np.where(lvl < _T12_INDEX, 36.0, _THORACIC_STEP)[None, None, :]
    rad = _LEVEL_RADIUS[lvl][None, None, :]
    yc = _LEVEL_Y[lvl][None, None, :]
    in_range = ((z > _LEVEL_Z[0] - 20) & (z < _LEVEL_Z[-1] + 15))[None, None, :]
    fused = (lvl < _FUSED_LEVELS)[None, None, :]
    half = _BODY_HEIGHT_FRACTION * step / 2
    rr = np.sqrt(qx ** 2 + (qy - yc) ** 2)
    disc = in_range & (rr < rad) & (np.abs(dz) >= half) & ~fused
    vbody = in_range & (rr < rad) & ((np.abs(dz) < half) | fused)
    shell = vbody & ((rr > rad - 2.5) | (np.abs(dz) > half - 2.0) & ~fused)
    canal_r = np.where(lvl < _T12_INDEX, 10.0, 8.0)[None, None, :]
    cy = yc - rad - canal_r + 1.0
    rc = np.sqrt(qx ** 2 + (qy - cy) ** 2)
    arch = in_range & (rc >= canal_r) & (rc < canal_r + 6.0) & (qy < yc - rad + 2) & (np.abs(dz) < 0.42 * step)
    spinous = in_range & (np.abs(qx) < 4.0) & (qy < cy - canal_r) & (qy > cy - canal_r - _SPINOUS_MM) \
        & (np.abs(dz + 0.12 * step) < 0.3 * step)
    tp_len = np.where(lvl < _T12_INDEX, 45.0, 30.0)[None, None, :]
    transverse = in_range & (np.abs(qy - cy) < 5.0) & (np.abs(qx) > canal_r) & (np.abs(qx) < tp_len) \
        & (np.abs(dz) < 6.0)
    inside = pt.body[sl]
    pt.put(sl, disc & inside, T["disc"], 0)
    bone = (vbody | arch | spinous | transverse) & inside
    pt.put(sl, bone, T["cancellous_bone"], LABELS["vertebrae"])
    pt.put(sl, (shell | arch | spinous | transverse) & inside, T["cortical_bone"])
    canal = in_range & (rc < canal_r) & inside
    pt.put(sl, canal, T["csf"], 0)


_RIB_RADIUS_MM = 5.0
_RIB_DROP_MM = 55.0
"""How far a rib descends from its vertebra to its anterior end (atlas mm)."""
_RIB_REACH = np.array([1.5, 1.6, 2.2, 2.3, 2.4, 2.6, 2.6, 2.6, 2.6, 2.5, 2.4, 2.3])
"""Angular reach of each rib from the posterior midline (radians; pi = anterior midline), T12 first:
floating ribs are short, true ribs reach close to the sternum."""


def _ribs(grid: _Grid, pt: _Painter, sub: Subject) -> None:
    rib_h = -0.5 * sub.muscle_mm                                            # inside the chest wall
    for sl in _slabs(grid.box((-170, -130, _LEVEL_Z[_T12_INDEX] - _RIB_DROP_MM - 10), (170, 130, ATLAS_Z_TOP))):
        _ribs_slab(grid, pt, sl, rib_h)
    # Sternum: an anterior midline bar over the upper chest.
    sl = grid.box((-20, 60, 470), (20, 130, ATLAS_Z_TOP))
    qx, qy, qz = grid.q(sl)
    m = (np.abs(qx) < 14.0) & (np.abs(pt.h[sl] - rib_h) < 5.0) & (qz > 470) & (qz < 640)
    pt.put(sl, m, TISSUE_HU["rib"], LABELS["ribs"])


def _ribs_slab(grid: _Grid, pt: _Painter, sl, rib_h: float) -> None:
    """Ribs: circles of radius 5 mm around a centre line in the chest wall that starts at each
    thoracic vertebra and descends anteriorly; evaluated only on the ring of wall voxels."""
    ring = np.abs(pt.h[sl] - rib_h) < _RIB_RADIUS_MM
    idx = np.nonzero(ring)
    if idx[0].size == 0:
        return
    qx, qy, qz = grid.q_at(tuple(i + s.start for i, s in zip(idx, sl)))
    phi = np.abs(np.arctan2(qx, -qy))                                       # 0 = posterior midline
    u = qz + _RIB_DROP_MM * phi / math.pi
    k = np.clip(np.rint((u - _LEVEL_Z[_T12_INDEX]) / _THORACIC_STEP), 0, 11).astype(int)
    dz = u - (_LEVEL_Z[_T12_INDEX] + _THORACIC_STEP * k)
    dr = pt.h[sl][idx] - rib_h
    rib = (dz ** 2 + dr ** 2 < _RIB_RADIUS_MM ** 2) & (phi > 0.3) & (phi < _RIB_REACH[k])
    sel = tuple(i[rib] for i in idx)
    pt.hu[sl][sel] = TISSUE_HU["rib"]
    pt.label[sl][sel] = LABELS["ribs"]


def _pelvis(grid: _Grid, pt: _Painter, sub: Subject) -> None:
    """Iliac wings (curved plates flaring from the sacrum) and the femoral heads."""
    sl = grid.box((-170, -130, 90), (170, 60, 215))
    qx, qy, qz = grid.q(sl)
    phi = np.abs(np.arctan2(qx, -qy))
    plate_h = 18.0
    crest = 205.0 - 25.0 * (phi - 1.1) ** 2
    m = (np.abs(pt.h[sl] - plate_h) < 4.0) & (phi > 0.45) & (phi < 1.75) & (qz > 100) & (qz < crest)
    pt.put(sl, m, TISSUE_HU["pelvis_bone"], LABELS["pelvis"])
    for c in _FEMUR_HEADS.values():
        c = np.array(c)
        sl = grid.box(c - _FEMUR_RADIUS, c + _FEMUR_RADIUS)
        qx, qy, qz = grid.q(sl)
        rr = np.sqrt((qx - c[0]) ** 2 + (qy - c[1]) ** 2 + (qz - c[2]) ** 2)
        pt.put(sl, (rr < _FEMUR_RADIUS) & pt.body[sl], TISSUE_HU["cancellous_bone"], LABELS["pelvis"])
        pt.put(sl, (rr < _FEMUR_RADIUS) & (rr > _FEMUR_RADIUS - 3) & pt.body[sl], TISSUE_HU["cortical_bone"])
