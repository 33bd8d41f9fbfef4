"""Oracle SAM embeddings (alice_ds.sam.oracle): exact anatomy written in the embedding file format."""

import numpy as np

from alice_ds.data.phantom import draw_subject
from alice_ds.sam.geometry import index_to_world
from alice_ds.sam.io import embedding_path, open_embedding
from alice_ds.sam.oracle import (
    COARSE_WAVELENGTHS_MM,
    FINE_WAVELENGTHS_MM,
    features,
    grid_features,
    write_atlas_oracle_embedding,
)


def _rotated_affine(rng) -> np.ndarray:
    """A random 4x4 affine: per-axis scale, rotation about z, translation."""
    a = np.deg2rad(rng.uniform(-10, 10))
    m = np.eye(4)
    m[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag(
        rng.uniform(0.9, 1.1, size=3))
    m[:3, 3] = rng.uniform(-8, 8, size=3)
    return m


def test_oracle_grid_equals_pointwise_features():
    """The factorised grid encoding equals the definition at arbitrary voxels of a rotated grid."""
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :3] = _rotated_affine(rng)[:3, :3] * 4.0
    affine[:3, 3] = [-150.0, -120.0, -90.0]
    to_canon = _rotated_affine(rng)
    shape = (70, 60, 50)
    grid = grid_features(affine, shape, to_canon, FINE_WAVELENGTHS_MM, 0).numpy()
    ijk = np.stack([rng.integers(n, size=64) for n in shape], 1)
    canon = (ijk @ affine[:3, :3].T + affine[:3, 3]) @ to_canon[:3, :3].T + to_canon[:3, 3]
    np.testing.assert_allclose(grid[tuple(ijk.T)], features(canon, FINE_WAVELENGTHS_MM, 0), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(grid[tuple(ijk.T)], axis=1), 1.0, atol=1e-5)


def test_atlas_oracle_embedding_encodes_the_exact_atlas_position(tmp_path):
    """Every stored vector is the Fourier feature of Subject.world_to_atlas at its voxel centre."""
    sub = draw_subject(5, seed=0, small=True)
    affine = np.diag([-3.0, 3.0, 5.0, 1.0])  # stored L along x: the grid's axes must follow the affine
    affine[:3, 3] = [60.0, -60.0, sub.grid_origin[2]]
    write_atlas_oracle_embedding(embedding_path(tmp_path, "Case_00005"), "Case_00005", affine, (40, 40, 30), sub)
    ef = open_embedding(tmp_path, "Case_00005")
    assert ef.meta["model_id"] == "oracle-atlas-v1"
    rng = np.random.default_rng(0)
    for grid, grid_affine, wavelengths, offset in ((ef.fine(), ef.fine_affine, FINE_WAVELENGTHS_MM, 0),
                                                    (ef.coarse(), ef.coarse_affine, COARSE_WAVELENGTHS_MM, 1)):
        ijk = rng.integers(0, grid.shape[:3], (20, 3))
        want = features(sub.world_to_atlas(index_to_world(grid_affine, ijk)), wavelengths, offset)  # [20, 128]
        got = grid[ijk[:, 0], ijk[:, 1], ijk[:, 2]].float().numpy()
        np.testing.assert_allclose(got, want, atol=2e-3)  # fp16 storage
