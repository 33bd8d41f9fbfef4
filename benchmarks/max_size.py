"""The largest preset and batch that train on this device, per ZeRO stage and memory setting.

Each attempt is one `benchmarks/throughput.py` run in its own process (one warm-up and one timed
step of the real trainer; an out-of-memory error ends only that process), for the settings
`plain`, `ckpt` (activation checkpointing) and, under ZeRO-3, `ckpt+offload` (optimizer state and
parameters in CPU memory). Per preset the batch doubles from 1 until an attempt fails or
`--max_batch` is reached; a preset that fails at batch 1 ends the search for larger presets.
Reports, per stage and setting, the largest batch of each preset, its peak memory and samples/s.

    python benchmarks/max_size.py --presets B L H --roi 96 --zero 1 2 3 --bf16 --json out.json
    python benchmarks/max_size.py --presets tiny --roi 64 --zero 0 --max_batch 2     (CPU smoke run)

One process per attempt (world size 1); the launch of throughput.py itself runs under the same
interpreter, so run this where that works (CUDA, or DS_ACCELERATOR=cpu on the CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"plain": [], "ckpt": ["--checkpoint_activations"],
            "ckpt+offload": ["--checkpoint_activations", "--offload"]}


def attempt(args, preset: str, batch: int, stage: int, setting: str, work: Path) -> dict | None:
    """One throughput run: its result row, or None when it failed (out of memory, or a timeout)."""
    out = work / f"{preset}_z{stage}_{setting}_b{batch}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--preset", preset, "--roi", str(args.roi),
           "--batch_size", str(batch), "--zero", str(stage), "--steps", "1", "--warmup", "1",
           "--num_workers", str(args.num_workers), "--work_dir", str(work), "--json", str(out),
           *SETTINGS[setting], *(["--bf16"] if args.bf16 else [])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"  {preset} batch {batch} ZeRO-{stage} {setting}: timeout after {args.timeout} s", flush=True)
        return None
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        print(f"  {preset} batch {batch} ZeRO-{stage} {setting}: failed ({tail[0][:160]})", flush=True)
        return None
    row = json.loads(out.read_text())["rows"][f"ZeRO-{stage}"]
    print(f"  {preset} batch {batch} ZeRO-{stage} {setting}: {row['peak_mem_gib']:.1f} GiB, "
          f"{row['samples_per_s']:.2f} samples/s", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["B", "L", "H"], help="in increasing size")
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--zero", type=int, nargs="+", default=[1, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="ckpt+offload is tried under ZeRO-3 only")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--max_batch", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--timeout", type=int, default=600, help="seconds per attempt")
    p.add_argument("--work_dir", type=Path, default=None, help="data (made once, reused) and attempt results")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from alice_ds.console import console, table

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="alice_max_size_"))
    work.mkdir(parents=True, exist_ok=True)
    found: dict[str, dict] = {}
    for stage in args.zero:
        for setting in args.settings:
            if "offload" in setting and stage != 3:
                continue
            key = f"ZeRO-{stage} {setting}"
            found[key] = {}
            for preset in args.presets:
                best, batch = None, 1
                while batch <= args.max_batch:
                    row = attempt(args, preset, batch, stage, setting, work)
                    if row is None:
                        break
                    best = {"batch": batch, "peak_mem_gib": row["peak_mem_gib"], "samples_per_s": row["samples_per_s"]}
                    batch *= 2
                found[key][preset] = best
                if best is None:
                    break  # a larger preset will not fit either
    body = [[key, preset, *(["-"] * 3 if r is None else [r["batch"], f"{r['peak_mem_gib']:.1f}",
                                                          f"{r['samples_per_s']:.2f}"])]
            for key, by in found.items() for preset, r in by.items()]
    console.print(table(f"largest batch that trains, {args.roi}^3, {'bf16' if args.bf16 else 'fp32'}",
                        ["ZeRO, setting", "preset", "batch", "peak GiB", "samples/s"], body))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "found": found}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
