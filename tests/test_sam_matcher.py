"""Embedding files and the coarse-to-fine matcher, on embeddings that are known functions of world
position (so the right answer of every match is known), written and read through the real files."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alice_ds.errors import DataError
from alice_ds.sam.geometry import index_to_world, sample_channels_last, scaled_affine, world_to_index
from alice_ds.sam.io import REQUIRED_META, list_embeddings, open_embedding, write_embedding
from alice_ds.sam.matcher import Matcher, coarse_candidates

FINE_MM = 4.0
COARSE_STRIDE = 16


def field(points_mm, seed, wavelength_mm):
    """A smooth, locally unique 128-d unit-vector field of world position."""
    g = torch.Generator().manual_seed(seed)
    freq = torch.randn(3, 64, generator=g, dtype=torch.float64) * (2 * np.pi / wavelength_mm)
    phase = torch.rand(64, generator=g, dtype=torch.float64) * 2 * np.pi
    x = torch.as_tensor(points_mm, dtype=torch.float64) @ freq + phase  # [P, 64]
    return F.normalize(torch.cat([torch.sin(x), torch.cos(x)], 1), dim=1).float()  # [P, 128]


def write_case(embed_dir, case_id, origin_mm, sam_shape):
    sam_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    sam_affine[:3, 3] = origin_mm
    out = {}
    for name, stride, wavelength in (("fine", 2, 80.0), ("coarse", COARSE_STRIDE, 200.0)):
        aff = scaled_affine(sam_affine, [stride] * 3)
        shape = [-(-s // stride) for s in sam_shape]
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
        out[name] = (field(index_to_world(aff, ijk), seed=len(name), wavelength_mm=wavelength)
                     .reshape(*shape, 128), aff)
    return write_embedding(embed_dir / f"{case_id}.safetensors", out["fine"][0], out["coarse"][0],
                           out["fine"][1], out["coarse"][1], [2] * 3, [COARSE_STRIDE] * 3,
                           "synthetic", case_id)


@pytest.fixture()
def embed_dir(tmp_path):
    write_case(tmp_path, "A_0000", origin_mm=[-60.0, 10.0, 200.0], sam_shape=[70, 64, 80])
    # the same field on a grid shifted by a non-integer number of voxels and cut differently
    write_case(tmp_path, "B_0000", origin_mm=[-47.0, 15.0, 211.0], sam_shape=[66, 58, 72])
    return tmp_path


def test_file_format_keys_and_lazy_window(embed_dir):
    ef = open_embedding(embed_dir, "A_0000")
    assert list_embeddings(embed_dir) == ["A_0000", "B_0000"]
    assert set(REQUIRED_META) <= set(ef.meta)
    assert json.loads(ef.meta["fine_stride"]) == [2, 2, 2]
    assert json.loads(ef.meta["coarse_stride"]) == [COARSE_STRIDE] * 3
    assert ef.fine_shape == (35, 32, 40) and ef.coarse_shape == (5, 4, 5)
    np.testing.assert_allclose(np.diag(ef.fine_affine)[:3], [FINE_MM] * 3)
    full = ef.fine()
    np.testing.assert_allclose(full.norm(dim=-1).numpy(), 1.0, atol=1e-2)  # int8 codes
    win = ef.fine_window((3, 4, 5), (9, 7, 40))
    assert win.shape == (6, 3, 35, 128)
    torch.testing.assert_close(win, full[3:9, 4:7, 5:40])
    mapped = ef.fine_map()  # zero-copy view of the file's fine codes (all 128 channels: identity basis)
    assert mapped.dtype == np.int8 and mapped.shape == (35, 32, 40, 128) and not mapped.flags.writeable
    torch.testing.assert_close(ef.decode(mapped[3:9, 4:7, 5:40]), win)
    torch.testing.assert_close(ef.basis, torch.eye(128))
    twin = copy.deepcopy(ef)  # as a spawned worker gets it: header only, the map is made anew
    assert twin._fine_map is None and twin.fine_map() is not mapped
    np.testing.assert_array_equal(twin.fine_map()[3:9, 4:7, 5:40], mapped[3:9, 4:7, 5:40])


def test_self_match_within_one_fine_voxel(embed_dir):
    """The coarse term is the coarse similarity map upsampled trilinearly: at a coarse voxel centre
    a self-match scores 1; between coarse centres the best it can score is the norm of the
    interpolated coarse embedding there, q . sum_k w_k c_k with q = that sum re-normalised."""
    rng = np.random.default_rng(0)
    ef = open_embedding(embed_dir, "A_0000")
    ijk = rng.uniform(2, np.asarray(ef.fine_shape) - 3, size=(40, 3))
    pts = index_to_world(ef.fine_affine, ijk)
    matched, scores = Matcher(embed_dir).match("A_0000", "A_0000", pts)
    assert matched.shape == (40, 3) and scores.dtype == np.float32
    assert np.abs(matched - pts).max() <= FINE_MM
    assert scores.min() > 0.85  # off-grid queries: both fields vary within a voxel
    # the sub-voxel peak: a fraction of the grid's own error (4 mm voxels: ~2 mm at the median)
    on_grid, on_grid_scores = Matcher(embed_dir, refine=False).match("A_0000", "A_0000", pts)
    np.testing.assert_array_equal(on_grid_scores, scores)  # the score is the best voxel's either way
    err, grid_err = np.linalg.norm(matched - pts, axis=1), np.linalg.norm(on_grid - pts, axis=1)
    assert np.median(grid_err) > 1.5 and np.median(err) < 0.6 and np.median(err) < np.median(grid_err) / 3
    centres = index_to_world(ef.fine_affine, np.rint(ijk))
    matched, scores = Matcher(embed_dir, refine=False).match("A_0000", "A_0000", centres)
    np.testing.assert_allclose(matched, centres, atol=1e-6)
    refined, _ = Matcher(embed_dir).match("A_0000", "A_0000", centres)  # a symmetric peak stays put
    np.testing.assert_allclose(refined, centres, atol=0.05)  # (int8 codes tilt it by < 1 % of a voxel)
    cijk = torch.from_numpy(world_to_index(ef.coarse_affine, centres)).float()
    interp_norm = sample_channels_last(ef.coarse(), cijk).norm(dim=1).numpy()  # [P]
    np.testing.assert_allclose(scores, (1.0 + interp_norm) / 2, atol=2e-3)  # fp16 storage
    # on the coarse grid the interpolation is exact: score 1, and the match within one fine voxel
    inner = np.clip(np.rint(cijk.numpy()), 1, np.asarray(ef.coarse_shape) - 2)  # coarse voxel centres
    on_coarse = index_to_world(ef.coarse_affine, inner)
    matched, scores = Matcher(embed_dir).match("A_0000", "A_0000", on_coarse)
    assert np.abs(matched - on_coarse).max() <= FINE_MM
    np.testing.assert_allclose(scores, 1.0, atol=2e-3)


def test_match_across_grids_lands_on_same_world_point(embed_dir):
    """B holds the same world field on a shifted grid: each point must come back to itself in mm."""
    rng = np.random.default_rng(1)
    pts = rng.uniform([-30, 40, 240], [50, 100, 320], size=(25, 3))
    matcher = Matcher(embed_dir, window=12, cache_size=1)
    matched, scores = matcher.match("A_0000", "B_0000", pts)
    assert np.abs(matched - pts).max() <= FINE_MM
    assert scores.min() > 0.85  # off-grid: interpolated cosines (see the self-match test)
    # the cache holds one case; matching again (reloading) gives identical answers
    again, _ = matcher.match("A_0000", "B_0000", pts)
    np.testing.assert_array_equal(again, matched)


def test_missing_and_corrupt_files_name_the_file(embed_dir):
    with pytest.raises(DataError, match="C_0000.safetensors"):
        Matcher(embed_dir).match("A_0000", "C_0000", np.zeros((1, 3)))
    bad = embed_dir / "B_0000.safetensors"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match="B_0000.safetensors"):
        open_embedding(embed_dir, "B_0000")


class _MatchDataset(torch.utils.data.Dataset):
    """Each item matches one point with a Matcher built in the parent process."""

    def __init__(self, matcher, points):
        self.matcher, self.points = matcher, points

    def __len__(self):
        return len(self.points)

    def __getitem__(self, i):
        matched, score = self.matcher.match("A_0000", "B_0000", self.points[i:i + 1])
        return torch.from_numpy(matched[0]), torch.from_numpy(score)


def test_matcher_in_dataloader_workers(embed_dir):
    pts = np.random.default_rng(2).uniform([-30, 40, 240], [50, 100, 320], size=(6, 3))
    matcher = Matcher(embed_dir)
    want, want_scores = matcher.match("A_0000", "B_0000", pts)  # also fills the parent's cache
    loader = torch.utils.data.DataLoader(_MatchDataset(matcher, pts), batch_size=2, num_workers=2)
    got = torch.cat([m for m, _ in loader]).numpy()
    got_scores = torch.cat([s for _, s in loader]).numpy().ravel()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-6)


def test_global_search_is_the_argmax_over_every_fine_voxel(embed_dir):
    """A decoy coarse voxel far away that equals the query's coarse embedding takes the coarse
    argmax, so the window search lands there; the global search scores every fine voxel and
    finds the point, with the score of a brute-force (fine + coarse) / 2 over the whole grid."""
    key = open_embedding(embed_dir, "B_0000")
    p = index_to_world(key.fine_affine, [[16.0, 14.0, 17.0]])  # between coarse voxel centres
    _, qc = Matcher(embed_dir).query_features("A_0000", p)
    coarse = key.coarse().clone()
    decoy = (0, 0, coarse.shape[2] - 1)  # a corner coarse voxel, > 100 mm from p
    coarse[decoy] = qc[0]
    write_embedding(embed_dir / "B_0000.safetensors", key.fine(), coarse, key.fine_affine,
                    key.coarse_affine, key.fine_stride, key.coarse_stride, "decoy", "B_0000")
    key = open_embedding(embed_dir, "B_0000")
    far = np.linalg.norm(index_to_world(key.coarse_affine, [decoy]) - p)
    assert far > 100

    window, window_score = Matcher(embed_dir, window=6, candidates=1).match("A_0000", "B_0000", p)
    assert np.linalg.norm(window - p) > 50  # the window (24 mm) went to the decoy
    # the second coarse candidate's window holds the point, and beats the decoy's window
    found2, score2 = Matcher(embed_dir, window=6, candidates=2).match("A_0000", "B_0000", p)
    assert np.linalg.norm(found2 - p) <= FINE_MM and score2[0] > window_score[0] + 0.1
    coarse_only, coarse_score = Matcher(embed_dir, search="coarse").match("A_0000", "B_0000", p)
    np.testing.assert_allclose(coarse_only, index_to_world(key.coarse_affine, [decoy]), atol=1e-6)
    assert float(coarse_score[0]) == pytest.approx(1.0, abs=1e-3)  # the decoy is qc itself (fp16)
    found, score = Matcher(embed_dir, window=6, search="global", refine=False, context=0).match("A_0000", "B_0000", p)
    assert np.linalg.norm(found - p) <= FINE_MM

    # brute force over the whole fine grid, from the file's tensors
    qf, qc = Matcher(embed_dir).query_features("A_0000", p)
    fine = key.fine().reshape(-1, 128)  # [N, 128]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in key.fine_shape], indexing="ij"), -1).reshape(-1, 3)
    cijk = torch.from_numpy(world_to_index(key.coarse_affine, index_to_world(key.fine_affine, ijk))).float()
    kc = F.normalize(sample_channels_last(key.coarse(), cijk), dim=1)  # [N, 128]
    combined = ((qf @ fine.T + qc @ kc.T) / 2)[0]
    best = int(combined.argmax())
    np.testing.assert_allclose(found[0], index_to_world(key.fine_affine, ijk[best:best + 1])[0], atol=1e-6)
    assert float(score[0]) == pytest.approx(float(combined[best]), abs=1e-4)


def test_global_template_outvotes_a_decoy_voxel(embed_dir):
    """A key voxel far away carries exactly the query's fine and coarse embeddings: one vector
    against one vector takes the decoy; the template (the query's neighbours 4 fine voxels away
    compared with the key's at the same offsets) finds the point, and its score is the mean of the
    seven cosines plus the coarse cosine, halved, computed here by hand."""
    key = open_embedding(embed_dir, "B_0000")
    true_ijk = np.array([[16, 14, 17]])
    p = index_to_world(key.fine_affine, true_ijk)
    qf, qc = Matcher(embed_dir).query_features("A_0000", p)
    fine, coarse = key.fine().clone(), key.coarse().clone()
    decoy = np.array([24, 8, 8])  # on a coarse voxel centre (8 fine voxels each), 53 mm away
    fine[tuple(decoy)] = qf[0]
    cdecoy = np.rint(world_to_index(key.coarse_affine, index_to_world(key.fine_affine, decoy[None]))[0]).astype(int)
    coarse[tuple(cdecoy)] = qc[0]
    write_embedding(embed_dir / "B_0000.safetensors", fine, coarse, key.fine_affine, key.coarse_affine,
                    key.fine_stride, key.coarse_stride, "decoy", "B_0000")
    key = open_embedding(embed_dir, "B_0000")
    single, _ = Matcher(embed_dir, search="global", refine=False, context=0).match("A_0000", "B_0000", p)
    np.testing.assert_allclose(single[0], index_to_world(key.fine_affine, decoy[None])[0], atol=1e-6)
    found, score = Matcher(embed_dir, search="global", refine=False, context=4).match("A_0000", "B_0000", p)
    np.testing.assert_allclose(found, p, atol=1e-6)
    steps = np.concatenate([np.zeros((1, 3)), 4 * np.eye(3), -4 * np.eye(3)])
    qt, _ = Matcher(embed_dir).query_features("A_0000", p + steps @ key.fine_affine[:3, :3].T)  # [7, C]
    kf = key.fine()[tuple((true_ijk + steps).astype(int).T)]  # [7, C]
    cijk = torch.from_numpy(world_to_index(key.coarse_affine, p)).float()
    kc = F.normalize(sample_channels_last(key.coarse(), cijk), dim=1)
    want = ((qt * kf).sum(1).mean() + (qc * kc).sum()) / 2
    assert float(score[0]) == pytest.approx(float(want), abs=1e-4)
    with pytest.raises(ValueError, match="context must be >= 0"):
        Matcher(embed_dir, context=-1)


def test_global_self_match_and_bad_search(embed_dir):
    ef = open_embedding(embed_dir, "A_0000")
    centres = index_to_world(ef.fine_affine, np.random.default_rng(3).integers(2, 30, size=(70, 3)))
    matched, scores = Matcher(embed_dir, search="global").match("A_0000", "A_0000", centres)  # 2 chunks
    np.testing.assert_allclose(matched, centres, atol=0.05)  # int8 codes: < 1 % of a voxel
    assert scores.min() > 0.99
    with pytest.raises(ValueError, match="search must be one of"):
        Matcher(embed_dir, search="everywhere")


def test_global_search_on_every_second_voxel(embed_dir):
    """grid_step 2 scores only the even fine voxels: matches across grids land within one 8 mm step
    of the full search's (the sub-voxel step then runs on the full grid), and every even voxel of A
    finds itself."""
    ef = open_embedding(embed_dir, "A_0000")
    rng = np.random.default_rng(5)
    pts = index_to_world(ef.fine_affine, rng.integers(4, 28, size=(20, 3)) + rng.random((20, 3)))
    full, _ = Matcher(embed_dir, search="global").match("A_0000", "B_0000", pts)
    coarse, _ = Matcher(embed_dir, search="global", grid_step=2).match("A_0000", "B_0000", pts)
    assert np.abs(coarse - full).max() <= 2 * FINE_MM * np.sqrt(3) + 1e-6
    assert np.median(np.linalg.norm(coarse - pts, axis=1)) <= FINE_MM  # the field is the same in B
    even = index_to_world(ef.fine_affine, 2 * rng.integers(2, 14, size=(20, 3)))
    matched, _ = Matcher(embed_dir, search="global", grid_step=2).match("A_0000", "A_0000", even)
    np.testing.assert_allclose(matched, even, atol=0.05)
    with pytest.raises(ValueError, match="divide context"):
        Matcher(embed_dir, search="global", grid_step=3)  # context 8


def test_window_search_around_given_centres(embed_dir):
    """centres_mm replaces the coarse candidates: a window on the right place finds the point, a window
    far from it cannot."""
    ef = open_embedding(embed_dir, "A_0000")
    pts = index_to_world(ef.fine_affine, np.random.default_rng(6).integers(8, 24, size=(10, 3)))
    m = Matcher(embed_dir, window=8, search="window")
    near, _ = m.match("A_0000", "B_0000", pts, centres_mm=pts + 6.0)
    assert np.linalg.norm(near - pts, axis=1).max() <= 2.0
    far, _ = m.match("A_0000", "B_0000", pts, centres_mm=pts + [0.0, 0.0, 60.0])
    assert np.linalg.norm(far - pts, axis=1).min() >= 60.0 - 16.0 * np.sqrt(3) - 1e-6
    with pytest.raises(ValueError, match="centres_mm needs search='window'"):
        Matcher(embed_dir, search="global").match("A_0000", "B_0000", pts, centres_mm=pts)


def test_coarse_candidates_order_and_suppression():
    """Descending similarity; a voxel within one coarse voxel (Chebyshev) of a taken one is skipped;
    a point whose pool runs out of free voxels repeats its last candidate."""
    shape = (6, 5, 4)
    sim = np.full((2, 120), -1.0, dtype=np.float32)
    def flat(*ijk):
        return np.ravel_multi_index(ijk, shape)
    sim[0, flat(2, 2, 2)] = 0.9
    sim[0, flat(3, 3, 3)] = 0.8  # a neighbour of the best: suppressed
    sim[0, flat(5, 0, 0)] = 0.7
    sim[0, flat(0, 4, 3)] = 0.6
    sim[1] = np.linspace(0, 1, 120)  # best at the last voxel (5, 4, 3)
    got = coarse_candidates(sim, shape, 3)
    assert got.shape == (2, 3, 3)
    assert got[0].tolist() == [[2, 2, 2], [5, 0, 0], [0, 4, 3]]
    assert got[1, 0].tolist() == [5, 4, 3]
    assert all(np.abs(got[1, i] - got[1, j]).max() > 1 for i in range(3) for j in range(i))
    tiny = coarse_candidates(np.array([[0.1, 0.9]], dtype=np.float32), (1, 1, 2), 3)  # one free peak
    assert tiny.tolist() == [[[0, 0, 1]] * 3]
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        Matcher(".", candidates=0)
