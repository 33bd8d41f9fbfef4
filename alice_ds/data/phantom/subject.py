"""One phantom subject: everything random about a case, drawn from the case's own generator, and its
world <-> atlas map (per-axis scale and translation plus a smooth separable deformation) evaluated on
the case's RAS voxel grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from alice_ds.data.phantom.anatomy import _ORGANS, ATLAS_Z_TOP, PHASES


@dataclass(frozen=True)
class Profile:
    """Acquisition ranges of one dataset flavour (all in mm unless noted)."""

    matrix: int
    """In-plane voxels per axis."""
    inplane_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    noise_hu: tuple[float, float]
    """Standard deviation of the (in-plane correlated) noise in HU; coarser voxels average it down."""


FULL = Profile(matrix=512, inplane_mm=(0.7, 0.9), slice_mm=(1.5, 5.0), noise_hu=(10.0, 28.0))
SMALL = Profile(matrix=128, inplane_mm=(2.8, 3.4), slice_mm=(4.0, 6.0), noise_hu=(4.0, 10.0))
"""Fast test cases: same anatomy in mm, ~3 mm in-plane voxels (the in-plane FOV stays 360-435 mm)."""

_ORIENTATIONS = ("RAS", "LPS", "RAS", "LAS")
"""Storage orientation by case index: every dataset of 2+ cases has non-RAS files."""


def _smooth_fn(rng: np.random.Generator, amplitude: float, wavelengths: tuple[float, float],
               modes: int = 3):
    """A random smooth 1D function (mm -> mm), |f| <= amplitude; sum of `modes` sinusoids."""
    lam = rng.uniform(*wavelengths, modes)
    phase = rng.uniform(0.0, 2 * math.pi, modes)
    amp = rng.normal(size=modes)
    amp *= amplitude / np.abs(amp).sum()

    def f(t):
        t = np.asarray(t, dtype=np.float64)
        return sum(a * np.sin(2 * math.pi * t / wl + p) for a, wl, p in zip(amp, lam, phase))

    return f


@dataclass
class _Organ:
    """An ellipsoid organ in atlas mm (centre and semi-axes already varied for this subject)."""

    center: np.ndarray
    radii: np.ndarray

    def lo(self):
        return self.center - self.radii

    def hi(self):
        return self.center + self.radii


@dataclass
class Subject:
    """Everything random about one phantom case (drawn from the case's own generator)."""

    scale: np.ndarray            # world mm per atlas mm, per axis
    origin: np.ndarray           # world mm of the atlas origin
    fat_mm: float
    muscle_mm: float
    phase: str
    noise_hu: float
    spacing: np.ndarray          # voxel size (mm) x, y, z
    shape: tuple[int, int, int]
    grid_origin: np.ndarray      # world mm of voxel (0, 0, 0) in the RAS generation grid
    z_range: tuple[float, float]  # atlas z covered by the field of view
    orientation: str
    deform: dict = field(default_factory=dict)
    organs: dict = field(default_factory=dict)
    hu_jitter: float = 1.0

    def world_to_atlas(self, points) -> np.ndarray:
        """World mm `[P, 3]` -> atlas mm `[P, 3]`: the subject map (per-axis scale and translation plus
        the smooth deformation; each organ's own shift and size are not part of it). `_Grid` evaluates the same map in
        its separable form over a voxel grid; `_Grid.atlas_to_world` inverts it."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        d, (ox, oy, oz), (sx, sy, sz) = self.deform, self.origin, self.scale
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        return np.stack([(x - ox) / sx + d["xx"](x) + d["xy"](y) + d["xz"](z),
                         (y - oy) / sy + d["yx"](x) + d["yy"](y) + d["yz"](z),
                         (z - oz) / sz + d["zz"](z)], axis=1)


_DEFORM = {
    "xx": (4.0, (150.0, 500.0)), "xy": (4.0, (150.0, 500.0)), "xz": (7.0, (200.0, 600.0)),
    "yx": (4.0, (150.0, 500.0)), "yy": (4.0, (150.0, 500.0)), "yz": (8.0, (200.0, 600.0)),
    "zz": (8.0, (250.0, 600.0)),
}
"""Smooth deformation terms: key "ab" = displacement of atlas axis a as a function of world axis b,
(max amplitude mm, wavelength range mm). Each term's slope is at most 2*pi*amp/min_wavelength
<= 0.25, which keeps the z map monotonic and the whole map invertible."""


def _draw_subject(rng: np.random.Generator, profile: Profile, index: int) -> Subject:
    s_xy = rng.uniform(0.86, 1.10)
    scale = np.array([s_xy * rng.uniform(0.97, 1.03), s_xy * rng.uniform(0.95, 1.05), rng.uniform(0.9, 1.1)])
    # Field of view along z: a 260-400 mm (atlas) slab anywhere in the body range.
    length = rng.uniform(260.0, 400.0)
    z0 = rng.uniform(0.0, ATLAS_Z_TOP - length)
    inplane = rng.uniform(*profile.inplane_mm)
    dz = rng.uniform(*profile.slice_mm)
    spacing = np.array([inplane, inplane, dz])
    nz = int(math.ceil(length * scale[2] / dz))
    shape = (profile.matrix, profile.matrix, nz)
    # World frame: scanner coordinates with the table centre near x = y = 0 and an arbitrary z.
    origin = np.array([rng.normal(0.0, 8.0), rng.normal(-10.0, 8.0), rng.uniform(-900.0, -300.0)])
    fov = spacing * (np.array(shape) - 1)
    grid_origin = np.array([-fov[0] / 2, -fov[1] / 2, origin[2] + z0 * scale[2]])
    deform = {key: _smooth_fn(rng, amp, wl) for key, (amp, wl) in _DEFORM.items()}
    deform["bound"] = {axis: sum(amp for key, (amp, _) in _DEFORM.items() if key[0] == axis) for axis in "xyz"}
    organs = {}
    for name, (c, r) in _ORGANS.items():
        organs[name] = _Organ(np.array(c) + np.clip(rng.normal(0.0, 4.5, 3), -9, 9),
                              np.array(r) * rng.uniform(0.88, 1.12, 3))
    lo, hi = profile.noise_hu
    return Subject(scale=scale, origin=origin, fat_mm=rng.uniform(8.0, 35.0), muscle_mm=rng.uniform(9.0, 15.0),
                   phase=str(rng.choice(list(PHASES))), noise_hu=rng.uniform(lo, hi), spacing=spacing,
                   shape=shape, grid_origin=grid_origin, z_range=(z0, z0 + length),
                   orientation=_ORIENTATIONS[index % len(_ORIENTATIONS)], deform=deform, organs=organs,
                   hu_jitter=rng.uniform(0.92, 1.08))


class _Grid:
    """World <-> atlas mapping of one subject on its RAS voxel grid (separable 1D terms)."""

    def __init__(self, sub: Subject):
        self.sub = sub
        d = sub.deform
        self.axes = [sub.grid_origin[a] + sub.spacing[a] * np.arange(sub.shape[a]) for a in range(3)]
        x, y, z = self.axes
        sx, sy, sz = sub.scale
        ox, oy, oz = sub.origin
        # q_x = (x - ox)/sx + f_xx(x) + f_xy(y) + f_xz(z); likewise q_y; q_z depends on z only.
        self.qx_terms = ((x - ox) / sx + d["xx"](x), d["xy"](y), d["xz"](z))
        self.qy_terms = (d["yx"](x), (y - oy) / sy + d["yy"](y), d["yz"](z))
        self.qz = (z - oz) / sz + d["zz"](z)

    def box(self, lo, hi):
        """Voxel slices that surely contain every voxel whose atlas point lies in [lo, hi]."""
        sub, b = self.sub, self.sub.deform["bound"]
        out = []
        for a, key in enumerate("xy"):
            w_lo = sub.origin[a] + sub.scale[a] * (lo[a] - b[key])
            w_hi = sub.origin[a] + sub.scale[a] * (hi[a] + b[key])
            i0 = int(math.floor((w_lo - sub.grid_origin[a]) / sub.spacing[a]))
            i1 = int(math.ceil((w_hi - sub.grid_origin[a]) / sub.spacing[a])) + 1
            out.append(slice(max(i0, 0), max(min(i1, sub.shape[a]), 0)))
        k0 = int(np.searchsorted(self.qz, lo[2], side="left"))
        k1 = int(np.searchsorted(self.qz, hi[2], side="right"))
        out.append(slice(max(k0 - 1, 0), min(k1 + 1, sub.shape[2])))
        return tuple(out)

    def q(self, sl):
        """Atlas coordinates over a box: QX, QY `[nx, ny, nz]` float32 and QZ `[1, 1, nz]`."""
        sx, sy, sz = sl
        a, b, c = self.qx_terms
        qx = (a[sx, None, None] + b[None, sy, None] + c[None, None, sz]).astype(np.float32)
        a, b, c = self.qy_terms
        qy = (a[sx, None, None] + b[None, sy, None] + c[None, None, sz]).astype(np.float32)
        qz = self.qz[sz].astype(np.float32)[None, None, :]
        return qx, qy, qz

    def q_at(self, idx):
        """Atlas coordinates `[N]` x3 at voxel index arrays `idx = (i, j, k)`."""
        i, j, k = idx
        a, b, c = self.qx_terms
        qx = a[i] + b[j] + c[k]
        a, b, c = self.qy_terms
        qy = a[i] + b[j] + c[k]
        return qx, qy, self.qz[k]

    def atlas_to_world(self, q) -> np.ndarray:
        """Invert the subject map for atlas points `[P, 3]` -> world mm `[P, 3]` by fixed-point
        iteration: the step contracts by scale x summed slopes of an axis' terms < 0.7, so 40
        iterations leave an error far below a micrometre."""
        sub, d = self.sub, self.sub.deform
        q = np.asarray(q, dtype=np.float64).reshape(-1, 3)
        p = sub.origin + sub.scale * q
        for _ in range(40):
            x, y, z = p[:, 0], p[:, 1], p[:, 2]
            p = np.stack([
                sub.origin[0] + sub.scale[0] * (q[:, 0] - d["xx"](x) - d["xy"](y) - d["xz"](z)),
                sub.origin[1] + sub.scale[1] * (q[:, 1] - d["yx"](x) - d["yy"](y) - d["yz"](z)),
                sub.origin[2] + sub.scale[2] * (q[:, 2] - d["zz"](z)),
            ], axis=1)
        return p


def corresponding_points(source: Subject, target: Subject, points_mm) -> np.ndarray:
    """The true correspondence between two phantom subjects: world mm `[P, 3]` of `source` -> the
    world mm `[P, 3]` of `target` with the same atlas position (subject map and its inverse; each
    organ's own shift, at most 9 mm per axis, is not in it). Points outside a subject's field of view
    map all the same (the map is defined everywhere)."""
    return _Grid(target).atlas_to_world(source.world_to_atlas(points_mm))


def _subject_and_rng(index: int, seed: int, small: bool) -> tuple[Subject, np.random.Generator]:
    """Case `index`'s generator (seeded by (seed, index)) and the Subject it draws first; rendering
    goes on with the same generator."""
    rng = np.random.default_rng([seed, index])
    return _draw_subject(rng, SMALL if small else FULL, index), rng


def draw_subject(index: int, seed: int = 0, small: bool = False) -> Subject:
    """The Subject of case `index` of the dataset with `seed`, without rendering it: its
    `world_to_atlas` is the case's exact anatomical frame (used by
    `alice_ds.sam.oracle.write_atlas_oracle_embedding`)."""
    return _subject_and_rng(index, seed, small)[0]
