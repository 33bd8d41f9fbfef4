"""The compact fine grid of the embedding files (`alice_ds.sam.io.compress_fine`): int8 codes of the
case's top principal directions. Fields here are smooth 128-d unit-vector fields of world position
that live in a 12-d subspace, as a trained SAM's fine vectors mostly do."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alice_ds.sam.geometry import index_to_world, scaled_affine
from alice_ds.sam.io import CODE_MAX, compress_fine, open_embedding, write_embedding
from alice_ds.sam.matcher import Matcher

RANK = 12


def low_rank_field(points_mm, wavelength_mm: float, seed: int = 0) -> torch.Tensor:
    """[P, 3] world mm -> [P, 128] unit vectors: 6 sine/cosine pairs of position mixed into 128-d."""
    g = torch.Generator().manual_seed(seed)
    freq = torch.randn(3, RANK // 2, generator=g, dtype=torch.float64) * (2 * np.pi / wavelength_mm)
    mix = torch.linalg.qr(torch.randn(128, RANK, generator=g, dtype=torch.float64))[0]  # [128, 12]
    x = torch.as_tensor(points_mm, dtype=torch.float64) @ freq  # [P, 6]
    return F.normalize(torch.cat([torch.sin(x), torch.cos(x)], 1) @ mix.T, dim=1).float()


def write_case(embed_dir, case_id, origin_mm, sam_shape, channels):
    sam_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    sam_affine[:3, 3] = origin_mm
    grids = {}
    for name, stride, wavelength in (("fine", 2, 60.0), ("coarse", 16, 200.0)):
        aff = scaled_affine(sam_affine, [stride] * 3)
        shape = [-(-s // stride) for s in sam_shape]
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
        grids[name] = (low_rank_field(index_to_world(aff, ijk), wavelength).reshape(*shape, 128), aff)
    return write_embedding(embed_dir / f"{case_id}.safetensors", grids["fine"][0], grids["coarse"][0],
                           grids["fine"][1], grids["coarse"][1], [2] * 3, [16] * 3, "synthetic", case_id,
                           channels=channels)


def test_compress_keeps_a_low_rank_field_and_is_deterministic():
    pts = np.random.default_rng(0).uniform(-100, 100, size=(4000, 3))
    fine = low_rank_field(pts, 60.0).view(40, 10, 10, 128)
    codes, basis, scale, kept = compress_fine(fine, 16)
    assert 0.999 < kept <= 1.0 + 1e-6
    assert codes.dtype == torch.int8 and codes.shape == (40, 10, 10, 16)
    assert basis.shape == (128, 16) and scale.shape == (16,)
    torch.testing.assert_close(basis.T @ basis, torch.eye(16), atol=1e-5, rtol=0)
    assert codes.abs().amax() == CODE_MAX  # every channel's largest value maps to the last code
    decoded = (codes.float() * scale) @ basis.T  # [40, 10, 10, 128]
    cos = F.cosine_similarity(decoded, fine, dim=-1)
    assert cos.min() > 0.999 and (decoded.norm(dim=-1) - 1).abs().max() < 0.01
    # channels past the field's rank carry (almost) nothing
    assert (scale[RANK:] < 0.01 * scale[:RANK].min()).all()
    again = compress_fine(fine.clone(), 16)  # same vectors, same file: the eigenvectors' signs are fixed
    for a, b in zip((codes, basis, scale), again[:3]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"channels must be in \[1, 128\], got 0"):
        compress_fine(fine, 0)


def test_compact_files_are_small_and_match_like_full_ones(tmp_path):
    """16 channels: ~1/8 of the bytes of 128 int8 channels, the same matches across shifted grids."""
    for channels in (16, 128):
        d = tmp_path / str(channels)
        write_case(d, "A_0000", [-60.0, 10.0, 200.0], [70, 64, 80], channels)
        write_case(d, "B_0000", [-47.0, 15.0, 211.0], [66, 58, 72], channels)
    small, full = (open_embedding(tmp_path / c, "A_0000") for c in ("16", "128"))
    assert small.channels == 16 and full.channels == 128
    voxels = int(np.prod(small.fine_shape))
    size_small, size_full = small.path.stat().st_size, full.path.stat().st_size
    assert voxels * 16 < size_small < voxels * 16 + 60_000  # codes + basis + coarse grid + header
    assert size_full > 6 * size_small
    rng = np.random.default_rng(1)
    pts = rng.uniform([-30, 40, 240], [50, 100, 320], size=(25, 3))
    for search in ("window", "global"):
        m16, s16 = Matcher(tmp_path / "16", search=search).match("A_0000", "B_0000", pts)
        m128, s128 = Matcher(tmp_path / "128", search=search).match("A_0000", "B_0000", pts)
        apart = np.linalg.norm(m16 - m128, axis=1)
        assert np.median(apart) < 0.3 and (apart < 1.0).mean() >= 0.9, np.sort(apart)
        np.testing.assert_allclose(s16, s128, atol=0.01)
        err16, err128 = (np.median(np.linalg.norm(m - pts, axis=1)) for m in (m16, m128))
        assert abs(err16 - err128) < 0.3, (err16, err128)  # (this field repeats: ~2-4 mm either way)
