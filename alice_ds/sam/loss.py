"""SAM self-supervised losses (Yan et al., TMI 2022, §III-B): InfoNCE over voxel pairs of two views
of one volume that sit at the same world position.

- fine: query = fine embedding of view 1 at a positive voxel, positive = fine embedding of view 2 at
  the same world point (trilinear), negatives = the hardest of N_CANDIDATES random view-2 voxels by
  (fine + coarse) similarity, excluding those within FINE_EXCLUDE_MM of the positive;
- coarse: query = coarse embedding of view 1 at the point, positive = coarse embedding of view 2
  there, negatives = every coarse voxel of every view *of the same case* in the batch farther than
  COARSE_POSITIVE_MM from the point (several view pairs per case teach position across the whole
  body), plus, with `cross_case`, every coarse voxel of the other cases' views (the reference's
  choice; on phantoms it teaches the coarse embedding to tell subjects apart, see
  docs/experiments/2026-11-26-sam-coarse-half-tries.md).

`coarse_rule="reference"` is the reference SAM's coarse loss instead (`sam-train --recipe reference`):
negatives = the coarse voxels of the pair's two views farther than REFERENCE_COARSE_IGNORE_MM, the
REFERENCE_COARSE_HARD hardest of them then a random REFERENCE_COARSE_KEPT, plus
REFERENCE_COARSE_OTHERS random coarse voxels of the other cases' views. A pair whose views do not
overlap (the reference's disjoint pairs) then still counts: each query of view 1 is its own positive
(fine and coarse), and everything of view 2 is a negative."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from alice_ds.sam.crops import View, positive_pairs
from alice_ds.sam.geometry import index_to_world, sample_channels_first, scaled_affine, world_to_index
from alice_ds.sam.network import COARSE_STRIDE

TEMPERATURE = 0.5
N_POSITIVES = 100
N_CANDIDATES = 2000
N_HARD = 500
"""Reference SAM: 100 positives, 2000 negative candidates, the 500 hardest kept."""
FINE_EXCLUDE_MM = 8.0
"""Candidates closer than this to the positive are not negatives (two fine voxels at 4 mm)."""
COARSE_POSITIVE_MM = 64.0
"""Coarse voxels within this distance are not negatives. Not the reference's rule: it takes as the
positive the nearest coarse voxel within 25 mm with |dz| < 6-8 mm and spares only voxels closer than 5 mm
from the negatives (its `coarse_z_thres`, `coarse_ignore_distance`). With 64 mm (two
coarse voxels at 32 mm) the coarse argmax alone lands 58-68 mm from held-out phantom landmarks
instead of 94-99 mm, and the Matcher's median error is 47-62 mm instead of 89-95 mm
(docs/experiments/2026-11-26-sam-coarse-half-tries.md protocol, --hu_window -200 300, seeds 0 and
1)."""
REFERENCE_COARSE_IGNORE_MM = 5.0
REFERENCE_COARSE_HARD = 250
REFERENCE_COARSE_KEPT = 200
REFERENCE_COARSE_OTHERS = 1000
"""The reference's coarse negatives (`coarse_ignore_distance`, top 250 -> random 200,
`coarse_global_select_number`)."""
COARSE_RULES = ("far", "reference")


def _info_nce(pos: torch.Tensor, neg: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE of positive logits [P] against negative logits [P, K] (-inf = excluded)."""
    logits = torch.cat([pos[:, None], neg], 1) / temperature  # [P, 1 + K]
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


def _coarse_world(view: View, shape, stride) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    return index_to_world(scaled_affine(view.affine, stride), ijk)


