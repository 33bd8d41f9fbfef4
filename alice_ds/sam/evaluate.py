"""`alice-ds sam-eval`: cross-subject landmark matching accuracy of SAM embeddings.

For every ordered pair of cases (query, key) with embeddings and landmark files, each landmark
present in both is matched from the query into the key; the error is the distance in mm between the
match and the key's own landmark. Reported overall and per landmark: mean, median, fraction within
10 mm (the SAMv2 lesion-tracking metric).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from alice_ds.console import console, progress, table
from alice_ds.data import case_key
from alice_ds.data.cache import open_case
from alice_ds.data.datalist import split_case_ids
from alice_ds.data.landmarks import load_landmarks
from alice_ds.data.phantom import ATLAS_FIXED_LANDMARKS, LANDMARK_LABELS
from alice_ds.errors import UserError
from alice_ds.sam import DEFAULT_CANDIDATES, DEFAULT_CONTEXT, DEFAULT_WINDOW
from alice_ds.sam.io import list_embeddings
from alice_ds.sam.levels import LEVELS_FILE, PRIOR_WINDOW, LevelPrior
from alice_ds.sam.match_cli import add_matcher_arguments
from alice_ds.sam.matcher import Matcher

WITHIN_MM = 10.0
GROSS_MM = 50.0
"""A match this far off lands at another body level: counted as a gross failure (`beyond_50mm`)."""
AXES_HEADER = "median |x|/|y|/|z| mm"
"""Table column of a summary's median_abs_xyz_mm (see axes_cell)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embed_dir", required=True, help="folder of SAM embeddings (alice-ds embed)")
    p.add_argument("--landmarks", required=True,
                   help='folder of landmark JSON files {"case_id", "landmarks": {name: [x, y, z] mm}}, '
                        "matched to cases by case id without the _0000 channel suffix")
    p.add_argument("--pairs", default="all",
                   help="'all' ordered case pairs, or N random ordered pairs (seeded)")
    p.add_argument("--json_list", default=None,
                   help="decathlon datalist: evaluate only its 'validation' cases (held out from sam-train)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing N random pairs")
    add_matcher_arguments(p)
    p.add_argument("--cache_dir", default=None,
                   help="the cache the embeddings were made from: with the embedding folder's levels file "
                        "(alice-ds sam-levels) each landmark is searched in a window of "
                        f"{PRIOR_WINDOW} fine voxels around its level prior's point, as the pair sampler "
                        "does; landmarks without a prior (a level the key case does not show, or cases "
                        "the levels do not connect) use --search")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the summary (overall and per landmark) to this JSON file")


def summarize(deltas) -> dict:
    """Match - landmark offsets [N, 3] in world mm (RAS axes) -> n, mean_mm, median_mm, within_10mm
    (of the distances), beyond_50mm (gross failures: another body level) and median_abs_xyz_mm (per
    axis: which direction the errors go)."""
    d = np.asarray(deltas, dtype=np.float64).reshape(-1, 3)
    e = np.linalg.norm(d, axis=1)
    return {"n": int(e.size), "mean_mm": float(e.mean()), "median_mm": float(np.median(e)),
            "within_10mm": float((e <= WITHIN_MM).mean()), "beyond_50mm": float((e > GROSS_MM).mean()),
            "median_abs_xyz_mm": [float(v) for v in np.median(np.abs(d), axis=0)]}


def axes_cell(summary: dict) -> str:
    """A summary's per-axis median errors as one narrow table cell, whole mm: '4/8/65'."""
    return "/".join(f"{v:.0f}" for v in summary["median_abs_xyz_mm"])


