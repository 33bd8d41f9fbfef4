"""Pair sampler on small cached volumes written in the cache format (docs/interfaces.md), with SAM
embedding files built from ground truth (alice_ds.sam.oracle) and the real coarse-to-fine Matcher.

The stand-in cases are affine deformations (scale, rotation about z, translation) of one canonical
body with organs; their landmarks (organ centres, world mm) are known exactly."""

import json

import numpy as np
import pytest
import torch

from alice_ds.data.cache import hu_window
from alice_ds.errors import DataError
from alice_ds.sam.io import embedding_path
from alice_ds.sam.oracle import write_oracle_embedding
from alice_ds.sampler import PairDataset, PairLoader, SamplerConfig, apply_device_augment

SPACING = 3.0  # mm, cache grid of the stand-in cases
SHAPE = (56, 48, 44)  # voxels: 168 x 144 x 132 mm
BODY = (70.0, 55.0, 60.0)  # canonical body semi-axes, mm
ORGANS = {  # name: (canonical centre mm, radius mm, HU)
    "liver": ((-30.0, -10.0, 15.0), 18.0, 120),
    "spleen": ((35.0, 5.0, 20.0), 10.0, 90),
    "spine": ((0.0, 35.0, 0.0), 9.0, 500),
    "kidney_l": ((30.0, 25.0, -25.0), 9.0, 180),
    "kidney_r": ((-30.0, 25.0, -25.0), 9.0, 180),
    "bladder": ((0.0, -15.0, -45.0), 10.0, 10),
}
CANONICAL = {k: v[0] for k, v in ORGANS.items()}
FAST = dict(roi=32, rotation=0.0, noise_std=0.0)  # no augmentation: crops comparable voxel by voxel


def _world_from_canonical(rng):
    """A random affine canonical mm -> world mm: per-axis scale, rotation about z, translation."""
    s = rng.uniform(0.9, 1.1, size=3)
    a = np.deg2rad(rng.uniform(-10, 10))
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag(s)
    m[:3, 3] = rng.uniform(-8, 8, size=3)
    return m


