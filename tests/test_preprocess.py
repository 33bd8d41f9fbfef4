"""Preprocessing into the cache: frames, spacing, HU, idempotence, bad inputs, interruption, workers."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from alice_ds.cli import main
from alice_ds.data.cache import list_cases, open_case
from alice_ds.data.datalist import write_datalist
from alice_ds.data.preprocess import preprocess_dataset
from alice_ds.errors import DataError, UserError

BOX_HU, AIR = 400, -1000


def _save(path, array, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _lps_copy(array, affine):
    """The same volume stored with the first two axes reversed (RAS -> LPS) and the matching affine."""
    out = affine.copy()
    for axis in (0, 1):
        out[:3, 3] += out[:3, axis] * (array.shape[axis] - 1)
        out[:3, axis] *= -1
    return np.ascontiguousarray(array[::-1, ::-1]), out


def _pattern(shape=(30, 24, 16), spacing=(2.0, 2.5, 4.0), origin=(-20.0, -30.0, -50.0)):
    """Air with a 400 HU box at world x in [0, 20], y in [-10, 10], z in [-30, -6] mm (RAS),
    deliberately off-centre so that any flipped axis moves it. Returns (array, affine, voxel centres
    inside the box in world mm)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk * spacing + origin
    inside = (world[:, 0] >= 0) & (world[:, 0] <= 20) & (world[:, 1] >= -10) & (world[:, 1] <= 10) \
        & (world[:, 2] >= -30) & (world[:, 2] <= -6)
    arr = np.full(shape, AIR, np.int16)
    arr.reshape(-1)[inside] = BOX_HU
    return arr, affine, world[inside]


def test_ras_and_lps_storage_give_identical_caches(phantom_dir, tmp_path):
    src = nib.load(phantom_dir / "imagesTr" / "Case_00002_0000.nii.gz")
    assert "".join(nib.aff2axcodes(src.affine)) == "RAS"
    arr = np.asarray(src.dataobj)
    _save(tmp_path / "d" / "ras.nii.gz", arr, src.affine)
    _save(tmp_path / "d" / "lps.nii.gz", *_lps_copy(arr, src.affine))
    # the same volume once more with the axes permuted (stored z, x, y)
    perm = src.affine[:, [2, 0, 1, 3]]
    _save(tmp_path / "d" / "zxy.nii.gz", np.ascontiguousarray(arr.transpose(2, 0, 1)), perm)
    dl = write_datalist({"training": [{"image": f"{n}.nii.gz"} for n in ("ras", "lps", "zxy")]}, tmp_path / "l.json")
    preprocess_dataset(tmp_path / "d", dl, tmp_path / "c", spacing=(3.0, 3.0, 3.0), show=False)
    ras, lps, zxy = (open_case(tmp_path / "c", n) for n in ("ras", "lps", "zxy"))
    assert lps.meta["original_orientation"] == "LPS" and ras.meta["original_orientation"] == "RAS"
    np.testing.assert_array_equal(lps.array, ras.array)
    np.testing.assert_array_equal(zxy.array, ras.array)
    np.testing.assert_allclose(lps.affine, ras.affine, atol=1e-4)
    np.testing.assert_allclose(zxy.affine, ras.affine, atol=1e-4)


def test_known_pattern_lands_at_its_world_position(tmp_path):
    """An off-centre box stored LPS at anisotropic spacing comes out RAS at 1 x 1 x 2 mm with the
    box at the same world mm and the same HU."""
    arr, affine, box_world = _pattern()
    _save(tmp_path / "d" / "box.nii.gz", *_lps_copy(arr, affine))
    dl = write_datalist({"training": [{"image": "box.nii.gz"}]}, tmp_path / "l.json")
    preprocess_dataset(tmp_path / "d", dl, tmp_path / "c", spacing=(1.0, 1.0, 2.0), show=False)
    case = open_case(tmp_path / "c", "box")
    np.testing.assert_allclose(case.spacing, [1.0, 1.0, 2.0], atol=1e-6)
    assert (np.diag(case.affine)[:3] > 0).all()
    assert case.meta["original_orientation"] == "LPS" and case.meta["original_shape"] == [30, 24, 16]
    np.testing.assert_allclose(case.meta["original_spacing"], [2.0, 2.5, 4.0], atol=1e-6)
    # The box (thresholded at the mid value) has the centroid and extent of the original voxels.
    bright = np.argwhere(np.asarray(case.array) > (BOX_HU + AIR) / 2)
    world = case.voxel_to_world(bright)
    np.testing.assert_allclose(world.mean(0), box_world.mean(0), atol=0.6)
    # edges move by less than one source voxel (2, 2.5, 4 mm), as the threshold sits half-way
    for axis, tol in enumerate((1.0, 1.25, 2.0)):
        assert abs(world[:, axis].min() - box_world[:, axis].min()) <= tol + 1e-6
        assert abs(world[:, axis].max() - box_world[:, axis].max()) <= tol + 1e-6
    # HU are kept: box interior and far background exact, the world origin voxel inside the box.
    assert case.crop([10.0, 0.0, -18.0], (3, 3, 3)).tolist() == np.full((3, 3, 3), BOX_HU).tolist()
    assert case.crop([-15.0, -25.0, 5.0], (1, 1, 1))[0, 0, 0] == AIR


