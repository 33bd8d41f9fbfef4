"""benchmarks/sam_halves.py on the tiny test SAM: each row is the evaluation it names."""

import json
import sys
from pathlib import Path

import pytest

from alice_ds.sam.evaluate import evaluate, load_landmarks

ROOT = Path(__file__).resolve().parents[1]


def test_sam_halves_rows(phantom_dir, phantom_cache, sam_embed_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sam_halves
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "halves.json"
    assert sam_halves.main(["--embed_dir", str(sam_embed_dir), "--cache_dir", str(phantom_cache),
                            "--landmarks", str(phantom_dir / "landmarks"), "--window", "12",
                            "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    marks = load_landmarks(phantom_dir / "landmarks")
    for name, search in (("learned, window", "window"), ("learned, global", "global"),
                         ("learned coarse alone", "coarse")):
        want = evaluate(sam_embed_dir, marks, window=12, search=search)["overall"]
        assert res[name].pop("median_abs_xyz_mm") == pytest.approx(want.pop("median_abs_xyz_mm"), rel=1e-9)
        assert res[name] == pytest.approx(want, rel=1e-9)
    n = res["learned, window"]["n"]
    assert all(r["n"] == n for r in res.values())
    # a 2-step model is near chance; the landmark fit is within a few mm, and its coarse half alone
    # takes the learned fine search close to the landmark
    assert res["oracle"]["median_mm"] < 10
    assert res["learned fine + oracle coarse"]["median_mm"] < 0.5 * res["learned, window"]["median_mm"]
