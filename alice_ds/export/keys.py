"""MONAI `SwinUNETR` state-dict names <-> the names of Tang et al.'s `model_swinvit.pt` (what
`SwinUNETR.load_from` indexes), and MONAI's own state dict as the oracle an export is checked against."""

from __future__ import annotations

import re

import torch
from monai.networks.nets import SwinUNETR

LOAD_FROM_PREFIX = ("swinViT.", "module.")
"""(MONAI prefix, `load_from` prefix) of the Swin encoder's keys."""
LOAD_FROM_RENAMES = ((".mlp.linear1.", ".mlp.fc1."), (".mlp.linear2.", ".mlp.fc2."))
V2_CONV_BLOCK = re.compile(r"^swinViT\.layers\dc\.")
"""SwinUNETR v2's per-stage convolution blocks: `load_from` never reads them, so that layout omits them."""


def to_load_from_key(key: str) -> str:
    """`swinViT.layers1.0.blocks.0.mlp.linear1.weight` -> `module.layers1.0.blocks.0.mlp.fc1.weight`."""
    if not key.startswith(LOAD_FROM_PREFIX[0]):
        raise ValueError(f"only swinViT.* keys have a load_from name, got {key!r}")
    key = LOAD_FROM_PREFIX[1] + key[len(LOAD_FROM_PREFIX[0]):]
    for ours, theirs in LOAD_FROM_RENAMES:
        key = key.replace(ours, theirs)
    return key


def from_load_from_key(key: str) -> str:
    """Inverse of `to_load_from_key`."""
    if not key.startswith(LOAD_FROM_PREFIX[1]):
        raise ValueError(f"load_from keys start with 'module.', got {key!r}")
    key = LOAD_FROM_PREFIX[0] + key[len(LOAD_FROM_PREFIX[1]):]
    for ours, theirs in LOAD_FROM_RENAMES:
        key = key.replace(theirs, ours)
    return key


def monai_reference(feature_size: int, use_v2: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype name) of MONAI's own `SwinUNETR(1, 1, feature_size, use_v2)` state dict:
    the oracle an export is checked against. Built on CPU (MONAI's constructor cannot run on the meta
    device) and freed before any checkpoint tensor is read."""
    with torch.random.fork_rng(devices=[]):
        model = SwinUNETR(in_channels=1, out_channels=1, feature_size=feature_size, use_v2=use_v2)
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
