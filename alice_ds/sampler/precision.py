"""How often the pair sampler's cross-subject pairs show the same anatomy, on phantoms, where the
true correspondence between two subjects is known (`alice_ds.data.phantom.corresponding_points`).

A pair is *correct* when its anchor centre lies within `radius_mm` of the true correspondence of its
query centre in the anchor's case. Only the accepted pairs across two cases count (`kind` "inter");
intra and random pairs have no match to judge, and a `best` pair (a match below the threshold,
taken by the fallback) was not accepted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alice_ds.data import case_key
from alice_ds.data.phantom import Subject, corresponding_points, subject_for_landmarks

PRECISION_RADIUS_MM = 20.0
"""A pair is correct when its anchor centre is this close to the true correspondence (the per-case
organ shifts alone reach 9 mm per axis; the anchor crop is 96-192 mm wide)."""
ACCEPTED_KINDS = ("inter",)


def phantom_subjects(landmark_dir, case_ids) -> dict[str, Subject]:
    """The generator's Subject of each phantom case (by cache id), redrawn from its landmark file
    `landmark_dir/<case key>.json` (`subject_for_landmarks` checks the file against the redraw)."""
    return {cid: subject_for_landmarks(Path(landmark_dir) / f"{case_key(cid)}.json") for cid in case_ids}


def pair_errors_mm(samples, subjects: dict[str, Subject], kinds=ACCEPTED_KINDS) -> np.ndarray:
    """Distance in mm `[N]` from each pair's anchor centre to the true correspondence of its query
    centre, for the samples of `kinds` (others are left out; "best" adds the fallback's pairs). `samples`: sample dicts
    of `PairDataset` (or anything with `kind`, `query_case`, `anchor_case`, `query_center_mm`,
    `anchor_center_mm`)."""
    errors = []
    for s in samples:
        if s["kind"] not in kinds:
            continue
        q = np.asarray(s["query_center_mm"], dtype=np.float64).reshape(1, 3)
        a = np.asarray(s["anchor_center_mm"], dtype=np.float64).reshape(3)
        true = corresponding_points(subjects[s["query_case"]], subjects[s["anchor_case"]], q)[0]
        errors.append(float(np.linalg.norm(a - true)))
    return np.asarray(errors, dtype=np.float64)


def precision_report(errors_mm: np.ndarray, attempts: int, radius_mm: float = PRECISION_RADIUS_MM) -> dict:
    """{pairs, attempts, acceptance = pairs / attempts, precision = fraction within `radius_mm`,
    median_mm, p95_mm}; None where there is nothing to count (valid JSON)."""
    e = np.asarray(errors_mm, dtype=np.float64)
    some = len(e) > 0
    return {"pairs": int(len(e)), "attempts": int(attempts), "radius_mm": float(radius_mm),
            "acceptance": len(e) / attempts if attempts else None,
            "precision": float(np.mean(e <= radius_mm)) if some else None,
            "median_mm": float(np.median(e)) if some else None,
            "p95_mm": float(np.percentile(e, 95)) if some else None}
