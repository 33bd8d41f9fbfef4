"""The canvas the painters draw on (HU, labels, body and cavity masks of one subject's RAS grid), the
slab iteration of full-grid steps and the shape tests they share."""

from __future__ import annotations

import numpy as np

from alice_ds.data.phantom.anatomy import PHANTOM_AIR_HU
from alice_ds.data.phantom.subject import _Grid, _Organ


class _Painter:
    """HU, label, body and cavity volumes of one subject's RAS grid, painted box by box."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        shape = grid.sub.shape
        self.hu = np.full(shape, PHANTOM_AIR_HU, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)
        self.body = np.zeros(shape, dtype=bool)
        self.cavity = np.zeros(shape, dtype=bool)
        """Free body cavity: filled by organs, then bowel and lungs."""
        self.h = np.zeros(shape, dtype=np.float32)
        """Atlas mm inside the cavity boundary (negative in the body wall)."""

    def put(self, sl, mask, hu, label=None):
        h = self.hu[sl]
        h[mask] = hu if np.isscalar(hu) else hu[mask]
        if label is not None:
            self.label[sl][mask] = label


def _ellipsoid(q, organ: _Organ):
    qx, qy, qz = q
    c, r = organ.center, organ.radii
    return ((qx - c[0]) / r[0]) ** 2 + ((qy - c[1]) / r[1]) ** 2 + ((qz - c[2]) / r[2]) ** 2


_SLAB = 32
"""Rows of x processed at once by the full-grid steps (memory: a few 10 MB per temporary)."""


def _slabs(sl):
    """Split a box into slabs of `_SLAB` rows along x."""
    for x0 in range(sl[0].start, sl[0].stop, _SLAB):
        yield (slice(x0, min(x0 + _SLAB, sl[0].stop)),) + tuple(sl[1:])


def _tube(qx, qy, cx, cy, r):
    return (qx - cx) ** 2 + (qy - cy) ** 2 < r ** 2
