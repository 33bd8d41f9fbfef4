"""`alice-ds sam-eval`: cross-subject landmark matching accuracy of SAM embeddings.

For every ordered pair of cases (query, key) with embeddings and landmark files, each landmark
present in both is matched from the query into the key; the error is the distance in mm between the
match and the key's own landmark. Reported overall and per landmark: mean, median, fraction within
10 mm (the SAMv2 lesion-tracking metric).
"""

from __future__ import annotations

import argparse

from alice_ds.cli import positive_int
from alice_ds.sam import DEFAULT_CANDIDATES, DEFAULT_WINDOW, SEARCH_MODES

WITHIN_MM = 10.0
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
    p.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW,
                   help="fine-search window edge in fine voxels around the coarse match")
    p.add_argument("--candidates", type=positive_int, default=DEFAULT_CANDIDATES,
                   help="window search: fine windows around this many best coarse voxels (kept at least "
                        "two coarse voxels apart); the best (fine + coarse) / 2 among them wins; 1 = the "
                        "coarse argmax alone, as the reference")
    p.add_argument("--search", choices=SEARCH_MODES, default="window",
                   help="'window': fine search around the best coarse voxels (as the pair sampler "
                        "matches); 'global': (fine + coarse) / 2 at every fine voxel of the key case "
                        "(slower; shows what a wrong coarse argmax costs); 'coarse': the coarse "
                        "argmax alone (where the coarse half points)")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the summary (overall and per landmark) to this JSON file")


def read_landmark_file(path) -> tuple[str, dict[str, list[float]]]:
    """One landmark file -> (case key, {name: [x, y, z] world mm}); DataError naming the file when it
    is not `{"case_id", "landmarks": {name: [x, y, z]}}` with finite numbers."""
    import json
    import math
    from pathlib import Path

    from alice_ds.data import case_key
    from alice_ds.errors import DataError

    f = Path(path)
    try:
        doc = json.loads(f.read_text())
        marks = {str(k): [float(v) for v in xyz] for k, xyz in doc["landmarks"].items()}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f, f'not a landmark file {{"case_id", "landmarks": {{name: [x, y, z]}}}} ({e})') from None
    bad = [n for n, v in marks.items() if len(v) != 3 or not all(math.isfinite(c) for c in v)]
    if bad:
        raise DataError(f, f"every landmark must be [x, y, z] in finite mm; not so: {bad[:5]}")
    return case_key(str(doc.get("case_id", f.stem))), marks


def read_landmark_folder(directory) -> dict:
    """A folder's landmark files, each read once -> {case key: (path, {name: [x, y, z] world mm})}
    (a later file of the same case wins, in name order)."""
    from pathlib import Path

    from alice_ds.errors import DataError

    d = Path(directory)
    if not d.is_dir():
        raise DataError(d, "landmark folder not found")
    out = {}
    for f in sorted(d.glob("*.json")):
        key, marks = read_landmark_file(f)
        out[key] = (f, marks)
    if not out:
        raise DataError(d, "no landmark .json files")
    return out


def load_landmarks(directory) -> dict[str, dict[str, list[float]]]:
    """Landmark files of a folder -> {case key: {name: [x, y, z] world mm}}."""
    return {key: marks for key, (_, marks) in read_landmark_folder(directory).items()}


