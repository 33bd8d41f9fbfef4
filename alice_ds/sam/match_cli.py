"""`alice-ds match`: where does a world-mm point of one case land in another? (A debugging tool the
reference's users asked for.) Points are world mm of the RAS frame, as everywhere in alice-ds."""

from __future__ import annotations

import argparse

from alice_ds.cli import positive_int
from alice_ds.sam import DEFAULT_CANDIDATES, DEFAULT_WINDOW, SEARCH_MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embed_dir", required=True, help="folder of SAM embeddings (alice-ds embed)")
    p.add_argument("--query", required=True, help="case id the point belongs to")
    p.add_argument("--key", required=True, help="case id to find the point in")
    p.add_argument("--point", required=True, type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="query point in world mm (RAS)")
    p.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW,
                   help="fine-search window edge in fine voxels around the coarse match")
    p.add_argument("--candidates", type=positive_int, default=DEFAULT_CANDIDATES,
                   help="window search: fine windows around this many best coarse voxels (kept at least "
                        "two coarse voxels apart); the best (fine + coarse) / 2 among them wins; 1 = the "
                        "coarse argmax alone, as the reference")
    p.add_argument("--search", choices=SEARCH_MODES, default="window",
                   help="'window': fine search around the best coarse voxels; 'global': every fine voxel "
                        "of the key case (slower, independent of the coarse argmax); 'coarse': the "
                        "coarse argmax alone (its voxel centre and coarse cosine)")
    p.add_argument("--json", action="store_true",
                   help='print {"matched_mm": [x, y, z], "score": s} instead of a sentence')


def run(args) -> int:
    import json

    import numpy as np

    from alice_ds.sam.matcher import Matcher

    matched, scores = Matcher(args.embed_dir, window=args.window, search=args.search,
                              candidates=args.candidates).match(
        args.query, args.key, np.asarray([args.point]))
    xyz = [round(float(v), 3) for v in matched[0]]
    if args.json:
        print(json.dumps({"matched_mm": xyz, "score": round(float(scores[0]), 5)}))
    else:
        print(f"{args.query} ({', '.join(f'{v:g}' for v in args.point)}) mm -> {args.key} "
              f"({', '.join(f'{v:g}' for v in xyz)}) mm, score {float(scores[0]):.3f}")
    return 0
