"""SAM embedding files: one `<embed_dir>/<case_id>.safetensors` per case (docs/interfaces.md).

Tensors `fine` [Xf, Yf, Zf, 128] and `coarse` [Xc, Yc, Zc, 128], fp16, channel-last and
L2-normalised per voxel, so a box of the fine grid is a few contiguous runs that `safe_open(...)
.get_slice` reads without touching the rest of the file. Metadata values are JSON strings: the
voxel -> world-mm affine of each grid (RAS), the strides in voxels of the 2 mm SAM grid, the model id.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alice_ds.errors import DataError
from alice_ds.files import atomic_path

FORMAT_VERSION = "1"
EMBED_DIM = 128
SUFFIX = ".safetensors"
REQUIRED_META = ("case_id", "fine_affine", "coarse_affine", "fine_stride", "coarse_stride",
                 "model_id", "format_version")


def embedding_path(embed_dir, case_id: str) -> Path:
    return Path(embed_dir) / f"{case_id}{SUFFIX}"


def list_embeddings(embed_dir) -> list[str]:
    """Sorted case ids with an embedding file in `embed_dir` (temporary files excluded)."""
    d = Path(embed_dir)
    if not d.is_dir():
        raise DataError(d, "embedding directory does not exist (run `alice-ds embed` first)")
    return sorted(p.name[:-len(SUFFIX)] for p in d.glob(f"*{SUFFIX}") if not p.name.startswith("."))


def write_embedding(path, fine: torch.Tensor, coarse: torch.Tensor, fine_affine, coarse_affine,
                    fine_stride, coarse_stride, model_id: str, case_id: str) -> Path:
    """Write one case atomically (temp file in the same directory, then rename), so a reader never
    sees a half-written file and an interrupted `embed` leaves no file that looks finished."""
    path = Path(path)
    for name, t in (("fine", fine), ("coarse", coarse)):
        if t.ndim != 4 or t.shape[-1] != EMBED_DIM:
            raise ValueError(f"{name} must be [X, Y, Z, {EMBED_DIM}], got {tuple(t.shape)}")
    meta = {
        "case_id": case_id,
        "fine_affine": json.dumps(np.asarray(fine_affine, dtype=float).tolist()),
        "coarse_affine": json.dumps(np.asarray(coarse_affine, dtype=float).tolist()),
        "fine_stride": json.dumps([int(s) for s in fine_stride]),
        "coarse_stride": json.dumps([int(s) for s in coarse_stride]),
        "model_id": model_id,
        "format_version": FORMAT_VERSION,
    }
    tensors = {"fine": fine.detach().to(torch.float16).contiguous().cpu(),
               "coarse": coarse.detach().to(torch.float16).contiguous().cpu()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


@dataclass
class EmbeddingFile:
    """A lazily read embedding file. The header is read on open; tensors only on request.

    Holds no open handle, so an instance can be created in a parent process and used in forked
    DataLoader workers (each read opens the file, which is an mmap of the header plus the slice).
    """

    path: Path
    case_id: str
    fine_affine: np.ndarray
    coarse_affine: np.ndarray
    fine_stride: tuple[int, int, int]
    coarse_stride: tuple[int, int, int]
    fine_shape: tuple[int, int, int]
    coarse_shape: tuple[int, int, int]
    meta: dict = field(repr=False)
    _fine_map: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def fine_map(self) -> np.ndarray:
        """The fine grid as a read-only memory map, float16 [Xf, Yf, Zf, 128] (as stored).

        Zero-copy: indexing it reads only the touched pages (the OS page cache keeps them warm
        across calls and across the processes that map the same file). Mapped on first use in the
        calling process; a map created before a DataLoader forks stays valid in the workers."""
        if self._fine_map is None:
            self._fine_map = _map_tensor(self.path, "fine")
        return self._fine_map

    def __getstate__(self) -> dict:
        """Copies (and DataLoader workers started by spawn) map the file anew: a memory map would
        otherwise travel as a full in-memory copy of the fine grid."""
        return {**self.__dict__, "_fine_map": None}

    def fine_window(self, lo, hi, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Fine-grid box `[lo, hi)` (voxel indices, clipped to the grid) as [wx, wy, wz, 128] of
        `dtype` (float16 = as stored, no conversion)."""
        lo = [max(0, int(v)) for v in lo]
        hi = [min(s, int(v)) for v, s in zip(hi, self.fine_shape)]
        try:
            with safe_open(str(self.path), framework="pt") as f:
                part = f.get_slice("fine")[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        except Exception as e:  # safetensors raises several types for a truncated/replaced file
            raise DataError(self.path, f"cannot read the fine embedding window: {e}") from None
        return part.to(dtype)

    def coverage_problem(self, affine, shape) -> str | None:
        """Why this file cannot hold the embeddings of a volume with `affine` (4x4 voxel -> world mm)
        and `shape`, or None when its fine grid covers every corner of that volume (within
        COVERAGE_TOLERANCE fine voxels: grids are rounded to whole voxels)."""
        corners = np.array(np.meshgrid(*[[0, s - 1] for s in shape], indexing="ij")).reshape(3, -1).T  # [8, 3]
        world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]  # [8, 3] mm
        inv = np.linalg.inv(self.fine_affine)
        ijk = world @ inv[:3, :3].T + inv[:3, 3]
        hi = np.asarray(self.fine_shape) - 1 + COVERAGE_TOLERANCE
        if (ijk < -COVERAGE_TOLERANCE).any() or (ijk > hi).any():
            return (f"embedding grid (fine shape {tuple(self.fine_shape)}) does not cover the cached volume "
                    f"(shape {tuple(shape)}); stale or from another preprocessing")
        return None

    def fine(self) -> torch.Tensor:
        """The whole fine grid as float32 [Xf, Yf, Zf, 128] (for tests and small volumes)."""
        return self.fine_window((0, 0, 0), self.fine_shape)

    def coarse(self) -> torch.Tensor:
        """The whole coarse grid as float32 [Xc, Yc, Zc, 128]."""
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor("coarse").float()
        except Exception as e:
            raise DataError(self.path, f"cannot read the coarse embedding: {e}") from None


