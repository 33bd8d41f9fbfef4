"""Checked NIfTI loading: every way a CT file can be unusable becomes a `DataError` naming the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from monai.data import NibabelReader
from monai.transforms import LoadImage

from alice_ds.errors import DataError

_HASH_CHUNK = 1 << 20


def file_fingerprint(path) -> dict:
    """Size, modification time and BLAKE2b digest of a source file. The stat fields make the
    up-to-date check cheap; the digest decides when only the time changed (a copy, a `touch`)."""
    path = Path(path)
    st = path.stat()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "blake2b": h.hexdigest()}


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0]}" if text else e.__class__.__name__


def load_ct(path):
    """Load a 3D CT with MONAI's `LoadImage` (nibabel reader) as a float32 `MetaTensor` `[X, Y, Z]`
    carrying its affine (voxel -> RAS world mm). Raises `DataError` for a missing, truncated or
    corrupt file, an image that is not 3D (a trailing singleton 4th axis is accepted), a single
    slice, non-finite voxels or a singular affine."""

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a regular file")
    loader = LoadImage(reader=NibabelReader(squeeze_non_spatial_dims=True), image_only=True, dtype=np.float32)
    try:
        img = loader(str(path))
    except Exception as e:  # nibabel/zlib/gzip raise many types for broken files; all mean the same here
        raise DataError(path, f"cannot read NIfTI, file is truncated or corrupt ({_short(e)})") from None
    shape = tuple(img.shape)
    if img.ndim != 3:
        raise DataError(path, f"expected a 3D image, got a {img.ndim}D image of shape {shape}")
    if min(shape) < 2:
        raise DataError(path, f"expected a 3D volume, got a single slice of shape {shape}")
    finite = np.isfinite(img.numpy())
    if not finite.all():
        raise DataError(path, f"{int((~finite).sum())} voxels are NaN or infinite")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(path, f"affine is singular or not finite: {affine[:3].tolist()}")
    return img
