"""`alice-ds phantom OUT_DIR --num N`: write the built-in synthetic CT dataset (FLARE layout)."""

from __future__ import annotations

import time

from alice_ds.console import console, progress, table
from alice_ds.data.phantom.write import write_dataset
from alice_ds.errors import UserError

_PHASE_SHORT = {"non_contrast": "plain", "arterial": "arterial", "portal_venous": "venous"}
"""Contrast phase names short enough for an 80-column summary table."""


def add_arguments(parser) -> None:
    parser.add_argument("out_dir", help="output folder (imagesTr/, labelsTr/, landmarks/, dataset.json)")
    parser.add_argument("--num", type=int, default=4, help="number of cases")
    parser.add_argument("--seed", type=int, default=0,
                        help="dataset seed; case i is the same for a given seed whatever --num is")
    parser.add_argument("--small", action="store_true",
                        help="fast small cases (~3 mm in-plane voxels, 128x128 matrix, 4-6 mm slices) "
                             "instead of realistic ones (512x512, 0.7-0.9 mm, 1.5-5 mm slices)")


def run(args) -> int:
    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}")
    rows = []
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("phantom", total=args.num)

        def on_case(case):
            info = case.info
            rows.append([case.case_id, "x".join(map(str, info["shape"])),
                         "{:.2f}/{:.1f}".format(info["spacing"][0], info["spacing"][2]), info["orientation"],
                         _PHASE_SHORT[info["phase"]], "{:.0f}-{:.0f}".format(*info["atlas_z_range"]),
                         len(case.landmarks)])
            bar.advance(task)

        write_dataset(args.out_dir, args.num, seed=args.seed, small=args.small, on_case=on_case)
    seconds = time.perf_counter() - start
    console.print(table(f"phantom dataset {args.out_dir} ({seconds:.1f} s, {seconds / args.num:.2f} s/case)",
                        ["case", "shape", "voxel xy/z", "stored", "phase", "z mm", "points"], rows))
    return 0
