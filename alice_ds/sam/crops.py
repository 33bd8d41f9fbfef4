"""Resampling cached CT onto SAM grids, and the random view pairs of self-supervised SAM training.

Every grid here is axis-aligned with the cached RAS grid: a view is the cached volume resampled at
a spacing of 2 mm x scale around a world-mm centre, with its own 4x4 affine, so any voxel of any view
maps to world mm and back (that is how positives are paired across views of different scales).
Only the slab of the memory-mapped cache that a grid covers is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from alice_ds.data.cache import AIR_HU, BODY_HU, BODY_STRIDE, body_voxels
from alice_ds.sam.geometry import index_to_world, normalized_grid, scaled_affine, world_to_index
from alice_ds.sam.network import FINE_STRIDE, SAM_SPACING_MM

SCALE_RANGE = (0.8, 1.2)
"""Independent zoom of each view: spacing 2 mm x scale (DESIGN §5)."""
MAX_NOISE_HU = 40.0
"""Gaussian noise sigma drawn in [0, MAX_NOISE_HU] per view."""
MAX_BLUR_VOXELS = 1.0
"""Gaussian blur sigma drawn in [0, MAX_BLUR_VOXELS] per view (voxels of the view)."""
INTENSITY_SCALE = 0.15
"""With intensity augmentation: HU -> HU x U(1 -/+ this) + U(-/+ INTENSITY_SHIFT_HU) per view, so that
the embedding cannot key on a subject's contrast phase or calibration."""
INTENSITY_SHIFT_HU = 40.0
MAX_SHIFT_FRACTION = 0.35
"""Centre of view 2 = centre of view 1 + up to this fraction of the view edge per axis: overlap stays
at least 30% per axis."""
SEED_REACH = 0.4
"""Reference pairs: each view's centre lies within this fraction of its nominal edge of the shared
seed point, per axis, so the seed is inside both views (to within half a voxel) at any zoom of
SCALE_RANGE (0.8 x 0.5)."""


def view_shape(size) -> tuple[int, int, int]:
    """A view's shape (X, Y, Z) from one edge (a cube) or three."""
    shape = (int(size),) * 3 if np.ndim(size) == 0 else tuple(int(s) for s in size)
    if len(shape) != 3:
        raise ValueError(f"a view size is one edge or three, got {size}")
    return shape


def unit_axes(affine) -> np.ndarray:
    """The 3x3 direction part of an affine with unit-length columns."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return a / np.linalg.norm(a, axis=0, keepdims=True)


def sam_grid(affine, shape, spacing_mm: float = SAM_SPACING_MM) -> tuple[np.ndarray, tuple]:
    """The 2 mm grid of a case: same voxel 0 and axes as the cache, spacing `spacing_mm`, covering
    the cached extent. -> (affine 4x4, shape (X, Y, Z))."""
    a = np.asarray(affine, dtype=np.float64)
    extent = (np.asarray(shape) - 1) * np.linalg.norm(a[:3, :3], axis=0)  # mm from first to last voxel
    out_shape = tuple(int(math.floor(e / spacing_mm + 1e-6)) + 1 for e in extent)
    out = np.eye(4)
    out[:3, :3] = unit_axes(a) * spacing_mm
    out[:3, 3] = a[:3, 3]
    return out, out_shape


def view_affine(case_affine, center_mm, size, spacing_mm: float) -> np.ndarray:
    """Affine of a view of `size` voxels (an edge, or (X, Y, Z)) at `spacing_mm`, centred on
    `center_mm`, with the cache's axes."""
    out = np.eye(4)
    out[:3, :3] = unit_axes(case_affine) * spacing_mm
    half = (np.asarray(view_shape(size), dtype=np.float64) - 1) / 2
    out[:3, 3] = np.asarray(center_mm, dtype=np.float64) - out[:3, :3] @ half
    return out


