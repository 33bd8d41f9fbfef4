"""Datalists: FLARE and plain-folder scans, deterministic split, MONAI round trip, validation errors."""

import json

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from alice_ds.cli import main
from alice_ds.data.datalist import build_datalist, load_datalist, write_datalist
from alice_ds.errors import DataError


def _nifti(path, shape=(4, 4, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), path)
    return path


def test_flare_layout_pairs_labels_and_round_trips_through_monai(phantom_dir, tmp_path):
    d = build_datalist(phantom_dir, val_fraction=0.25, seed=0)
    assert len(d["training"]) == 3 and len(d["validation"]) == 1
    for e in d["training"] + d["validation"]:
        key = e["image"].split("/")[-1].removesuffix("_0000.nii.gz")
        assert e["label"] == f"labelsTr/{key}.nii.gz"
    path = write_datalist(d, tmp_path / "list.json")
    ours = load_datalist(path, phantom_dir)
    for section in ("training", "validation"):
        theirs = load_decathlon_datalist(str(path), data_list_key=section, base_dir=str(phantom_dir))
        assert [(e["image"], e["label"]) for e in theirs] == [(e["image"], e["label"]) for e in ours[section]]
        assert all(nib.load(e["image"]).ndim == 3 for e in theirs)


def test_split_is_deterministic_and_stable(tmp_path):
    for i in range(20):
        _nifti(tmp_path / "imagesTr" / f"Case_{i:05d}_0000.nii.gz")
    a = build_datalist(tmp_path, val_fraction=0.2, seed=3)
    assert a == build_datalist(tmp_path, val_fraction=0.2, seed=3)
    assert len(a["validation"]) == 4 and len(a["training"]) == 16
    other_seed = build_datalist(tmp_path, 0.2, seed=4)
    assert {e["image"] for e in a["validation"]} != {e["image"] for e in other_seed["validation"]}
    # Adding a case moves at most one case out of validation (cases are ranked by a hash of their
    # path, so the others keep their rank).
    _nifti(tmp_path / "imagesTr" / "Case_00020_0000.nii.gz")
    b = build_datalist(tmp_path, val_fraction=0.2, seed=3)
    assert len({e["image"] for e in a["validation"]} - {e["image"] for e in b["validation"]}) <= 1
    assert all("label" not in e for e in b["training"])  # no labelsTr folder


def test_plain_folder_and_images_ts(tmp_path):
    _nifti(tmp_path / "plain" / "a" / "ct1.nii.gz")
    _nifti(tmp_path / "plain" / "b" / "ct2.nii")
    (tmp_path / "plain" / "notes.txt").write_text("not an image")
    d = build_datalist(tmp_path / "plain", val_fraction=0.0)
    assert [e["image"] for e in d["training"]] == ["a/ct1.nii.gz", "b/ct2.nii"] and d["validation"] == []
    _nifti(tmp_path / "flare" / "imagesTr" / "X_001_0000.nii.gz")
    _nifti(tmp_path / "flare" / "imagesTs" / "X_900_0000.nii.gz")
    _nifti(tmp_path / "flare" / "labelsTr" / "X_001.nii.gz")
    d = build_datalist(tmp_path / "flare", val_fraction=0.0)
    assert d["training"] == [{"image": "imagesTr/X_001_0000.nii.gz", "label": "labelsTr/X_001.nii.gz"},
                             {"image": "imagesTs/X_900_0000.nii.gz"}]


def test_datalist_cli(tmp_path, phantom_dir, capsys):
    out = tmp_path / "p.json"
    assert main(["datalist", str(phantom_dir), "-o", str(out), "--val_fraction", "0.5", "--seed", "1"]) == 0
    d = json.loads(out.read_text())
    assert len(d["training"]) == 2 and len(d["validation"]) == 2
    assert main(["datalist", str(tmp_path / "empty"), "-o", str(out)]) == 2
    assert "empty: data directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["datalist", str(tmp_path / "empty"), "-o", str(out)]) == 2
    assert "no .nii or .nii.gz files found" in capsys.readouterr().err
    assert main(["datalist", str(phantom_dir), "-o", str(out), "--val_fraction", "1.5"]) == 2
    assert "--val_fraction must be in [0, 1), got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [
    ('{"training": [', "not valid JSON (line 1"),
    ('{"training": []}', "datalist is empty"),
    ('[1, 2]', 'expected an object with a "training" list'),
    ('{"training": [{"label": "x.nii.gz"}]}', 'training[0] has no "image" path'),
    ('{"training": [{"image": "../outside.nii.gz"}]}', "training[0].image '../outside.nii.gz' escapes data_dir"),
    ('{"training": [{"image": "/etc/passwd"}]}', "escapes data_dir"),
    ('{"training": [], "validation": {"image": "a.nii.gz"}}', '"validation" must be a list'),
])
def test_load_datalist_rejects_bad_lists(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError) as e:
        load_datalist(path, tmp_path / "data")
    assert problem in str(e.value) and str(path) in str(e.value)


def test_symlinked_image_folder_is_inside_data_dir(tmp_path):
    """A data_dir whose imagesTr/ is a symlink to another disk is fine; only `..` paths escape."""
    _nifti(tmp_path / "elsewhere" / "Case_00001_0000.nii.gz")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "imagesTr").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    path = write_datalist(build_datalist(tmp_path / "d", val_fraction=0.0), tmp_path / "l.json")
    image = load_datalist(path, tmp_path / "d")["training"][0]["image"]
    assert image == str(tmp_path / "d" / "imagesTr" / "Case_00001_0000.nii.gz")
    assert nib.load(image).shape == (4, 4, 3)


def test_load_datalist_missing_image(tmp_path):
    path = write_datalist({"training": [{"image": "imagesTr/gone.nii.gz"}]}, tmp_path / "l.json")
    with pytest.raises(DataError, match=r"gone.nii.gz: file not found \(listed in .*l.json as training\[0\].image\)"):
        load_datalist(path, tmp_path)
    assert load_datalist(path, tmp_path, check_files=False)["training"][0]["image"].endswith("gone.nii.gz")
