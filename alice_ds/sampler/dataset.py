"""SAM-conditioned pair sampler (DESIGN §4 steps 1-3): the stream of samples Alice trains on.

For a query case A (this rank's shard of the epoch) `num_candidates` points are drawn inside A's
body and matched into a random partner case B != A with ONE `Matcher.match` call; one candidate is
drawn uniformly among those whose score (mean of fine and coarse cosine) reaches the threshold and
that pass `alice_ds.sampler.accept` (the level prior where `sam-levels` connects A and B, else the
cycle check): a crop around it in A is the *query* view, around its match in B the *anchor* view.
When none passes, new partners and candidates are tried (`max_retries`), then the `fallback` decides
(an intra pair, or the best match anyway; counted).
`pairing` `random` / `intra` and `embed_dir=None` are the ablations without SAM. Views are augmented
in the worker or, with `augment_on="device"`, the worker ships the drawn parameters and
`apply_device_augment` applies them on the training device.

Reproducibility. Sample n of rank r's stream is a pure function of (seed, r, n) and the data: its
query case comes from a per-epoch permutation seeded by (seed, epoch), every random draw from a
generator seeded by (seed, r, n). Batches go to DataLoader workers round-robin, so the stream is the
same for any number of workers and resuming is setting n (`PairLoader` keeps the position).
Sharding: each epoch the valid cases are permuted (the same permutation on every rank) and cut into
`world_size` disjoint, equal shards (the remainder sits out that epoch).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from alice_ds import dist
from alice_ds.console import warn
from alice_ds.data.cache import body_voxels, hu_window, list_cases, open_case
from alice_ds.errors import UserError
from alice_ds.memory import WORKER_MMAP_THRESHOLD, keep_freed_memory
from alice_ds.sam.levels import LevelPrior
from alice_ds.sam.matcher import Matcher
from alice_ds.sampler.accept import first_consistent, match_at_prior
from alice_ds.sampler.augment import ViewAugment, aug_key
from alice_ds.sampler.cases import usable_cases
from alice_ds.sampler.config import RETRY_CALLS, SamplerConfig
from alice_ds.sampler.masks import block_mask
from alice_ds.views import VIEWS

COUNTERS = ("samples", "inter", "best", "intra", "random", "fallback_intra", "fallback_best", "matcher_calls")
OPEN_CASES = 64
"""Cached volumes kept open (memory maps) per process; a map holds a file descriptor."""


class PairDataset(IterableDataset):
    """Infinite (or `epochs`-long) stream of Alice pair samples for one rank; see the module doc.

    Each sample is a dict (docs/interfaces.md "Pair sampler"): `query`, `anchor` float32
    [1, R, R, R] in [0, 1]; `query_target`, `anchor_target` (the clean views, without noise) when
    views are noised; `query_mask`, `anchor_mask` bool [R/2]^3 (True = masked); `score` float (1.0
    for intra, 0.0 for random); `query_center_mm`, `anchor_center_mm` float64 [3] (world mm of the
    crops' centres); `query_case`, `anchor_case` str; `kind` "inter" | "best" | "intra" | "random";
    `tries` int (matcher calls); `index` int (position in the rank's stream). With
    `augment_on="device"` the views are un-augmented crops and `<view>_aug_*` carry the drawn
    parameters (`alice_ds.sampler.augment.AugmentParams`) for `apply_device_augment`.

    `cases` restricts the sampler to those ids (a datalist split); `rank`/`world_size` default to
    the process group; `epochs=None` streams forever; `matcher` is anything with the
    `Matcher.match` signature (default: a `Matcher` with the config's window and candidates, built
    lazily in each worker).
    """

    def __init__(self, cache_dir, embed_dir=None, config: SamplerConfig | None = None, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, cases: list[str] | None = None,
                 epochs: int | None = None, matcher=None):
        self.cache_dir = cache_dir
        self.embed_dir = embed_dir
        self.config = config or SamplerConfig()
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.rank = dist.rank() if rank is None else int(rank)
        self.world_size = dist.world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
        self.epochs = epochs
        self.batch_block = 1  # consecutive samples one worker makes; PairLoader sets the batch size
        self._matcher = matcher
        ids = list_cases(cache_dir) if cases is None else list(cases)
        self.cases, self.skipped = usable_cases(cache_dir, embed_dir, ids, self.config.max_bad_fraction,
                                                show=self.rank == 0)
        self._case_pos = {cid: i for i, cid in enumerate(self.cases)}
        self.shard_size = len(self.cases) // self.world_size
        if self.shard_size < 1:
            raise UserError(f"{cache_dir}: {len(self.cases)} usable cases cannot be shared by "
                            f"world_size={self.world_size} ranks")
        self.samples_per_epoch = self.shard_size * self.config.samples_per_case
        self._next = 0  # stream index of the next sample this process hands out
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._counts["score_sum"] = 0.0
        self._open: OrderedDict = OrderedDict()
        self._body: dict[str, np.ndarray] = {}
        self._augment = None
        self._perm_cache: tuple[int, list[str]] | None = None
        self._levels = (LevelPrior.load(embed_dir, self.config.body_hu)
                        if embed_dir is not None and self.config.level_prior_mm > 0 else None)

    # ---- setup ---------------------------------------------------------------------------------
    @property
    def matcher(self):
        """The SAM matcher of this process, built on first use (inside each DataLoader worker)."""
        if self._matcher is None:
            self._matcher = Matcher(self.embed_dir, window=self.config.match_window,
                                    candidates=self.config.match_candidates)
        return self._matcher

    def _case(self, case_id: str):
        """Open cached volume from a small per-process LRU."""
        case = self._open.get(case_id)
        if case is None:
            case = open_case(self.cache_dir, case_id)
            self._open[case_id] = case
            while len(self._open) > OPEN_CASES:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(case_id)
        return case

    def _body_cells(self, case) -> np.ndarray:
        """Flat voxel indices (int64) of body voxels on the `body_stride` grid, listed once
        per process; a fixed subset of at most `body_points`, seeded by the case id so every worker
        and every resume sees the same list."""
        cells = self._body.get(case.case_id)
        if cells is None:
            ijk = body_voxels(case.array, self.config.body_stride, self.config.body_hu)  # [M, 3]
            if len(ijk) > self.config.body_points:
                pick = np.random.default_rng(zlib.crc32(case.case_id.encode())).choice(
                    len(ijk), self.config.body_points, replace=False)
                ijk = ijk[np.sort(pick)]
            cells = np.ravel_multi_index(ijk.T, case.shape)
            self._body[case.case_id] = cells
        return cells

    def _body_points(self, case, k: int, rng: np.random.Generator) -> np.ndarray:
        """k random body points of `case` in world mm `[k, 3]` (voxel centres)."""
        cells = self._body_cells(case)
        ijk = np.stack(np.unravel_index(cells[rng.integers(len(cells), size=k)], case.shape), 1)  # [k, 3]
        ijk = np.minimum(ijk + rng.integers(self.config.body_stride, size=(k, 3)), np.asarray(case.shape) - 1)
        return case.voxel_to_world(ijk)

    # ---- one sample ----------------------------------------------------------------------------
    def _epoch_cases(self, epoch: int) -> list[str]:
        """This rank's shard of query cases for `epoch` (disjoint across ranks)."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.cases))
            shard = order[self.rank * self.shard_size:(self.rank + 1) * self.shard_size]
            self._perm_cache = (epoch, [self.cases[i] for i in shard])
        return self._perm_cache[1]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, index])

    def sample(self, index: int) -> dict:
        """Sample `index` of this rank's stream (a pure function of seed, rank, index and the data)."""
        epoch, pos = divmod(index, self.samples_per_epoch)
        shard = self._epoch_cases(epoch)
        case_a = shard[pos % self.shard_size]
        rng = self._rng(index)
        c = self.config
        if c.pairing == "intra" or self.embed_dir is None:
            return self._intra(case_a, self._body_points(self._case(case_a), 1, rng)[0], 0, rng, index)
        if c.pairing == "random":
            case_b = self._partner(case_a, rng)
            return self._inter(case_a, case_b, self._body_points(self._case(case_a), 1, rng)[0],
                               self._body_points(self._case(case_b), 1, rng)[0], 0.0, "random", 0, rng, index)
        calls = RETRY_CALLS if c.fallback == "retry" else c.max_retries + 1
        best = None  # (score, partner, query point, match) of the best candidate that did not pass
        for attempt in range(calls):
            case_b = self._partner(case_a, rng)
            points = self._body_points(self._case(case_a), c.num_candidates, rng)
            out, miss = self._match(case_a, case_b, points, rng, index, tries=attempt + 1)
            if out is not None:
                return out
            if best is None or miss[0] > best[0]:
                best = miss
        return self._fallback(case_a, best, calls, rng, index)

    def pair(self, query_case: str, points_mm, key_case: str | None = None, index: int = 0) -> dict:
        """A sample from given candidate points of `query_case` (world mm `[K, 3]`) matched into
        `key_case` (random when None) in one matcher call; the `fallback` of the config (at the first
        point for `intra`) when no candidate reaches the threshold. Randomness from (seed, rank,
        index)."""
        for cid in (query_case, key_case):
            if cid is not None and cid not in self._case_pos:
                raise ValueError(f"case {cid!r} is not among the sampler's usable cases")
        rng = self._rng(index)
        points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        if self.embed_dir is None:
            return self._intra(query_case, points[0], 0, rng, index)
        case_b = key_case if key_case is not None else self._partner(query_case, rng)
        out, miss = self._match(query_case, case_b, points, rng, index, tries=1)
        return out if out is not None else self._fallback(query_case, miss, 1, rng, index, point=points[0])

    def _partner(self, case_a: str, rng: np.random.Generator) -> str:
        j = int(rng.integers(len(self.cases) - 1))
        return self.cases[j + (j >= self._case_pos[case_a])]  # uniform over cases != A

    def _match(self, case_a: str, case_b: str, points: np.ndarray, rng: np.random.Generator, index: int,
               tries: int) -> tuple[dict | None, tuple | None]:
        """One matcher call (and the cycle check's calls back): (the inter sample of a candidate drawn uniformly
        among those that pass, None), or (None, (score, case_b, point, match) of the best-scoring one)."""
        if self._levels is not None and self._levels.connects(case_a, case_b):
            return self._match_with_prior(case_a, case_b, points, rng, index, tries)
        matched, scores = self.matcher.match(case_a, case_b, points)
        passing = np.flatnonzero(scores >= self.config.score_threshold)
        i = first_consistent(self.matcher, case_a, case_b, points, matched, rng.permutation(passing),
                             self.config.cycle_mm)
        if i is None:
            i = int(np.argmax(scores))
            return None, (float(scores[i]), case_b, points[i], matched[i])
        return self._inter(case_a, case_b, points[i], matched[i], float(scores[i]), "inter", tries, rng, index), None

    def _match_with_prior(self, case_a: str, case_b: str, points: np.ndarray, rng: np.random.Generator,
                          index: int, tries: int) -> tuple[dict | None, tuple | None]:
        """`_match` for cases the levels connect (`accept.match_at_prior`)."""
        known, matched, scores, passing = match_at_prior(self.matcher, self._levels, self._case(case_a),
                                                         self._case(case_b), points, self.config.score_threshold,
                                                         self.config.level_prior_mm)
        if len(passing):
            i = int(rng.choice(passing))
            return self._inter(case_a, case_b, points[known[i]], matched[i], float(scores[i]), "inter", tries,
                               rng, index), None
        if len(known) == 0:  # no candidate at a level B shows: the plain match, for the fallback only
            (matched, scores), known = self.matcher.match(case_a, case_b, points[:1]), np.zeros(1, dtype=np.int64)
        i = int(np.argmax(scores))
        return None, (float(scores[i]), case_b, points[known[i]], matched[i])

    def _fallback(self, case_a: str, best: tuple, tries: int, rng: np.random.Generator, index: int,
                  point=None) -> dict:
        """No candidate passed in `tries` matcher calls: an intra pair (at `point`, or a new body
        point) or, for `best` and `retry`, the best match found anyway (kind "best")."""
        if self.config.fallback == "intra":
            point = self._body_points(self._case(case_a), 1, rng)[0] if point is None else point
            return self._intra(case_a, point, tries, rng, index)
        score, case_b, q_point, a_point = best
        return self._inter(case_a, case_b, q_point, a_point, score, "best", tries, rng, index)

    def _inter(self, case_a: str, case_b: str, q_point, a_point, score: float, kind: str, tries: int,
               rng: np.random.Generator, index: int) -> dict:
        """A crop around `q_point` in case A and one around `a_point` in case B (world mm)."""
        qa, kb = self._case(case_a), self._case(case_b)
        q_center, a_center = _snap(qa, q_point), _snap(kb, a_point)
        query = self._augmented(self._window(qa, q_center), rng)
        anchor = self._augmented(self._window(kb, a_center), rng)
        return self._pack(query, anchor, q_center, a_center, case_a, case_b, score, kind, tries, rng, index)

    def _intra(self, case_a: str, point_mm, tries: int, rng: np.random.Generator, index: int) -> dict:
        """Two augmentations of one crop of case A."""
        qa = self._case(case_a)
        center = _snap(qa, point_mm)
        crop = self._window(qa, center)
        query = self._augmented(crop, rng)
        anchor = self._augmented(crop.clone(), rng)  # two tensors even when augmentation is off
        return self._pack(query, anchor, center, center, case_a, case_a, 1.0, "intra", tries, rng, index)

    def _window(self, case, center_mm: np.ndarray) -> torch.Tensor:
        r = self.config.roi
        crop = case.crop(center_mm, (r, r, r), pad_value=int(self.config.pad_hu))  # int16 [R, R, R]
        lo, hi = self.config.hu_window
        return torch.from_numpy(hu_window(crop, lo, hi))[None]  # [R, R, R] -> [1, R, R, R]

    def _augmented(self, crop: torch.Tensor, rng: np.random.Generator) -> tuple:
        """(view, clean view or None, None) augmented here, or (crop, None, drawn parameters) for
        `augment_on="device"` (`auto` augments here: only a trainer can apply parameters on its
        device). The clean view (no noise: the reconstruction target) comes along when views are
        noised."""
        if self.config.augment_on == "device":
            return crop, None, self.augment.draw(rng)
        params = self.augment.draw(rng)
        if self.noised:
            view, clean = self.augment.apply(crop, params, with_clean=True)
            return view, clean, None
        return self.augment.apply(crop, params), None, None

    @property
    def noised(self) -> bool:
        """Whether the views get noise (then each sample also carries its clean views)."""
        return self.config.augment and self.config.noise_std > 0

    @property
    def augment(self) -> ViewAugment:
        if self._augment is None:
            c = self.config
            on = float(c.augment)  # off: every magnitude 0, nothing is drawn
            self._augment = ViewAugment(c.rotation * on, c.rotation_prob, c.noise_std * on, c.intensity_scale * on,
                                        c.intensity_shift * on)
        return self._augment

    def _pack(self, query, anchor, q_center, a_center, case_a, case_b, score, kind, tries, rng, index) -> dict:
        """query, anchor: (view, clean view or None, parameters or None) from `_augmented`."""
        c = self.config
        block = c.mask_block_tokens
        params = {aug_key(v, k): t for v, (_, _, p) in zip(VIEWS, (query, anchor)) if p is not None
                  for k, t in p.items()}
        clean = {f"{v}_target": t for v, (_, t, _) in zip(VIEWS, (query, anchor)) if t is not None}
        return {
            "query": query[0], "anchor": anchor[0], **clean, **params,
            "query_mask": torch.from_numpy(block_mask(c.grid, c.mask_ratio, block, rng)),
            "anchor_mask": torch.from_numpy(block_mask(c.grid, c.mask_ratio, block, rng)),
            "score": score,
            "query_center_mm": torch.from_numpy(np.asarray(q_center, dtype=np.float64)),
            "anchor_center_mm": torch.from_numpy(np.asarray(a_center, dtype=np.float64)),
            "query_case": case_a, "anchor_case": case_b, "kind": kind, "tries": tries, "index": index,
        }

    # ---- iteration, state, counters -----------------------------------------------------------
    def _end(self) -> int | None:
        return None if self.epochs is None else self.epochs * self.samples_per_epoch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            keep_freed_memory(WORKER_MMAP_THRESHOLD)
        start, end, b = self._next, self._end(), self.batch_block
        k = worker  # block k holds stream indices start + k*b ... start + (k+1)*b - 1
        while True:
            first = start + k * b
            for index in range(first, first + b):
                if end is not None and index >= end:
                    return
                item = self.sample(index)
                if info is None:  # in the main process the position and counters are ours to keep
                    self._next = index + 1
                    self._record([item["kind"]], [item["score"]], [item["tries"]])
                yield item
            k += workers

    def _record(self, kinds, scores, tries) -> None:
        c = self._counts
        for kind, score, t in zip(kinds, scores, tries):
            c["samples"] += 1
            c[kind] += 1
            c["matcher_calls"] += int(t)
            if kind == "inter":
                c["score_sum"] += float(score)
            if t > 0 and kind != "inter":  # matched, nothing passed: an intra or best-anyway sample
                c[f"fallback_{kind}"] += 1

    def consumed(self, batch: dict) -> None:
        """Account for a collated batch made by DataLoader workers (PairLoader calls this)."""
        n = len(batch["kind"])
        self._next = int(batch["index"][-1]) + 1 if n else self._next
        self._record(batch["kind"], batch["score"].tolist(), batch["tries"].tolist())

    def stats(self) -> dict:
        """Counters over the samples handed out so far by this process (or its PairLoader): samples of
        each kind (`inter`: a SAM match that passed; `best`: a match below the threshold taken by the
        fallback; `intra`; `random`), `fallback_intra` / `fallback_best` (samples that matched and
        fell back), `acceptance_rate` = inter / samples that tried matching, `call_acceptance_rate`
        = inter / matcher calls, `mean_score` over inter pairs, `retries` = matcher calls beyond the
        first of each matched sample, `skipped_cases`. A rate with nothing to count yet is None, so
        the dict stays valid JSON."""
        c = self._counts
        matched = c["inter"] + c["fallback_intra"] + c["fallback_best"]
        return {
            **{k: c[k] for k in ("samples", "inter", "best", "intra", "random", "fallback_intra", "fallback_best",
                                 "matcher_calls")},
            "retries": c["matcher_calls"] - matched,
            "acceptance_rate": c["inter"] / matched if matched else None,
            "call_acceptance_rate": c["inter"] / c["matcher_calls"] if c["matcher_calls"] else None,
            "mean_score": c["score_sum"] / c["inter"] if c["inter"] else None,
            "skipped_cases": len(self.skipped),
        }

    def state_dict(self) -> dict:
        """Position of the next sample: JSON-serialisable, restored by `load_state_dict`."""
        epoch, position = divmod(self._next, self.samples_per_epoch)
        return {"epoch": epoch, "position": position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "samples_per_epoch": self.samples_per_epoch,
                "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the exact stream of the saved state. Only the position is restored; a changed
        seed, world size or case count cannot continue the same stream, so it restarts the saved
        epoch with a warning."""
        same = (state.get("seed") == self.seed and state.get("world_size") == self.world_size
                and state.get("samples_per_epoch") == self.samples_per_epoch)
        epoch, position = int(state["epoch"]), int(state["position"])
        if not same:
            warn(f"pair sampler state from seed={state.get('seed')}, world_size={state.get('world_size')}, "
                 f"samples_per_epoch={state.get('samples_per_epoch')} differs from this run's "
                 f"({self.seed}, {self.world_size}, {self.samples_per_epoch}); restarting epoch {epoch}")
            position = 0
        if not 0 <= position < self.samples_per_epoch:
            raise ValueError(f"sampler position must be in [0, {self.samples_per_epoch}), got {position}")
        self._next = epoch * self.samples_per_epoch + position


def _snap(case, point_mm) -> np.ndarray:
    """World mm of the voxel nearest to `point_mm` (where `crop` centres), float64 [3]."""
    return case.voxel_to_world(np.rint(case.world_to_voxel(point_mm)))[0]
