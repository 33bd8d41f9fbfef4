"""`alice-ds match`: where does a world-mm point of one case land in another? (A debugging tool the
reference's users asked for.) Points are world mm of the RAS frame, as everywhere in alice-ds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alice_ds.args import non_negative_int, positive_int
from alice_ds.files import atomic_write_text
from alice_ds.sam import DEFAULT_CANDIDATES, DEFAULT_CONTEXT, DEFAULT_WINDOW, SEARCH_MODES
from alice_ds.sam.matcher import Matcher


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embed_dir", required=True, help="folder of SAM embeddings (alice-ds embed)")
    p.add_argument("--query", required=True, help="case id the point belongs to")
    p.add_argument("--key", required=True, help="case id to find the point in")
    p.add_argument("--point", required=True, type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="query point in world mm (RAS)")
    add_matcher_arguments(p)
    p.add_argument("--json", default=None, metavar="OUT",
                   help='also write {"matched_mm": [x, y, z], "score": s} to this JSON file ("-": print it '
                        "instead of the sentence)")


def run(args) -> int:
    matched, scores = matcher_from_args(args.embed_dir, args).match(args.query, args.key, np.asarray([args.point]))
    xyz = [round(float(v), 3) for v in matched[0]]
    doc = json.dumps({"matched_mm": xyz, "score": round(float(scores[0]), 5)})
    if args.json == "-":
        print(doc)
        return 0
    print(f"{args.query} ({', '.join(f'{v:g}' for v in args.point)}) mm -> {args.key} "
          f"({', '.join(f'{v:g}' for v in xyz)}) mm, score {float(scores[0]):.3f}")
    if args.json:
        atomic_write_text(Path(args.json), doc + "\n")
    return 0


def add_matcher_arguments(p: argparse.ArgumentParser, window_default: int | None = DEFAULT_WINDOW) -> None:
    """`--window`, `--candidates`, `--context`, `--search`: the flags that build a `Matcher`
    (`matcher_from_args`)."""
    p.add_argument("--window", type=positive_int, default=window_default,
                   help="fine-search window edge in fine voxels around each coarse candidate")
    p.add_argument("--candidates", type=positive_int, default=DEFAULT_CANDIDATES,
                   help="window search: fine windows around this many best coarse voxels (kept at least "
                        "two coarse voxels apart); the best (fine + coarse) / 2 among them wins; 1 = the "
                        "coarse argmax alone (the reference SAM searches globally: --search global)")
    p.add_argument("--context", type=non_negative_int, default=DEFAULT_CONTEXT,
                   help="global search: compare the point and its six neighbours this many fine voxels "
                        "away with the key's at the same offsets (0: the point's vector alone)")
    p.add_argument("--search", choices=SEARCH_MODES, default="global",
                   help="'global': (fine + coarse) / 2 at every fine voxel of the key case, the fine term "
                        "over the --context template (the reference SAM's search; seconds per case pair); "
                        "'window': fine search around the best coarse voxels only (as the pair sampler "
                        "matches: milliseconds, but lost when the coarse half points elsewhere); 'coarse': "
                        "the coarse argmax alone (where the coarse half points)")


def matcher_from_args(embed_dir, args: argparse.Namespace) -> Matcher:
    return Matcher(embed_dir, window=args.window, search=args.search, candidates=args.candidates,
                   context=args.context)
