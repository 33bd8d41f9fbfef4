"""Which candidates of a matcher call make a pair (DESIGN §4 step 1): the cycle check, or, for cases
that `alice-ds sam-levels` connects, agreement with the level prior (`alice_ds.sam.levels`)."""

from __future__ import annotations

import numpy as np

from alice_ds.sam.levels import LevelPrior

CYCLE_CHUNK = 8
"""Passing candidates matched back per call by the cycle check (any chunk picks the same one): with
int8 x 16 learned embeddings of the held-out phantoms 88-90 pairs/CPU-s against 79-80 with 2."""


def first_consistent(matcher, case_a: str, case_b: str, points: np.ndarray, matched: np.ndarray,
                     order: np.ndarray, limit_mm: float) -> int | None:
    """The first candidate of `order` whose match maps back near itself: matched from case B back
    into case A, within `limit_mm` of the query point (every candidate passes with 0). `order` is the
    passing candidates in random order, so the one returned is uniform among those that pass; they
    are matched back CYCLE_CHUNK at a time. points, matched [K, 3] world mm."""
    if len(order) == 0:
        return None
    if limit_mm <= 0:
        return int(order[0])
    for s in range(0, len(order), CYCLE_CHUNK):
        chunk = order[s:s + CYCLE_CHUNK]
        back, _ = matcher.match(case_b, case_a, matched[chunk])  # [k, 3] world mm in case A
        ok = np.flatnonzero(np.linalg.norm(back - points[chunk], axis=1) <= limit_mm)
        if len(ok):
            return int(chunk[ok[0]])
    return None


def match_at_prior(matcher, prior: LevelPrior, case_a, case_b, points: np.ndarray, threshold: float,
                   radius_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each candidate point of A (world mm [K, 3]) searched in one fine window around its prior point
    in B (`LevelPrior.match`; `case_a`, `case_b` cached cases). Those whose level lies outside B
    have no counterpart there and are not matched. -> (known [M] indices into points, matched
    [M, 3], scores [M], passing: positions in `known` whose score reaches `threshold` and whose match
    lies within `radius_mm` of the prior point). No cycle check: on the held-out phantoms the prior
    alone gives the precision at a higher acceptance (docs/experiments/2026-12-03-sam-body-levels.md)."""
    known, centres, matched, scores = prior.match(matcher, case_a, case_b, points)
    near = np.linalg.norm(matched - centres, axis=1) <= radius_mm
    return known, matched, scores, np.flatnonzero((scores >= threshold) & near)
