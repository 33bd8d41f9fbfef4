"""SAM-conditioned pair sampler (DESIGN §4 steps 1-3): the loader that crafts Alice's two views.

For a query case A (this rank's shard of the epoch) K candidate points are drawn inside A's body and
matched into a random partner case B != A with ONE `Matcher.match` call; the best candidate whose
score (mean of fine and coarse cosine similarity) reaches the threshold becomes the pair: a crop
around it in A (the *query* view) and one around its match in B (the *anchor* view). When no
candidate reaches the threshold, a new partner and new candidates are tried, up to `max_retries`
times; then the sample falls back to *intra*: two augmentations of one crop of A (counted).
`embed_dir=None` makes every sample intra (ablations, smoke tests of the engine).

Augmentation runs where `SamplerConfig.augment_on` says: in the worker (each view augmented on the CPU,
~28 ms of one core per 96^3 view) or on the training device: the worker draws the same parameters
from the same generator and ships them with the un-augmented crops; the trainer calls
`apply_device_augment(batch)` once the batch is on its device (one batched `grid_sample`).

Reproducibility. Sample n of rank r's stream (n counts from 0 over all epochs) is a pure function of
(seed, r, n) and the data: its query case comes from a per-epoch permutation seeded by (seed, epoch),
every random draw (candidates, partner, augmentation, masks) from a generator seeded by
(seed, r, n). The DataLoader worker that makes sample n is itself a function of n (batches go to
workers round-robin), so the stream is the same for any number of workers, and resuming is setting
n. Use `PairLoader` to iterate with workers: it keeps the main process's copy of the position and
the counters up to date.

Sharding. Each epoch the valid cases are permuted (same permutation on every rank) and cut into
`world_size` disjoint, equal shards (the remainder of `num_cases % world_size` sits out that
epoch), so every rank runs the same number of steps.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from alice_ds import dist
from alice_ds.console import progress, warn
from alice_ds.data.cache import body_voxels, hu_window, list_cases, open_case
from alice_ds.errors import DataError, UserError
from alice_ds.sam.io import open_embedding
from alice_ds.sam.matcher import Matcher
from alice_ds.sampler.augment import ViewAugment
from alice_ds.sampler.config import SamplerConfig
from alice_ds.sampler.loader import tune_worker_allocator
from alice_ds.sampler.masks import block_mask
from alice_ds.views import VIEWS

OPEN_CASES = 64
"""Cached volumes kept open (memory maps) per process; a map holds a file descriptor."""


class PairDataset(IterableDataset):
    """Infinite (or `epochs`-long) stream of Alice pair samples for one rank; see the module doc.

    Each sample is a dict (docs/interfaces.md): `query`, `anchor` float32 [1, R, R, R] in [0, 1];
    `query_mask`, `anchor_mask` bool [R/p]^3 (True = masked); `score` float (1.0 for intra: the same
    anatomy); `query_center_mm`, `anchor_center_mm` float64 [3] (world mm of the crops' centre
    voxels); `query_case`, `anchor_case` str; `kind` "inter" | "intra"; `tries` int (matcher calls
    made for the sample, 0 without embeddings); `index` int (position in the rank's stream).

    With `config.augment_on="device"`, `query`/`anchor` are the un-augmented crops and each view's
    drawn augmentation comes along (`alice_ds.sampler.augment.AugmentParams`): `<view>_aug_rot`
    float64 [3, 3] (identity = not rotated), `<view>_aug_noise_seed` int64, `<view>_aug_noise_std`,
    `<view>_aug_scale`, `<view>_aug_shift` float64 (0 = off), for view in query, anchor;
    `apply_device_augment` turns a collated batch of these into augmented views.

    `cases` restricts the sampler to those ids (a datalist split); `rank`/`world_size` default to
    the process group; `epochs=None` streams forever; `matcher` is anything with the
    `Matcher.match` signature (default: `Matcher(embed_dir, window=config.match_window,
    candidates=config.match_candidates)`, built
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
        self.skipped: dict[str, str] = {}
        self.cases = self._valid_cases(list_cases(cache_dir) if cases is None else list(cases))
        self._case_pos = {cid: i for i, cid in enumerate(self.cases)}
        self.shard_size = len(self.cases) // self.world_size
        if self.shard_size < 1:
            raise UserError(f"{cache_dir}: {len(self.cases)} usable cases cannot be shared by "
                            f"world_size={self.world_size} ranks")
        self.samples_per_epoch = self.shard_size * self.config.samples_per_case
        self._next = 0  # stream index of the next sample this process hands out
        self._counts = dict(samples=0, inter=0, intra=0, fallbacks=0, matcher_calls=0, score_sum=0.0)
        self._open: OrderedDict = OrderedDict()
        self._body: dict[str, np.ndarray] = {}
        self._augment = None
        self._perm_cache: tuple[int, list[str]] | None = None

    # ---- setup ---------------------------------------------------------------------------------
    def _valid_cases(self, ids: list[str]) -> list[str]:
        if not ids:
            raise UserError(f"{self.cache_dir}: no cached cases (run `alice-ds preprocess` first)")
        valid = []
        with progress(disable=self.rank != 0, transient=True) as bar:
            task = bar.add_task("checking cases and embeddings", total=len(ids))
            for cid in ids:
                bar.advance(task)
                try:
                    case = open_case(self.cache_dir, cid)
                except DataError as e:
                    self.skipped[cid] = str(e)
                    continue
                problem = None if self.embed_dir is None else _embedding_problem(self.embed_dir, case)
                if problem is None:
                    valid.append(cid)
                else:
                    self.skipped[cid] = problem
        for cid, why in self.skipped.items():
            warn(f"pair sampler skips case {cid}: {why}")
        bad = len(self.skipped) / len(ids)
        if bad > self.config.max_bad_fraction:
            first = next(iter(self.skipped.items()))
            where = self.embed_dir if self.embed_dir is not None else self.cache_dir
            raise DataError(where, f"{len(self.skipped)} of {len(ids)} cases are unusable ({bad:.0%} > "
                                   f"max_bad_fraction={self.config.max_bad_fraction:.0%}); first: "
                                   f"{first[0]}: {first[1]}")
        if self.embed_dir is not None and len(valid) < 2:
            raise UserError(f"{self.embed_dir}: inter pairs need at least 2 usable cases, got {len(valid)} "
                            "(pass embed_dir=None for intra-only sampling)")
        return valid

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
        if self.embed_dir is None:
            return self._intra(case_a, self._body_points(self._case(case_a), 1, rng)[0], 0, rng, index)
        for attempt in range(self.config.max_retries + 1):
            out = self._try_pair(case_a, None, None, rng, index, tries=attempt + 1)
            if out is not None:
                return out
        return self._intra(case_a, self._body_points(self._case(case_a), 1, rng)[0],
                           self.config.max_retries + 1, rng, index)

    def pair(self, query_case: str, points_mm, key_case: str | None = None, index: int = 0) -> dict:
        """A sample from given candidate points of `query_case` (world mm `[K, 3]`) matched into
        `key_case` (random when None) in one matcher call; intra at the first point when no
        candidate reaches the threshold. Randomness from (seed, rank, index)."""
        for cid in (query_case, key_case):
            if cid is not None and cid not in self._case_pos:
                raise ValueError(f"case {cid!r} is not among the sampler's usable cases")
        rng = self._rng(index)
        points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        out = None
        if self.embed_dir is not None:
            out = self._try_pair(query_case, key_case, points, rng, index, tries=1)
        return out if out is not None else self._intra(query_case, points[0], int(self.embed_dir is not None),
                                                       rng, index)

    def _try_pair(self, case_a: str, case_b: str | None, points: np.ndarray | None,
                  rng: np.random.Generator, index: int, tries: int) -> dict | None:
        """One matcher call: the inter sample of the best candidate, or None below the threshold."""
        if case_b is None:
            j = int(rng.integers(len(self.cases) - 1))
            case_b = self.cases[j + (j >= self._case_pos[case_a])]  # uniform over cases != A
        qa = self._case(case_a)
        if points is None:
            points = self._body_points(qa, self.config.num_candidates, rng)
        matched, scores = self.matcher.match(case_a, case_b, points)
        best = int(np.argmax(scores))
        if not scores[best] >= self.config.score_threshold:
            return None
        kb = self._case(case_b)
        q_center = _snap(qa, points[best])
        a_center = _snap(kb, matched[best])
        query = self._augmented(self._window(qa, q_center), rng)
        anchor = self._augmented(self._window(kb, a_center), rng)
        return self._pack(query, anchor, q_center, a_center, case_a, case_b, float(scores[best]),
                          "inter", tries, rng, index)

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

    def _augmented(self, crop: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict | None]:
        """(view, None) augmented here, or (crop, drawn parameters) for `augment_on="device"` (`auto`
        augments here: only a trainer can apply parameters on its device)."""
        if self.config.augment_on == "device":
            return crop, self.augment.draw(rng)
        return self.augment(crop, rng), None

    @property
    def augment(self) -> ViewAugment:
        if self._augment is None:
            c = self.config
            self._augment = ViewAugment(c.rotation, c.rotation_prob, c.noise_std, c.intensity_scale,
                                        c.intensity_shift)
        return self._augment

    def _pack(self, query, anchor, q_center, a_center, case_a, case_b, score, kind, tries, rng, index) -> dict:
        """query, anchor: (view, parameters or None) from `_augmented`."""
        c = self.config
        block = c.mask_block_tokens
        params = {f"{v}_aug_{k}": t for v, (_, p) in zip(VIEWS, (query, anchor)) if p is not None
                  for k, t in p.items()}
        return {
            "query": query[0], "anchor": anchor[0], **params,
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
            tune_worker_allocator()
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
            c["matcher_calls"] += int(t)
            if kind == "inter":
                c["inter"] += 1
                c["score_sum"] += float(score)
            else:
                c["intra"] += 1
                c["fallbacks"] += int(t > 0)

    def consumed(self, batch: dict) -> None:
        """Account for a collated batch made by DataLoader workers (PairLoader calls this)."""
        n = len(batch["kind"])
        self._next = int(batch["index"][-1]) + 1 if n else self._next
        self._record(batch["kind"], batch["score"].tolist(), batch["tries"].tolist())

    def stats(self) -> dict:
        """Counters over the samples handed out so far by this process (or its PairLoader):
        `acceptance_rate` = inter / samples that tried matching (1 - fallback rate),
        `call_acceptance_rate` = inter / matcher calls, `mean_score` over inter pairs, `retries` =
        matcher calls beyond the first of each sample, `skipped_cases`. A rate with nothing to count
        yet (no matcher call, no inter pair) is None, so the dict stays valid JSON."""
        c = self._counts
        matched = c["inter"] + c["fallbacks"]
        return {
            "samples": c["samples"], "inter": c["inter"], "intra": c["intra"], "fallbacks": c["fallbacks"],
            "matcher_calls": c["matcher_calls"], "retries": c["matcher_calls"] - matched,
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


def _embedding_problem(embed_dir, case) -> str | None:
    """Why the case's embedding file cannot be used with its cached volume, or None when it can."""
    try:
        ef = open_embedding(embed_dir, case.case_id)
    except DataError as e:
        return e.problem
    if ef.case_id != case.case_id:
        return f"embedding file belongs to case {ef.case_id!r}"
    return ef.coverage_problem(case.affine, case.shape)
