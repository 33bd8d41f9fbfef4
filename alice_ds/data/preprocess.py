"""`alice-ds preprocess`: decode each CT once into the memory-mapped cache (DESIGN §3).

Per case: MONAI `LoadImage` (nibabel) -> `Orientation("RAS")` -> `Spacing(spacing, bilinear)` ->
rounded int16 HU, written as `<case_id>.npy` + `<case_id>.json` (see `alice_ds.data.cache`).

- Idempotent: a case is skipped when its JSON records the same settings and the same source
  fingerprint (size + mtime, or the content digest when only the time changed).
- Atomic: the array goes to a temp file renamed into place, the JSON last (no fsync: the rename is
  atomic against a killed process, and fsync cost ~1 s per file on a busy disk here); an old JSON is removed
  before its array is replaced. A killed run leaves complete cases and stray temp files only (removed
  by the next run); `list_cases` ignores arrays without JSON.
- Sharded: `--shard I/N` (or a SLURM array, or torchrun's ranks: `alice_ds.shards`) takes every N-th
  case; shards write into one cache folder and each removes only its own cases' stale temporaries.
- Bad inputs do not stop the run: good cases finish, bad ones are listed, and the run fails at the
  end unless `skip_bad`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import EnsureChannelFirst, Orientation, Spacing
from rich.markup import escape

from alice_ds.args import shard
from alice_ds.console import console, progress, table, warn
from alice_ds.data import case_id_from_path
from alice_ds.data.cache import array_path, meta_path
from alice_ds.data.datalist import SECTIONS, load_datalist
from alice_ds.data.nifti import file_fingerprint, load_ct
from alice_ds.errors import DataError, UserError
from alice_ds.files import TMP_MARK, atomic_path, atomic_write_text, stale_temporaries
from alice_ds.shards import SHARD_HELP, Shard, resolve_shard

FORMAT_VERSION = 1
INT16_RANGE = (-32768, 32767)
_TABLE_MAX_ROWS = 50
"""Above this many cases the summary table lists only the bad ones (the counts line says the rest)."""
DEFAULT_SPACING = (1.5, 1.5, 2.0)
"""Cache voxel size in mm (RAS axes) unless `--spacing` says otherwise."""
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
"""Axis labels for MONAI's `Orientation`: (low, high) end of each world axis, nibabel convention."""


def cache_settings(spacing) -> dict:
    """Everything that changes the cached array; a case is redone when this differs."""
    return {"spacing": [float(s) for s in spacing], "orientation": "RAS", "interpolation": "bilinear",
            "padding": "border", "dtype": "int16", "format_version": FORMAT_VERSION}


