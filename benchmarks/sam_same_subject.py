"""Same subject, another field of view: SAM matching from a CT into a crop of itself and into a copy
of itself stored LPS, where the right answer is the query point itself (same world frame).

For each case: a crop of the NIfTI keeping 60-75 % of its extent per axis (a random box, the
original voxels and affine, so world mm are unchanged) and the whole image reoriented to LPS; both
go through the real `preprocess` (the original's cache spacing) and `embed`. The points are the
case's landmarks inside the crop plus `--body_points` random body voxels of the crop; each is
matched from the original into each copy, with every `--search` mode. Reported per copy and mode:
median and 95th percentile of the distance to the point itself, and % within 3 / 6 mm.

    python benchmarks/sam_same_subject.py --data_dir P --cache_dir C --sam_checkpoint S/sam.safetensors \
        --work_dir W [--json_list P.json] [--json OUT]

`--json_list`: its validation cases only (held out from sam-train).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alice_ds.args import positive_int
from alice_ds.sam import DEFAULT_WINDOW, SEARCH_MODES
from alice_ds.sam.io import CODE_BITS, DEFAULT_BITS

CROP_FRACTION = (0.60, 0.75)
"""Extent of the crop per axis, as a fraction of the case's own (drawn per axis)."""
COPIES = ("crop", "lps")
INTERIOR_MM = 16.0
"""Points at least this far inside every face of the crop are also reported on their own: nearer the
edge of the field of view the network's features of the crop see padding where the original saw
tissue."""


def write_copies(image_path: Path, out_dir: Path, key: str, rng: np.random.Generator) -> dict[str, Path]:
    """`<out_dir>/<key>_crop_0000.nii.gz` (a random box of 60-75 % of the extent per axis, same world
    frame) and `<out_dir>/<key>_lps_0000.nii.gz` (the whole image reoriented to LPS) -> {copy: path}."""
    import nibabel as nib

    img = nib.load(str(image_path))
    shape = np.asarray(img.shape[:3])
    size = np.maximum(np.rint(shape * rng.uniform(*CROP_FRACTION, size=3)).astype(int), 1)
    lo = rng.integers(0, shape - size + 1)
    crop = img.slicer[lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]]  # keeps world mm
    current = nib.orientations.io_orientation(img.affine)
    lps = img.as_reoriented(nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("LPS")))
    out = {}
    for name, im in (("crop", crop), ("lps", lps)):
        path = out_dir / f"{key}_{name}_0000.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(im.dataobj), im.affine), str(path))
        out[name] = path
    return out


def body_points_inside(case, inside_of, k: int, rng: np.random.Generator) -> np.ndarray:
    """`k` random body voxels (world mm `[k, 3]`) of cached `case` that lie inside cached `inside_of`."""
    from alice_ds.data.cache import body_voxels

    ijk = body_voxels(case.array, 1)  # [M, 3]
    pts = case.voxel_to_world(ijk[rng.permutation(len(ijk))[:20 * k]])
    keep = _inside(inside_of, pts)
    return pts[keep][:k]


def _inside(case, points_mm) -> np.ndarray:
    ijk = case.world_to_voxel(points_mm)
    return ((ijk >= 0) & (ijk <= np.asarray(case.shape) - 1)).all(1)


