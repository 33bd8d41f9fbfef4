"""Pair precision on phantoms (the generator's exact correspondence) and the sampler's cycle check."""

import json

import numpy as np
import pytest

from alice_ds.data import case_key
from alice_ds.data.cache import list_cases, open_case
from alice_ds.data.phantom import ATLAS_FIXED_LANDMARKS, corresponding_points
from alice_ds.sam.oracle import write_atlas_oracle_cases
from alice_ds.sampler import PairDataset, SamplerConfig
from alice_ds.sampler.accept import CYCLE_CHUNK
from alice_ds.sampler.precision import pair_errors_mm, phantom_subjects, precision_report

FAST = dict(roi=32, rotation=0.0, noise_std=0.0)


def test_corresponding_points_carry_fixed_landmarks_between_subjects(phantom_dir, phantom_cache):
    ids = list_cases(phantom_cache)
    subjects = phantom_subjects(phantom_dir / "landmarks", ids)
    marks = {c: json.loads((phantom_dir / "landmarks" / f"{case_key(c)}.json").read_text())["landmarks"]
             for c in ids}
    checked = 0
    for a in ids:
        for b in ids:
            names = sorted(set(marks[a]) & set(marks[b]) & ATLAS_FIXED_LANDMARKS)
            if not names:
                continue
            got = corresponding_points(subjects[a], subjects[b], [marks[a][n] for n in names])
            np.testing.assert_allclose(got, [marks[b][n] for n in names], atol=0.01)  # files round to 1 um
            checked += len(names)
    assert checked >= 20
    a, b = ids[0], ids[1]
    p = np.array([[10.0, -20.0, float(np.mean([m[2] for m in marks[a].values()]))]])
    back = corresponding_points(subjects[b], subjects[a], corresponding_points(subjects[a], subjects[b], p))
    np.testing.assert_allclose(back, p, atol=1e-6)


@pytest.fixture(scope="module")
def atlas_embed(phantom_dir, phantom_cache, tmp_path_factory):
    """Atlas-oracle embeddings of the phantom cases (exact correspondence up to organ shifts) and the
    cases' Subjects."""
    out = tmp_path_factory.mktemp("atlas_embed")
    ids = list_cases(phantom_cache)
    subjects = phantom_subjects(phantom_dir / "landmarks", ids)
    write_atlas_oracle_cases(phantom_cache, out, subjects)
    return out, subjects


def test_precision_of_sam_pairs_against_random_pairs(phantom_cache, atlas_embed):
    """Atlas-oracle embeddings give accepted pairs within 20 mm of the true correspondence; random
    pairs mostly are not."""
    embed, subjects = atlas_embed
    reports = {}
    for pairing in ("sam", "random"):
        ds = PairDataset(phantom_cache, embed, SamplerConfig(**FAST, pairing=pairing, score_threshold=0.9),
                         seed=0, rank=0, world_size=1)
        samples = [s for _, s in zip(range(40), ds)]
        kinds = ("inter",) if pairing == "sam" else ("random",)
        reports[pairing] = precision_report(pair_errors_mm(samples, subjects, kinds), ds.stats()["matcher_calls"])
    sam, rnd = reports["sam"], reports["random"]
    assert sam["pairs"] >= 20 and sam["acceptance"] >= 0.5, sam
    assert sam["precision"] >= 0.95 and sam["median_mm"] <= 8.0, sam
    assert rnd["pairs"] == 40 and rnd["precision"] <= 0.3 and rnd["median_mm"] >= 40.0, rnd


def test_pair_errors_and_report_by_hand(phantom_dir, phantom_cache):
    ids = list_cases(phantom_cache)
    subjects = phantom_subjects(phantom_dir / "landmarks", ids)
    q = np.array([0.0, 0.0, float(open_case(phantom_cache, ids[0]).voxel_to_world([[0, 0, 20]])[0, 2])])
    true = corresponding_points(subjects[ids[0]], subjects[ids[1]], q[None])[0]
    samples = [{"kind": kind, "query_case": ids[0], "anchor_case": ids[1], "query_center_mm": q,
                "anchor_center_mm": true + np.array([0.0, off, 0.0])}
               for kind, off in (("inter", 5.0), ("inter", 25.0), ("best", 1.0), ("intra", 0.0))]
    np.testing.assert_allclose(pair_errors_mm(samples, subjects), [5.0, 25.0], atol=1e-9)
    np.testing.assert_allclose(pair_errors_mm(samples, subjects, ("best",)), [1.0], atol=1e-9)
    r = precision_report(pair_errors_mm(samples, subjects), attempts=8)
    assert r["pairs"] == 2 and r["acceptance"] == 0.25 and r["precision"] == 0.5 and r["median_mm"] == 15.0
    assert precision_report(np.zeros(0), 0) == {"pairs": 0, "attempts": 0, "radius_mm": 20.0, "acceptance": None,
                                                "precision": None, "median_mm": None, "p95_mm": None}


class _CycleMatcher:
    """A -> B moves every point by SHIFT (score 0.9); B -> A moves it back, except for points whose
    x (in A) is below SPLIT: those come back 50 mm off, as a wrong match that does not map back."""

    SHIFT = np.array([0.0, 0.0, 12.0])
    SPLIT = 0.0

    def __init__(self, forward_case):
        self.forward_case = forward_case
        self.calls = []

    def match(self, query_case, key_case, points):
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        self.calls.append((query_case, key_case, len(points)))
        if query_case == self.forward_case:
            return points + self.SHIFT, np.full(len(points), 0.9, dtype=np.float32)
        back = points - self.SHIFT
        back[back[:, 0] < self.SPLIT] += np.array([50.0, 0.0, 0.0])
        return back, np.full(len(points), 0.9, dtype=np.float32)


@pytest.mark.parametrize("cycle_mm", [0.0, 10.0])
def test_cycle_check_keeps_only_matches_that_map_back(phantom_cache, atlas_embed, cycle_mm):
    """With the cycle check a candidate whose match does not map back near it is never chosen, and
    those that do are chosen uniformly; without it every candidate can be."""
    ids = list_cases(phantom_cache)
    a, b = ids[0], ids[1]
    matcher = _CycleMatcher(a)
    ds = PairDataset(phantom_cache, atlas_embed[0], SamplerConfig(**FAST, cycle_mm=cycle_mm), seed=0, rank=0,
                     world_size=1, matcher=matcher)
    points = np.array([[x, 0.0, float(open_case(phantom_cache, a).voxel_to_world([[0, 0, 20]])[0, 2])]
                       for x in (-40.0, -20.0, 20.0, 40.0)])  # two map back (x > 0), two do not
    picks = []
    for i in range(120):
        s = ds.pair(a, points, key_case=b, index=i)
        assert s["kind"] == "inter"
        picks.append(int(np.argmin(np.abs(points[:, 0] - s["query_center_mm"][0].item()))))
    counts = np.bincount(picks, minlength=4)
    if cycle_mm:
        assert counts[:2].sum() == 0 and (counts[2:] > 40).all(), counts  # 60 each expected
        assert all(n <= CYCLE_CHUNK for q, k, n in matcher.calls if q == b)  # only passing ones go back
    else:
        assert (counts > 15).all(), counts  # 30 each expected
        assert all(q == a for q, _, _ in matcher.calls)  # no call back
    matcher.SPLIT = 100.0  # now none maps back: the fallback (intra) takes over
    matcher.calls.clear()
    s = ds.pair(a, points, key_case=b, index=999)
    assert s["kind"] == ("intra" if cycle_mm else "inter")