def test_rerun_skips_unchanged_and_redoes_changed(tmp_path):
    arr, affine, _ = _pattern()
    a = _save(tmp_path / "d" / "a.nii.gz", arr, affine)
    _save(tmp_path / "d" / "b.nii.gz", arr, affine)
    dl = write_datalist({"training": [{"image": "a.nii.gz"}], "validation": [{"image": "b.nii.gz"}]},
                        tmp_path / "l.json")
    cache = tmp_path / "c"
    def run(spacing=(2.0, 2.0, 2.0)):
        return preprocess_dataset(tmp_path / "d", dl, cache, spacing=spacing, show=False)
    assert sorted(run().done) == ["a", "b"]
    s = run()
    assert s.done == [] and sorted(s.skipped) == ["a", "b"]
    os.utime(a, ns=(time.time_ns(), time.time_ns() + 10**9))      # touched, same bytes: still up to date
    assert run().done == []
    changed = arr.copy()
    changed[0, 0, 0] = 123
    _save(a, changed, affine)                                      # new content: redone
    s = run()
    assert s.done == ["a"] and s.skipped == ["b"]
    assert open_case(cache, "a").array[0, 0, 0] == 123
    s = run(spacing=(3.0, 3.0, 3.0))                               # new settings: everything redone
    assert sorted(s.done) == ["a", "b"]
    np.testing.assert_allclose(open_case(cache, "b").spacing, [3.0, 3.0, 3.0])


@pytest.fixture
def bad_dataset(tmp_path):
    arr, affine, _ = _pattern()
    d = tmp_path / "d"
    good = _save(d / "good.nii.gz", arr, affine)
    raw = good.read_bytes()
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (d / "corrupt.nii.gz").write_bytes(np.random.default_rng(0).bytes(2000))
    _save(d / "flat.nii.gz", arr[:, :, 0], affine)
    _save(d / "slice.nii.gz", arr[:, :, :1], affine)
    _save(d / "fourd.nii.gz", np.stack([arr, arr, arr], -1), affine)
    nan = arr.astype(np.float32)
    nan[3, 4, 5] = np.nan
    _save(d / "nan.nii.gz", nan, affine)
    names = ["good", "truncated", "corrupt", "flat", "slice", "fourd", "nan", "missing"]
    dl = write_datalist({"training": [{"image": f"{n}.nii.gz"} for n in names]}, tmp_path / "l.json")
    return d, dl


BAD_PROBLEMS = {
    "truncated": "cannot read NIfTI, file is truncated or corrupt",
    "corrupt": "cannot read NIfTI, file is truncated or corrupt",
    "flat": "expected a 3D image, got a 2D image of shape (30, 24)",
    "slice": "expected a 3D volume, got a single slice of shape (30, 24, 1)",
    "fourd": "expected a 3D image, got a 4D image of shape (30, 24, 16, 3)",
    "nan": "1 voxels are NaN or infinite",
    "missing": "file not found",
}