def run(data_dir, cache_dir, checkpoint, work_dir, cases: list[str], body_points: int = 32,
        searches=SEARCH_MODES[:2], window: int = DEFAULT_WINDOW, seed: int = 0, bits: int = DEFAULT_BITS) -> dict:
    """The check for `cases` (cache ids of `cache_dir`, preprocessed from `data_dir`): copies,
    preprocessing, embedding (codes of `bits` bits) and matching under `work_dir` -> {copy: {search: summary}} with
    summary = {n, median_mm, p95_mm, within_3mm, within_6mm} over "all" points, the "landmarks", the
    "body points" and those at least INTERIOR_MM inside the crop; plus "errors" per copy and search,
    "is_landmark" and "inside_mm" per point."""
    from alice_ds.data import case_key
    from alice_ds.data.cache import open_case
    from alice_ds.data.landmarks import load_landmarks
    from alice_ds.data.preprocess import process_case
    from alice_ds.errors import DataError
    from alice_ds.sam.embed import DEFAULT_OVERLAP, DEFAULT_TILE, embed_case
    from alice_ds.sam.matcher import Matcher
    from alice_ds.sam.train import load_model

    work_dir = Path(work_dir)
    raw, cache, emb = work_dir / "raw", work_dir / "cache", work_dir / "embed"
    for d in (raw, cache, emb):
        d.mkdir(parents=True, exist_ok=True)
    model, model_id = load_model(checkpoint)
    marks = load_landmarks(Path(data_dir) / "landmarks")
    rng = np.random.default_rng(seed)
    errors = {c: {s: [] for s in searches} for c in COPIES}  # distances, case by case
    is_landmark: list[bool] = []  # per point, in the same order
    inside_mm: list[float] = []  # per point: distance to the nearest face of the crop
    for cid in cases:
        original = open_case(cache_dir, cid)
        spacing = original.meta["spacing"]
        paths = write_copies(Path(original.meta["source"]), raw, case_key(cid), rng)
        for name, path in paths.items():
            row = process_case(str(path), f"{case_key(cid)}_{name}_0000", str(cache), spacing)
            if row["status"] != "done":
                raise DataError(path, f"preprocessing the {name} copy failed: {row.get('problem')}")
        for c in (cid, *[f"{case_key(cid)}_{n}_0000" for n in COPIES]):
            embed_case(model, model_id, cache_dir if c == cid else cache, c, emb, DEFAULT_TILE, DEFAULT_OVERLAP,
                       bits=bits)
        crop = open_case(cache, f"{case_key(cid)}_crop_0000")
        named = np.asarray(list(marks.get(case_key(cid), {}).values()), dtype=np.float64).reshape(-1, 3)
        named = named[_inside(crop, named)]
        points = np.concatenate([named, body_points_inside(original, crop, body_points, rng)])
        is_landmark += [True] * len(named) + [False] * (len(points) - len(named))
        ijk = crop.world_to_voxel(points)
        inside_mm += (np.minimum(ijk, np.asarray(crop.shape) - 1 - ijk) * crop.meta["spacing"]).min(1).tolist()
        for search in searches:
            matcher = Matcher(emb, window=window, search=search)
            for name in COPIES:
                got, _ = matcher.match(cid, f"{case_key(cid)}_{name}_0000", points)
                errors[name][search] += np.linalg.norm(got - points, axis=1).tolist()
    lm, deep = np.asarray(is_landmark), np.asarray(inside_mm) >= INTERIOR_MM
    out = {name: {s: {"all": summarize(e), "landmarks": summarize(np.asarray(e)[lm]),
                      "body points": summarize(np.asarray(e)[~lm]),
                      f">= {INTERIOR_MM:g} mm inside the crop": summarize(np.asarray(e)[deep])}
                  for s, e in by.items()}
           for name, by in errors.items()}
    out["errors"], out["is_landmark"], out["inside_mm"] = errors, is_landmark, inside_mm
    return out


def summarize(errors) -> dict:
    e = np.asarray(errors, dtype=np.float64)
    if len(e) == 0:
        return {"n": 0, "median_mm": float("nan"), "p95_mm": float("nan"), "within_3mm": float("nan"),
                "within_6mm": float("nan")}
    return {"n": int(len(e)), "median_mm": float(np.median(e)), "p95_mm": float(np.percentile(e, 95)),
            "within_3mm": float(np.mean(e <= 3)), "within_6mm": float(np.mean(e <= 6))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="the phantom folder (imagesTr/, landmarks/)")
    p.add_argument("--cache_dir", required=True, help="its cache (alice-ds preprocess)")
    p.add_argument("--sam_checkpoint", required=True, help="OUTPUT_DIR/sam.safetensors of alice-ds sam-train")
    p.add_argument("--work_dir", required=True, help="copies, their cache and every embedding go here")
    p.add_argument("--json_list", default=None, help="datalist: its validation cases only")
    p.add_argument("--body_points", type=positive_int, default=32, help="random body points per case")
    p.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW, help="fine-search window")
    p.add_argument("--search", nargs="+", choices=SEARCH_MODES[:2], default=list(SEARCH_MODES[:2]),
                   help="matcher searches to report")
    p.add_argument("--seed", type=int, default=0, help="crop boxes and body points")
    p.add_argument("--bits", type=int, choices=CODE_BITS, default=DEFAULT_BITS, help="embed's --bits")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results here")
    args = p.parse_args(argv)

    from alice_ds.console import console, fail, table
    from alice_ds.data.cache import list_cases
    from alice_ds.data.datalist import split_case_ids
    from alice_ds.errors import UserError

    try:
        cases = list_cases(args.cache_dir)
        if args.json_list:
            held = set(split_case_ids(args.json_list, "validation"))
            cases = [c for c in cases if c in held]
        res = run(args.data_dir, args.cache_dir, args.sam_checkpoint, args.work_dir, cases, args.body_points,
                  args.search, args.window, args.seed, args.bits)
    except UserError as e:
        fail(str(e))
        return 2
    rows = [[copy, s, kind, r["n"], f"{r['median_mm']:.1f}", f"{r['p95_mm']:.1f}", f"{100 * r['within_3mm']:.1f}",
             f"{100 * r['within_6mm']:.1f}"]
            for copy in COPIES for s, by in res[copy].items() for kind, r in by.items()]
    console.print(table(f"same subject, other field of view: {len(cases)} cases",
                        ["copy", "search", "points", "n", "median mm", "p95 mm", "% within 3 mm",
                         "% within 6 mm"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": cases, **res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
