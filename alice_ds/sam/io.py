"""SAM embedding files: one `<embed_dir>/<case_id>.safetensors` per case (docs/interfaces.md).

The fine grid is stored compact: `fine` codes [Xf, Yf, Zf, K], channel-last, with `fine_basis` fp32
[128, K] (orthonormal columns: the case's own top-K principal directions of its fine vectors,
uncentred, or the identity when K = 128) and `fine_scale` fp32 [K]; a voxel's 128-d embedding is
`(codes * fine_scale) @ fine_basis.T`, and `fine_norm` fp16 [Xf, Yf, Zf] holds its norm (the matcher
divides by it: its scores are cosines). The codes have `fine_bits` bits: 8 (one int8 per channel) or 4
(two per byte, `pack_codes`; what `embed` writes). `embed` stores by default as many channels as keep
99.9 % of the case's fine-vector energy (`AUTO_KEEP`): a SAMNet's fine vectors span about its last
feature width, so at 4 bits a full-size phantom CT takes about 9 MB (width 0.125, K = 16) or 16 MB
(width 0.25, K = 32) instead of 227 MB at fp16 x 128, with matches as close as at 8 bits
(docs/experiments/2026-12-03-four-bit-embeddings.md). `coarse` [Xc, Yc, Zc, 128] stays fp16 (a few
hundred kB). Both are L2-normalised per voxel before compression. Channel-last, so a box of the fine
grid is a few contiguous runs that a memory map reads without touching the rest of the file.
Metadata values are JSON strings: the voxel -> world-mm affine of each grid (RAS), the strides in
voxels of the 2 mm SAM grid, the model id, `fine_bits`. Format 3 (4-bit codes, `fine_norm`) replaced
format 2 (int8 codes only); `embed` re-embeds files of an older format.
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

FORMAT_VERSION = "3"
EMBED_DIM = 128
SUFFIX = ".safetensors"
PCA_SAMPLES = 200_000
"""Fine voxels (evenly strided) whose second-moment matrix gives a case's basis: ~0.1 s."""
AUTO_KEEP = 0.999
"""Share of a case's fine-vector energy the automatic channel count keeps (`compress_fine`)."""
CODE_BITS = (8, 4)
"""Bits per stored code: 8 (one int8 per channel) or 4 (two channels per byte, `pack_codes`)."""
DEFAULT_BITS = 4
"""What `embed` stores: at 4 bits (range clipped by `code_scale`) a width-0.25 SAMNet's 32 channels
take 16 MB per full-size CT (with `fine_norm`) instead of 29 MB, held-out landmarks across subjects
match as closely as at 8 bits, and within one subject the median moves 0.1-0.2 mm (docs/experiments/
2026-12-03-four-bit-embeddings.md)."""
TENSORS = ("fine", "fine_basis", "fine_scale", "fine_norm", "coarse")
REQUIRED_META = ("case_id", "fine_affine", "coarse_affine", "fine_stride", "coarse_stride",
                 "model_id", "format_version", "fine_bits")


def embedding_path(embed_dir, case_id: str) -> Path:
    return Path(embed_dir) / f"{case_id}{SUFFIX}"


def list_embeddings(embed_dir) -> list[str]:
    """Sorted case ids with an embedding file in `embed_dir` (temporary files excluded)."""
    d = Path(embed_dir)
    if not d.is_dir():
        raise DataError(d, "embedding directory does not exist (run `alice-ds embed` first)")
    return sorted(p.name[:-len(SUFFIX)] for p in d.glob(f"*{SUFFIX}") if not p.name.startswith("."))


def code_max(bits: int) -> int:
    """Codes of `bits` bits span [-code_max, code_max] (symmetric: 127 for 8 bits, 7 for 4)."""
    if bits not in CODE_BITS:
        raise ValueError(f"bits must be one of {CODE_BITS}, got {bits}")
    return 2 ** (bits - 1) - 1


