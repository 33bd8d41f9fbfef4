"""`alice-ds sam-levels`: where each case lies along the body, label-free, for the pair sampler.

Every CT has its own world z origin, and the learned coarse half does not know the body level
across subjects. The global search with its template does, often enough to vote
(docs/experiments/2026-12-03-sam-body-levels.md):

1. For a pair of cases (A, B), `points` body points of A are matched into B by the global search and
   back. The cycle-consistent ones (within CYCLE_MM of where they started) vote on B's z shift. The
   shift is the mode of a kernel density (BANDWIDTH_MM) of their z offsets.
2. An edge A-B is kept when the two directions agree: shift(A->B) + shift(B->A) within AGREE_MM.
   Pairs with little overlap, whose votes are noise, mostly fail this.
3. Per connected component of kept edges, least squares gives each case an offset (the component's
   first case at 0): a level z of A lies at z + offset[A] - offset[B] in B.

`LevelPrior` turns the offsets into a prior point in B for a point of A: z as above, x and y at the
same relative place in the body's bounding box of the two axial slices (the body outline).

Files in the embedding folder: `levels_edges.jsonl`, one line per measured direction (so an
interrupted run resumes), and `levels.json`:
{"format": 1, "points": n, "partners": k, "cases": {id: {"component": c, "offset_mm": o}}}.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from alice_ds.args import positive_int
from alice_ds.console import console, progress
from alice_ds.data.cache import BODY_HU, list_cases, open_case
from alice_ds.errors import DataError, UserError
from alice_ds.files import atomic_write_text
from alice_ds.sam.io import list_embeddings

LEVELS_FILE = "levels.json"
EDGES_FILE = "levels_edges.jsonl"
LEVELS_FORMAT = 1
CYCLE_MM = 16.0
"""A global match votes when matching it back lands this close to its query point."""
BANDWIDTH_MM = 6.0
"""Kernel of the density over the votes' z offsets."""
AGREE_MM = 16.0
"""An edge is kept when its two directions' shifts cancel to within this."""
PRIOR_WINDOW = 8
"""Fine voxels (32 mm) of the window searched around a level prior's point (the pair sampler's
`match_window`, and `sam-eval --cache_dir`): on the held-out phantoms landmarks land within 10 mm for
70.7 % with 8 and 51.0 % with 20 (docs/experiments/2026-12-03-sam-body-levels.md)."""
GRID_STEP = 2
"""The vote's global search scores every GRID_STEP-th fine voxel along each axis (`Matcher(grid_step=)`):
8 mm instead of 4, an eighth of the voxels; the level needs a few mm, not the last one."""
DEFAULT_POINTS = 24
DEFAULT_PARTNERS = 4
BODY_POINT_HU = -300.0
"""Query points of the vote lie in tissue (not in the lungs' air, which the body mask of the sampler
keeps)."""


def vote_shift(matcher, case_a, case_b: str, points_mm: np.ndarray) -> tuple[float | None, int]:
    """B's z shift relative to A from the cycle-consistent global matches of A's points -> (shift mm
    or None when no match maps back, number of votes). `matcher`: a global-search `Matcher`."""
    matched, _ = matcher.match(case_a, case_b, points_mm)  # [P, 3] in B
    back, _ = matcher.match(case_b, case_a, matched)  # [P, 3] in A
    dz = (matched[:, 2] - points_mm[:, 2])[np.linalg.norm(back - points_mm, axis=1) <= CYCLE_MM]
    if len(dz) == 0:
        return None, 0
    grid = np.arange(dz.min() - BANDWIDTH_MM, dz.max() + BANDWIDTH_MM, 1.0)  # [G] mm, 1 mm steps
    density = np.exp(-0.5 * ((grid[:, None] - dz[None]) / BANDWIDTH_MM) ** 2).sum(1)  # [G]
    return float(grid[density.argmax()]), int(len(dz))


def partner_pairs(cases: list[str], partners: int, seed: int) -> list[tuple[str, str]]:
    """Unordered case pairs to measure: every pair when each case can have `partners` others,
    else each case with `partners` random others (seeded), without repeats."""
    if partners >= len(cases) - 1:
        return list(itertools.combinations(cases, 2))
    rng = np.random.default_rng(seed)
    pairs = set()
    for i, a in enumerate(cases):
        for j in rng.choice([j for j in range(len(cases)) if j != i], partners, replace=False):
            pairs.add(tuple(sorted((a, cases[int(j)]))))
    return sorted(pairs)


