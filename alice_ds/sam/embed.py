"""`alice-ds embed`: SAM fine/coarse embeddings of every cached case, one safetensors file each.

A case is resampled once to the SAM grid (the model's spacing, 2 mm by default; reading the
memory-mapped cache), then run through SAMNet in overlapping tiles of `--tile` voxels so activation
memory is bounded whatever the volume size; each tile contributes only its interior (half the
overlap is dropped at inner seams). Tiles start on multiples of the coarse stride, so fine and
coarse grids of all tiles line up exactly.
The fine grid is stored as 4-bit (or `--bits 8`) codes of its top principal directions (`--channels`,
by default as many as keep 99.9 % of the energy; `alice_ds.sam.io.compress_fine`).
Each face of the volume that cuts through the body is replicated `BORDER` voxels (32 mm) outwards
before the network, so that a scan cut short is embedded near its faces as a longer scan of the same
body is; faces in air (the sides of a CT whose body fits in the field of view) are left as they are.
Existing files made by the same model with the same channels, bits and border are skipped
(idempotent); files are written atomically.
Sharded like `preprocess` (`--shard I/N`, a SLURM array, or torchrun's ranks with one GPU each:
`alice_ds.shards`); the shards' files together are one unsharded run's.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import torch

from alice_ds.args import shard
from alice_ds.console import console, progress, table, warn
from alice_ds.data.cache import BODY_HU, list_cases, open_case
from alice_ds.errors import DataError, UserError
from alice_ds.sam.crops import resample, sam_grid
from alice_ds.sam.geometry import scaled_affine
from alice_ds.sam.io import AUTO_KEEP, CODE_BITS, DEFAULT_BITS, embedding_path, open_embedding, write_embedding
from alice_ds.sam.network import COARSE_STRIDE, EMBED_DIM, FINE_STRIDE, scale_hu
from alice_ds.sam.train import load_model
from alice_ds.shards import SHARD_HELP, resolve_shard

DEFAULT_TILE = 224
"""Tile edge in SAM-grid voxels (448 mm at 2 mm): the cross-section of a CT fits in one tile, so
only long scans are tiled (along z); smaller tiles recompute the overlaps (160: 2.4x the time of
224 on a 200^3 case)."""
DEFAULT_OVERLAP = 64
"""Tile overlap in SAM-grid voxels: 32 voxels (64 mm) of context on each side of an inner seam."""
BORDER = 16
"""SAM-grid voxels (32 mm at 2 mm) by which each face of a volume is replicated outwards before the
network. Without it, the network sees air where a scan is cut, so points near the faces of a smaller
field of view get other embeddings than the same points in a larger scan (a CT matched into a crop of
itself: p95 38.0 -> 15.7 mm; docs/experiments/2026-12-03-sam-embed-edge-padding.md). A multiple of
the coarse stride, so that the fine and coarse grids stay aligned with the unpadded volume's."""
CUT_FACE_FRACTION = 0.002
"""A face of a volume cuts through the body (and is replicated outwards) when more than this share
of its voxels is above BODY_HU: one stray voxel does not count. Only such faces are padded: a CT's
body usually fits in its field of view in x and y, so padding z alone keeps the border's cost low:
on the held-out phantoms 1.25x the network time of an unpadded case (+1.6 CPU-s) instead of 1.70x
(+4.6) with every face (docs/experiments/2026-12-03-sam-embed-edge-padding.md)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache_dir", required=True, help="preprocessed cache (alice-ds preprocess)")
    p.add_argument("--sam_checkpoint", required=True,
                   help="SAM weights (.safetensors with its .json sidecar), e.g. OUTPUT_DIR/sam.safetensors")
    p.add_argument("--embed_dir", required=True, help="output folder: one <case_id>.safetensors per case")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel processes, each embedding whole cases (CPU threads are shared out)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE,
                   help="tile edge in SAM-grid voxels (multiple of 32; the replicated border adds "
                        f"{2 * BORDER}); lower it when memory is short")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                   help="overlap between tiles in SAM-grid voxels (multiple of 32, < tile)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads with --workers 1 (on a shared CPU, 1 avoids threads "
                        "waiting for each other)")
    p.add_argument("--channels", type=channels_arg, default=None, metavar="auto|K",
                   help="fine-grid channels stored per voxel as codes: the case's top principal "
                        f"directions of the {EMBED_DIM}-d embedding. 'auto' (default): as many as keep "
                        f"{AUTO_KEEP * 100:.1f} %% of its energy (16 for a width-0.125 SAMNet, 32 for 0.25); "
                        f"K: exactly K ({EMBED_DIM} = all, only quantised)")
    p.add_argument("--bits", type=int, choices=CODE_BITS, default=DEFAULT_BITS,
                   help="bits per stored code: 4 (two channels per byte; 16 MB per full-size CT with a "
                        "width-0.25 SAMNet) or 8 (about twice the size; matches within one subject 0.1-0.2 mm "
                        "closer at the median, across subjects no difference measured)")
    p.add_argument("--force", action="store_true", help="re-embed cases whose file already exists")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda:LOCAL_RANK if CUDA is available, else cpu)")
    p.add_argument("--shard", type=shard, default=None, metavar="I/N", help=SHARD_HELP)


LOW_KEPT = 0.9
"""Below this share of the fine vectors' energy kept by the stored channels, `embed` warns. Of a
width-0.25 SAMNet's 32 directions on the held-out phantoms, 24 kept >= 92.6 % and cost 0.25 mm of
median landmark error, 20 kept >= 85.9 % and cost 1.8 mm, 16 kept >= 77.8 % and cost 5.3 mm."""
TILE_ALIGN = 32
"""Tiles and overlaps are multiples of 2 x the coarse stride so half an overlap is on the coarse grid."""


def channels_arg(text: str) -> int | None:
    """argparse type of `--channels`: 'auto' -> None, else an int in [1, 128]."""
    if text == "auto":
        return None
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of channels, got {text!r}") from None
    if not 1 <= k <= EMBED_DIM:
        raise argparse.ArgumentTypeError(f"channels must be in [1, {EMBED_DIM}], got {k}")
    return k


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start voxels of the tiles along one axis of `size` voxels (the last one may be shorter)."""
    starts = [0]
    while starts[-1] + tile < size:
        starts.append(starts[-1] + tile - overlap)
    return starts