@dataclass
class Summary:
    """Outcome of one preprocess run (case ids; bad cases as (source path, problem))."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad


def _up_to_date(cache_dir: Path, case_id: str, source: Path, settings: dict) -> bool:
    try:
        meta = json.loads(meta_path(cache_dir, case_id).read_text())
    except (OSError, ValueError):
        return False
    if meta.get("settings") != settings or not array_path(cache_dir, case_id).exists():
        return False
    old = meta.get("fingerprint", {})
    st = source.stat()
    if old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
        return True

    return old.get("size") == st.st_size and old.get("blake2b") == file_fingerprint(source)["blake2b"]


def process_case(source: str, case_id: str, cache_dir: str, spacing) -> dict:
    """Decode, reorient, resample and write one case. Returns a result row; a bad input is reported
    (`status="bad"`) rather than raised so a pool worker can carry on."""


    start = time.perf_counter()
    source_p, cache_p = Path(source), Path(cache_dir)
    try:
        fingerprint = file_fingerprint(source_p) if source_p.is_file() else None
        img = load_ct(source_p)
    except DataError as e:
        return {"case_id": case_id, "status": "bad", "source": source, "problem": e.problem}
    original_affine = np.asarray(img.affine, dtype=np.float64)
    original_shape = list(img.shape)
    x = EnsureChannelFirst(channel_dim="no_channel")(img)                 # [X, Y, Z] -> [1, X, Y, Z]
    x = Orientation(axcodes="RAS", labels=RAS_LABELS)(x)
    x = Spacing(pixdim=tuple(spacing), mode="bilinear", padding_mode="border", dtype=torch.float32)(x)
    arr = np.clip(np.rint(x[0].numpy()), *INT16_RANGE).astype(np.int16)   # [1, X, Y, Z] -> [X, Y, Z]
    affine = np.asarray(x.affine, dtype=np.float64)
    meta = {
        "case_id": case_id,
        "affine": affine.tolist(),
        "spacing": [float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "shape": list(arr.shape),
        "original_shape": original_shape,
        "original_spacing": [float(s) for s in np.sqrt((original_affine[:3, :3] ** 2).sum(axis=0))],
        "original_orientation": "".join(nib.aff2axcodes(original_affine)),
        "original_affine": original_affine.tolist(),
        "source": str(source_p.resolve()),
        "fingerprint": fingerprint,
        "settings": cache_settings(spacing),
        "hu_range": [int(arr.min()), int(arr.max())],
    }
    meta_path(cache_p, case_id).unlink(missing_ok=True)  # the old JSON must never describe a new array
    with atomic_path(array_path(cache_p, case_id)) as tmp:
        with open(tmp, "wb") as f:  # np.save would append .npy to a path
            np.save(f, arr)
    atomic_write_text(meta_path(cache_p, case_id), json.dumps(meta, indent=1))
    return {"case_id": case_id, "status": "done", "source": source, "shape": list(arr.shape),
            "orientation": meta["original_orientation"], "seconds": time.perf_counter() - start}


def _worker_init() -> None:

    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe


def _collect_cases(data_dir, json_list) -> list[tuple[str, str]]:
    """(case_id, absolute source) for every image of every list, in order, without duplicates."""

    lists = load_datalist(json_list, data_dir, check_files=False)
    seen: dict[str, str] = {}
    for section in SECTIONS:
        for item in lists[section]:
            cid, src = case_id_from_path(item["image"]), item["image"]
            if cid in seen and seen[cid] != src:
                raise DataError(json_list, f"case id {cid!r} used by two files: {seen[cid]} and {src}")
            seen[cid] = src
    return list(seen.items())


def preprocess_dataset(data_dir, json_list, cache_dir, spacing=DEFAULT_SPACING, workers: int = 1,
                       skip_bad: bool = False, show: bool = True, share: Shard = Shard()) -> Summary:
    """Fill `cache_dir` with every image of the datalist (training and validation), or with `share`
    of them. Prints a progress bar and a summary table when `show`. Raises `DataError` for the first
    bad case after all good ones are done, unless `skip_bad` (then bad cases are only warned about
    and listed)."""


    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise UserError(f"spacing must be three positive numbers (mm), got {spacing}")
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    cases = share.take(_collect_cases(data_dir, json_list))
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    mine = {f".{name}" for cid, _ in cases for name in (array_path(cache, cid).name, meta_path(cache, cid).name)}
    for p in stale_temporaries(cache):  # only this shard's: another shard's writer may run on another host
        if p.name.split(TMP_MARK, 1)[0] in mine:
            p.unlink(missing_ok=True)
    settings = cache_settings(spacing)
    summary = Summary()
    start = time.perf_counter()
    todo = []
    for cid, src in cases:
        if Path(src).is_file() and _up_to_date(cache, cid, Path(src), settings):
            summary.skipped.append(cid)
            summary.rows.append([cid, "up to date", "", ""])
        else:
            todo.append((src, cid, str(cache), spacing))

    def record(r: dict) -> None:
        if r["status"] == "bad":
            summary.bad.append((r["source"], r["problem"]))
            summary.rows.append([r["case_id"], "[red]bad[/red]", "", escape(r["problem"])])
        else:
            summary.done.append(r["case_id"])
            summary.rows.append([r["case_id"], "done", "x".join(map(str, r["shape"])),
                                 f"from {r['orientation']}, {r['seconds']:.1f} s"])

    if show and share.count > 1:
        console.print(f"preprocess: {share}, {len(cases)} cases", highlight=False)
    with progress(disable=not show, unit="cases") as bar:
        task = bar.add_task("preprocess", total=len(todo))
        if workers == 1 or len(todo) <= 1:
            for t in todo:
                record(process_case(*t))
                bar.advance(task)
        else:

            # spawn: forking a parent that already runs torch/OpenMP threads can deadlock the child.
            pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                                       initializer=_worker_init)
            try:
                for fut in as_completed([pool.submit(process_case, *t) for t in todo]):
                    record(fut.result())
                    bar.advance(task)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: finish running cases only
    summary.seconds = time.perf_counter() - start
    summary.rows.sort(key=lambda r: r[0])
    if show:
        rows = summary.rows
        if len(rows) > _TABLE_MAX_ROWS:  # large datasets: only the cases that need attention
            rows = [r for r in rows if r[1] != "up to date" and r[1] != "done"]
        if rows:
            console.print(table(f"preprocess -> {cache} (spacing {spacing} mm, {summary.seconds:.1f} s)",
                                ["case", "status", "shape", "note"], rows))
        console.print(f"{len(summary.done)} written, {len(summary.skipped)} up to date, {len(summary.bad)} bad",
                      highlight=False)
    if summary.bad:
        if not skip_bad:
            path, problem = summary.bad[0]
            more = f" (and {len(summary.bad) - 1} more bad cases, see the summary)" if len(summary.bad) > 1 else ""
            raise DataError(path, problem + more)
        for path, problem in summary.bad:
            warn(f"skipped {path}: {problem}")
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--data_dir", required=True, help="root the datalist paths are relative to")
    parser.add_argument("--json_list", required=True, help="decathlon datalist (from `alice-ds datalist`)")
    parser.add_argument("--cache_dir", required=True, help="output folder: <case_id>.npy (int16 HU) + .json")
    parser.add_argument("--spacing", type=float, nargs=3, default=DEFAULT_SPACING, metavar=("X", "Y", "Z"),
                        help="target voxel size in mm (RAS axes)")
    parser.add_argument("--workers", type=int, default=1,
                        help="parallel processes (each decodes and resamples one case at a time)")
    parser.add_argument("--shard", type=shard, default=None, metavar="I/N", help=SHARD_HELP)
    parser.add_argument("--skip_bad", action="store_true",
                        help="exit 0 even when some inputs are unreadable (they are still listed)")


def run(args) -> int:
    preprocess_dataset(args.data_dir, args.json_list, args.cache_dir, spacing=args.spacing,
                       workers=args.workers, skip_bad=args.skip_bad, share=resolve_shard(args.shard))
    return 0
