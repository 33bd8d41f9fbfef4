"""Coarse-to-fine SAM matching (DESIGN §5): where in case B is the point p of case A?

sim(p, q) = (cos_fine(p, q) + cos_coarse(p, q)) / 2. The argmax is found in two steps: the
coarse grid of the key case (a few thousand voxels, held in memory) gives a coarse argmax; the
fine grid is then searched only in a window of `window` fine voxels around it, read from the file
with `get_slice`. All query points go through one matrix product per step. The reference code
instead ran a full-volume search up to 101 times per training step.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from alice_ds.sam import DEFAULT_WINDOW
from alice_ds.sam.geometry import index_to_world, sample_channels_last, world_to_index
from alice_ds.sam.io import EmbeddingFile, open_embedding

DEFAULT_CACHE = 64
"""Coarse grids kept per process (a 400 mm CT at coarse stride 16 is ~13^3 x 128 fp32 = 1 MB)."""
POINTS_PER_CHUNK = 16
"""Query points per fine-window product: bounds memory at 2 x 16 x 20^3 x 128 x 4 B = 130 MB
(fine window + interpolated coarse)."""


class Matcher:
    """Matches world-mm points of a query case into a key case. Files are opened lazily and only
    header + coarse grid are cached (LRU per process), so one instance built before a DataLoader
    forks can be used in every worker."""

    def __init__(self, embed_dir, window: int = DEFAULT_WINDOW, cache_size: int = DEFAULT_CACHE):
        if window < 1:
            raise ValueError(f"window must be >= 1 fine voxel, got {window}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.embed_dir = embed_dir
        self.window = int(window)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[EmbeddingFile, torch.Tensor]] = OrderedDict()

    def _load(self, case_id: str) -> tuple[EmbeddingFile, torch.Tensor]:
        """(file, coarse grid float32 [Xc, Yc, Zc, 128]) from the LRU, loading on a miss."""
        hit = self._cache.get(case_id)
        if hit is not None:
            self._cache.move_to_end(case_id)
            return hit
        ef = open_embedding(self.embed_dir, case_id)
        entry = (ef, ef.coarse())
        self._cache[case_id] = entry
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return entry

    def query_features(self, case_id: str, points_mm) -> tuple[torch.Tensor, torch.Tensor]:
        """Trilinear fine and coarse embeddings of a case at world points -> ([P, 128], [P, 128]),
        re-normalised. Only the 2x2x2 fine neighbourhood of each point is read."""
        ef, coarse = self._load(case_id)
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        shape = np.asarray(ef.fine_shape)
        ijk = np.clip(world_to_index(ef.fine_affine, pts), 0, shape - 1)
        lo = np.minimum(np.floor(ijk).astype(int), np.maximum(shape - 2, 0))
        fine = []
        for p in range(len(pts)):
            block = ef.fine_window(lo[p], lo[p] + 2)  # [<=2, <=2, <=2, 128]
            local = torch.from_numpy(ijk[p] - lo[p]).float()[None]
            fine.append(sample_channels_last(block, local))
        qf = torch.cat(fine) if fine else torch.zeros(0, coarse.shape[-1])
        cijk = torch.from_numpy(world_to_index(ef.coarse_affine, pts)).float()
        qc = sample_channels_last(coarse, cijk)
        return F.normalize(qf, dim=1), F.normalize(qc, dim=1)

    def match(self, query_case: str, key_case: str, points_mm) -> tuple[np.ndarray, np.ndarray]:
        """Match world points [P, 3] of `query_case` into `key_case`.

        Returns (matched_mm [P, 3] float64 at fine-voxel centres of the key case, scores [P] float32
        = the combined similarity at the match, in [-1, 1])."""
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        if len(pts) == 0:
            return np.zeros((0, 3)), np.zeros(0, dtype=np.float32)
        qf, qc = self.query_features(query_case, pts)
        ef, kcoarse = self._load(key_case)
        cshape = kcoarse.shape[:3]
        sim_c = qc @ kcoarse.reshape(-1, kcoarse.shape[-1]).T  # [P, Nc]
        best_c = np.stack(np.unravel_index(sim_c.argmax(1).numpy(), cshape), axis=1)  # [P, 3]
        centre = np.rint(world_to_index(ef.fine_affine, index_to_world(ef.coarse_affine, best_c)))
        matched, scores = [], []
        for s in range(0, len(pts), POINTS_PER_CHUNK):
            sl = slice(s, s + POINTS_PER_CHUNK)
            m, sc = self._fine_search(ef, kcoarse, centre[sl], qf[sl], qc[sl])
            matched.append(m)
            scores.append(sc)
        return np.concatenate(matched), np.concatenate(scores).astype(np.float32)

    def _fine_search(self, ef: EmbeddingFile, kcoarse: torch.Tensor, centre: np.ndarray,
                     qf: torch.Tensor, qc: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Fine argmax of (cos_fine + cos_coarse) / 2 in a window around each coarse argmax.
        centre [P, 3] fine indices; qf, qc [P, 128] query embeddings; kcoarse [Xc, Yc, Zc, 128]."""
        shape = np.asarray(ef.fine_shape)
        size = np.minimum(self.window, shape)  # same window size for every point -> one product
        lo = np.clip(centre.astype(int) - size // 2, 0, shape - size)  # [P, 3]
        box_lo, box_hi = lo.min(0), (lo + size).max(0)
        if np.prod(box_hi - box_lo) <= len(lo) * np.prod(size):
            # one read covering every window, kept fp16 until the windows are cut out of it
            box = ef.fine_window(box_lo, box_hi, dtype=torch.float16)
            wins = [box[a:a + size[0], b:b + size[1], c:c + size[2]]
                    for a, b, c in lo - box_lo]
        else:
            wins = [ef.fine_window(lo_p, lo_p + size, dtype=torch.float16) for lo_p in lo]
        windows = torch.stack(wins).float().reshape(len(lo), -1, qf.shape[1])  # [P, wx, wy, wz, C] -> [P, W, C]
        sim_f = torch.bmm(windows, qf[:, :, None])[..., 0]  # [P, W]
        # coarse embedding of the key at each window voxel: trilinear, re-normalised (as the query's)
        local = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
        fine_ijk = lo[:, None, :] + local[None]  # [P, W, 3]
        cijk = world_to_index(ef.coarse_affine, index_to_world(ef.fine_affine, fine_ijk.reshape(-1, 3)))
        kc = F.normalize(sample_channels_last(kcoarse, torch.from_numpy(cijk).float()), dim=1)
        sim_cw = torch.bmm(kc.view(len(lo), -1, qc.shape[1]), qc[:, :, None])[..., 0]  # [P*W, C] -> [P, W]
        combined = (sim_f + sim_cw) / 2
        score, arg = combined.max(1)
        best = fine_ijk[np.arange(len(lo)), arg.numpy()]
        return index_to_world(ef.fine_affine, best), score.numpy()
