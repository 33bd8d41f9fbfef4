"""benchmarks/sam_halves.py on the tiny test SAM: each row is the evaluation it names."""

import json
from pathlib import Path

import pytest

from alice_ds.data.landmarks import load_landmarks
from alice_ds.data.phantom import ATLAS_FIXED_LANDMARKS
from alice_ds.sam.evaluate import evaluate
from benchmarks import sam_halves

ROOT = Path(__file__).resolve().parents[1]


def test_sam_halves_rows(phantom_dir, phantom_cache, sam_embed_dir, tmp_path):
    out = tmp_path / "halves.json"
    assert sam_halves.main(["--embed_dir", str(sam_embed_dir), "--cache_dir", str(phantom_cache),
                            "--landmarks", str(phantom_dir / "landmarks"), "--window", "12",
                            "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    marks = load_landmarks(phantom_dir / "landmarks")
    for name, search in (("learned, window", "window"), ("learned, global", "global"),
                         ("learned coarse alone", "coarse")):
        full = evaluate(sam_embed_dir, marks, window=12, search=search)
        want = full["overall"]
        for split in ("fixed", "organ_bound"):  # the phantom landmark splits
            got = res[name].pop(split)
            assert got["n"] == full[split]["n"] and got["median_mm"] == pytest.approx(full[split]["median_mm"])
        assert res[name].pop("median_abs_xyz_mm") == pytest.approx(want.pop("median_abs_xyz_mm"), rel=1e-9)
        assert res[name] == pytest.approx(want, rel=1e-9)
    n = res["learned, window"]["n"]
    assert all(r["n"] == n for r in res.values())
    # a 2-step model is near chance; the landmark fit is within a few mm, and its coarse half alone
    # takes the learned fine search close to the landmark
    assert res["oracle"]["median_mm"] < 10
    assert res["learned fine + oracle coarse"]["median_mm"] < 0.5 * res["learned, window"]["median_mm"]
    # the atlas oracle is exact anatomy: landmarks fixed in the atlas (vertebrae, femoral heads, aortic
    # levels, carina) match within a fine voxel (4 mm, half-diagonal 3.5 mm); those that move with their
    # organ (centroids, kidney poles) are off by the organs' own shifts
    per = json.loads(out.read_text())["per_landmark"]["atlas oracle"]
    fixed = [n for n in per if n in ATLAS_FIXED_LANDMARKS]
    assert len(fixed) >= 5, sorted(per)
    for name in fixed:
        assert per[name]["median_mm"] < 3.5, (name, per[name])
    assert res["atlas oracle"]["median_mm"] < res["oracle"]["median_mm"]
    assert res["learned fine + atlas coarse"]["median_mm"] < 0.5 * res["learned, window"]["median_mm"]
    # searched globally, a right coarse half is not narrowed to its windows (7.8 vs 14.4 mm here)
    assert (res["learned fine + atlas coarse, global"]["median_mm"]
            < res["learned fine + atlas coarse"]["median_mm"] < 0.5 * res["learned, global"]["median_mm"])


def test_sam_halves_names_a_landmark_file_without_generator(phantom_dir, phantom_cache, sam_embed_dir,
                                                            tmp_path, capsys):
    import shutil

    marks = tmp_path / "landmarks"
    shutil.copytree(phantom_dir / "landmarks", marks)
    doc = json.loads((marks / "Case_00003.json").read_text())
    del doc["info"]
    (marks / "Case_00003.json").write_text(json.dumps(doc))
    args = ["--embed_dir", str(sam_embed_dir), "--cache_dir", str(phantom_cache), "--landmarks", str(marks)]
    assert sam_halves.main(args) == 2
    err = capsys.readouterr().err
    assert "Case_00003.json: not a phantom landmark file" in err and "--no_atlas" in err
    out = tmp_path / "halves.json"
    assert sam_halves.main(args + ["--no_atlas", "--window", "12", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["results"]) == ["learned, window", "learned, global", "learned coarse alone",
                                    "learned fine + oracle coarse", "oracle"]
    assert res["per_landmark"]["oracle"] and res["results"]["oracle"]["median_mm"] < 10
    assert sam_halves.main(["--embed_dir", str(sam_embed_dir), "--cache_dir", str(phantom_cache),
                            "--landmarks", str(tmp_path / "none"), "--no_atlas"]) == 2
    assert "none: landmark folder not found" in capsys.readouterr().err