def validation_cases(json_list) -> set[str]:
    """Case ids of a datalist's 'validation' list."""
    import json
    from pathlib import Path

    from alice_ds.data import case_id_from_path
    from alice_ds.errors import DataError

    try:
        return {case_id_from_path(e["image"]) for e in json.loads(Path(json_list).read_text())["validation"]}
    except FileNotFoundError:
        raise DataError(json_list, "datalist not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(json_list, f"not a decathlon datalist with a 'validation' list ({e})") from None


def summarize(deltas) -> dict:
    """Match - landmark offsets [N, 3] in world mm (RAS axes) -> n, mean_mm, median_mm, within_10mm
    (of the distances) and median_abs_xyz_mm (per axis: which direction the errors go)."""
    import numpy as np

    d = np.asarray(deltas, dtype=np.float64).reshape(-1, 3)
    e = np.linalg.norm(d, axis=1)
    return {"n": int(e.size), "mean_mm": float(e.mean()), "median_mm": float(np.median(e)),
            "within_10mm": float((e <= WITHIN_MM).mean()),
            "median_abs_xyz_mm": [float(v) for v in np.median(np.abs(d), axis=0)]}


def axes_cell(summary: dict) -> str:
    """A summary's per-axis median errors as one narrow table cell, whole mm: '4/8/65'."""
    return "/".join(f"{v:.0f}" for v in summary["median_abs_xyz_mm"])


def evaluate(embed_dir, landmarks: dict, pairs="all", seed: int = 0, window: int = DEFAULT_WINDOW,
             on_pair=None, only=None, search: str = "window", candidates: int = DEFAULT_CANDIDATES) -> dict:
    """Match every common landmark over the chosen case pairs. -> {"overall": summary,
    "per_landmark": {name: summary}, "pairs": n, "cases": [...]} (summary: n, mean_mm, median_mm,
    within_10mm as a fraction, median_abs_xyz_mm). `only`: restrict to these case ids; `search`,
    `candidates`: the Matcher's."""
    import itertools

    import numpy as np

    from alice_ds.data import case_key
    from alice_ds.errors import UserError
    from alice_ds.sam.io import list_embeddings
    from alice_ds.sam.matcher import Matcher

    cases = [c for c in list_embeddings(embed_dir)
             if case_key(c) in landmarks and (only is None or c in only)]
    if len(cases) < 2:
        raise UserError(f"{embed_dir}: need >= 2 embedded cases with landmark files, found {len(cases)}")
    ordered = [(a, b) for a, b in itertools.permutations(cases, 2)]
    if pairs != "all":
        n = int(pairs)
        rng = np.random.default_rng(seed)
        ordered = [ordered[i] for i in rng.permutation(len(ordered))[:n]]
    matcher = Matcher(embed_dir, window=window, search=search, candidates=candidates)
    per: dict[str, list[np.ndarray]] = {}  # landmark -> match - landmark offsets [3] mm
    for q, k in ordered:
        lq, lk = landmarks[case_key(q)], landmarks[case_key(k)]
        names = sorted(set(lq) & set(lk))
        if names:
            matched, _ = matcher.match(q, k, np.array([lq[n] for n in names]))
            for n, d in zip(names, matched - np.array([lk[n] for n in names])):
                per.setdefault(n, []).append(d)
        if on_pair is not None:
            on_pair()
    if not per:
        raise UserError(f"{embed_dir}: no landmark is shared by any evaluated case pair")
    return {"overall": summarize([e for v in per.values() for e in v]),
            "per_landmark": {n: summarize(v) for n, v in sorted(per.items())},
            "pairs": len(ordered), "cases": cases}


def run(args) -> int:
    import json
    import time
    from pathlib import Path

    from alice_ds.console import console, progress, table
    from alice_ds.errors import UserError
    from alice_ds.sam.io import list_embeddings

    if args.pairs != "all" and not (args.pairs.isdigit() and int(args.pairs) > 0):
        raise UserError(f"--pairs must be 'all' or a positive integer, got {args.pairs!r}")
    marks = load_landmarks(args.landmarks)
    only = None if args.json_list is None else validation_cases(args.json_list)
    n_cases = len([c for c in list_embeddings(args.embed_dir) if only is None or c in only])
    total = n_cases * (n_cases - 1) if args.pairs == "all" else int(args.pairs)
    t0 = time.time()
    with progress() as bar:
        task = bar.add_task("sam-eval", total=total)
        res = evaluate(args.embed_dir, marks, args.pairs, args.seed, args.window,
                       on_pair=lambda: bar.advance(task), only=only, search=args.search,
                       candidates=args.candidates)
    res["seconds_per_pair"] = (time.time() - t0) / max(res["pairs"], 1)
    rows = [[name, s["n"], f"{s['mean_mm']:.2f}", f"{s['median_mm']:.2f}", f"{100 * s['within_10mm']:.1f}",
             axes_cell(s)]
            for name, s in [*res["per_landmark"].items(), ("overall", res["overall"])]]
    console.print(table(f"SAM landmark matching ({args.search} search): {len(res['cases'])} cases, "
                        f"{res['pairs']} ordered pairs",
                        ["landmark", "n", "mean mm", "median mm", "% within 10 mm", AXES_HEADER],
                        rows))
    if args.json:
        doc = {**res["overall"], "overall": res["overall"], "per_landmark": res["per_landmark"],
               "pairs": res["pairs"], "cases": res["cases"], "seconds_per_pair": res["seconds_per_pair"],
               "search": args.search, "window": args.window, "candidates": args.candidates}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0
