"""Which half of a SAM model fails? Landmark accuracy of learned embeddings, taken apart.

On cases with known landmarks (phantoms), for the embeddings of `--embed_dir`:

- `learned, window`: the Matcher as the pair sampler uses it (fine windows around the best coarse
  voxels; `--candidates`, default as the Matcher's);
- `learned, global`: (fine + coarse) / 2 at every fine voxel (`Matcher(search="global")`);
- `learned coarse alone`: the coarse argmax voxel (`Matcher(search="coarse")`), no fine search;
- `learned fine + oracle coarse`: the learned fine grid with a ground-truth coarse grid
  (alice_ds.sam.oracle: anatomical position up to an affine landmark fit), window search: what the
  fine half gives when the coarse half is right;
- `oracle`: both halves from the landmark fit (the accuracy of that fit);
- `learned fine + atlas coarse` (window and global search) and `atlas oracle` (phantom landmark
  files only, `--no_atlas` skips them): the same with the generator's exact anatomical frame
  (`alice_ds.sam.oracle.write_atlas_oracle_embedding`) instead of the landmark fit: what a perfect
  geometric coarse half gives, and exact correspondence up to the per-case organ shifts (the
  ceiling of anatomy mapped geometrically, on landmarks that move with their organ).

    python benchmarks/sam_halves.py --embed_dir E --cache_dir C --landmarks P/landmarks \
        [--json_list P.json] [--json OUT]

`--json_list`: only its validation cases (held out from sam-train). The oracle's reference frame is
the landmark set of the first case that has one. Prints a table (with the median absolute error per
world axis: on phantoms the coarse half errs along z); `--json` writes the same numbers, and per
landmark.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from alice_ds.args import positive_int
from alice_ds.sam import DEFAULT_CANDIDATES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embed_dir", required=True, help="learned embeddings (alice-ds embed)")
    p.add_argument("--cache_dir", required=True, help="the cache they were embedded from (grids of the oracle)")
    p.add_argument("--landmarks", required=True, help="landmark folder (alice-ds phantom writes P/landmarks)")
    p.add_argument("--json_list", default=None, help="datalist: evaluate its validation cases only")
    p.add_argument("--window", type=positive_int, default=None, help="fine-search window (default: the Matcher's)")
    p.add_argument("--candidates", type=positive_int, default=DEFAULT_CANDIDATES,
                   help="coarse candidates of the window searches (1: the coarse argmax alone)")
    p.add_argument("--no_atlas", action="store_true",
                   help="skip the atlas-oracle rows (needs phantom landmark files with info.generator)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="write the oracle and mixed embedding folders (oracle/, mixed/, atlas/, mixed_atlas/) "
                        "here and keep them (default: a temporary folder)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results here")
    args = p.parse_args(argv)

    from alice_ds.console import fail
    from alice_ds.errors import UserError

    try:
        return _run(args)
    except UserError as e:
        fail(str(e))
        return 2


def fixed_cell(r: dict) -> str:
    """'% within 10 mm' of the atlas-fixed and the organ-bound phantom landmarks: '32 / 60'."""
    if "fixed" not in r:
        return "-"
    return f"{100 * r['fixed']['within_10mm']:.0f} / {100 * r['organ_bound']['within_10mm']:.0f}"


def _run(args) -> int:
    from alice_ds.console import console, table
    from alice_ds.data import case_key
    from alice_ds.data.cache import open_case
    from alice_ds.data.datalist import split_case_ids
    from alice_ds.data.landmarks import read_landmark_folder
    from alice_ds.data.phantom import subject_for_landmarks
    from alice_ds.errors import DataError
    from alice_ds.sam import DEFAULT_WINDOW
    from alice_ds.sam.evaluate import AXES_HEADER, axes_cell, evaluate
    from alice_ds.sam.io import embedding_path, list_embeddings, open_embedding, write_embedding
    from alice_ds.sam.oracle import write_atlas_oracle_embedding, write_oracle_embedding

    window = args.window or DEFAULT_WINDOW
    folder = read_landmark_folder(args.landmarks)
    files, marks = {k: f for k, (f, _) in folder.items()}, {k: m for k, (_, m) in folder.items()}
    only = None if args.json_list is None else set(split_case_ids(args.json_list, "validation"))
    cases = [c for c in list_embeddings(args.embed_dir)
             if case_key(c) in marks and (only is None or c in only)]
    reference = marks[sorted(marks)[0]]
    oracles = {"oracle": "mixed"} if args.no_atlas else {"oracle": "mixed", "atlas": "mixed_atlas"}
    results, per_landmark = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep or tmp)
        evaluations = [("learned, window", args.embed_dir, "window"), ("learned, global", args.embed_dir, "global"),
                       ("learned coarse alone", args.embed_dir, "coarse"),
                       ("learned fine + oracle coarse", tmp / "mixed", "window"), ("oracle", tmp / "oracle", "window")]
        if not args.no_atlas:
            evaluations += [("learned fine + atlas coarse", tmp / "mixed_atlas", "window"),
                            ("learned fine + atlas coarse, global", tmp / "mixed_atlas", "global"),
                            ("atlas oracle", tmp / "atlas", "window")]
        for c in cases:
            case = open_case(args.cache_dir, c)
            learned = open_embedding(args.embed_dir, c)
            write_oracle_embedding(embedding_path(tmp / "oracle", c), c, case.affine, case.shape,
                                   marks[case_key(c)], reference)
            if not args.no_atlas:
                try:
                    subject = subject_for_landmarks(files[case_key(c)])
                except DataError as e:
                    raise DataError(e.path, f"{e.problem} (--no_atlas skips the rows that need phantom "
                                            "landmark files)") from None
                write_atlas_oracle_embedding(embedding_path(tmp / "atlas", c), c, case.affine, case.shape, subject)
            for oracle_name, mixed in oracles.items():
                oracle = open_embedding(tmp / oracle_name, c)
                # each grid keeps its own affine: the Matcher maps the coarse argmax through world mm
                write_embedding(embedding_path(tmp / mixed, c), learned.fine(), oracle.coarse(),
                                learned.fine_affine, oracle.coarse_affine, learned.fine_stride,
                                oracle.coarse_stride, f"{learned.meta['model_id']}+{oracle_name}-coarse", c)
        for name, directory, search in evaluations:
            r = evaluate(directory, marks, window=window, only=set(cases), search=search, candidates=args.candidates)
            results[name], per_landmark[name] = r["overall"], r["per_landmark"]
            results[name] |= {k: r[k] for k in ("fixed", "organ_bound") if k in r}
    rows = [[name, r["n"], f"{r['median_mm']:.1f}", f"{r['mean_mm']:.1f}", f"{100 * r['within_10mm']:.1f}",
             f"{100 * r['beyond_50mm']:.1f}", fixed_cell(r), axes_cell(r)] for name, r in results.items()]
    console.print(table(f"SAM halves: {len(cases)} cases, window {window}, {args.candidates} coarse candidates",
                        ["embeddings", "n", "median mm", "mean mm", "% within 10 mm", "% beyond 50 mm",
                         "fixed / organ-bound % within 10 mm", AXES_HEADER], rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": cases, "window": window, "candidates": args.candidates,
                                               "results": results, "per_landmark": per_landmark}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
