"""A safetensors writer that streams: the header is written from the promised layout first, then the
tensors one at a time, so peak memory is one tensor, never the whole state dict."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import torch

from alice_ds.errors import DataError
from alice_ds.files import atomic_path

# torch dtype name -> safetensors dtype tag (only what SwinUNETR state dicts contain)
SAFETENSORS_DTYPES = {"float32": "F32", "int64": "I64", "float16": "F16", "bfloat16": "BF16", "bool": "BOOL"}
SAFETENSORS_ALIGN = 8
"""The safetensors header is padded with spaces to a multiple of 8 bytes."""


def write_safetensors(path: Path, layout: dict[str, tuple[tuple[int, ...], str]],
                      get: Callable[[str], torch.Tensor], metadata: dict[str, str],
                      on_tensor: Callable[[str], None] | None = None) -> None:
    """Write a safetensors file tensor by tensor: the header is built from `layout` (name -> (shape,
    dtype name)) before any data is read, then `get(name)` is called once per tensor in order and
    checked against its promised shape/dtype. Written to a temporary name and renamed, so a failure
    leaves no partial file under `path`."""
    header: dict[str, dict] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, (shape, dtype) in layout.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors tag here")
        nbytes = math.prod(shape) * _itemsize(dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % SAFETENSORS_ALIGN)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))  # header length, u64 little endian
        f.write(blob)
        for name, (shape, dtype) in layout.items():
            t = get(name)
            if tuple(t.shape) != tuple(shape) or str(t.dtype).removeprefix("torch.") != dtype:
                raise DataError(path, f"{name}: got {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())  # [*shape] -> raw bytes
            if on_tensor is not None:
                on_tensor(name)


def _itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize
