"""Phantom dataset: files and frames, determinism, landmark/label consistency, subject variation."""

import json

import nibabel as nib
import numpy as np
import pytest

from alice_ds.cli import main
from alice_ds.data.phantom import LABELS, LANDMARK_LABELS, PHASES, draw_subject, generate_case, subject_for_landmarks
from alice_ds.data.phantom.anatomy import _LEVEL_NAMES
from alice_ds.data.phantom.landmarks import _atlas_landmarks
from alice_ds.data.phantom.subject import _Grid
from alice_ds.errors import DataError

MIN_LANDMARKS = 10


def _label_at(label, affine, point_mm):
    ijk = np.rint(np.linalg.solve(affine, np.append(point_mm, 1.0))[:3]).astype(int)
    assert (ijk >= 0).all() and (ijk < label.shape).all(), ijk
    return int(label[tuple(ijk)])


def test_dataset_files_frames_and_landmarks(phantom_dir):
    ds = json.loads((phantom_dir / "dataset.json").read_text())
    assert [e["image"] for e in ds["training"]] == [f"imagesTr/Case_{i:05d}_0000.nii.gz" for i in range(1, 5)]
    assert ds["labels"]["1"] == "liver"
    for i in range(1, 5):
        img = nib.load(phantom_dir / "imagesTr" / f"Case_{i:05d}_0000.nii.gz")
        lab = nib.load(phantom_dir / "labelsTr" / f"Case_{i:05d}.nii.gz")
        lm = json.loads((phantom_dir / "landmarks" / f"Case_{i:05d}.json").read_text())
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, lab.affine)
        assert "".join(nib.aff2axcodes(img.affine)) == lm["info"]["orientation"] == ("RAS", "LPS", "RAS", "LAS")[i % 4]
        assert img.shape == lab.shape == tuple(lm["info"]["shape"])
        assert lm["case_id"] == f"Case_{i:05d}" and len(lm["landmarks"]) >= MIN_LANDMARKS
        # Every landmark lies inside the field of view and inside the organ it names.
        label = np.asarray(lab.dataobj)
        for name, p in lm["landmarks"].items():
            assert _label_at(label, img.affine, p) == LABELS[LANDMARK_LABELS[name]], (i, name)


def test_generation_is_deterministic_per_seed():
    a = generate_case(3, seed=7, small=True)
    b = generate_case(3, seed=7, small=True)
    c = generate_case(3, seed=8, small=True)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.landmarks == b.landmarks
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_subject_map_inverts_and_regenerates_from_landmark_files(phantom_dir, tmp_path):
    """Subject.world_to_atlas is the map the renderer uses (its separable form on the voxel grid)
    and atlas_to_world's inverse; a landmark file's info.generator regenerates its Subject."""
    sub = draw_subject(2, seed=0, small=True)
    grid = _Grid(sub)
    rng = np.random.default_rng(0)
    idx = tuple(rng.integers(0, n, 50) for n in sub.shape)
    world = np.stack([grid.axes[a][idx[a]] for a in range(3)], axis=1)  # [50, 3] voxel centres
    np.testing.assert_allclose(sub.world_to_atlas(world), np.stack(grid.q_at(idx), axis=1), atol=1e-6)
    atlas = rng.uniform([-100, -80, 100], [100, 80, 500], (50, 3))
    np.testing.assert_allclose(sub.world_to_atlas(grid.atlas_to_world(atlas)), atlas, atol=1e-6)

    file = phantom_dir / "landmarks" / "Case_00002.json"
    doc = json.loads(file.read_text())
    assert doc["info"]["generator"] == {"seed": 0, "index": 2, "small": True}
    again = subject_for_landmarks(file)
    np.testing.assert_allclose(again.world_to_atlas(world), sub.world_to_atlas(world))
    name, xyz = next(iter(doc["landmarks"].items()))
    np.testing.assert_allclose(again.world_to_atlas(np.array([xyz]))[0], _atlas_landmarks(again)[name], atol=0.01)

    def refused(change, message):
        bad = json.loads(file.read_text())
        change(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=r"bad\.json: " + message):
            subject_for_landmarks(tmp_path / "bad.json")

    refused(lambda d: d["info"]["generator"].update(seed=1), r".*differ.* from the redrawn phantom")
    refused(lambda d: d["landmarks"][name].__setitem__(0, xyz[0] + 1.0),
            r"landmarks differ from the redrawn phantom .* by up to 1\.00 mm")
    refused(lambda d: d["landmarks"][name].__setitem__(0, float("nan")), r"every landmark must be .* finite")
    refused(lambda d: d["landmarks"].__setitem__(name, [1.0, 2.0]), r"every landmark must be")
    refused(lambda d: d.__setitem__("landmarks", [name]), r"not a landmark file")
    refused(lambda d: d["info"]["generator"].update(small="false"), r"info\.generator must hold an int seed")
    refused(lambda d: d.__delitem__("info"), r"not a phantom landmark file")




def test_landmarks_and_tissue_values_over_many_subjects():
    """Six more subjects: landmarks inside their organs, organs at plausible HU for the phase,
    vertebrae ordered along z, and a real spread of acquisitions and body ranges."""
    spacings, z_ranges, phases = [], [], set()
    for i in range(1, 7):
        case = generate_case(i, seed=11, small=True)
        assert len(case.landmarks) >= MIN_LANDMARKS, (i, sorted(case.landmarks))
        for name, p in case.landmarks.items():
            assert _label_at(case.label, case.affine, p) == LABELS[LANDMARK_LABELS[name]], (i, name)
        hu = case.image.astype(np.float32)
        phase = PHASES[case.info["phase"]]
        for organ, key in (("liver", "liver"), ("aorta", "aorta"), ("spleen", "spleen")):
            m = case.label == LABELS[organ]
            if m.sum() > 50:
                # organ HU within jitter (+-8%) and noise of the phase table; medians ignore edges
                assert abs(np.median(hu[m]) - phase[key]) < 0.1 * phase[key] + 10, (i, organ)
        lungs = (case.label == LABELS["lung_left"]) | (case.label == LABELS["lung_right"])
        if lungs.sum() > 50:
            assert np.median(hu[lungs]) < -750
        assert np.median(hu[case.label == LABELS["vertebrae"]]) > 200
        vz = [case.landmarks[n][2] for n in sorted(case.landmarks, key=_level_order) if n.startswith("vertebra_")]
        assert np.all(np.diff(vz) > 15), vz   # bottom-up, at least 15 mm apart
        spacings.append(case.info["spacing"])
        z_ranges.append(case.info["atlas_z_range"])
        phases.add(case.info["phase"])
    spacings, z_ranges = np.array(spacings), np.array(z_ranges)
    assert np.ptp(spacings[:, 0]) > 0.1 and np.ptp(spacings[:, 2]) > 0.3
    assert np.ptp(z_ranges[:, 0]) > 40 and len(phases) >= 2
    # Partly overlapping body ranges: every case overlaps at least one other.
    for a in z_ranges:
        overlaps = [min(a[1], b[1]) - max(a[0], b[0]) for b in z_ranges if b is not a]
        assert max(overlaps) > 50


def _level_order(name):
    level = name.removeprefix("vertebra_")
    return _LEVEL_NAMES.index(level) if level in _LEVEL_NAMES else -1


def test_full_size_anatomy_matches_small(tmp_path):
    """The same subject at realistic resolution (here a reduced matrix with the same field of view)
    puts its landmarks at the same world mm as the small variant... only the grid differs."""
    small = generate_case(2, seed=5, small=True)
    fine = generate_case(2, seed=5, small=True, shape=(200, 200, 80))
    assert fine.image.shape == (200, 200, 80)
    for name in set(small.landmarks) & set(fine.landmarks):
        np.testing.assert_allclose(fine.landmarks[name], small.landmarks[name], atol=1e-6)
        assert _label_at(fine.label, fine.affine, fine.landmarks[name]) == LABELS[LANDMARK_LABELS[name]]


def test_phantom_cli_writes_a_small_dataset(tmp_path, capsys, monkeypatch):
    from alice_ds.console import console

    monkeypatch.setattr(console, "width", 160)  # a terminal wide enough for the summary table
    out = tmp_path / "p"
    assert main(["phantom", str(out), "--num", "1", "--seed", "4", "--small"]) == 0
    img = nib.load(out / "imagesTr" / "Case_00001_0000.nii.gz")
    assert img.shape[0] == 128
    np.testing.assert_array_equal(np.asarray(img.dataobj), generate_case(1, seed=4, small=True).image)
    err = capsys.readouterr().err
    assert "Case_00001" in err and "128x128x" in err and "points" in err
    # A reused folder with fewer cases: dataset.json lists only this run's cases.
    assert main(["phantom", str(out), "--num", "2", "--seed", "4", "--small"]) == 0
    assert main(["phantom", str(out), "--num", "1", "--seed", "4", "--small"]) == 0
    ds = json.loads((out / "dataset.json").read_text())
    assert [e["image"] for e in ds["training"]] == ["imagesTr/Case_00001_0000.nii.gz"] and ds["numTraining"] == 1
    capsys.readouterr()
    assert main(["phantom", str(out), "--num", "0"]) == 2
    assert "--num must be at least 1, got 0" in capsys.readouterr().err
