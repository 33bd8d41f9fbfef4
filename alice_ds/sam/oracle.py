"""Ground-truth ("oracle") SAM embeddings for cases with known landmarks (phantoms).

A point's embedding is a fixed function of its *anatomical* position: world mm are mapped into a
shared canonical frame by the affine that best maps the case's landmarks onto a reference set of
landmarks (least squares), and the canonical position u is encoded as Fourier features
`[cos(2π d_j·u / λ_j), sin(2π d_j·u / λ_j)] / sqrt(J)` over J = 64 fixed (direction, wavelength)
pairs. Every vector has unit norm and the cosine of two vectors is `mean_j cos(2π d_j·Δu / λ_j)`: a
smooth function of the canonical distance with its maximum 1 exactly at Δu = 0. Matching with these
files is therefore as good as the landmark fit; they serve the sampler tests, the sampler benchmark
and ablations. Files follow docs/interfaces.md (written with `alice_ds.sam.io.write_embedding`).

For phantoms the canonical frame can also be the generator's exact atlas frame
(`write_atlas_oracle_embedding`): anatomical correspondence without the affine fit's residual, but
still blind to each case's own organ shifts and sizes, so neither oracle is an upper bound for a learned
embedding that recognises the organs (docs/experiments/2026-11-26-sam-exact-anatomy-ceiling.md).
"""

from __future__ import annotations

import numpy as np
import torch

from alice_ds.sam import network
from alice_ds.sam.geometry import scaled_affine
from alice_ds.sam.io import EMBED_DIM, write_embedding
from alice_ds.sam.network import SAM_SPACING_MM

FINE_STRIDE = (network.FINE_STRIDE,) * 3
COARSE_STRIDE = (network.COARSE_STRIDE,) * 3
"""The learned SAMNet's strides in 2 mm voxels (fine 4 mm, coarse 32 mm), so that matching costs what
it costs with real embeddings (the coarse product scales with the number of coarse voxels)."""
FINE_WAVELENGTHS_MM = (24.0, 160.0)
COARSE_WAVELENGTHS_MM = (80.0, 600.0)
"""Wavelength ranges of the two encodings: the fine one separates points a few mm apart, the coarse
one is unambiguous over a whole body."""
MODEL_ID = "oracle-landmarks-v1"
ATLAS_MODEL_ID = "oracle-atlas-v1"
FEATURE_SEED = 1234
"""Seed of the fixed feature directions (the same for every case, so cases are comparable)."""


def landmark_affine(landmarks: dict, reference: dict) -> np.ndarray:
    """4x4 affine world mm -> canonical frame, least squares over the landmark names both dicts
    share (at least 4, not coplanar)."""
    names = sorted(set(landmarks) & set(reference))
    if len(names) < 4:
        raise ValueError(f"need at least 4 shared landmarks to fit an affine, got {names}")
    src = np.asarray([landmarks[n] for n in names], dtype=np.float64)  # [L, 3]
    dst = np.asarray([reference[n] for n in names], dtype=np.float64)  # [L, 3]
    design = np.concatenate([src, np.ones((len(names), 1))], axis=1)  # [L, 4]
    sol, _, rank, _ = np.linalg.lstsq(design, dst, rcond=None)  # [4, 3]
    if rank < 4:
        raise ValueError(f"landmarks {names} are coplanar; cannot fit an affine")
    out = np.eye(4)
    out[:3, :] = sol.T
    return out


