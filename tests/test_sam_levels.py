"""Body levels across cases (`alice-ds sam-levels`) and the pair sampler's level prior, on phantoms
with atlas-oracle embeddings (exact correspondence up to organ shifts)."""

import json

import numpy as np
import pytest

from alice_ds.cli import main
from alice_ds.data.cache import list_cases, open_case
from alice_ds.data.phantom import corresponding_points
from alice_ds.sam.levels import AGREE_MM, EDGES_FILE, LEVELS_FILE, LevelPrior, partner_pairs, solve_offsets
from alice_ds.sam.oracle import write_atlas_oracle_cases
from alice_ds.sampler import PairDataset, SamplerConfig
from alice_ds.sampler.precision import pair_errors_mm, phantom_subjects, precision_report

FAST = dict(roi=32, rotation=0.0, noise_std=0.0)


def test_solve_offsets_keeps_edges_whose_directions_agree():
    # true offsets a 0, b -100, c -150: shift(A -> B) = o_A - o_B
    shifts = {("a", "b"): 101.0, ("b", "a"): -99.0, ("b", "c"): 50.0, ("c", "b"): -50.0,
              ("a", "c"): 150.0, ("c", "a"): -150.0 + 3 * AGREE_MM,  # directions disagree: dropped
              ("a", "d"): 10.0}  # one direction only: dropped
    got = solve_offsets(["a", "b", "c", "d"], shifts)
    assert [got[c]["component"] for c in "abcd"] == [0, 0, 0, 1]
    np.testing.assert_allclose([got[c]["offset_mm"] for c in "abcd"], [0.0, -100.0, -150.0, 0.0], atol=1e-9)
    # with the a-c edge agreeing, least squares spreads the disagreement of the loop
    shifts[("c", "a")] = -156.0
    got = solve_offsets(["a", "b", "c"], shifts)
    o = {c: got[c]["offset_mm"] for c in "abc"}
    assert abs(o["a"]) < 1e-9 and abs(o["b"] + 101.0) < 1.5 and abs(o["c"] + 152.0) < 1.5


def test_partner_pairs():
    cases = [f"c{i}" for i in range(6)]
    assert len(partner_pairs(cases, 5, 0)) == 15
    few = partner_pairs(cases, 2, 0)
    assert all(a < b for a, b in few) and len(set(few)) == len(few) and 6 <= len(few) <= 12
    assert {c for p in few for c in p} == set(cases)


@pytest.fixture(scope="module")
def levels_embed(phantom_dir, phantom_cache, tmp_path_factory):
    """Atlas-oracle embeddings of the phantom cases with `alice-ds sam-levels` run on them, and the
    cases' Subjects."""
    out = tmp_path_factory.mktemp("levels_embed")
    ids = list_cases(phantom_cache)
    subjects = phantom_subjects(phantom_dir / "landmarks", ids)
    write_atlas_oracle_cases(phantom_cache, out, subjects)
    assert main(["sam-levels", "--embed_dir", str(out), "--cache_dir", str(phantom_cache), "--points", "16"]) == 0
    return out, subjects


def test_levels_match_the_true_shifts(phantom_cache, levels_embed):
    embed, subjects = levels_embed
    doc = json.loads((embed / LEVELS_FILE).read_text())
    ids = list_cases(phantom_cache)
    assert sorted(doc["cases"]) == ids
    assert len((embed / EDGES_FILE).read_text().splitlines()) == len(ids) * (len(ids) - 1)  # all directions
    comp = [doc["cases"][c]["component"] for c in ids]
    assert comp.count(0) >= 3, doc
    checked = 0
    for a in ids:
        for b in ids:
            if a == b or not (doc["cases"][a]["component"] == doc["cases"][b]["component"] == 0):
                continue
            case, key = open_case(phantom_cache, a), open_case(phantom_cache, b)
            pts = case.voxel_to_world(np.argwhere(np.asarray(case.array) > -300)[::97])
            true = corresponding_points(subjects[a], subjects[b], pts)
            k = key.world_to_voxel(true)[:, 2]
            seen = (k >= 0) & (k <= key.shape[2] - 1)  # A's points at a level B shows
            est = doc["cases"][a]["offset_mm"] - doc["cases"][b]["offset_mm"]
            err = np.abs(est - (true[seen, 2] - pts[seen, 2]))  # per point: the subjects differ in height too
            print(a, b, round(est, 1), np.round(np.percentile(err, [50, 90]), 1), seen.mean())
            assert np.median(err) <= 8.0 and np.percentile(err, 90) <= 16.0, (a, b, est, err)
            checked += 1
    assert checked >= 6
    # a second run resumes from the edge file: nothing measured again, the same offsets
    before = (embed / EDGES_FILE).read_text()
    assert main(["sam-levels", "--embed_dir", str(embed), "--cache_dir", str(phantom_cache), "--points", "16"]) == 0
    assert (embed / EDGES_FILE).read_text() == before
    assert json.loads((embed / LEVELS_FILE).read_text())["cases"] == doc["cases"]