def write_case(cache_dir, case_id, rng):
    """A cached case (int16 .npy + JSON, RAS) and its landmarks in world mm."""
    to_world = _world_from_canonical(rng)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = -(np.asarray(SHAPE) - 1) * SPACING / 2 + rng.uniform(-6, 6, size=3)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    inv = np.linalg.inv(to_world)
    canon = world @ inv[:3, :3].T + inv[:3, 3]  # [N, 3]
    hu = np.full(len(canon), -1000.0)
    hu[((canon / np.asarray(BODY)) ** 2).sum(1) <= 1] = 40.0
    for centre, radius, value in ORGANS.values():
        hu[((canon - centre) ** 2).sum(1) <= radius ** 2] = value
    hu += rng.normal(0, 10, size=hu.shape)
    vol = hu.reshape(SHAPE).astype(np.int16)
    np.save(cache_dir / f"{case_id}.npy", vol)
    meta = {"case_id": case_id, "affine": affine.tolist(), "spacing": [SPACING] * 3, "shape": list(SHAPE),
            "original_shape": list(SHAPE), "original_spacing": [SPACING] * 3, "original_orientation": "RAS",
            "source": "test stand-in", "fingerprint": case_id, "settings": {}}
    (cache_dir / f"{case_id}.json").write_text(json.dumps(meta))
    landmarks = {k: (to_world[:3, :3] @ np.asarray(c) + to_world[:3, 3]).tolist() for k, c in CANONICAL.items()}
    return affine, vol, landmarks


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Five cached cases, their volumes, landmarks and oracle embeddings."""
    root = tmp_path_factory.mktemp("pairs")
    cache, embed = root / "cache", root / "embed"
    cache.mkdir()
    rng = np.random.default_rng(2024)
    cases = {}
    for i in range(5):
        cid = f"Case_{i:05d}_0000"
        affine, vol, lms = write_case(cache, cid, rng)
        write_oracle_embedding(embedding_path(embed, cid), cid, affine, SHAPE, lms, CANONICAL)
        cases[cid] = dict(affine=affine, vol=vol, landmarks=lms)
    return dict(cache=cache, embed=embed, cases=cases, root=root)


def _expected_crop(vol, affine, center_mm, roi, pad=-1024):
    """The crop computed independently of the cache module: [R, R, R] HU with padding."""
    c = np.rint(np.linalg.solve(affine, np.append(center_mm, 1.0))[:3]).astype(int)
    out = np.full((roi,) * 3, pad, dtype=np.int16)
    start = c - roi // 2
    g = np.stack(np.meshgrid(*[np.arange(roi)] * 3, indexing="ij"), -1) + start  # [R, R, R, 3]
    inside = ((g >= 0) & (g < np.asarray(vol.shape))).all(-1)
    out[inside] = vol[tuple(g[inside].T)]
    return out, inside


def _dataset(cohort, embed=True, **cfg):
    kwargs = dict(FAST)
    kwargs.update(cfg)
    return PairDataset(cohort["cache"], cohort["embed"] if embed else None, SamplerConfig(**kwargs), seed=0,
                       rank=0, world_size=1)


def test_landmark_query_lands_on_the_same_landmark(cohort):
    ds = _dataset(cohort)
    ids = sorted(cohort["cases"])
    # worst case: query snapped to A's voxel, match at a 4 mm fine voxel of B, snapped to B's voxel
    tol = np.sqrt(3) / 2 * (SPACING * 1.1 + 4.0 + SPACING)
    errors, wrong = [], []
    for a, b in [(ids[0], ids[1]), (ids[2], ids[4]), (ids[3], ids[0])]:
        la, lb = cohort["cases"][a]["landmarks"], cohort["cases"][b]["landmarks"]
        for name in ORGANS:
            s = ds.pair(a, [la[name]], key_case=b)
            assert s["kind"] == "inter" and s["anchor_case"] == b and s["score"] >= 0.7
            assert np.linalg.norm(s["query_center_mm"].numpy() - la[name]) <= np.sqrt(3) / 2 * SPACING + 1e-6
            errors.append(np.linalg.norm(s["anchor_center_mm"].numpy() - lb[name]))
            others = [np.linalg.norm(s["anchor_center_mm"].numpy() - lb[o]) for o in ORGANS if o != name]
            wrong.append(min(others))
    assert max(errors) <= tol, (errors, tol)
    assert np.mean(errors) <= 5.0
    assert min(wrong) > 25.0  # the match is not merely near *some* landmark


def test_crop_content_and_border_padding(cohort):
    ds = _dataset(cohort)
    ids = sorted(cohort["cases"])
    a, b = ids[1], ids[3]
    case = cohort["cases"][a]
    corner = case["affine"][:3, :3] @ np.array([2.0, 1.0, SHAPE[2] - 3.0]) + case["affine"][:3, 3]
    s = ds.pair(a, [corner], key_case=b)
    exp, inside = _expected_crop(case["vol"], case["affine"], s["query_center_mm"].numpy(), 32)
    assert (~inside).sum() > 32 ** 3 // 4  # a real border crop: a large part lies outside
    q = s["query"][0].numpy()
    np.testing.assert_allclose(q, hu_window(exp), atol=1e-6)
    assert np.all(q[~inside] == 0.0)  # air padding maps to the bottom of the window
    # the anchor crop is B's volume around the reported anchor centre
    kb = cohort["cases"][s["anchor_case"]]
    exp_b, _ = _expected_crop(kb["vol"], kb["affine"], s["anchor_center_mm"].numpy(), 32)
    np.testing.assert_allclose(s["anchor"][0].numpy(), hu_window(exp_b), atol=1e-6)
    assert s["query"].shape == (1, 32, 32, 32) and s["query"].dtype == torch.float32
    assert s["query_mask"].shape == (16, 16, 16) and s["query_mask"].dtype == torch.bool
    assert int(s["query_mask"].sum()) == int(s["anchor_mask"].sum()) == 3072  # 0.75 of 16^3
    assert not torch.equal(s["query_mask"], s["anchor_mask"])  # one mask per view


def _same(x, y):
    for k in x:
        if isinstance(x[k], torch.Tensor):
            if not torch.equal(x[k], y[k]):
                return False
        elif x[k] != y[k]:
            return False
    return True


def test_determinism_and_augmentation(cohort):
    cfg = dict(roi=32, rotation=15.0, noise_std=0.1, intensity_scale=0.1, intensity_shift=0.1)
    first = [_dataset(cohort, **cfg).sample(i) for i in range(2)]
    again = [_dataset(cohort, **cfg).sample(i) for i in reversed(range(2))][::-1]
    assert all(_same(x, y) for x, y in zip(first, again))
    other = PairDataset(cohort["cache"], cohort["embed"], SamplerConfig(**cfg), seed=1, rank=0, world_size=1)
    assert not _same(first[0], other.sample(0))
    # augmentation is applied: the view differs from the plain windowed crop, stays in [0, 1]
    s = first[0]
    case = cohort["cases"][s["query_case"]]
    exp, _ = _expected_crop(case["vol"], case["affine"], s["query_center_mm"].numpy(), 32)
    diff = (s["query"][0] - torch.from_numpy(hu_window(exp))).abs()
    assert diff.mean() > 0.03
    assert s["query"].min() >= 0.0 and s["query"].max() <= 1.0


def test_ranks_get_disjoint_shards_of_equal_length(cohort):
    cfg = SamplerConfig(**FAST)
    r0, r1 = (PairDataset(cohort["cache"], None, cfg, seed=3, rank=r, world_size=2, epochs=3) for r in (0, 1))
    assert r0.samples_per_epoch == r1.samples_per_epoch == 2  # 5 cases // 2 ranks
    s0, s1 = list(r0), list(r1)
    assert len(s0) == len(s1) == 6
    seen = set()
    for epoch in range(3):
        c0 = {s["query_case"] for s in s0[2 * epoch:2 * epoch + 2]}
        c1 = {s["query_case"] for s in s1[2 * epoch:2 * epoch + 2]}
        assert len(c0) == len(c1) == 2 and not c0 & c1
        seen |= c0 | c1
    assert len(seen) == 5  # the case left out rotates across epochs (seed 3)
    assert all(s["kind"] == "intra" and s["query_case"] == s["anchor_case"] for s in s0)
    st = r0.stats()
    assert (st["samples"], st["intra"], st["matcher_calls"], st["acceptance_rate"]) == (6, 6, 0, None)


def test_resume_continues_the_exact_stream_with_workers(cohort):
    cfg = dict(roi=32, rotation=10.0, noise_std=0.1)
    reference = PairLoader(_dataset(cohort, **cfg), batch_size=2, num_workers=0)
    ref = [b for _, b in zip(range(3), reference)]
    loader = PairLoader(_dataset(cohort, **cfg), batch_size=2, num_workers=2)
    got = [b for _, b in zip(range(1), loader)]
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON round trip
    assert state["epoch"] * 5 + state["position"] == 2
    restored = PairLoader(_dataset(cohort, **cfg), batch_size=2, num_workers=2)
    restored.load_state_dict(state)
    got += [b for _, b in zip(range(2), restored)]
    for x, y in zip(ref, got):
        assert x["index"].tolist() == y["index"].tolist()
        assert _same(x, y)
    assert ref[0]["query"].shape == (2, 1, 32, 32, 32) and ref[0]["query_mask"].shape == (2, 16, 16, 16)
    assert isinstance(ref[0]["query_case"], list) and len(ref[0]["kind"]) == 2
    st = loader.stats()
    assert st["samples"] == 2 and st["inter"] == 2 and st["acceptance_rate"] == 1.0
    assert 0.9 <= st["mean_score"] <= 1.0


def test_fallbacks_are_chosen_and_counted(cohort):
    """A threshold no fp16 embedding reaches: every matcher call fails. `intra` falls back to two
    augmentations of one crop; `best` takes the best-scoring candidate of all calls anyway; `retry`
    keeps trying new partners for 100 calls, then takes the best."""
    ds = _dataset(cohort, score_threshold=1.0, max_retries=1, num_candidates=4)
    samples = [s for _, s in zip(range(3), ds)]
    assert all(s["kind"] == "intra" and s["tries"] == 2 for s in samples)
    st = ds.stats()
    assert (st["fallback_intra"], st["fallback_best"], st["matcher_calls"], st["retries"],
            st["acceptance_rate"]) == (3, 0, 6, 3, 0.0)
    assert ds.state_dict()["position"] == 3
    best = _dataset(cohort, score_threshold=1.0, max_retries=1, num_candidates=4, fallback="best")
    samples = [s for _, s in zip(range(3), best)]
    assert all(s["kind"] == "best" and s["tries"] == 2 and s["anchor_case"] != s["query_case"] for s in samples)
    assert all(0.5 < s["score"] < 1.0 for s in samples)  # oracle embeddings: a close match, below 1.0
    st = best.stats()
    assert (st["best"], st["fallback_best"], st["inter"], st["acceptance_rate"]) == (3, 3, 0, 0.0)
    retry = _dataset(cohort, score_threshold=1.0, num_candidates=2, fallback="retry")
    s = retry.sample(0)
    assert (s["kind"], s["tries"]) == ("best", 100)
    assert s["score"] >= samples[0]["score"] - 1e-6 or s["query_case"] != samples[0]["query_case"]
    assert retry.sample(0)["score"] == s["score"]  # a pure function of (seed, rank, index)


class _ScoredMatcher:
    """Matches every point onto itself with fixed scores (the selection rule is what is tested)."""

    def __init__(self, scores):
        self.scores = np.asarray(scores, dtype=np.float32)

    def match(self, query_case, key_case, points):
        return np.asarray(points, dtype=np.float64), self.scores[:len(points)]


def test_candidate_is_drawn_uniformly_among_those_that_pass(cohort):
    """Of 8 candidates, 4 reach the threshold: each of those is chosen about equally often, never a
    failing one, and the best-scoring one no more than the others."""
    scores = [0.95, 0.72, 0.5, 0.8, 0.69, 0.99, 0.1, 0.3]  # passing at 0.7: 0, 1, 3, 5; best: 5
    ids = sorted(cohort["cases"])
    a, b = ids[0], ids[1]
    ds = PairDataset(cohort["cache"], cohort["embed"], SamplerConfig(**FAST), seed=0, rank=0, world_size=1,
                     matcher=_ScoredMatcher(scores))
    centre = cohort["cases"][a]["affine"][:3, 3] + np.array([80.0, 70.0, 60.0])
    points = centre + 9.0 * np.arange(8)[:, None] * np.array([[1.0, 0.0, 0.0]])  # 3 voxels apart along x
    picks = []
    for i in range(200):
        s = ds.pair(a, points, key_case=b, index=i)
        assert s["kind"] == "inter" and s["score"] >= 0.7
        picks.append(int(np.argmin(np.linalg.norm(points - s["query_center_mm"].numpy(), axis=1))))
    counts = np.bincount(picks, minlength=8)
    assert counts[[2, 4, 6, 7]].sum() == 0 and (counts[[0, 1, 3, 5]] > 25).all(), counts  # 50 each expected


def test_random_and_intra_pairing(cohort):
    rnd = _dataset(cohort, pairing="random")
    samples = [s for _, s in zip(range(4), rnd)]
    assert all(s["kind"] == "random" and s["tries"] == 0 and s["anchor_case"] != s["query_case"] for s in samples)
    assert rnd.stats()["random"] == 4 and rnd.stats()["matcher_calls"] == 0
    intra = _dataset(cohort, pairing="intra")
    samples = [s for _, s in zip(range(4), intra)]
    assert all(s["kind"] == "intra" and s["anchor_case"] == s["query_case"] for s in samples)
    assert all(torch.equal(s["query_center_mm"], s["anchor_center_mm"]) for s in samples)


def test_clean_views_are_the_reconstruction_targets(cohort):
    """Noised views come with their clean versions: the same rotation and intensity, no noise."""
    plain = _dataset(cohort, embed=False, noise_std=0.1)  # FAST: no rotation, no intensity change
    s = plain.sample(0)
    crop = plain._window(plain._case(s["query_case"]), s["query_center_mm"].numpy())
    assert torch.equal(s["query_target"], crop) and torch.equal(s["anchor_target"], crop)
    inside = (crop > 0.2) & (crop < 0.8)  # away from the clip at 0 and 1
    assert (s["query"] - crop)[inside].std().item() == pytest.approx(0.1, rel=0.05)
    assert "query_target" not in _dataset(cohort, embed=False).sample(0)  # no noise: the view is the target
    off = _dataset(cohort, embed=False, noise_std=0.1, rotation=15.0, augment=False).sample(0)
    assert "query_target" not in off and torch.equal(off["query"], off["anchor"])  # augment off: nothing


def test_bad_embeddings_are_skipped_then_fatal(cohort, tmp_path):
    ids = sorted(cohort["cases"])
    embed = tmp_path / "embed"
    embed.mkdir()
    for cid in ids[:3]:
        (embed / f"{cid}.safetensors").write_bytes(embedding_path(cohort["embed"], cid).read_bytes())
    # ids[3]: file of another case under its name; ids[4]: no file
    (embed / f"{ids[3]}.safetensors").write_bytes(embedding_path(cohort["embed"], ids[0]).read_bytes())
    ds = PairDataset(cohort["cache"], embed, SamplerConfig(**FAST, max_bad_fraction=0.5), rank=0, world_size=1)
    assert ds.cases == ids[:3] and ds.stats()["skipped_cases"] == 2
    assert "belongs to case" in ds.skipped[ids[3]] and "no SAM embedding" in ds.skipped[ids[4]]
    with pytest.raises(DataError, match=r"2 of 5 cases are unusable .*max_bad_fraction=10%"):
        PairDataset(cohort["cache"], embed, SamplerConfig(**FAST), rank=0, world_size=1)


def test_stale_embedding_grid_is_detected(cohort, tmp_path):
    ids = sorted(cohort["cases"])
    embed = tmp_path / "embed"
    c = cohort["cases"][ids[0]]
    shifted = c["affine"].copy()
    shifted[:3, 3] += 60.0  # an embedding computed from a different field of view
    write_oracle_embedding(embedding_path(embed, ids[0]), ids[0], shifted, SHAPE, c["landmarks"], CANONICAL)
    for cid in ids[1:]:
        (embed / f"{cid}.safetensors").write_bytes(embedding_path(cohort["embed"], cid).read_bytes())
    ds = PairDataset(cohort["cache"], embed, SamplerConfig(**FAST, max_bad_fraction=0.2), rank=0, world_size=1)
    assert ids[0] not in ds.cases and "does not cover" in ds.skipped[ids[0]]


@pytest.mark.parametrize("field,value", [("roi", 48), ("mask_ratio", 1.2), ("mask_block", 5),
                                         ("score_threshold", 2.0), ("hu_window", (200, 100)),
                                         ("num_candidates", 0), ("augment_on", "gpu")])
def test_config_errors_name_the_value(field, value):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**{field: value})


def test_phantom_chain_landmarks(phantom_dir, phantom_cache, tmp_path):
    """Phantoms stored RAS, LPS and LAS, through the real preprocess into the cache, with oracle
    embeddings fitted to their landmarks: a landmark query of A anchors at that landmark of B.
    A flipped axis anywhere in the chain would put anchors >100 mm off."""
    from alice_ds.data import case_key
    from alice_ds.data.cache import list_cases, open_case

    ids = list_cases(phantom_cache)
    lms = {cid: json.loads((phantom_dir / "landmarks" / f"{case_key(cid)}.json").read_text())["landmarks"]
           for cid in ids}
    reference = max(lms.values(), key=len)
    for cid in ids:
        case = open_case(phantom_cache, cid)
        write_oracle_embedding(embedding_path(tmp_path, cid), cid, case.affine, case.shape, lms[cid], reference)
    ds = PairDataset(phantom_cache, tmp_path, SamplerConfig(**FAST), rank=0, world_size=1)
    errors = []
    for a, b in ((ids[0], ids[1]), (ids[2], ids[3])):
        for name in sorted(set(lms[a]) & set(lms[b])):
            s = ds.pair(a, [lms[a][name]], key_case=b)
            assert s["kind"] == "inter"
            errors.append(np.linalg.norm(s["anchor_center_mm"].numpy() - lms[b][name]))
    errors = np.asarray(errors)
    print(f"phantom landmark errors (mm): median {np.median(errors):.1f}, max {errors.max():.1f}, n={len(errors)}")
    assert len(errors) >= 12
    assert np.median(errors) <= 10.0
    assert np.mean(errors <= 20.0) >= 0.9




def _rank_worker(rank, cache, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ds = PairDataset(cache, None, SamplerConfig(**FAST), seed=5, epochs=2)  # rank/world from the group
        cases = [s["query_case"] for s in ds]
        gathered = [None, None]
        dist.all_gather_object(gathered, {"rank": ds.rank, "world": ds.world_size, "cases": cases})
        if rank == 0:
            out.write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_epochs_disjointly(cohort, tmp_path):
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ranks.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_worker, args=(r, cohort["cache"], port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = json.loads(out.read_text())
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    assert len(r0["cases"]) == len(r1["cases"]) == 4  # 2 epochs x (5 cases // 2 ranks)
    for epoch in range(2):
        a, b = set(r0["cases"][2 * epoch:2 * epoch + 2]), set(r1["cases"][2 * epoch:2 * epoch + 2])
        assert len(a) == len(b) == 2 and not a & b


def test_intra_pairs_are_two_augmentations_of_one_crop(cohort):
    ds = _dataset(cohort, embed=False, noise_std=0.1)
    s = ds.sample(0)
    assert s["kind"] == "intra" and s["query_case"] == s["anchor_case"] and s["tries"] == 0
    assert torch.equal(s["query_center_mm"], s["anchor_center_mm"]) and s["score"] == 1.0
    q, a = s["query"][0], s["anchor"][0]
    both = (q > 0) & (q < 1) & (a > 0) & (a < 1)  # unclipped voxels: the difference is the noise
    assert both.sum() > 1000
    # independent noise fields of sigma 0.1 in each view: the difference has sigma 0.1 * sqrt(2)
    assert abs(float((q - a)[both].std()) - 0.1 * np.sqrt(2)) < 0.02


def test_state_from_another_world_size_restarts_its_epoch(cohort):
    ds = _dataset(cohort, embed=False)
    state = dict(ds.state_dict(), epoch=3, position=4, world_size=2)
    ds.load_state_dict(state)
    assert (ds.state_dict()["epoch"], ds.state_dict()["position"]) == (3, 0)
    ds.load_state_dict(dict(state, world_size=1, position=2))
    assert next(iter(ds))["index"] == 3 * 5 + 2
    with pytest.raises(ValueError, match="position must be in \\[0, 5\\), got 7"):
        ds.load_state_dict(dict(state, world_size=1, position=7))


AUG = dict(roi=32, rotation=15.0, rotation_prob=0.7, noise_std=0.1, intensity_scale=0.1, intensity_shift=0.05)
PARAMS = {f"{v}_aug_{k}" for v in ("query", "anchor") for k in ("rot", "noise_seed", "noise_std", "scale", "shift")}


def _batch(cohort, embed, n=4, **cfg):
    ds = _dataset(cohort, embed=embed, **AUG, **cfg)
    return next(iter(PairLoader(ds, batch_size=n)))


@pytest.mark.parametrize("embed", [True, False], ids=["inter", "intra"])
def test_device_augmentation_equals_worker_augmentation(cohort, embed):
    """augment_on="device" draws what the worker path draws: after `apply_device_augment` (here on
    the CPU, where the noise generator is the worker's) the views equal the worker's, and every
    other field (masks, centres, cases) is the same."""
    worker = _batch(cohort, embed)
    raw = _batch(cohort, embed, augment_on="device")
    assert not PARAMS & set(worker) and PARAMS <= set(raw)
    assert raw["query_aug_rot"].shape == (4, 3, 3) and raw["query_aug_noise_seed"].dtype == torch.int64
    rots = torch.cat([raw["query_aug_rot"], raw["anchor_aug_rot"]])  # [8, 3, 3]
    rotated = (rots != torch.eye(3, dtype=torch.float64)).flatten(1).any(1)  # [8]
    assert 0 < int(rotated.sum()) < 8  # rotation_prob 0.7: a batch with and without rotated views
    got = apply_device_augment(raw)
    assert set(got) == set(worker)
    assert {"query_target", "anchor_target"} <= set(got)  # noised views: their clean targets too
    for k in worker:
        if k in ("query", "anchor", "query_target", "anchor_target"):
            torch.testing.assert_close(got[k], worker[k], atol=1e-5, rtol=0)
            assert (got[k] - raw[k.split("_")[0]]).abs().mean() > 0.005  # augmented, from the un-augmented crop
        elif isinstance(worker[k], torch.Tensor):
            assert torch.equal(got[k], worker[k]), k
        else:
            assert got[k] == worker[k], k
    assert all(x == ("inter" if embed else "intra") for x in got["kind"])
    if not embed:  # intra: one crop shipped twice, two different views on the device
        assert torch.equal(raw["query"], raw["anchor"])
        assert (got["query"] - got["anchor"]).abs().mean() > 0.05


def test_device_augmentation_is_reproducible_and_needs_its_keys(cohort):
    a = apply_device_augment(_batch(cohort, False, n=2, augment_on="device"))
    b = apply_device_augment(_batch(cohort, False, n=2, augment_on="device"))
    assert torch.equal(a["query"], b["query"]) and torch.equal(a["anchor"], b["anchor"])
    other = PairDataset(cohort["cache"], None, SamplerConfig(**AUG, augment_on="device"), seed=1, rank=0,
                        world_size=1)
    c = apply_device_augment(next(iter(PairLoader(other, batch_size=2))))
    assert not torch.equal(a["query"], c["query"])
    with pytest.raises(ValueError, match="augment_on='device'"):
        apply_device_augment(_batch(cohort, False, n=2))


def test_workers_ignore_stop_signals_and_stop_when_the_loader_closes(cohort):
    """A launcher's or scheduler's SIGTERM/SIGUSR1 reaches the DataLoader workers too, sent by another
    process than their parent (here `kill`). Each used to kill a worker, and the main process then
    raised "DataLoader worker ... is killed by signal" in the step it was finishing. The workers ignore
    both, the stream goes on in order, and closing the loader's iterator shuts them down."""
    import subprocess
    import time

    import psutil

    before = {c.pid for c in psutil.Process().children()}
    batches = iter(PairLoader(_dataset(cohort), batch_size=1, num_workers=2))
    got = [next(batches)]
    workers = [c for c in psutil.Process().children() if c.pid not in before]
    assert len(workers) == 2
    for sig in ("TERM", "USR1"):
        subprocess.run(["kill", f"-{sig}", *[str(w.pid) for w in workers]], check=True)
    time.sleep(1.0)  # a worker that died would have been reported (SIGCHLD) by now
    got += [next(batches) for _ in range(3)]
    assert [int(b["index"][0]) for b in got] == [0, 1, 2, 3]
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    batches.close()
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, "workers still alive after the loader closed"


def test_case_deleted_mid_run_stops_the_stream_naming_the_file(cohort, tmp_path):
    """Cached cases deleted after the sampler checked them (a cleanup job, a moved cache): the worker
    that opens one fails and the main process raises the DataLoader's error, which names the file and
    the problem (the trainer stops with it; docs/faults.md)."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(cohort["cache"], cache)
    ds = PairDataset(cache, cohort["embed"], SamplerConfig(**FAST), rank=0, world_size=1)
    for f in cache.glob("*.npy"):
        f.unlink()
    with pytest.raises(RuntimeError, match=r"Caught DataError in DataLoader worker(.|\n)*\.npy: case "
                                           r"'Case_\d+_0000' has metadata but no array"):
        next(iter(PairLoader(ds, batch_size=1, num_workers=1)))
