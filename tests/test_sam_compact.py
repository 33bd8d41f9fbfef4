"""The compact fine grid of the embedding files (`alice_ds.sam.io.compress_fine`, `pack_codes`): 8- or
4-bit codes of the case's top principal directions. Fields here are smooth 128-d unit-vector fields of world position
that live in a 12-d subspace, as a trained SAM's fine vectors mostly do."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alice_ds.errors import DataError
from alice_ds.sam.geometry import index_to_world, scaled_affine
from alice_ds.sam.io import code_max, compress_fine, open_embedding, pack_codes, unpack_codes, write_embedding
from alice_ds.sam.matcher import Matcher

RANK = 12


def low_rank_field(points_mm, wavelength_mm: float, seed: int = 0) -> torch.Tensor:
    """[P, 3] world mm -> [P, 128] unit vectors: 6 sine/cosine pairs of position mixed into 128-d."""
    g = torch.Generator().manual_seed(seed)
    freq = torch.randn(3, RANK // 2, generator=g, dtype=torch.float64) * (2 * np.pi / wavelength_mm)
    mix = torch.linalg.qr(torch.randn(128, RANK, generator=g, dtype=torch.float64))[0]  # [128, 12]
    x = torch.as_tensor(points_mm, dtype=torch.float64) @ freq  # [P, 6]
    return F.normalize(torch.cat([torch.sin(x), torch.cos(x)], 1) @ mix.T, dim=1).float()


def write_case(embed_dir, case_id, origin_mm, sam_shape, channels, bits=8):
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
                           channels=channels, bits=bits)


def test_compress_keeps_a_low_rank_field_and_is_deterministic():
    pts = np.random.default_rng(0).uniform(-100, 100, size=(4000, 3))
    fine = low_rank_field(pts, 60.0).view(40, 10, 10, 128)
    codes, basis, scale, kept = compress_fine(fine, 16)
    assert 0.999 < kept <= 1.0 + 1e-6
    assert codes.dtype == torch.int8 and codes.shape == (40, 10, 10, 16)
    assert basis.shape == (128, 16) and scale.shape == (16,)
    torch.testing.assert_close(basis.T @ basis, torch.eye(16), atol=1e-5, rtol=0)
    assert codes.abs().amax() == 127  # every channel's largest value maps to the last code
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
    assert voxels * 18 < size_small < voxels * 18 + 60_000  # codes, fp16 norms + basis + coarse grid + header
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


@pytest.mark.parametrize("channels", [1, 5, 16])
def test_four_bit_codes_pack_two_per_byte_and_unpack_exactly(channels):
    codes = torch.randint(-7, 8, (3, 4, 5, channels), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, 4)
    assert packed.dtype == torch.int8 and packed.shape == (3, 4, 5, (channels + 1) // 2)
    out = unpack_codes(packed.numpy(), 4, channels)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, codes.numpy())
    np.testing.assert_array_equal(unpack_codes(packed.numpy()[1:3, :, 2], 4, channels), codes.numpy()[1:3, :, 2])
    assert pack_codes(codes, 8) is codes and code_max(8) == 127 and code_max(4) == 7
    with pytest.raises(ValueError, match=r"bits must be one of \(8, 4\), got 6"):
        pack_codes(codes, 6)


def test_four_bit_compress_spends_every_code_and_keeps_the_directions():
    pts = np.random.default_rng(0).uniform(-100, 100, size=(4000, 3))
    fine = low_rank_field(pts, 60.0).view(40, 10, 10, 128)
    codes8, basis8, scale8, kept8 = compress_fine(fine, 16, bits=8)
    codes, basis, scale, kept = compress_fine(fine, 16, bits=4)
    assert torch.equal(basis, basis8) and kept == kept8  # the same directions; only the rounding differs
    assert codes.dtype == torch.int8 and codes.abs().amax() == 7
    assert (codes[..., :RANK].abs().amax((0, 1, 2)) == 7).all()  # each channel's own scale
    decoded = (codes.float() * scale) @ basis.T  # [40, 10, 10, 128]
    cos = F.cosine_similarity(decoded, fine, dim=-1)
    # 15 levels per channel: a rounding error of up to half a level in each of 12 live channels
    assert cos.median() > 0.97 and cos.min() > 0.9, (cos.median(), cos.min())


def test_four_bit_files_are_half_the_size_and_match_like_eight_bit_ones(tmp_path):
    for bits in (8, 4):
        d = tmp_path / str(bits)
        write_case(d, "A_0000", [-60.0, 10.0, 200.0], [70, 64, 80], 16, bits)
        write_case(d, "B_0000", [-47.0, 15.0, 211.0], [66, 58, 72], 16, bits)
    ef8, ef4 = (open_embedding(tmp_path / b, "A_0000") for b in ("8", "4"))
    assert (ef8.bits, ef4.bits) == (8, 4) and ef4.channels == 16
    assert ef4.fine_map().shape == (*ef4.fine_shape, 8) and ef4.fine_codes().shape == (*ef4.fine_shape, 16)
    voxels = int(np.prod(ef4.fine_shape))
    assert voxels * 10 < ef4.path.stat().st_size < voxels * 10 + 60_000  # codes, fp16 norms + basis + coarse + header
    # a box read through the map is the box of the whole grid, decoded as the window reader does
    box = np.s_[3:9, 4:7, 5:30]
    np.testing.assert_array_equal(ef4.fine_codes(box), ef4.fine_codes()[box])
    torch.testing.assert_close(ef4.fine_window((3, 4, 5), (9, 7, 30)), ef4.decode(ef4.fine_codes(box)))
    # the stored norms are the decoded vectors' (the matcher divides by them: scores are cosines)
    np.testing.assert_allclose(ef4.norm_map()[box], ef4.decode(ef4.fine_codes(box)).norm(dim=-1).numpy(), rtol=1e-3)
    assert 0.8 < float(ef4.norm_map().min()) and float(ef4.norm_map().max()) < 1.2  # rounding and clipping move them
    ijk = np.random.default_rng(2).integers(2, np.asarray(ef4.fine_shape) - 2, size=(20, 3))
    centres = index_to_world(ef4.fine_affine, ijk)  # fine-voxel centres: the point itself is the best match
    got, score = Matcher(tmp_path / "4", search="global", refine=False, context=0).match("A_0000", "A_0000", centres)
    off = np.abs(got - centres).max(1)  # mm; one fine voxel is 4 mm
    # a smooth field's neighbours can round to the same 4-bit codes: a tie, broken by the coarse term
    assert score.min() > 0.99 and np.median(off) < 1e-6 and (off <= 4 + 1e-6).mean() >= 0.8, (off, score)
    rng = np.random.default_rng(1)
    pts = rng.uniform([-30, 40, 240], [50, 100, 320], size=(25, 3))
    for search in ("window", "global"):
        m8, s8 = Matcher(tmp_path / "8", search=search).match("A_0000", "B_0000", pts)
        m4, s4 = Matcher(tmp_path / "4", search=search).match("A_0000", "B_0000", pts)
        err8, err4 = (np.median(np.linalg.norm(m - pts, axis=1)) for m in (m8, m4))
        assert err4 < err8 + 0.5, (err4, err8)
        np.testing.assert_allclose(s4, s8, atol=0.03)


def test_a_file_with_unknown_bits_is_refused_by_name(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = write_case(tmp_path, "A_0000", [0.0, 0.0, 0.0], [32, 32, 32], 8, bits=4)
    with safe_open(str(path), framework="pt") as f:
        meta = {**f.metadata(), "fine_bits": "3"}
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(DataError, match=r"A_0000.safetensors.*fine_bits '3', expected one of \(8, 4\)"):
        open_embedding(tmp_path, "A_0000")