COVERAGE_TOLERANCE = 1.5
"""How far (in fine-grid voxels) a corner of a volume may lie outside the embedding's fine grid before
the embedding counts as belonging to another volume (`EmbeddingFile.coverage_problem`)."""
SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4"}
"""safetensors dtype names -> NumPy dtypes (the format stores little-endian data)."""


def _map_tensor(path: Path, name: str) -> np.ndarray:
    """Memory-map tensor `name` of a safetensors file, read-only. The file is an 8-byte
    little-endian header length N, N bytes of JSON header (`dtype`, `shape`, `data_offsets` relative
    to the end of the header per tensor), then the raw data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        entry = header[name]
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(v) for v in entry["data_offsets"])
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise DataError(path, f"cannot map tensor {name!r} of the safetensors file ({e!r})") from None
    if end - begin != dtype.itemsize * int(np.prod(shape)):
        raise DataError(path, f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}")
    try:
        return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot map tensor {name!r} ({e})") from None


def open_embedding(embed_dir, case_id: str) -> EmbeddingFile:
    """Open `<embed_dir>/<case_id>.safetensors` and validate its header; a missing, truncated or
    foreign file raises `DataError` naming it."""
    path = embedding_path(embed_dir, case_id)
    if not path.is_file():
        raise DataError(path, f"no SAM embedding for case {case_id!r} (run `alice-ds embed`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys & {"fine", "coarse"}}
    except Exception as e:
        raise DataError(path, f"not a readable safetensors embedding file ({e})") from None
    missing = [k for k in ("fine", "coarse") if k not in keys] + [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise DataError(path, f"embedding file lacks {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(path, f"embedding format_version {meta['format_version']!r}, "
                              f"this alice-ds reads {FORMAT_VERSION!r} (re-run `alice-ds embed`)")
    for k, s in shapes.items():
        if len(s) != 4 or s[-1] != EMBED_DIM:
            raise DataError(path, f"tensor {k!r} has shape {s}, expected [X, Y, Z, {EMBED_DIM}]")
    try:
        fine_affine = np.array(json.loads(meta["fine_affine"]), dtype=np.float64).reshape(4, 4)
        coarse_affine = np.array(json.loads(meta["coarse_affine"]), dtype=np.float64).reshape(4, 4)
        fine_stride = tuple(int(v) for v in json.loads(meta["fine_stride"]))
        coarse_stride = tuple(int(v) for v in json.loads(meta["coarse_stride"]))
    except (ValueError, TypeError) as e:
        raise DataError(path, f"embedding metadata is malformed ({e})") from None
    return EmbeddingFile(path=path, case_id=meta["case_id"], fine_affine=fine_affine,
                         coarse_affine=coarse_affine, fine_stride=fine_stride,
                         coarse_stride=coarse_stride, fine_shape=shapes["fine"][:3],
                         coarse_shape=shapes["coarse"][:3], meta=meta)