def compress_fine(fine: torch.Tensor, channels: int | None,
                  bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Fine grid [X, Y, Z, 128] (unit vectors) -> (int8 codes [X, Y, Z, K], basis fp32 [128, K],
    scale fp32 [K], kept: the mean squared norm of the projections, the share of the vectors' energy
    the K channels keep). K = `channels`, or with None the fewest principal directions that keep
    AUTO_KEEP of the energy (a network's fine vectors span about its last feature width: 16
    directions for SAMNet width 0.125, 32 for 0.25, and nothing beyond).

    The basis is the top-K eigenvectors of the uncentred second moment of the case's fine vectors
    (what keeps their dot products best at rank K; the identity at K = 128), each signed so its
    largest entry is positive (the same vectors give the same file). The projections are not
    re-normalised here: the file stores each voxel's decoded norm (`fine_norm`), and the matcher
    divides by it, so its scores are cosines of the stored vectors (rounding to 15 levels moves a
    norm by a few %, and a plain dot product then favours the voxels rounded outwards: in the
    same-subject test the 95th percentile of the LPS copy went from 4.1 to 7.5 mm without the
    division). Each channel is quantised with its own scale to integers in
    [-code_max(bits), code_max(bits)] (stored one per byte; `pack_codes` puts two 4-bit codes in one)."""
    top = code_max(bits)
    if channels is not None and not 1 <= channels <= EMBED_DIM:
        raise ValueError(f"channels must be in [1, {EMBED_DIM}], got {channels}")
    flat = fine.reshape(-1, EMBED_DIM)  # [N, 128]
    if channels == EMBED_DIM:
        basis = torch.eye(EMBED_DIM)
    else:
        sample = flat[:: max(1, len(flat) // PCA_SAMPLES)].double()  # [S, 128]
        values, vectors = torch.linalg.eigh(sample.T @ sample)  # ascending eigenvalues
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)  # largest first
        if channels is None:
            share = values.cumsum(0) / values.sum().clamp_min(1e-30)
            channels = int(torch.searchsorted(share, torch.tensor(AUTO_KEEP, dtype=share.dtype))) + 1
            channels = min(channels, EMBED_DIM)
        basis = vectors[:, :channels]  # [128, K]
        peak = basis.abs().argmax(0)
        basis = (basis * torch.sign(basis[peak, torch.arange(channels)])).float()
    proj = torch.cat([chunk.float() @ basis for chunk in flat.split(1 << 18)])  # [N, K]
    scale = code_scale(proj, bits)  # [K]
    codes = torch.round(proj / scale).clamp(-top, top).to(torch.int8)
    kept = float(proj.square().sum(1).mean()) if len(proj) else 1.0
    return codes.view(*fine.shape[:3], channels), basis.contiguous(), scale, kept


NORM_FLOOR = 1e-6
"""Least stored `fine_norm`: a voxel whose codes all rounded to 0 then scores 0 in the matcher, not NaN."""
CLIP_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
"""Below 8 bits each channel's range is clipped to the fraction of its largest |value| that rounds its
values with the least squared error (`code_scale`)."""


def code_scale(proj: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel step of the codes for values proj [N, K] -> [K]. At 8 bits the largest |value| maps
    to the last code (rounding errors are then below 0.4 % of the range). With 15 levels at 4 bits a
    few extreme values would waste most of them: the range is clipped to whichever of CLIP_FRACTIONS
    of the largest |value| gives the least squared error (rounding plus clipping) over PCA_SAMPLES of
    the values."""
    top = code_max(bits)
    peak = proj.abs().amax(0).clamp_min(1e-8)  # [K]
    if bits == 8:
        return peak / top
    proj = proj[:: max(1, len(proj) // PCA_SAMPLES)]  # [S, K]
    steps = torch.stack([peak * f / top for f in CLIP_FRACTIONS])  # [F, K]
    error = torch.stack([((torch.round(proj / s).clamp(-top, top) * s - proj) ** 2).sum(0) for s in steps])  # [F, K]
    return steps.gather(0, error.argmin(0, keepdim=True))[0]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [..., K] in [-code_max(bits), code_max(bits)] -> what the file stores: the codes
    themselves at 8 bits; at 4 bits int8 [..., ceil(K / 2)], channel 2j in the low half of byte j and
    2j + 1 in the high half (two's complement nibbles; an odd K is padded with a zero code).
    Channel-last either way, so a box of the grid is still a few contiguous runs."""
    code_max(bits)  # validates `bits`
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], -1)
    low, high = codes[..., 0::2], codes[..., 1::2]
    return ((high << 4) | (low & 0x0F)).to(torch.int8)


def _nibble_table() -> np.ndarray:
    """Byte value (as uint8) -> its two 4-bit codes (low, high), int8 [256, 2]."""
    byte = np.arange(256, dtype=np.uint8).view(np.int8)
    return np.stack([np.left_shift(byte, 4) >> 4, byte >> 4], 1)  # int8 arithmetic: sign-extended


NIBBLES = _nibble_table()


def unpack_codes(stored: np.ndarray, bits: int, channels: int) -> np.ndarray:
    """`pack_codes` undone: stored int8 [..., B] -> codes int8 [..., channels] (at 8 bits `stored`
    itself, a memory map stays a map). One table lookup per byte: 30 % faster than shifting and
    interleaving (45 vs 65 us for a 20^3 window of 16 channels, one core)."""
    if bits == 8:
        return stored
    codes = np.take(NIBBLES, np.asarray(stored).view(np.uint8), axis=0)  # [..., B, 2]
    return codes.reshape(*codes.shape[:-2], -1)[..., :channels]


def write_embedding(path, fine: torch.Tensor, coarse: torch.Tensor, fine_affine, coarse_affine,
                    fine_stride, coarse_stride, model_id: str, case_id: str,
                    channels: int | None = EMBED_DIM, bits: int = 8, extra_meta: dict | None = None) -> Path:
    """Write one case atomically (temp file in the same directory, then rename), so a reader never
    sees a half-written file and an interrupted `embed` leaves no file that looks finished.
    fine [Xf, Yf, Zf, 128], coarse [Xc, Yc, Zc, 128]; the fine grid is stored as `channels` int8
    codes of `bits` bits (`compress_fine`, `pack_codes`; 128 = the identity basis, only quantised;
    None = as many as keep AUTO_KEEP of the energy). `extra_meta`: more string metadata (how it was made)."""
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
        **(extra_meta or {}),
    }
    codes, basis, scale, kept = compress_fine(fine.detach().cpu(), channels, bits)
    meta["fine_kept"] = json.dumps(round(kept, 6))
    meta["fine_bits"] = str(bits)
    norm = torch.cat([(c.float() * scale).norm(dim=-1) for c in codes.view(-1, codes.shape[-1]).split(1 << 18)])
    norm = norm.clamp_min(NORM_FLOOR)
    tensors = {"fine": pack_codes(codes, bits).contiguous(), "fine_basis": basis, "fine_scale": scale,
               "fine_norm": norm.view(codes.shape[:3]).to(torch.float16).contiguous(),
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
    bits: int  # per stored code: 8 or 4 (`pack_codes`)
    basis: torch.Tensor = field(repr=False)  # fp32 [128, K]
    scale: torch.Tensor = field(repr=False)  # fp32 [K]
    meta: dict = field(repr=False)
    _fine_map: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _norm_map: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def channels(self) -> int:
        """K, the stored channels of the fine grid."""
        return self.basis.shape[1]

    def decode(self, codes) -> torch.Tensor:
        """Fine codes [..., K] (int8 or float) -> 128-d embeddings float32 [..., 128]."""
        codes = torch.from_numpy(np.asarray(codes, dtype=np.float32)) if isinstance(codes, np.ndarray) \
            else codes.float()  # (a memory map is read-only: the cast copies it)
        return (codes * self.scale) @ self.basis.T

    def code_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """128-d query vectors [..., 128] -> [..., K] whose dot product with this file's raw codes
        (cast to float) is the query's dot product with the decoded voxel: the scale is folded in."""
        return (queries.float() @ self.basis) * self.scale

    def fine_map(self) -> np.ndarray:
        """The stored fine grid as a read-only memory map: int8 [Xf, Yf, Zf, K] codes at 8 bits,
        [Xf, Yf, Zf, ceil(K / 2)] packed pairs at 4 (read codes with `fine_codes`).

        Zero-copy: indexing it reads only the touched pages (the OS page cache keeps them warm
        across calls and across the processes that map the same file). Mapped on first use in the
        calling process; a map created before a DataLoader forks stays valid in the workers."""
        if self._fine_map is None:
            self._fine_map = _map_tensor(self.path, "fine")
        return self._fine_map

    def norm_map(self) -> np.ndarray:
        """Each fine voxel's decoded norm, ||codes * scale||, as a read-only fp16 memory map
        [Xf, Yf, Zf]: a code dot product divided by it is the cosine with the stored vector."""
        if self._norm_map is None:
            self._norm_map = _map_tensor(self.path, "fine_norm")
        return self._norm_map

    def fine_codes(self, index=np.s_[...]) -> np.ndarray:
        """Codes of the fine voxels `fine_map()[index]` (slices or integer index arrays over the
        three grid axes), int8 [..., K]: dot them with `code_queries`, or `decode` them. At 8 bits
        a slice is a view of the memory map; 4-bit pairs are unpacked (a copy of the part read)."""
        return unpack_codes(self.fine_map()[index], self.bits, self.channels)

    def __getstate__(self) -> dict:
        """Copies (and DataLoader workers started by spawn) map the file anew: a memory map would
        otherwise travel as a full in-memory copy of the fine grid."""
        return {**self.__dict__, "_fine_map": None, "_norm_map": None}

    def fine_window(self, lo, hi) -> torch.Tensor:
        """Fine-grid box `[lo, hi)` (voxel indices, clipped to the grid), decoded: float32
        [wx, wy, wz, 128]."""
        lo = [max(0, int(v)) for v in lo]
        hi = [min(s, int(v)) for v, s in zip(hi, self.fine_shape)]
        try:
            with safe_open(str(self.path), framework="pt") as f:
                part = f.get_slice("fine")[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        except Exception as e:  # safetensors raises several types for a truncated/replaced file
            raise DataError(self.path, f"cannot read the fine embedding window: {e}") from None
        return self.decode(unpack_codes(part.numpy(), self.bits, self.channels))

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
SAFETENSORS_DTYPES = {"I8": "i1", "F16": "<f2", "F32": "<f4"}
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
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys & set(TENSORS)}
            small = {k: f.get_tensor(k).float() for k in keys & {"fine_basis", "fine_scale"}}
    except Exception as e:
        raise DataError(path, f"not a readable safetensors embedding file ({e})") from None
    if "format_version" in meta and meta["format_version"] != FORMAT_VERSION:
        raise DataError(path, f"embedding format_version {meta['format_version']!r}, this alice-ds reads "
                              f"{FORMAT_VERSION!r} (re-run `alice-ds embed`: it replaces older files)")
    missing = [k for k in TENSORS if k not in keys] + [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise DataError(path, f"embedding file lacks {', '.join(missing)}")
    bits = int(meta["fine_bits"]) if meta["fine_bits"].isdigit() else -1
    if bits not in CODE_BITS:
        raise DataError(path, f"fine_bits {meta['fine_bits']!r}, expected one of {CODE_BITS}")
    k = shapes["fine_scale"][0] if len(shapes["fine_scale"]) == 1 else -1
    stored = k if bits == 8 else (k + 1) // 2
    expected = {"fine": ("X", "Y", "Z", stored), "coarse": ("X", "Y", "Z", EMBED_DIM), "fine_basis": (EMBED_DIM, k),
                "fine_scale": (k,), "fine_norm": shapes["fine"][:3]}
    for name, want in expected.items():
        s = shapes[name]
        if len(s) != len(want) or any(isinstance(w, int) and w != v for w, v in zip(want, s)) or k < 1:
            raise DataError(path, f"tensor {name!r} has shape {s}, expected [{', '.join(map(str, want))}]")
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
                         coarse_shape=shapes["coarse"][:3], bits=bits, basis=small["fine_basis"],
                         scale=small["fine_scale"], meta=meta)