def test_prior_points(phantom_cache):
    a, b = (open_case(phantom_cache, c) for c in list_cases(phantom_cache)[:2])
    prior = LevelPrior({"cases": {a.case_id: {"component": 0, "offset_mm": 0.0},
                                  b.case_id: {"component": 0, "offset_mm": 0.0}}})
    body = a.voxel_to_world(np.argwhere(np.asarray(a.array) > -300)[::499])
    np.testing.assert_allclose(prior.map_points(a, a, body), body, atol=1e-9)  # a case onto itself
    # B shifted 1000 mm up the body: no level of A is inside B
    prior.cases[b.case_id]["offset_mm"] = -1000.0
    assert np.isnan(prior.map_points(a, b, body)).all()
    # inside B: the prior lies in B's body slab at z + shift, within B's body box in x and y
    z_mid = b.voxel_to_world([[0, 0, b.shape[2] // 2]])[0, 2]
    prior.cases[b.case_id]["offset_mm"] = float(np.median(body[:, 2]) - z_mid)
    got = prior.map_points(a, b, body)
    ok = ~np.isnan(got).any(1)
    assert ok.mean() > 0.3
    np.testing.assert_allclose(got[ok, 2], body[ok, 2] - prior.cases[b.case_id]["offset_mm"], atol=1e-9)
    vox = b.world_to_voxel(got[ok])
    assert (vox >= -0.5).all() and (vox <= np.asarray(b.shape) - 0.5).all()


def test_sampler_with_the_level_prior(phantom_cache, levels_embed, tmp_path):
    """The sampler's pairs with the level prior are right; with a wrong level file the same sampler
    accepts far fewer right pairs (the prior decides)."""
    embed, subjects = levels_embed

    def report(embed_dir, **cfg):
        ds = PairDataset(phantom_cache, embed_dir, SamplerConfig(**FAST, score_threshold=0.9, **cfg),
                         seed=0, rank=0, world_size=1)
        samples = [s for _, s in zip(range(30), ds)]
        return precision_report(pair_errors_mm(samples, subjects), ds.stats()["matcher_calls"])

    good = report(embed)
    assert good["acceptance"] >= 0.5 and good["precision"] >= 0.9, good
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in embed.glob("*.safetensors"):
        (wrong / f.name).symlink_to(f)
    doc = json.loads((embed / LEVELS_FILE).read_text())
    for i, c in enumerate(sorted(doc["cases"])):
        doc["cases"][c]["offset_mm"] += 60.0 * i  # every pair's level off by >= 60 mm
    (wrong / LEVELS_FILE).write_text(json.dumps(doc))
    bad = report(wrong)
    assert bad["pairs"] * (bad["precision"] or 0.0) <= 0.5 * good["pairs"] * good["precision"], (good, bad)
    off = report(wrong, level_prior_mm=0.0)  # the file ignored: the cycle check, as without levels
    assert off["precision"] >= 0.9, off


def test_broken_levels_file_is_named(phantom_cache, levels_embed, tmp_path):
    embed, _ = levels_embed
    for f in embed.glob("*.safetensors"):
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / LEVELS_FILE).write_text("{not json")
    from alice_ds.errors import DataError
    with pytest.raises(DataError, match=LEVELS_FILE):
        PairDataset(phantom_cache, tmp_path, SamplerConfig(**FAST), seed=0, rank=0, world_size=1)


def test_sam_eval_with_the_level_prior(phantom_dir, phantom_cache, levels_embed, tmp_path):
    embed, _ = levels_embed
    out = tmp_path / "eval.json"
    assert main(["sam-eval", "--embed_dir", str(embed), "--landmarks", str(phantom_dir / "landmarks"),
                 "--cache_dir", str(phantom_cache), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["level_prior"] and doc["prior_matches"] >= 0.8 * doc["n"], doc
    assert doc["within_10mm"] >= 0.8 and doc["beyond_50mm"] <= 0.02, doc  # oracle embeddings, organ shifts
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in embed.glob("*.safetensors"):
        (bare / f.name).symlink_to(f)
    assert main(["sam-eval", "--embed_dir", str(bare), "--landmarks", str(phantom_dir / "landmarks"),
                 "--cache_dir", str(phantom_cache)]) == 2  # no levels file: a user error naming the step
