"""Coarse-to-fine SAM matching (DESIGN §5): where in case B is the point p of case A?

sim(p, q) = (cos_fine(p, q) + cos_coarse(p, q)) / 2. The argmax is found in two steps: the
coarse grid of the key case (a few thousand voxels, held in memory) gives a coarse argmax; the
fine grid is then searched only in a window of `window` fine voxels around it, read from a memory
map of the file (only the window's pages are touched; no fine grid is copied). All query points go
through one coarse matrix product; each point's window through one matrix-vector product. The
reference code instead ran a full-volume search up to 101 times per training step.

The window search visits the windows of the `candidates` best coarse voxels (each more than one
coarse voxel from the others; DEFAULT_CANDIDATES) and keeps the best (fine + coarse) / 2 among
them: a coarse argmax at the wrong body level, common with a weak coarse half, no longer decides
the match alone. `candidates=1` is a single coarse argmax; the
reference SAM's own inference is the global search below.

`search="global"` scores (fine + coarse) / 2 at every fine voxel of the key case instead (the fine
grid streamed from the memory map in slabs of GLOBAL_SLAB_PLANES), without trusting the coarse
argmax, as the reference SAM's own inference does. Its fine term compares a *template*: the query
point and its six neighbours `context` fine voxels away (`context_steps`), each with the key voxel at
the same offset, averaged over the offsets inside the key's grid. One vector alone is ambiguous in
homogeneous tissue and along the repeated vertebrae; the template is what makes the global search
land (docs/experiments/2026-12-02-sam-matching-and-pair-precision.md). It reads the whole fine
grid of the key case per call, once per template offset (seconds per case pair, vs 0.06 s with the window), so the
pair sampler keeps the window.

Every match but `search="coarse"` ends at the best fine voxel moved by `subvoxel_offsets` (the
vertex of a parabola through the fine cosines of its neighbours, per axis): a 4 mm grid alone
leaves ~2 mm at the median even between identical embeddings.

`search="coarse"` stops after the first step and returns the centre of the coarse argmax voxel with
its coarse cosine: what the coarse half alone says, to tell a weak coarse half from a weak fine one.

Cost on one core (benchmark phantoms, oracle embeddings, 32 points, window 8): ≈ 4.3 ms per call
on SAMNet's 32 mm coarse grid, ≈ 7.5 ms on a 16 mm one (the coarse product scales with the coarse
voxels: ~15k of them ≈ 1.3-1.8 ms); window 20 (`DEFAULT_WINDOW`) ≈ 44 ms on the 16 mm grid.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from alice_ds.sam import DEFAULT_CANDIDATES, DEFAULT_CONTEXT, DEFAULT_WINDOW, SEARCH_MODES
from alice_ds.sam.geometry import index_to_world, normalized_grid, sample_channels_last, world_to_index
from alice_ds.sam.io import EmbeddingFile, open_embedding

DEFAULT_CACHE = 64
"""Coarse grids kept per process (a 400 mm CT at coarse stride 16 is ~13^3 x 128 fp32 = 1 MB, held
twice: as the grid and as the transposed key matrix)."""
POINTS_PER_CHUNK = 64
"""Windows per fine search (points x coarse candidates): bounds its [P, W] similarity and index
arrays (W = window^3 voxels; 64 x 8000 x 3 int64 = 12 MB at the default window). All candidates of a
point go through one search: one coarse interpolation and one argmax for all of them instead of one
per candidate (1.4 ms of overhead each). The fine windows themselves pass one
at a time through a reused buffer (a window of 20^3 x 128 fp32 is 4 MB: a [32, W, 128] stack of
them was 131 MB and memory-bound, 0.4 s per call)."""
CANDIDATE_POOL = 64
"""Best coarse voxels per point from which the candidates are picked (with their neighbours
suppressed, DEFAULT_CANDIDATES fit easily)."""
GLOBAL_SLAB_PLANES = 8
"""x-planes of the fine grid scored at once by the global search: a slab of 8 x 100 x 100 fine voxels
is 41 MB in fp32 and its [64, 80000] similarity block 20 MB."""


class Matcher:
    """Matches world-mm points of a query case into a key case. Files are opened lazily and only
    header + coarse grid are cached (LRU per process; the fine grid is a memory map), so one
    instance built before a DataLoader forks can be used in every worker."""

    def __init__(self, embed_dir, window: int = DEFAULT_WINDOW, cache_size: int = DEFAULT_CACHE,
                 search: str = "window", candidates: int = DEFAULT_CANDIDATES, refine: bool = True,
                 context: int = DEFAULT_CONTEXT, grid_step: int = 1):
        if search not in SEARCH_MODES:
            raise ValueError(f"search must be one of {SEARCH_MODES}, got {search!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1 fine voxel, got {window}")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1 coarse voxel, got {candidates}")
        self.candidates = int(candidates)
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.embed_dir = embed_dir
        self.window = int(window)
        self.cache_size = int(cache_size)
        self.search = search
        self.refine = bool(refine)
        if context < 0:
            raise ValueError(f"context must be >= 0 fine voxels (0: no template), got {context}")
        self.context = int(context)
        if grid_step < 1 or self.context % grid_step:
            raise ValueError(f"grid_step must be >= 1 and divide context={self.context}, got {grid_step}")
        self.grid_step = int(grid_step)
        self._cache: OrderedDict[str, tuple[EmbeddingFile, torch.Tensor, torch.Tensor]] = OrderedDict()

    def _load(self, case_id: str) -> tuple[EmbeddingFile, torch.Tensor, torch.Tensor]:
        """(file, coarse grid float32 [Xc, Yc, Zc, 128], the same as keys [128, Nc] contiguous)
        from the LRU, loading on a miss. The transposed copy makes `q @ keys` 25% faster than
        `q @ coarse.view(-1, 128).T` (1.8 vs 2.4 ms for 32 x 15k, one core)."""
        hit = self._cache.get(case_id)
        if hit is not None:
            self._cache.move_to_end(case_id)
            return hit
        ef = open_embedding(self.embed_dir, case_id)
        coarse = ef.coarse()
        entry = (ef, coarse, coarse.reshape(-1, coarse.shape[-1]).T.contiguous())
        self._cache[case_id] = entry
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return entry

    def query_features(self, case_id: str, points_mm) -> tuple[torch.Tensor, torch.Tensor]:
        """Trilinear fine and coarse embeddings of a case at world points -> ([P, 128], [P, 128]),
        re-normalised. Only the 2x2x2 fine neighbourhood of each point is read (one gather from
        the memory map); points outside the grid take the border value."""
        ef, coarse, _ = self._load(case_id)
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        shape = np.asarray(ef.fine_shape)
        ijk = np.clip(world_to_index(ef.fine_affine, pts), 0, shape - 1)  # [P, 3]
        lo = np.minimum(np.floor(ijk).astype(np.int64), np.maximum(shape - 2, 0))
        frac = ijk - lo  # [P, 3] in [0, 1]; 0 on an axis of one voxel
        hi = np.minimum(lo + 1, shape - 1)
        corner = np.stack(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij"), -1).reshape(8, 3)  # [8, 3]
        idx = np.where(corner[None] == 1, hi[:, None], lo[:, None])  # [P, 8, 3]
        weight = np.where(corner[None] == 1, frac[:, None], 1 - frac[:, None]).prod(-1)  # [P, 8]
        vals = ef.fine_codes((idx[..., 0], idx[..., 1], idx[..., 2])).astype(np.float32)  # codes [P, 8, K]
        qf = ef.decode(np.einsum("pk,pkc->pc", weight.astype(np.float32), vals))  # [P, 128] (decoding is linear)
        cijk = torch.from_numpy(world_to_index(ef.coarse_affine, pts)).float()
        qc = sample_channels_last(coarse, cijk)
        return F.normalize(qf, dim=1), F.normalize(qc, dim=1)

    def match(self, query_case: str, key_case: str, points_mm, centres_mm=None) -> tuple[np.ndarray, np.ndarray]:
        """Match world points [P, 3] of `query_case` into `key_case`.

        Returns (matched_mm [P, 3] float64, scores [P] float32 = the combined similarity at the best
        fine voxel, in [-1, 1]; with search="coarse": coarse-voxel centres and the coarse cosine).
        The match is the best fine voxel's centre moved by `subvoxel_offsets` (at most half a voxel
        per axis) unless the matcher was built with `refine=False`. `centres_mm` [P, 3] (window
        search only): one fine window per point centred there (a prior, `levels.LevelPrior`) instead
        of the windows of the coarse candidates."""
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        if len(pts) == 0:
            return np.zeros((0, 3)), np.zeros(0, dtype=np.float32)
        qf, qc = self.query_features(query_case, pts)
        ef, kcoarse, keys = self._load(key_case)
        cshape = kcoarse.shape[:3]
        sim_c = qc @ keys  # [P, C] @ [C, Nc] -> [P, Nc]
        if self.search == "coarse":
            best_c = np.stack(np.unravel_index(sim_c.numpy().argmax(1), cshape), axis=1)  # [P, 3] (NumPy's
            # argmax: 0.03 ms vs torch's 0.4 ms for [32, 15k] on one core)
            return index_to_world(ef.coarse_affine, best_c), sim_c.numpy().max(1)
        if centres_mm is not None:
            if self.search != "window":
                raise ValueError(f"centres_mm needs search='window', not {self.search!r}")
            centres = np.rint(world_to_index(ef.fine_affine, np.asarray(centres_mm, dtype=np.float64)
                                             .reshape(-1, 3)))[:, None]  # [P, 1, 3] fine indices
        elif self.search == "window":
            cands = coarse_candidates(sim_c.numpy(), cshape, self.candidates)  # [P, K, 3]
            centres = np.rint(world_to_index(ef.fine_affine, index_to_world(ef.coarse_affine, cands.reshape(-1, 3))
                                             )).reshape(cands.shape)  # [P, K, 3] fine indices
        sim_c = sim_c.view(len(pts), 1, *cshape)  # [P, Nc] -> [P, 1, Xc, Yc, Zc]
        if self.search == "global":
            steps = context_steps(self.context)  # [T, 3] fine voxels of the key
            offsets_mm = steps @ ef.fine_affine[:3, :3].T  # [T, 3]: the key's voxel steps in world mm
            qft = self.query_features(query_case, (pts[:, None] + offsets_mm[None]).reshape(-1, 3))[0]
            qft = ef.code_queries(qft.view(len(pts), len(steps), -1))  # [P * T, 128] -> [P, T, K]: the query
            # at each offset, in the key's codes
        qk = ef.code_queries(qf)  # [P, K]: the queries in the key's codes
        matched, scores = [], []
        chunk = max(POINTS_PER_CHUNK // self.candidates, 1) if self.search == "window" else POINTS_PER_CHUNK
        for s in range(0, len(pts), chunk):
            sl = slice(s, s + chunk)
            if self.search == "window":  # every candidate's window in one pass; the first best wins
                k = centres.shape[1]
                centre = centres[sl].reshape(-1, 3)
                mk, sk = self._fine_search(ef, sim_c[sl].repeat_interleave(k, 0), centre,
                                           qk[sl].repeat_interleave(k, 0))  # [p * k, 3] fine indices, [p * k]
                pick = sk.reshape(-1, k).argmax(1)  # [p]
                rows = np.arange(len(pick))
                m, sc = mk.reshape(-1, k, 3)[rows, pick], sk.reshape(-1, k)[rows, pick]
            elif self.grid_step == 1:
                m, sc = self._global_search(ef, kcoarse, qft[sl], qc[sl], steps)
            else:  # every grid_step-th fine voxel along each axis; the template's offsets stay on that grid
                m, sc = self._global_search(StridedFine(ef, self.grid_step), kcoarse, qft[sl], qc[sl],
                                            steps // self.grid_step)
                m = m * self.grid_step
            offset = subvoxel_offsets(ef, m, qk[sl].numpy()) if self.refine else 0.0
            matched.append(index_to_world(ef.fine_affine, m + offset))
            scores.append(sc)
        return np.concatenate(matched), np.concatenate(scores).astype(np.float32)

    def _fine_search(self, ef: EmbeddingFile, sim_c: torch.Tensor, centre: np.ndarray,
                     qf: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Fine argmax of (cos_fine + cos_coarse) / 2 in a window around each coarse argmax -> (fine
        indices [P, 3] int64, scores [P]).
        sim_c [P, 1, Xc, Yc, Zc] coarse cosine of each query with the key's coarse grid; centre
        [P, 3] fine indices; qf [P, K] query fine embeddings in the key's codes (`code_queries`).

        cos_coarse at a fine voxel is the coarse *similarity map* upsampled trilinearly (as the
        reference SAM does), not the cosine of a trilinearly interpolated, re-normalised coarse
        embedding: one scalar per coarse voxel is interpolated instead of 128 channels. The two
        agree at coarse voxel centres and differ in between by the interpolation of a cosine vs the
        cosine of an interpolation (the former is slightly lower between dissimilar neighbours). On
        the benchmark phantoms (oracle embeddings, 12 case pairs x 32 body points, window 8) scores
        drop by 0.012 on average (max 0.031), the fraction >= 0.7 stays 0.72, and the match is the
        same voxel for 74% of the points, 1.2 mm away on average (95th percentile 5.4 mm)."""
        shape = np.asarray(ef.fine_shape)
        size = np.minimum(self.window, shape)  # same window size for every point -> one product
        lo = np.clip(centre.astype(np.int64) - size // 2, 0, shape - size)  # [P, 3]
        buf = torch.empty((*size, ef.channels))  # [wx, wy, wz, K] fp32, reused: stays in cache
        flat = buf.view(-1, ef.channels)  # [W, K]
        sim_f = torch.empty(len(lo), flat.shape[0])  # [P, W]
        norm = torch.empty(len(lo), *size)  # [P, wx, wy, wz]: the keys' decoded norms
        for p, (a, b, c) in enumerate(lo.tolist()):
            box = np.s_[a:a + size[0], b:b + size[1], c:c + size[2]]
            buf.copy_(_as_tensor(ef.fine_codes(box)))  # int8 -> fp32, the window only
            norm[p].copy_(_as_tensor(ef.norm_map()[box]))
            torch.mv(flat, qf[p], out=sim_f[p])  # [W, K] @ [K] -> [W]; one core, W = 8000: torch.mv
            # 0.6 ms at K = 128, NumPy's matmul 11 ms, torch.bmm of all windows at once 1.5 ms per window
        sim_f /= norm.view(len(lo), -1)  # dot products -> cosines (stored norms are >= io.NORM_FLOOR)
        # coarse similarity at each window voxel: trilinear in the coarse map of each point. The fine
        # and coarse grids share their axes, so it is one linear interpolation per axis (border-
        # clamped, as grid_sample with align_corners=True and border padding), three batched
        # products: 0.3 ms for 8 windows of 20^3 instead of grid_sample's 3.2 ms (one core)
        f2c = np.linalg.inv(ef.coarse_affine) @ ef.fine_affine  # fine index -> coarse index, 4x4
        if not np.allclose(f2c[:3, :3], np.diag(np.diag(f2c[:3, :3]))):
            raise ValueError(f"{ef.path}: fine and coarse grids do not share their axes")
        n, (xc, yc, zc) = len(lo), sim_c.shape[2:]
        w = [linear_weights(torch.from_numpy(f2c[a, a] * (lo[:, a:a + 1] + np.arange(size[a])) + f2c[a, 3]).float(),
                            sim_c.shape[2 + a]).transpose(1, 2) for a in range(3)]  # [P, C_a, w_a] per axis
        t = torch.bmm(sim_c.reshape(n, xc * yc, zc), w[2])  # [P, Xc * Yc, wz]
        t = torch.bmm(t.view(n, xc, yc, -1).transpose(2, 3).reshape(n, -1, yc), w[1])  # [P, Xc * wz, wy]
        t = torch.bmm(t.view(n, xc, -1).transpose(1, 2), w[0])  # [P, wz * wy, wx]
        t = t.view(n, size[2], size[1], size[0]).permute(0, 3, 2, 1)  # [P, wx, wy, wz]
        combined = (sim_f + t.reshape(len(lo), -1)) / 2  # [P, W]
        score, arg = combined.max(1)
        return lo + np.stack(np.unravel_index(arg.numpy(), tuple(size)), axis=1), score.numpy()

    def _global_search(self, ef: EmbeddingFile, kcoarse: torch.Tensor, qf: torch.Tensor,
                       qc: torch.Tensor, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Argmax of (cos_fine + cos_coarse) / 2 over every fine voxel of the key case, slab by
        slab of x-planes -> (fine indices [P, 3] int64, scores [P]).

        With a context template (`steps` [T, 3] fine-voxel offsets, the first (0, 0, 0); qf [P, T, C]
        the query's fine embeddings at the same offsets in mm) cos_fine at voxel v is the mean over
        the offsets o with v + o inside the grid of cos(qf[:, o], fine[v + o]): a patch of the query
        compared with a patch of the key, not one vector with one vector. qf is in the key's codes
        (`code_queries`) [P, T, K]; qc [P, 128].

        cos_coarse is the cosine with the key's coarse embedding interpolated trilinearly to the fine
        voxel and re-normalised (the window search interpolates the similarity map instead, which is
        cheaper per query; with a model trained by the held-out protocol at HU window -200..300 the
        global argmax lands within 10 mm for 40.3 % of the landmarks this way and for 29.4 % with the
        interpolated similarity map). kcoarse [Xc, Yc, Zc, C]: the key's coarse grid; qc [P, C]."""
        nx, ny, nz, k = *ef.fine_shape, ef.channels
        channels = kcoarse.shape[-1]
        halo = int(np.abs(steps[:, 0]).max())
        coarse = kcoarse.permute(3, 0, 1, 2)[None]  # [1, C, Xc, Yc, Zc]
        f2c = np.linalg.inv(ef.coarse_affine) @ ef.fine_affine  # fine index -> coarse index, 4x4
        score = torch.full((len(qf),), -float("inf"))
        best = np.zeros((len(qf), 3), dtype=np.int64)
        for a in range(0, nx, GLOBAL_SLAB_PLANES):
            n = min(GLOBAL_SLAB_PLANES, nx - a)
            lo, hi = max(a - halo, 0), min(a + n + halo, nx)
            slab = _as_tensor(ef.fine_codes(np.s_[lo:hi])).float().view(-1, k)  # [(hi - lo) * Yf * Zf, K] fp32,
            # with the halo
            slab /= _as_tensor(ef.norm_map()[lo:hi]).float().view(-1, 1)  # unit keys
            total = torch.zeros(len(qf), n, ny, nz)  # sum of cos_fine over the offsets inside the grid
            count = torch.zeros(1, n, ny, nz)
            for t, (dx, dy, dz) in enumerate(steps.tolist()):
                sim = (qf[:, t] @ slab.T).view(len(qf), hi - lo, ny, nz)  # [P, h, Yf, Zf]
                # voxel v of the slab reads voxel v + o: the part of the slab whose shifted voxel is inside
                x0, x1 = max(a, lo - dx), min(a + n, hi - dx)
                y0, y1, z0, z1 = max(0, -dy), min(ny, ny - dy), max(0, -dz), min(nz, nz - dz)
                if x0 >= x1 or y0 >= y1 or z0 >= z1:
                    continue
                total[:, x0 - a:x1 - a, y0:y1, z0:z1] += sim[:, x0 + dx - lo:x1 + dx - lo, y0 + dy:y1 + dy,
                                                             z0 + dz:z1 + dz]
                count[:, x0 - a:x1 - a, y0:y1, z0:z1] += 1
            ijk = np.stack(np.meshgrid(np.arange(a, a + n), np.arange(ny), np.arange(nz),
                                       indexing="ij"), -1).reshape(-1, 3)  # [W, 3]
            grid = normalized_grid(torch.from_numpy(ijk @ f2c[:3, :3].T + f2c[:3, 3]).float(),
                                   coarse.shape[2:])
            kc = F.grid_sample(coarse, grid.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border",
                               align_corners=True).view(channels, -1)  # [C, W]
            combined = ((total / count).view(len(qf), -1) + qc @ F.normalize(kc, dim=0)) / 2  # [P, W]
            s, arg = combined.max(1)
            better = (s > score).numpy()
            score = torch.maximum(s, score)
            best[better] = ijk[arg.numpy()[better]]
        return best, score.numpy()


class StridedFine:
    """Every `step`-th fine voxel of an embedding file along each axis, with what `_global_search`
    reads of a file: a coarser fine grid (8 mm at step 2) for a global search that needs to find the
    body level, not the last mm, at an eighth of the voxels."""

    def __init__(self, ef: EmbeddingFile, step: int):
        self.ef, self.step = ef, int(step)
        self.fine_shape = tuple(-(-n // self.step) for n in ef.fine_shape)
        self.channels = ef.channels
        self.coarse_affine = ef.coarse_affine
        self.fine_affine = ef.fine_affine @ np.diag([self.step] * 3 + [1.0])  # strided index -> world mm
        self._norm = ef.norm_map()[::self.step, ::self.step, ::self.step]

    def fine_codes(self, index: slice) -> np.ndarray:
        """Codes of the strided x-planes `index` (a slice without step), all y and z: int8 [x, y, z, K]."""
        s = self.step
        return self.ef.fine_codes(np.s_[index.start * s:index.stop * s:s, ::s, ::s])

    def norm_map(self) -> np.ndarray:
        return self._norm


def linear_weights(pos: torch.Tensor, size: int) -> torch.Tensor:
    """Linear interpolation along one axis as weights: positions [P, w] in voxels of an axis of `size`
    voxels, clamped to [0, size - 1] -> [P, w, size] (two non-zeros per row)."""
    pos = pos.clamp(0, size - 1)
    lo = pos.floor().clamp(max=max(size - 2, 0))
    frac = pos - lo
    w = torch.zeros(*pos.shape, size)
    w.scatter_(-1, lo.long()[..., None], (1 - frac)[..., None])
    if size > 1:
        w.scatter_add_(-1, lo.long()[..., None] + 1, frac[..., None])
    return w


def context_steps(context: int) -> np.ndarray:
    """The template of the global search: the point and its six neighbours `context` fine voxels
    away along each grid axis -> int64 [7, 3] (just [[0, 0, 0]] for context 0)."""
    if context == 0:
        return np.zeros((1, 3), dtype=np.int64)
    axes = np.eye(3, dtype=np.int64) * context
    return np.concatenate([np.zeros((1, 3), dtype=np.int64), axes, -axes])


def subvoxel_offsets(ef: EmbeddingFile, best: np.ndarray, qf: np.ndarray) -> np.ndarray:
    """Where between fine voxels the peak lies: per axis, the vertex of the parabola through the fine
    cosine of the query at the best voxel and at its two neighbours on that axis, in voxels, in
    [-0.5, 0.5] (0 where a neighbour is outside the grid or the three values do not curve down).
    ef: the key case's file; best [P, 3] int fine indices, qf [P, K] query embeddings in its codes
    (`EmbeddingFile.code_queries`) -> offsets [P, 3].

    The coarse term is left out: across one fine voxel it is nearly linear and only tilts the
    parabola towards the coarse peak. A 4 mm grid alone puts a match ~2 mm from the point at the
    median; this brings identical embeddings to a fraction of that."""
    shape = np.asarray(ef.fine_shape)
    idx = best[:, None, :] + context_steps(1)[None]  # [P, 7, 3]: the voxel, then +x +y +z, then -x -y -z
    inside = ((idx >= 0) & (idx < shape)).all(-1)  # [P, 7]
    idx = np.clip(idx, 0, shape - 1)
    vals = ef.fine_codes((idx[..., 0], idx[..., 1], idx[..., 2])).astype(np.float32)  # [P, 7, K]
    norm = ef.norm_map()[idx[..., 0], idx[..., 1], idx[..., 2]].astype(np.float32)  # [P, 7]
    s = np.einsum("pkc,pc->pk", vals, np.asarray(qf, dtype=np.float32)) / norm  # [P, 7]
    plus, minus = s[:, 1:4], s[:, 4:7]  # [P, 3] each
    curve = plus - 2 * s[:, :1] + minus  # [P, 3]: 2a of the parabola a t^2 + b t + c
    ok = inside[:, 1:4] & inside[:, 4:7] & (curve < 0)
    return np.where(ok, np.clip(0.5 * (minus - plus) / np.where(ok, curve, -1.0), -0.5, 0.5), 0.0)


def coarse_candidates(sim_c: np.ndarray, cshape, k: int) -> np.ndarray:
    """Up to `k` coarse voxels per point by descending similarity, each more than one coarse voxel
    (Chebyshev) from those taken before it: sim_c [P, Nc] over the key's coarse grid of shape
    `cshape` -> coarse indices [P, k, 3] (the first one the argmax; a point with fewer distinct
    peaks in its pool repeats its last candidate)."""
    pool = min(CANDIDATE_POOL, sim_c.shape[1])
    top = np.argpartition(-sim_c, pool - 1, axis=1)[:, :pool]  # [P, pool], unordered
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sim_c, top, 1), axis=1), 1)
    ijk = np.stack(np.unravel_index(top, cshape), axis=-1)  # [P, pool, 3]
    out = np.empty((len(sim_c), k, 3), dtype=np.int64)
    for p in range(len(sim_c)):
        free = np.ones(pool, dtype=bool)
        j = 0
        for n in range(k):
            if free.any():
                j = int(np.argmax(free))  # the most similar voxel not suppressed yet
                free &= np.abs(ijk[p] - ijk[p, j]).max(1) > 1
            out[p, n] = ijk[p, j]
    return out


def _as_tensor(mapped: np.ndarray) -> torch.Tensor:
    """A read-only memory map as a tensor without a copy, for reading only. (torch warns that it
    cannot protect a non-writable array; nothing here writes. Copying windows with torch was 5x
    faster than NumPy's cast in the fp16 format: 0.8 vs 4.6 ms for 32 windows of 8^3 x 128.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(mapped)
