"""The cache read API on the shared phantom cache: frames, crops, landmarks, intensity window."""

import json

import numpy as np
import pytest
import torch

from alice_ds.data import case_key
from alice_ds.data.cache import hu_window, list_cases, open_case
from alice_ds.data.phantom import LANDMARK_LABELS
from alice_ds.errors import DataError


def _landmarks(phantom_dir, case_id):
    return json.loads((phantom_dir / "landmarks" / f"{case_key(case_id)}.json").read_text())["landmarks"]


def test_case_key():
    assert case_key("Case_00001_0000") == "Case_00001"
    assert case_key("Case_00001") == "Case_00001"
    assert case_key("liver_12_0001") == "liver_12"


def test_cache_lists_every_case_in_ras_at_the_cache_spacing(phantom_cache):
    ids = list_cases(phantom_cache)
    assert ids == [f"Case_{i:05d}_0000" for i in range(1, 5)]
    orientations = set()
    for cid in ids:
        case = open_case(phantom_cache, cid)
        assert isinstance(case.array, np.memmap) and case.array.dtype == np.int16
        np.testing.assert_allclose(case.spacing, [3.0, 3.0, 3.0], atol=1e-6)
        np.testing.assert_allclose(np.diag(case.affine)[:3], [3.0, 3.0, 3.0], atol=1e-6)  # RAS+, no flips
        assert case.shape == tuple(case.meta["shape"])
        orientations.add(case.meta["original_orientation"])
    assert {"RAS", "LPS", "LAS"} <= orientations


def test_world_voxel_round_trip(phantom_cache):
    case = open_case(phantom_cache, "Case_00001_0000")
    ijk = np.array([[0, 0, 0], [10.5, 3.25, 7.0], [case.shape[0] - 1, case.shape[1] - 1, case.shape[2] - 1]])
    world = case.voxel_to_world(ijk)
    np.testing.assert_allclose(world[0], case.affine[:3, 3])
    np.testing.assert_allclose(world[1] - world[0], np.array([10.5, 3.25, 7.0]) * 3.0, atol=1e-9)
    np.testing.assert_allclose(case.world_to_voxel(world), ijk, atol=1e-9)


def test_landmarks_land_on_their_tissue_in_the_cache(phantom_dir, phantom_cache):
    """World-mm landmarks read through every storage orientation hit bone for vertebrae and soft
    tissue for the liver: a mirrored axis would put them in fat, gas or another organ."""
    checked = 0
    for cid in list_cases(phantom_cache):
        case = open_case(phantom_cache, cid)
        for name, p in _landmarks(phantom_dir, cid).items():
            hu = int(case.crop(p, (1, 1, 1))[0, 0, 0])
            organ = LANDMARK_LABELS[name]
            if organ == "vertebrae":
                assert hu > 150, (cid, name, hu)
            elif organ in ("liver", "spleen"):
                assert 20 < hu < 180, (cid, name, hu)
            checked += organ in ("vertebrae", "liver", "spleen")
    assert checked >= 20


def test_crop_inside_equals_the_array_slab(phantom_cache):
    case = open_case(phantom_cache, "Case_00002_0000")
    center_vox = np.array([40, 50, 30])
    out = case.crop(case.voxel_to_world(center_vox)[0], (16, 9, 8))
    assert out.shape == (16, 9, 8) and out.dtype == np.int16
    np.testing.assert_array_equal(out, case.array[32:48, 46:55, 26:34])
    # An off-grid centre rounds to the nearest voxel.
    off = case.voxel_to_world(center_vox + np.array([0.4, -0.4, 0.3]))[0]
    np.testing.assert_array_equal(case.crop(off, (16, 9, 8)), out)


def test_crop_near_the_border_pads_and_matches(phantom_cache):
    case = open_case(phantom_cache, "Case_00003_0000")
    x, y, z = case.shape
    out = case.crop(case.voxel_to_world([[1, y - 2, 0]])[0], 8, pad_value=-2000)
    # box spans [-3, 5) x [y-6, y+2) x [-4, 4)
    assert out.shape == (8, 8, 8)
    np.testing.assert_array_equal(out[3:, :6, 4:], case.array[0:5, y - 6:y, 0:4])
    assert (out[:3] == -2000).all() and (out[:, 6:] == -2000).all() and (out[:, :, :4] == -2000).all()
    far = case.crop(case.voxel_to_world([[x + 50, 0, 0]])[0], (4, 4, 4))
    assert (far == -1024).all()
    with pytest.raises(ValueError, match="size"):
        case.crop([0, 0, 0], (0, 4, 4))


def test_hu_window_numpy_and_torch():
    hu = np.array([-1024, -125, 50, 225, 3000], dtype=np.int16)
    expected = np.array([0.0, 0.0, 0.5, 1.0, 1.0], dtype=np.float32)
    out = hu_window(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-7)
    np.testing.assert_allclose(hu_window(torch.from_numpy(hu)).numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(hu_window(hu, lo=-1000, hi=1000)[2], 0.525, atol=1e-6)
    with pytest.raises(ValueError, match="hi > lo"):
        hu_window(hu, lo=10, hi=10)


def test_missing_case_names_the_file(phantom_cache, tmp_path):
    with pytest.raises(DataError, match="Case_09999_0000.json"):
        open_case(phantom_cache, "Case_09999_0000")
    with pytest.raises(DataError, match="cache directory not found"):
        list_cases(tmp_path / "nowhere")