def test_bad_inputs_are_listed_and_fail_the_run(bad_dataset, tmp_path, capsys, monkeypatch):
    from alice_ds.console import console

    monkeypatch.setattr(console, "width", 250)  # the summary table on a wide terminal
    d, dl = bad_dataset
    cache = tmp_path / "c"
    rc = main(["preprocess", "--data_dir", str(d), "--json_list", str(dl), "--cache_dir", str(cache),
               "--spacing", "2", "2", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert list_cases(cache) == ["good"]                           # the good case is finished
    for name, problem in BAD_PROBLEMS.items():
        assert name in err and problem in err, (name, err)
    last = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(last) == 1 and "truncated.nii.gz: cannot read NIfTI" in last[0] and "6 more bad cases" in last[0]
    assert "Traceback" not in err
    rc = main(["preprocess", "--data_dir", str(d), "--json_list", str(dl), "--cache_dir", str(cache),
               "--spacing", "2", "2", "2", "--skip_bad"])
    err = capsys.readouterr().err
    assert rc == 0 and "1 up to date, 7 bad" in err
    for name, problem in BAD_PROBLEMS.items():
        assert any(line.startswith("warning: skipped") and f"{name}.nii.gz: {problem}" in line
                   for line in err.splitlines()), name


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON (line 1, column 2"),
    ('{"training": []}', "datalist is empty"),
    ('{"training": [{"image": "../../etc/passwd"}]}', "escapes data_dir"),
])
def test_bad_datalists_stop_with_one_line(tmp_path, capsys, content, problem):
    (tmp_path / "d").mkdir()
    (tmp_path / "l.json").write_text(content)
    rc = main(["preprocess", "--data_dir", str(tmp_path / "d"), "--json_list", str(tmp_path / "l.json"),
               "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {tmp_path / 'l.json'}: ") and problem in err


def test_bad_spacing_and_duplicate_ids(tmp_path, phantom_dir, phantom_datalist):
    with pytest.raises(UserError, match=r"spacing must be three positive numbers \(mm\), got \[1.0, 0.0, 1.0\]"):
        preprocess_dataset(phantom_dir, phantom_datalist, tmp_path / "c", spacing=(1.0, 0.0, 1.0))
    arr, affine, _ = _pattern()
    _save(tmp_path / "d" / "x" / "ct.nii.gz", arr, affine)
    _save(tmp_path / "d" / "y" / "ct.nii.gz", arr, affine)
    dl = write_datalist({"training": [{"image": "x/ct.nii.gz"}, {"image": "y/ct.nii.gz"}]}, tmp_path / "l.json")
    with pytest.raises(DataError, match="case id 'ct' used by two files"):
        preprocess_dataset(tmp_path / "d", dl, tmp_path / "c")


KILL_AT_RENAME = """\
import os, signal, sys
from alice_ds.cli import main
renames, real = [0], os.replace
def replace(src, dst):  # the third rename is the second case's array: die with its temporary written
    renames[0] += 1
    if renames[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_leaves_no_partial_case_and_rerun_completes(phantom_dir, phantom_datalist, tmp_path):
    """SIGKILL the CLI at a known point, with one case written and the next one's array written under
    its temporary name: only the complete case is listed and reads back whole, and the next run finishes
    the rest and removes the dead run's temporary."""
    cache = tmp_path / "c"
    cmd = [sys.executable, "-c", KILL_AT_RENAME, "preprocess", "--data_dir", str(phantom_dir),
           "--json_list", str(phantom_datalist), "--cache_dir", str(cache), "--spacing", "2", "2", "2"]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300,
                          env={**os.environ, "ALICE_DS_PROGRESS": "0"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    (done,) = list_cases(cache)  # one case complete
    (temp,) = [p.name for p in cache.iterdir() if p.name.startswith(".")]
    assert temp.startswith(".Case_") and ".npy.tmp-" in temp and done not in temp  # the next case, mid-write
    case = open_case(cache, done)
    assert np.asarray(case.array).shape == case.shape
    s = preprocess_dataset(phantom_dir, phantom_datalist, cache, spacing=(2.0, 2.0, 2.0), show=False)
    assert s.skipped == [done] and len(s.done) == 3
    assert list_cases(cache) == [f"Case_{i:05d}_0000" for i in range(1, 5)]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_two_workers_match_one(phantom_dir, phantom_datalist, phantom_cache, tmp_path):
    s = preprocess_dataset(phantom_dir, phantom_datalist, tmp_path / "c", spacing=(3.0, 3.0, 3.0), workers=2,
                           show=False)
    assert sorted(s.done) == list_cases(phantom_cache)
    for cid in s.done:
        a, b = open_case(tmp_path / "c", cid), open_case(phantom_cache, cid)
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_allclose(a.affine, b.affine)
        assert json.loads((tmp_path / "c" / f"{cid}.json").read_text())["settings"] == b.meta["settings"]