def _directions_and_wavelengths(lo: float, hi: float, offset: int) -> tuple[np.ndarray, np.ndarray]:
    half = EMBED_DIM // 2
    rng = np.random.default_rng(FEATURE_SEED + offset)
    d = rng.normal(size=(half, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    lam = np.geomspace(lo, hi, half)
    return d, lam


def features(canonical_mm: np.ndarray, wavelengths: tuple[float, float], offset: int = 0) -> np.ndarray:
    """Unit Fourier features `[P, 128]` float32 of canonical positions `[P, 3]` (mm)."""
    d, lam = _directions_and_wavelengths(*wavelengths, offset)
    phase = 2 * np.pi * (np.asarray(canonical_mm, dtype=np.float64) @ d.T) / lam  # [P, 64]
    out = np.concatenate([np.cos(phase), np.sin(phase)], axis=1) / np.sqrt(d.shape[0])
    return out.astype(np.float32)


def grid_features(affine: np.ndarray, shape, to_canonical: np.ndarray, wavelengths, offset: int) -> torch.Tensor:
    """`features` of every voxel of a grid -> channel-last `[X, Y, Z, 128]`.

    The phases are affine in the voxel index, so exp(i·phase) factorises into one complex factor per
    axis: the grid costs two complex products per value instead of a cos and a sin (10x faster)."""
    d, lam = _directions_and_wavelengths(*wavelengths, offset)
    vox_to_canon = np.asarray(to_canonical, dtype=np.float64) @ np.asarray(affine, dtype=np.float64)
    coef = 2 * np.pi * (d @ vox_to_canon[:3, :3]) / lam[:, None]  # [J, 3] radians per voxel step
    const = np.exp(1j * 2 * np.pi * (d @ vox_to_canon[:3, 3]) / lam)  # [J]
    ex, ey, ez = (np.exp(1j * np.arange(n)[:, None] * coef[None, :, a]).astype(np.complex64)
                  for a, n in enumerate(shape))  # [n, J] per axis
    eyz = ey[:, None, :] * ez[None, :, :] * const.astype(np.complex64)  # [Y, Z, J]
    out = np.empty((*shape, EMBED_DIM), dtype=np.float32)
    norm = np.float32(1 / np.sqrt(d.shape[0]))
    for x in range(shape[0]):
        slab = ex[x] * eyz  # [Y, Z, J]
        out[x, ..., :d.shape[0]] = slab.real * norm
        out[x, ..., d.shape[0]:] = slab.imag * norm
    return torch.from_numpy(out)


def write_oracle_embedding(path, case_id: str, volume_affine, volume_shape, landmarks: dict,
                           reference: dict) -> None:
    """Write `<path>` for a cached volume (`volume_affine` voxel -> mm, RAS, `volume_shape`) whose
    landmarks (world mm) are known. The 2 mm SAM grid starts at the volume's voxel 0 and covers
    its extent; fine and coarse grids sit on it at `FINE_STRIDE` / `COARSE_STRIDE`."""
    to_canonical = landmark_affine(landmarks, reference)
    _write(path, case_id, volume_affine, volume_shape, MODEL_ID,
           lambda aff, shape, wavelengths, offset: grid_features(aff, shape, to_canonical, wavelengths, offset))


def write_atlas_oracle_embedding(path, case_id: str, volume_affine, volume_shape, subject) -> None:
    """Like `write_oracle_embedding`, for a phantom case whose generator Subject is known
    (`alice_ds.data.phantom.subject_for_landmarks`): the canonical position is the exact atlas mm of
    `subject.world_to_atlas` (scale, translation and smooth deformation of the case; the per-case
    organ shifts and sizes are not in it). Matching with these files is exact anatomical correspondence
    up to those: a ceiling for any method that maps anatomy geometrically, without telling one
    organ's displacement from the body's."""
    _write(path, case_id, volume_affine, volume_shape, ATLAS_MODEL_ID,
           lambda aff, shape, wavelengths, offset: _atlas_grid_features(aff, shape, subject, wavelengths, offset))


def write_atlas_oracle_cases(cache_dir, embed_dir, subjects: dict) -> None:
    """`write_atlas_oracle_embedding` for every case of `subjects` ({case id: Subject}), cached in
    `cache_dir`, into `embed_dir/<case id>.safetensors`."""
    from alice_ds.data.cache import open_case
    from alice_ds.sam.io import embedding_path

    for cid, subject in subjects.items():
        case = open_case(cache_dir, cid)
        write_atlas_oracle_embedding(embedding_path(embed_dir, cid), cid, case.affine, case.shape, subject)


def _atlas_grid_features(affine, shape, subject, wavelengths, offset: int) -> torch.Tensor:
    """`features` of the atlas position of every voxel of a grid -> `[X, Y, Z, 128]`, one x-plane at
    a time (the map is not affine, so `grid_features`' factorisation does not apply)."""
    affine = np.asarray(affine, dtype=np.float64)
    out = torch.empty((*shape, EMBED_DIM))
    yz = np.stack(np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij"), -1).reshape(-1, 2)  # [Y*Z, 2]
    for x in range(shape[0]):
        ijk = np.concatenate([np.full((len(yz), 1), x), yz], axis=1)  # [Y*Z, 3]
        world = ijk @ affine[:3, :3].T + affine[:3, 3]  # [Y*Z, 3] mm
        feat = features(subject.world_to_atlas(world), wavelengths, offset)  # [Y*Z, 128]
        out[x] = torch.from_numpy(feat).view(shape[1], shape[2], EMBED_DIM)  # -> [Y, Z, 128]
    return out


def _write(path, case_id: str, volume_affine, volume_shape, model_id: str, grid_fn) -> None:
    """The oracle grids of a volume, written by `write_embedding`: `grid_fn(affine, shape,
    wavelengths, offset)` -> `[X, Y, Z, 128]` per grid."""
    volume_affine = np.asarray(volume_affine, dtype=np.float64)
    spacing = np.sqrt((volume_affine[:3, :3] ** 2).sum(0))
    extent = (np.asarray(volume_shape) - 1) * spacing  # mm between the first and last voxel centre
    sam_affine = volume_affine.copy()
    sam_affine[:3, :3] = volume_affine[:3, :3] / spacing * SAM_SPACING_MM  # same axes, 2 mm voxels
    sam_shape = np.floor(extent / SAM_SPACING_MM).astype(int) + 1
    grids = {}
    for name, stride, wavelengths, offset in (("fine", FINE_STRIDE, FINE_WAVELENGTHS_MM, 0),
                                              ("coarse", COARSE_STRIDE, COARSE_WAVELENGTHS_MM, 1)):
        shape = tuple(int(n) for n in -(-sam_shape // np.asarray(stride)))  # ceil: the last voxel covers the far edge
        aff = scaled_affine(sam_affine, stride)
        grids[name] = (grid_fn(aff, shape, wavelengths, offset), aff)
    write_embedding(path, grids["fine"][0], grids["coarse"][0], grids["fine"][1], grids["coarse"][1],
                    FINE_STRIDE, COARSE_STRIDE, model_id, case_id)