def cut_faces(hu) -> np.ndarray:
    """Which faces of a volume HU [X, Y, Z] cut through the body: bool [3, 2] (axis; low, high face),
    True where more than CUT_FACE_FRACTION of the face's voxels are above BODY_HU."""
    hu = torch.as_tensor(hu)
    return np.array([[float((hu.select(axis, i) > BODY_HU).float().mean()) > CUT_FACE_FRACTION
                      for i in (0, hu.shape[axis] - 1)] for axis in range(3)])


def embed_volume(model, hu, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, border: int = BORDER,
                 faces: np.ndarray | None = None):
    """SAM embeddings of a volume on the SAM grid, HU float [X, Y, Z] -> (fine fp16
    [ceil(X/2), ..., 128], coarse fp16 [ceil(X/s_x), ..., 128] for the model's coarse_stride s),
    channel-last, tile by tile. The faces `faces` (bool [3, 2], default: every face) are replicated
    `border` voxels out first (tiles `tile + 2 border` wide) and the outputs of that margin dropped."""
    if border % COARSE_STRIDE:
        raise ValueError(f"border must be a multiple of the coarse stride {COARSE_STRIDE}, got {border}")
    strides = ((FINE_STRIDE,) * 3, model.coarse_stride)  # (fine, coarse), per axis
    pad = border * (np.ones((3, 2), dtype=np.int64) if faces is None else np.asarray(faces, dtype=np.int64))
    if pad.any():
        hu = torch.as_tensor(hu)
        shape = tuple(hu.shape)
        padded = torch.nn.functional.pad(hu[None, None].float(), pad[::-1].reshape(-1).tolist(),  # z first
                                         mode="replicate")[0, 0]
        # tiles 2 b wider, so a volume that is one tile across stays one tile (as many tiles as unpadded)
        fine, coarse = embed_volume(model, padded, tile + 2 * border, overlap, border=0)  # [X/2 + b, ...]
        return tuple(t[tuple(slice(lo // s, lo // s + math.ceil(n / s))
                             for lo, n, s in zip(pad[:, 0], shape, stride))].clone()
                     for t, stride in zip((fine, coarse), strides))
    shape = tuple(hu.shape)
    fine, coarse = (torch.empty(*[math.ceil(n / s) for n, s in zip(shape, stride)], EMBED_DIM, dtype=torch.float16)
                    for stride in strides)
    device = next(model.parameters()).device
    starts = [tile_starts(s, tile, overlap) for s in shape]
    half = overlap // 2
    with torch.inference_mode():
        for sx in starts[0]:
            for sy in starts[1]:
                for sz in starts[2]:
                    lo = (sx, sy, sz)
                    hi = tuple(min(s + tile, n) for s, n in zip(lo, shape))
                    x = scale_hu(hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], model.hu_window)[None, None]
                    x = x.to(device)
                    f, c = model(x)
                    # owned interior of this tile in SAM-grid voxels: drop half the overlap at inner seams
                    own_lo = [s + half if s > 0 else 0 for s in lo]
                    own_hi = [h - half if h < n else n for h, n in zip(hi, shape)]
                    for out, t, stride in zip((fine, coarse), (f, c), strides):
                        a = [ol // s for ol, s in zip(own_lo, stride)]
                        b = [math.ceil(oh / s) for oh, s in zip(own_hi, stride)]
                        o = [st // s for st, s in zip(lo, stride)]
                        out[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = t[0].permute(1, 2, 3, 0)[  # [C,x,y,z] -> [x,y,z,C]
                            a[0] - o[0]:b[0] - o[0], a[1] - o[1]:b[1] - o[1], a[2] - o[2]:b[2] - o[2]
                        ].to(torch.float16).cpu()
    return fine, coarse


BORDER_KEY = "border_voxels"
"""File metadata: `BORDER` of the run that wrote it (absent: an older file, embedded without it)."""
FACES_KEY = "border_faces"
"""File metadata: the faces replicated outwards, e.g. "z-z+" (`faces_text`; "" for none; absent: an
older file, whose every face was padded)."""


def embed_case(model, model_id: str, cache_dir, case_id: str, embed_dir, tile: int, overlap: int,
               channels: int | None = None, bits: int = DEFAULT_BITS):
    """Embed one cached case into `<embed_dir>/<case_id>.safetensors` (the faces that cut through the
    body replicated `BORDER` voxels out; the file records both)."""
    case = open_case(cache_dir, case_id)
    affine, shape = sam_grid(case.affine, case.shape, model.spacing_mm)
    hu = resample(case.array, case.affine, affine, shape)
    faces = cut_faces(hu)
    fine, coarse = embed_volume(model, hu, tile, overlap, BORDER, faces)
    write_embedding(embedding_path(embed_dir, case_id), fine, coarse,
                    scaled_affine(affine, [FINE_STRIDE] * 3), scaled_affine(affine, model.coarse_stride),
                    [FINE_STRIDE] * 3, model.coarse_stride, model_id, case_id, channels, bits,
                    extra_meta={BORDER_KEY: str(BORDER), FACES_KEY: faces_text(faces)})


def faces_text(faces: np.ndarray) -> str:
    """bool [3, 2] -> the padded faces as text, e.g. "x-z-z+"."""
    return "".join(f"{a}{s}" for a, row in zip("xyz", faces) for s, on in zip("-+", row) if on)


def _up_to_date(embed_dir, case_id: str, model_id: str, channels: int | None, bits: int) -> bool:
    """Whether the case's file exists, reads in this format and was made by this model with these
    channels (any number with `channels` None: auto), bits and border rule."""
    if not embedding_path(embed_dir, case_id).exists():
        return False
    try:
        ef = open_embedding(embed_dir, case_id)
    except DataError:  # a corrupt leftover or an older format is simply re-embedded
        return False
    return (ef.meta["model_id"] == model_id and channels in (None, ef.channels) and ef.bits == bits
            and ef.meta.get(BORDER_KEY) == str(BORDER) and FACES_KEY in ef.meta)


_WORKER: dict = {}


def _worker_init(checkpoint: str, device: str, threads: int, job: dict) -> None:
    torch.set_num_threads(threads)
    _WORKER["model"], _WORKER["model_id"] = load_model(checkpoint, device)
    _WORKER["job"] = job


def _worker_embed(case_id: str) -> tuple[str, float, float, float, int]:
    """(case id, seconds, share of the fine vectors' energy the stored channels keep, file MB,
    channels)."""
    t0 = time.time()
    job = _WORKER["job"]
    embed_case(_WORKER["model"], _WORKER["model_id"], job["cache_dir"], case_id, job["embed_dir"],
               job["tile"], job["overlap"], job["channels"], job["bits"])
    ef = open_embedding(job["embed_dir"], case_id)
    return case_id, time.time() - t0, float(ef.meta["fine_kept"]), ef.path.stat().st_size / 1e6, ef.channels


def run(args) -> int:
    if args.tile % TILE_ALIGN or args.tile < TILE_ALIGN:
        raise UserError(f"--tile must be a positive multiple of {TILE_ALIGN}, got {args.tile}")
    if args.overlap % TILE_ALIGN or not 0 <= args.overlap < args.tile:
        raise UserError(f"--overlap must be a multiple of {TILE_ALIGN} in [0, --tile), got {args.overlap}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    share = resolve_shard(args.shard)
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    model, model_id = load_model(args.sam_checkpoint, device)
    Path(args.embed_dir).mkdir(parents=True, exist_ok=True)
    cases = share.take(list_cases(args.cache_dir))
    todo = [c for c in cases
            if args.force or not _up_to_date(args.embed_dir, c, model_id, args.channels, args.bits)]
    where = f" ({share})" if share.count > 1 else ""
    console.print(f"embed{where}: {len(cases)} cached cases, {len(cases) - len(todo)} up to date, "
                  f"{len(todo)} to embed with {model_id} on {device}", highlight=False)
    job = {"cache_dir": args.cache_dir, "embed_dir": args.embed_dir, "tile": args.tile,
           "overlap": args.overlap, "channels": args.channels, "bits": args.bits}
    seconds: list[float] = []
    sizes: list[tuple[float, float, int]] = []
    with progress(unit="cases") as bar:
        task = bar.add_task("embed", total=len(todo))
        if args.workers == 1 or len(todo) <= 1:
            torch.set_num_threads(args.threads)
            _WORKER.update(model=model, model_id=model_id, job=job)
            results = map(_worker_embed, todo)
            pool = None
        else:
            threads = max(1, (os.cpu_count() or 1) // args.workers)
            pool = mp.get_context("spawn").Pool(args.workers, _worker_init,
                                                (args.sam_checkpoint, device, threads, job))
            results = pool.imap_unordered(_worker_embed, todo)
        try:
            for case_id, s, kept, mb, k in results:
                seconds.append(s)
                sizes.append((kept, mb, k))
                bar.update(task, advance=1, description=f"embed {case_id} {s:.1f} s")
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    if seconds:
        kept, mb, k = np.array(sizes).T
        console.print(table("embed", ["cases embedded", "skipped", "s/case (mean)", "s/case (max)", "MB/case (mean)",
                                      "channels", "bits", "energy kept (min)"],
                            [[len(seconds), len(cases) - len(todo), f"{np.mean(seconds):.2f}",
                              f"{np.max(seconds):.2f}", f"{np.mean(mb):.1f}",
                              f"{k.min():.0f}" + (f"-{k.max():.0f}" if k.max() > k.min() else ""), args.bits,
                              f"{kept.min():.4f}"]]))
        if kept.min() < LOW_KEPT:
            warn(f"the stored channels keep only {kept.min():.1%} of some cases' fine embedding energy: "
                 f"matching loses accuracy (--channels auto keeps {AUTO_KEEP:.1%}; see docs/sam.md)")
    return 0