def solve_offsets(cases: list[str], shifts: dict[tuple[str, str], float]) -> dict[str, dict]:
    """Offsets from measured shifts {(A, B): z shift of B relative to A}: the edges whose two
    directions agree within AGREE_MM, least squares per connected component (its first case at 0)
    -> {case: {"component": c, "offset_mm": o}} with z_B = z_A + o_A - o_B; a case without a kept
    edge is a component of its own."""
    edges = {}
    for (a, b), s in shifts.items():
        back = shifts.get((b, a))
        if a < b and back is not None and abs(s + back) <= AGREE_MM:
            edges[a, b] = (s - back) / 2  # the mean of both directions: z_B - z_A
    parent = {c: c for c in cases}

    def root(c):
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for a, b in edges:
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for c in cases:
        groups.setdefault(root(c), []).append(c)
    out = {}
    for comp, members in enumerate(sorted(groups.values(), key=lambda m: (-len(m), m[0]))):
        pos = {c: i for i, c in enumerate(members)}
        rows, rhs = [np.eye(len(members))[0]], [0.0]  # gauge: the first member at 0
        for (a, b), s in edges.items():
            if a in pos:
                r = np.zeros(len(members))
                r[pos[a]], r[pos[b]] = 1.0, -1.0  # o_A - o_B = z_B - z_A
                rows.append(r)
                rhs.append(s)
        offsets = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
        for c in members:
            out[c] = {"component": comp, "offset_mm": float(offsets[pos[c]])}
    return out


def level_cases(cache_dir, embed_dir) -> list[str]:
    """The cases with both an embedding and a cache entry, sorted; a UserError below two."""
    cases = sorted(set(list_embeddings(embed_dir)) & set(list_cases(cache_dir)))
    if len(cases) < 2:
        raise UserError(f"{embed_dir}: need >= 2 cases with both an embedding and a cache entry "
                        f"in {cache_dir}, found {len(cases)}")
    return cases


