"""`alice-ds match`: where does a world-mm point of one case land in another? (A debugging tool the
reference's users asked for.) Points are world mm of the RAS frame, as everywhere in alice-ds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alice_ds.files import atomic_write_text
from alice_ds.sam.matcher import add_matcher_arguments, matcher_from_args


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
