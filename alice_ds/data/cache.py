"""Read side of the preprocessed cache (DESIGN §3): memory-mapped int16 HU volumes in RAS+.

Per case `cache_dir/<case_id>.npy` (int16 `[X, Y, Z]`, RAS+, resampled to the cache spacing) and
`cache_dir/<case_id>.json` (affine voxel -> world mm and provenance). The JSON is written last, so a
case whose JSON exists is complete; `list_cases` only lists those.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alice_ds.errors import DataError
from alice_ds.files import read_json

ARRAY_SUFFIX = ".npy"
META_SUFFIX = ".json"
AIR_HU = -1024
"""Padding value outside a volume: air, as CT scanners store it."""
VIEW_HU_WINDOW = (-125.0, 225.0)
"""HU mapped to [0, 1] for Alice's views: the reference code's abdominal window."""
BODY_HU = -500.0
"""Voxels above this HU are inside the body (air and lung below), where crop centres are drawn."""
BODY_STRIDE = 4
"""Body voxels are listed on every BODY_STRIDE-th voxel of the cache grid (a 64x smaller read)."""


def array_path(cache_dir, case_id: str) -> Path:
    return Path(cache_dir) / f"{case_id}{ARRAY_SUFFIX}"


def meta_path(cache_dir, case_id: str) -> Path:
    return Path(cache_dir) / f"{case_id}{META_SUFFIX}"


def list_cases(cache_dir) -> list[str]:
    """Sorted ids of the complete cases in `cache_dir` (JSON and array both present)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise DataError(cache_dir, "cache directory not found (run `alice-ds preprocess` first)")
    return sorted(p.name[: -len(META_SUFFIX)] for p in cache_dir.glob(f"*{META_SUFFIX}")
                  if not p.name.startswith(".") and array_path(cache_dir, p.name[: -len(META_SUFFIX)]).exists())


def read_meta(cache_dir, case_id: str) -> dict:
    path = meta_path(cache_dir, case_id)
    meta = read_json(path, f"case {case_id!r} is not in the cache")
    if not isinstance(meta, dict) or "affine" not in meta:
        raise DataError(path, "cache metadata has no affine")
    return meta


class CachedCase:
    """One cached CT: `.array` is an `np.memmap` (int16 HU, `[X, Y, Z]`, RAS+), opened read-only so a
    crop reads only the pages of its slab from disk."""

    def __init__(self, cache_dir, case_id: str):
        self.case_id = case_id
        self.meta = read_meta(cache_dir, case_id)
        path = array_path(cache_dir, case_id)
        try:
            self.array = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise DataError(path, f"case {case_id!r} has metadata but no array") from None
        except ValueError as e:
            raise DataError(path, f"corrupt cache array ({e})") from None
        if self.array.ndim != 3 or self.array.dtype != np.int16:
            raise DataError(path, f"expected an int16 3D array, got {self.array.dtype} {self.array.shape}")
        if list(self.array.shape) != list(self.meta.get("shape", self.array.shape)):
            raise DataError(path, f"array shape {self.array.shape} does not match metadata {self.meta['shape']}")
        self.affine = np.asarray(self.meta["affine"], dtype=np.float64).reshape(4, 4)
        self._inverse = np.linalg.inv(self.affine)
        self.spacing = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        self.shape = tuple(int(s) for s in self.array.shape)

    def __repr__(self) -> str:
        return f"CachedCase({self.case_id!r}, shape={self.shape}, spacing={tuple(np.round(self.spacing, 3))})"

    def world_to_voxel(self, points_mm) -> np.ndarray:
        """World mm `[P, 3]` -> continuous voxel coordinates `[P, 3]` (float64; voxel centres are
        integers)."""
        p = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        return p @ self._inverse[:3, :3].T + self._inverse[:3, 3]

    def voxel_to_world(self, ijk) -> np.ndarray:
        """Voxel coordinates `[P, 3]` -> world mm `[P, 3]` (float64)."""
        v = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return v @ self.affine[:3, :3].T + self.affine[:3, 3]

    def crop(self, center_mm, size, pad_value: int = AIR_HU) -> np.ndarray:
        """A `size` box (voxels, `[sx, sy, sz]`) around the voxel nearest to `center_mm`.

        The box spans `[c - size // 2, c - size // 2 + size)` on each axis (an even size puts the
        centre voxel just after the middle). Only the part inside the volume is read from the
        memory map; the rest is `pad_value`. Returns a new int16 array.
        """
        size = np.broadcast_to(np.asarray(size, dtype=np.int64), (3,))
        if (size <= 0).any():
            raise ValueError(f"crop size must be positive, got {size.tolist()}")
        center = np.rint(self.world_to_voxel(center_mm)[0]).astype(np.int64)
        start = center - size // 2
        stop = start + size
        out = np.full(tuple(size), pad_value, dtype=np.int16)
        lo = np.maximum(start, 0)
        hi = np.minimum(stop, self.shape)
        if (hi > lo).all():
            src = tuple(slice(a, b) for a, b in zip(lo, hi))
            dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
            out[dst] = self.array[src]
        return out


def open_case(cache_dir, case_id: str) -> CachedCase:
    """Open a cached case by id; `DataError` naming the file when it is missing or corrupt."""
    return CachedCase(cache_dir, case_id)


def body_voxels(array, stride: int = BODY_STRIDE, body_hu: float = BODY_HU) -> np.ndarray:
    """Voxel indices `[N, 3]` (int64) above `body_hu` on every `stride`-th voxel of a cached volume
    `[X, Y, Z]`: where crop centres are drawn. Without any body (an all-air test volume), every
    voxel of that grid."""
    sub = np.asarray(array[::stride, ::stride, ::stride])  # the only full read of the volume
    idx = np.argwhere(sub > body_hu)
    if len(idx) == 0:
        idx = np.argwhere(np.ones_like(sub, dtype=bool))
    return idx * stride


def hu_window(arr, lo: float = VIEW_HU_WINDOW[0], hi: float = VIEW_HU_WINDOW[1]):
    """Map HU linearly so `lo -> 0` and `hi -> 1`, clipped to [0, 1]; float32. Accepts numpy arrays
    and torch tensors (returns the same kind). The default is the reference code's abdominal window."""
    if hi <= lo:
        raise ValueError(f"hu_window needs hi > lo, got lo={lo}, hi={hi}")
    scale = 1.0 / (hi - lo)
    if isinstance(arr, np.ndarray):
        return np.clip((arr.astype(np.float32) - np.float32(lo)) * np.float32(scale), 0.0, 1.0)
    return ((arr.float() - lo) * scale).clamp_(0.0, 1.0)