def estimate_levels(cache_dir, embed_dir, points: int = DEFAULT_POINTS, partners: int = DEFAULT_PARTNERS,
                    seed: int = 0, on_pair=None, grid_step: int = GRID_STEP) -> dict:
    """Measure the shifts of the chosen pairs (resuming from EDGES_FILE), solve the offsets and
    write LEVELS_FILE -> its content."""
    from alice_ds.sam.matcher import Matcher

    cases = level_cases(cache_dir, embed_dir)
    edges_path = Path(embed_dir) / EDGES_FILE
    shifts: dict[tuple[str, str], float | None] = {}
    if edges_path.exists():
        for line in edges_path.read_text().splitlines():
            try:
                e = json.loads(line)
                if e["points"] == points and e["seed"] == seed and e.get("grid_step", 1) == grid_step:
                    shifts[e["a"], e["b"]] = e["shift_mm"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by an interrupted run: measured again
    matcher = Matcher(embed_dir, search="global", grid_step=grid_step)
    bodies: dict[str, tuple] = {}  # case -> (cached case, body voxels [M, 3]): each volume read once
    with edges_path.open("a") as log:
        for a, b in partner_pairs(cases, partners, seed):
            for q, k in ((a, b), (b, a)):
                if (q, k) in shifts:
                    continue
                if q not in bodies:
                    case = open_case(cache_dir, q)
                    bodies[q] = (case, np.argwhere(np.asarray(case.array) > BODY_POINT_HU))  # [M, 3]
                case, body = bodies[q]
                if len(body) == 0:
                    raise UserError(f"{cache_dir}: case {q} has no voxel above {BODY_POINT_HU:g} HU (no body)")
                rng = np.random.default_rng([seed, *(ord(ch) for ch in q + k)])
                pts = case.voxel_to_world(body[rng.choice(len(body), min(points, len(body)), replace=False)])
                shift, votes = vote_shift(matcher, q, k, pts)
                shifts[q, k] = shift
                log.write(json.dumps({"a": q, "b": k, "shift_mm": shift, "votes": votes,
                                      "points": points, "seed": seed, "grid_step": grid_step}) + "\n")
                log.flush()
            if on_pair is not None:
                on_pair()
    doc = {"format": LEVELS_FORMAT, "points": points, "partners": partners, "seed": seed, "grid_step": grid_step,
           "cases": solve_offsets(cases, {k: v for k, v in shifts.items() if v is not None})}
    atomic_write_text(Path(embed_dir) / LEVELS_FILE, json.dumps(doc, indent=1))
    return doc


class LevelPrior:
    """Prior points in case B for points of case A, from `levels.json` and the body outlines."""

    def __init__(self, levels: dict, body_hu: float = BODY_HU):
        self.cases = levels["cases"]
        self.body_hu = float(body_hu)
        self._boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def load(cls, embed_dir, body_hu: float = BODY_HU) -> LevelPrior | None:
        """The prior of an embedding folder, or None when it has no LEVELS_FILE."""
        path = Path(embed_dir) / LEVELS_FILE
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            ok = doc.get("format") == LEVELS_FORMAT and isinstance(doc.get("cases"), dict)
        except (json.JSONDecodeError, AttributeError):
            ok = False
        if not ok:
            raise DataError(path, f"not a levels file of format {LEVELS_FORMAT}: run alice-ds sam-levels again")
        return cls(doc, body_hu)

    def connects(self, case_a: str, case_b: str) -> bool:
        a, b = self.cases.get(case_a), self.cases.get(case_b)
        return a is not None and b is not None and a["component"] == b["component"]

    def _box(self, case) -> tuple[np.ndarray, np.ndarray]:
        """Per axial slice k the body's bounding box in x and y voxels: (low [Z, 2], high [Z, 2]),
        NaN for a slice without body."""
        box = self._boxes.get(case.case_id)
        if box is None:
            body = np.asarray(case.array) > self.body_hu  # [X, Y, Z]
            xs, ys = body.any(1), body.any(0)  # [X, Z], [Y, Z]
            lo, hi = np.full((body.shape[2], 2), np.nan), np.full((body.shape[2], 2), np.nan)
            for axis, m in enumerate((xs, ys)):
                has = m.any(0)  # [Z]
                lo[has, axis] = m.argmax(0)[has]
                hi[has, axis] = m.shape[0] - 1 - m[::-1].argmax(0)[has]
            box = self._boxes[case.case_id] = (lo, hi)
        return box

    def map_points(self, case_a, case_b, points_mm) -> np.ndarray:
        """Points of A (world mm [P, 3]) -> prior points in B [P, 3], NaN rows where the level lies
        outside B or a slice has no body. `case_a`, `case_b`: cached cases (`open_case`) whose ids
        this prior `connects`. Assumes axial slices (the cache is RAS+, z the third voxel axis)."""
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        shift = self.cases[case_a.case_id]["offset_mm"] - self.cases[case_b.case_id]["offset_mm"]
        va = case_a.world_to_voxel(pts)  # [P, 3]
        vb = case_b.world_to_voxel(pts + [0.0, 0.0, shift])  # [P, 3]: the level in B
        ka = np.clip(np.rint(va[:, 2]).astype(np.int64), 0, case_a.shape[2] - 1)
        kb = np.rint(vb[:, 2]).astype(np.int64)
        inside = (kb >= 0) & (kb < case_b.shape[2])
        kb = np.clip(kb, 0, case_b.shape[2] - 1)
        (la, ha), (lb, hb) = self._box(case_a), self._box(case_b)
        rel = (va[:, :2] - la[ka]) / np.maximum(ha[ka] - la[ka], 1.0)  # [P, 2] place in A's box
        vb[:, :2] = lb[kb] + rel * (hb[kb] - lb[kb])
        out = case_b.voxel_to_world(vb)
        out[~inside | np.isnan(out).any(1)] = np.nan
        return out


    def match(self, matcher, case_a, case_b, points_mm) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Points of A (world mm [P, 3]) searched by a window `matcher` in one fine window around their
        prior points in B (`case_a`, `case_b`: cached cases this prior `connects`) -> (known [M]:
        indices of the points that have a prior, centres [M, 3], matched [M, 3], scores [M]); a point
        at a level B does not show has no counterpart there and is left out."""
        centres = self.map_points(case_a, case_b, points_mm)  # [P, 3], NaN rows: no prior
        known = np.flatnonzero(~np.isnan(centres).any(1))
        if len(known) == 0:
            return known, np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, dtype=np.float32)
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)[known]
        matched, scores = matcher.match(case_a.case_id, case_b.case_id, pts, centres_mm=centres[known])
        return known, centres[known], matched, scores


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embed_dir", required=True, help="folder of SAM embeddings (alice-ds embed); "
                   f"{LEVELS_FILE} and {EDGES_FILE} are written there")
    p.add_argument("--cache_dir", required=True, help="the preprocessed cache the embeddings were made from")
    p.add_argument("--points", type=positive_int, default=DEFAULT_POINTS,
                   help="body points per case pair and direction that vote on the pair's z shift")
    p.add_argument("--partners", type=positive_int, default=DEFAULT_PARTNERS,
                   help="case pairs measured per case (random partners; every pair when there are few cases)")
    p.add_argument("--grid_step", type=positive_int, default=GRID_STEP,
                   help="the vote's global search scores every N-th fine voxel along each axis (1: all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the partners and points")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (on a shared or small CPU, 1 avoids threads waiting for each other)")


def run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    total = len(partner_pairs(level_cases(args.cache_dir, args.embed_dir), args.partners, args.seed))
    with progress(unit="pairs") as bar:
        task = bar.add_task("sam-levels", total=total)
        doc = estimate_levels(args.cache_dir, args.embed_dir, args.points, args.partners, args.seed,
                              on_pair=lambda: bar.advance(task), grid_step=args.grid_step)
    comps: dict[int, int] = {}
    for v in doc["cases"].values():
        comps[v["component"]] = comps.get(v["component"], 0) + 1
    console.print(f"{len(doc['cases'])} cases in {len(comps)} connected groups "
                  f"(largest {max(comps.values())}); wrote {Path(args.embed_dir) / LEVELS_FILE}", highlight=False)
    return 0