def sam_loss(fine: torch.Tensor, coarse: torch.Tensor, pairs: list[tuple[View, View]],
             rng: np.random.Generator, cases=None, cross_case: bool = False,
             temperature: float = TEMPERATURE, coarse_rule: str = "far",
             coarse_stride=(COARSE_STRIDE,) * 3) -> dict[str, torch.Tensor]:
    """fine [2B, C, Xf, Yf, Zf], coarse [2B, C, Xc, Yc, Zc] for views ordered (a1, b1, a2, b2, ...)
    of `pairs`; `cases` [B]: the case of each pair (default: a different case per pair);
    `coarse_rule`: "far" (ours, `cross_case` adds the other cases) or "reference" (module doc);
    `coarse_stride`: the network's (X, Y, Z).
    -> {"loss", "fine", "coarse"} (scalars; loss = fine + coarse)."""
    if coarse_rule not in COARSE_RULES:
        raise ValueError(f"coarse_rule must be one of {COARSE_RULES}, got {coarse_rule!r}")
    reference = coarse_rule == "reference"
    fshape, cshape = fine.shape[2:], coarse.shape[2:]
    n_views = 2 * len(pairs)
    cases = np.arange(len(pairs)) if cases is None else np.asarray(cases)
    coarse_all = coarse.flatten(2).transpose(1, 2).reshape(-1, coarse.shape[1])  # [2B * Nc, C]
    n_c = int(np.prod(cshape))
    coarse_xyz = np.concatenate([_coarse_world(v, cshape, coarse_stride)
                                 for pair in pairs for v in pair])  # [2B * Nc, 3]
    coarse_case = np.repeat(np.repeat(cases, 2), n_c)  # [2B * Nc]
    assert len(coarse_all) == n_views * n_c
    fine_losses, coarse_losses = [], []
    for b, (v1, v2) in enumerate(pairs):
        f1, f2, c1, c2 = fine[2 * b], fine[2 * b + 1], coarse[2 * b], coarse[2 * b + 1]
        ijk1, ijk2 = positive_pairs(v1, v2, fshape, N_POSITIVES, rng)
        c1_aff = scaled_affine(v1.affine, coarse_stride)
        c2_aff = scaled_affine(v2.affine, coarse_stride)
        disjoint = len(ijk1) == 0
        if disjoint and not reference:
            continue
        if disjoint:  # each query is its own positive
            ijk1, ijk2 = positive_pairs(v1, v1, fshape, N_POSITIVES, rng)
        world = index_to_world(v1.fine_affine, ijk1)  # [P, 3] mm
        q = f1[:, ijk1[:, 0], ijk1[:, 1], ijk1[:, 2]].T  # [C, P] -> [P, C]
        k_pos = _sample(f1 if disjoint else f2, ijk2)
        qc = _sample(c1, world_to_index(c1_aff, world))
        kc_pos = qc if disjoint else _sample(c2, world_to_index(c2_aff, world))

        # fine negatives: hardest candidates of view 2 by (fine + coarse) similarity
        n_fine = int(np.prod(fshape))
        cand = rng.choice(n_fine, size=min(N_CANDIDATES, n_fine), replace=False)
        cand_ijk = np.stack(np.unravel_index(cand, tuple(fshape)), 1)
        cand_world = index_to_world(v2.fine_affine, cand_ijk)
        fc = f2.flatten(1)[:, torch.from_numpy(cand).to(f2.device)].T  # [C, K] -> [K, C]
        cc = _sample(c2, world_to_index(c2_aff, cand_world))
        too_close = torch.from_numpy(np.linalg.norm(world[:, None] - cand_world[None], axis=2)
                                     < FINE_EXCLUDE_MM).to(f2.device)  # [P, K]
        with torch.no_grad():
            hardness = (q @ fc.T + qc @ cc.T).masked_fill(too_close, -float("inf"))
            hard = hardness.topk(min(N_HARD, len(cand)), dim=1).indices  # [P, H]
        neg = (q @ fc.T).masked_fill(too_close, -float("inf")).gather(1, hard)
        fine_losses.append(_info_nce((q * k_pos).sum(1), neg, temperature))

        if reference:
            neg_c = _reference_coarse_negatives(qc, world, b, coarse_all, coarse_xyz, coarse_case != cases[b],
                                                n_c, rng)
        else:  # far voxels of this case's views (+ all voxels of other cases' views)
            same = coarse_case == cases[b]  # [2B * Nc]
            near = np.linalg.norm(world[:, None] - coarse_xyz[None], axis=2) < COARSE_POSITIVE_MM  # [P, 2B * Nc]
            excluded = (same[None] & near) | (~same[None] & (not cross_case))
            neg_c = (qc @ coarse_all.T).masked_fill(torch.from_numpy(excluded).to(qc.device), -float("inf"))
        coarse_losses.append(_info_nce((qc * kc_pos).sum(1), neg_c, temperature))
    if not fine_losses:
        raise RuntimeError("no view pair of this batch overlaps; views are too far apart")
    lf, lc = torch.stack(fine_losses).mean(), torch.stack(coarse_losses).mean()
    return {"loss": lf + lc, "fine": lf.detach(), "coarse": lc.detach()}


def _reference_coarse_negatives(qc: torch.Tensor, world: np.ndarray, b: int, coarse_all: torch.Tensor,
                                coarse_xyz: np.ndarray, other_case: np.ndarray, n_c: int,
                                rng: np.random.Generator) -> torch.Tensor:
    """Coarse negative logits [P, K] of pair `b`'s queries qc [P, C] at `world` [P, 3] mm: its own two
    views' voxels (rows 2b * n_c .. (2b + 2) * n_c of coarse_all) farther than
    REFERENCE_COARSE_IGNORE_MM, hardest REFERENCE_COARSE_HARD then a random REFERENCE_COARSE_KEPT,
    plus REFERENCE_COARSE_OTHERS random voxels where `other_case` [2B * Nc] (-inf = excluded)."""
    own = slice(2 * b * n_c, (2 * b + 2) * n_c)
    close = np.linalg.norm(world[:, None] - coarse_xyz[own][None], axis=2) < REFERENCE_COARSE_IGNORE_MM
    sim = (qc @ coarse_all[own].T).masked_fill(torch.from_numpy(close).to(qc.device), -float("inf"))
    with torch.no_grad():
        hard = sim.topk(min(REFERENCE_COARSE_HARD, sim.shape[1]), dim=1).indices  # [P, H]
    keep = torch.from_numpy(rng.random(hard.shape).argsort(1)[:, :REFERENCE_COARSE_KEPT]).to(qc.device)
    negs = [sim.gather(1, hard.gather(1, keep))]  # a random KEPT of each query's hardest
    others = np.flatnonzero(other_case)
    if len(others):
        pick = torch.from_numpy(rng.permutation(others)[:REFERENCE_COARSE_OTHERS]).to(qc.device)
        negs.append((qc @ coarse_all[pick].T))
    return torch.cat(negs, 1)


def _sample(feat: torch.Tensor, ijk: np.ndarray) -> torch.Tensor:
    """Trilinear embedding of one map [C, X, Y, Z] at continuous indices [P, 3] -> [P, C], unit norm."""
    ijk = torch.from_numpy(np.asarray(ijk, dtype=np.float32)).to(feat.device)
    out = sample_channels_first(feat[None], ijk[None])
    return F.normalize(out[0], dim=1)