def evaluate(embed_dir, landmarks: dict, pairs="all", seed: int = 0, window: int = DEFAULT_WINDOW,
             on_pair=None, only=None, search: str = "global", candidates: int = DEFAULT_CANDIDATES,
             context: int = DEFAULT_CONTEXT, cache_dir=None) -> dict:
    """Match every common landmark over the chosen case pairs. -> {"overall": summary,
    "per_landmark": {name: summary}, "pairs": n, "cases": [...]} (summary: see `summarize`), plus
    "fixed" and "organ_bound" summaries when every landmark is a phantom's (ATLAS_FIXED_LANDMARKS).
    `only`: restrict to these case ids; `search`, `candidates`, `context`: the Matcher's. With
    `cache_dir` the level prior (`alice_ds.sam.levels`) places each landmark's search window where it
    has one; "prior_matches" counts those."""
    cases = [c for c in list_embeddings(embed_dir)
             if case_key(c) in landmarks and (only is None or c in only)]
    if len(cases) < 2:
        raise UserError(f"{embed_dir}: need >= 2 embedded cases with landmark files, found {len(cases)}")
    ordered = [(a, b) for a, b in itertools.permutations(cases, 2)]
    if pairs != "all":
        n = int(pairs)
        rng = np.random.default_rng(seed)
        ordered = [ordered[i] for i in rng.permutation(len(ordered))[:n]]
    matcher = Matcher(embed_dir, window=window, search=search, candidates=candidates, context=context)
    prior = None
    if cache_dir is not None:
        prior = LevelPrior.load(embed_dir)
        if prior is None:
            raise UserError(f"{embed_dir}: no {LEVELS_FILE}; run alice-ds sam-levels first (or drop --cache_dir)")
        at_prior = Matcher(embed_dir, window=PRIOR_WINDOW, search="window")
    per: dict[str, list[np.ndarray]] = {}  # landmark -> match - landmark offsets [3] mm
    prior_matches = 0
    for q, k in ordered:
        lq, lk = landmarks[case_key(q)], landmarks[case_key(k)]
        names = sorted(set(lq) & set(lk))
        if names:
            pts = np.array([lq[n] for n in names])  # [P, 3]
            matched, known = np.zeros_like(pts), np.zeros(len(pts), dtype=bool)
            if prior is not None and prior.connects(q, k):
                idx, _, got, _ = prior.match(at_prior, open_case(cache_dir, q), open_case(cache_dir, k), pts)
                matched[idx], known[idx] = got, True
                prior_matches += len(idx)
            if not known.all():
                matched[~known] = matcher.match(q, k, pts[~known])[0]
            for n, d in zip(names, matched - np.array([lk[n] for n in names])):
                per.setdefault(n, []).append(d)
        if on_pair is not None:
            on_pair()
    if not per:
        raise UserError(f"{embed_dir}: no landmark is shared by any evaluated case pair")
    out = {"overall": summarize([e for v in per.values() for e in v]),
           "per_landmark": {n: summarize(v) for n, v in sorted(per.items())},
           "pairs": len(ordered), "cases": cases, "prior_matches": prior_matches}
    if set(per) <= set(LANDMARK_LABELS):  # phantom landmarks: atlas-fixed vs organ-bound
        for split, names in (("fixed", [n for n in per if n in ATLAS_FIXED_LANDMARKS]),
                             ("organ_bound", [n for n in per if n not in ATLAS_FIXED_LANDMARKS])):
            if names:
                out[split] = summarize([e for n in names for e in per[n]])
    return out


def run(args) -> int:
    if args.pairs != "all" and not (args.pairs.isdigit() and int(args.pairs) > 0):
        raise UserError(f"--pairs must be 'all' or a positive integer, got {args.pairs!r}")
    marks = load_landmarks(args.landmarks)
    only = None if args.json_list is None else set(split_case_ids(args.json_list, "validation"))
    n_cases = len([c for c in list_embeddings(args.embed_dir) if only is None or c in only])
    total = n_cases * (n_cases - 1) if args.pairs == "all" else int(args.pairs)
    t0 = time.time()
    with progress() as bar:
        task = bar.add_task("sam-eval", total=total)
        res = evaluate(args.embed_dir, marks, args.pairs, args.seed, args.window,
                       on_pair=lambda: bar.advance(task), only=only, search=args.search,
                       candidates=args.candidates, context=args.context, cache_dir=args.cache_dir)
    res["seconds_per_pair"] = (time.time() - t0) / max(res["pairs"], 1)
    rows = [[name, s["n"], f"{s['mean_mm']:.2f}", f"{s['median_mm']:.2f}", f"{100 * s['within_10mm']:.1f}",
             axes_cell(s)]
            for name, s in [*res["per_landmark"].items(), ("overall", res["overall"])]]
    rows += [[f"{split} (phantom)", s["n"], f"{s['mean_mm']:.2f}", f"{s['median_mm']:.2f}",
              f"{100 * s['within_10mm']:.1f}", axes_cell(s)]
             for split, s in ((k, res[k]) for k in ("fixed", "organ_bound") if k in res)]
    console.print(table(f"SAM landmark matching ({args.search} search): {len(res['cases'])} cases, "
                        f"{res['pairs']} ordered pairs",
                        ["landmark", "n", "mean mm", "median mm", "% within 10 mm", AXES_HEADER],
                        rows))
    if args.cache_dir:
        console.print(f"level prior: {res['prior_matches']} of {res['overall']['n']} landmarks searched around "
                      f"their prior point, the rest with --search {args.search}", highlight=False)
    console.print(f"beyond {GROSS_MM:g} mm (another body level): {100 * res['overall']['beyond_50mm']:.1f} % of "
                  f"{res['overall']['n']} matches", highlight=False)
    if args.json:
        doc = {**res["overall"], "overall": res["overall"], "per_landmark": res["per_landmark"],
               **{k: res[k] for k in ("fixed", "organ_bound") if k in res},
               "pairs": res["pairs"], "cases": res["cases"], "seconds_per_pair": res["seconds_per_pair"],
               "search": args.search, "window": args.window, "candidates": args.candidates,
               "context": args.context, "level_prior": bool(args.cache_dir), "prior_matches": res["prior_matches"]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0