def resample(array, case_affine, out_affine, out_shape, pad: float = AIR_HU) -> torch.Tensor:
    """Trilinear resample of a cached HU array [X, Y, Z] onto the grid (out_affine, out_shape),
    reading only the slab it covers. -> float32 HU [X', Y', Z'], `pad` outside the volume."""
    out_shape = tuple(int(s) for s in out_shape)
    corners = np.stack(np.meshgrid(*[[0, s - 1] for s in out_shape], indexing="ij"), -1).reshape(-1, 3)
    cidx = world_to_index(case_affine, index_to_world(out_affine, corners))
    src_shape = np.asarray(array.shape)
    lo = np.clip(np.floor(cidx.min(0)).astype(int), 0, src_shape)
    hi = np.clip(np.ceil(cidx.max(0)).astype(int) + 1, 0, src_shape)
    if np.any(hi - lo < 1):
        return torch.full(out_shape, pad)
    slab = torch.from_numpy(np.asarray(array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32))
    o2c = np.linalg.inv(case_affine) @ out_affine  # output voxel -> cache voxel
    if np.allclose(o2c[:3, :3], np.diag(np.diag(o2c[:3, :3])), atol=1e-9):
        # the grids share axes (every SAM grid does): trilinear = three 1-D linear interpolations
        return _resample_separable(slab, np.diag(o2c[:3, :3]), o2c[:3, 3] - lo, out_shape, pad)
    # general case: index of every output voxel in slab coordinates, grid_sample
    axes = [np.arange(s) for s in out_shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3) @ o2c[:3, :3].T + o2c[:3, 3] - lo
    g = normalized_grid(torch.from_numpy(ijk).float(), slab.shape).view(1, *out_shape, 3)
    # sample (value - pad) with zero padding so that outside the slab reads exactly `pad`; a voxel
    # beyond the last one of the volume is outside (grid_sample with align_corners=True)
    inside = F.grid_sample((slab - pad)[None, None], g, mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    return inside[0, 0] + pad


def _resample_separable(slab: torch.Tensor, step, offset, out_shape, pad: float) -> torch.Tensor:
    """Trilinear resample of slab [X, Y, Z] at index `offset[a] + step[a] * j` along each axis a
    (j = 0 .. out_shape[a] - 1), one 1-D linear interpolation per axis: O(output) instead of
    grid_sample's 8 gathers per voxel. Same values as the grid_sample path: outside the slab reads
    `pad`, blending linearly over the last voxel. -> float32 [X', Y', Z']."""
    v = F.pad(slab - pad, (1, 1, 1, 1, 1, 1))  # zero (= pad) border: [X + 2, Y + 2, Z + 2]
    for axis in range(3):
        n_src = v.shape[axis]
        c = torch.from_numpy(offset[axis] + 1 + step[axis] * np.arange(out_shape[axis])).clamp(0, n_src - 1)
        i0 = c.floor().long().clamp(max=n_src - 2)
        w = (c - i0).float().view([-1 if a == axis else 1 for a in range(3)])
        v = torch.lerp(v.index_select(axis, i0), v.index_select(axis, i0 + 1), w)
    return v + pad


def gaussian_blur(vol: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [X, Y, Z] with sigma in voxels (no-op below 0.1 voxel)."""
    if sigma < 0.1:
        return vol
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    v = vol[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(k)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        v = F.conv3d(F.pad(v, pad, mode="replicate"), k.view(shape))
    return v[0, 0]


@dataclass
class View:
    """One augmented crop: HU volume [X, Y, Z] and its voxel -> world affine."""

    hu: torch.Tensor
    affine: np.ndarray

    @property
    def fine_affine(self) -> np.ndarray:
        return scaled_affine(self.affine, [FINE_STRIDE] * 3)


def body_points(body: np.ndarray, affine, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` random world points [n, 3] mm around the body voxels `body` (from body_voxels)."""
    pick = body[rng.integers(0, len(body), n)]
    return index_to_world(affine, pick + rng.uniform(0, BODY_STRIDE, size=(n, 3)))


def augmented_view(array, affine, center_mm, size, rng: np.random.Generator,
                   spacing_mm: float = SAM_SPACING_MM, intensity: bool = False) -> View:
    """A view of `size` voxels (an edge, or (X, Y, Z)) at `spacing_mm` x U(SCALE_RANGE), blurred
    and noised (HU); `intensity`: also a random linear HU transform (INTENSITY_SCALE,
    INTENSITY_SHIFT_HU)."""
    scale = rng.uniform(*SCALE_RANGE)
    aff = view_affine(affine, center_mm, size, spacing_mm * scale)
    hu = resample(array, affine, aff, view_shape(size))
    hu = gaussian_blur(hu, rng.uniform(0, MAX_BLUR_VOXELS))
    noise = torch.from_numpy(rng.standard_normal(hu.shape).astype(np.float32))
    hu = hu + noise * rng.uniform(0, MAX_NOISE_HU)
    if intensity:
        hu = hu * rng.uniform(1 - INTENSITY_SCALE, 1 + INTENSITY_SCALE) + rng.uniform(-INTENSITY_SHIFT_HU,
                                                                                      INTENSITY_SHIFT_HU)
    return View(hu, aff)


def view_pair(array, affine, size, rng: np.random.Generator, body: np.ndarray | None = None,
              spacing_mm: float = SAM_SPACING_MM, intensity: bool = False) -> tuple[View, View]:
    """Two overlapping augmented views of one case around a random body point (`body`: the case's
    body_voxels, computed here when not given). View 2 is shifted from view 1 by up to
    MAX_SHIFT_FRACTION of the edge per axis."""
    c1 = body_points(body if body is not None else body_voxels(array), affine, rng, 1)[0]
    extent = np.asarray(view_shape(size)) * spacing_mm  # [3] mm
    c2 = c1 + unit_axes(affine) @ (rng.uniform(-MAX_SHIFT_FRACTION, MAX_SHIFT_FRACTION, 3) * extent)
    return (augmented_view(array, affine, c1, size, rng, spacing_mm, intensity),
            augmented_view(array, affine, c2, size, rng, spacing_mm, intensity))


def reference_pair(array, affine, size, rng: np.random.Generator, disjoint: bool,
                   body: np.ndarray | None = None, spacing_mm: float = SAM_SPACING_MM,
                   intensity: bool = False) -> tuple[View, View]:
    """The reference SAM's view pair: both views contain one random body point (each centre within
    SEED_REACH of the edge of it, independently, so the overlap ranges from most of a view down to
    a sliver), or with `disjoint` two views around independent body points, which may not overlap
    at all (the loss then treats each query as its own positive)."""
    body = body if body is not None else body_voxels(array)
    extent = np.asarray(view_shape(size)) * spacing_mm  # [3] mm
    if disjoint:
        c1, c2 = body_points(body, affine, rng, 2)
    else:
        seed = body_points(body, affine, rng, 1)[0]
        c1, c2 = (seed + unit_axes(affine) @ (rng.uniform(-SEED_REACH, SEED_REACH, 3) * extent) for _ in range(2))
    return (augmented_view(array, affine, c1, size, rng, spacing_mm, intensity),
            augmented_view(array, affine, c2, size, rng, spacing_mm, intensity))


def positive_pairs(v1: View, v2: View, fine_shape, n: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to `n` positive pairs: fine voxels of view 1 (integer [k, 3]) and the continuous fine
    index of the same world point in view 2 ([k, 3] float), inside both views. Body voxels of view 1
    are preferred; background fills up only when the overlap holds too few."""
    shape = np.asarray(fine_shape)
    ijk1 = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    ijk2 = world_to_index(v2.fine_affine, index_to_world(v1.fine_affine, ijk1))
    inside = np.all((ijk2 >= 0) & (ijk2 <= shape - 1), axis=1)
    hu1 = v1.hu[tuple(torch.from_numpy(ijk1 * FINE_STRIDE).T)].numpy()
    body = inside & (hu1 > BODY_HU)
    chosen = np.flatnonzero(body)
    if len(chosen) < n:
        rest = np.flatnonzero(inside & ~body)
        chosen = np.concatenate([chosen, rng.permutation(rest)[:n - len(chosen)]])
    chosen = rng.permutation(chosen)[:n]
    return ijk1[chosen], ijk2[chosen]
