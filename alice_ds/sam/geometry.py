"""Grid geometry shared by SAM training, embedding and matching: voxel <-> world mm through 4x4
affines, and trilinear sampling of channel-last grids at continuous voxel positions."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def world_to_index(affine, points_mm) -> np.ndarray:
    """World mm [P, 3] -> continuous voxel indices [P, 3] of the grid with `affine` (voxel -> mm)."""
    pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return pts @ inv[:3, :3].T + inv[:3, 3]


def index_to_world(affine, ijk) -> np.ndarray:
    """Voxel indices [P, 3] (continuous allowed) -> world mm [P, 3]."""
    a = np.asarray(affine, dtype=np.float64)
    return np.asarray(ijk, dtype=np.float64).reshape(-1, 3) @ a[:3, :3].T + a[:3, 3]


def scaled_affine(affine, stride) -> np.ndarray:
    """Affine of a grid whose voxel j sits on voxel `stride * j` of the grid with `affine`.

    This is where a stride-s output of a convolution with symmetric padding is centred (output j
    sees inputs centred on s*j), so every SAM output grid shares voxel 0 with its input grid."""
    out = np.asarray(affine, dtype=np.float64).copy()
    out[:3, :3] = out[:3, :3] * np.asarray(stride, dtype=np.float64)[None, :]
    return out


def normalized_grid(ijk: torch.Tensor, shape) -> torch.Tensor:
    """Continuous voxel indices [..., 3] (x, y, z) -> `grid_sample` coordinates [..., 3] for an input
    laid out [N, C, X, Y, Z] with `align_corners=True` (grid_sample's last coordinate indexes the
    last spatial axis, so the order is reversed)."""
    size = torch.as_tensor(shape, dtype=ijk.dtype, device=ijk.device)
    norm = torch.where(size > 1, 2 * ijk / (size - 1).clamp(min=1) - 1, torch.zeros_like(ijk))
    return norm.flip(-1)


def sample_channels_last(grid: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Trilinear values of a channel-last grid [X, Y, Z, C] at continuous indices [P, 3] -> [P, C].
    Positions outside the grid take the border value."""
    vol = grid.permute(3, 0, 1, 2)[None]  # [X, Y, Z, C] -> [1, C, X, Y, Z]
    g = normalized_grid(ijk.to(vol.dtype), grid.shape[:3]).view(1, -1, 1, 1, 3)
    out = F.grid_sample(vol, g, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(grid.shape[3], -1).T  # [1, C, P, 1, 1] -> [P, C]


def sample_channels_first(feat: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Trilinear values of a batch of feature maps [B, C, X, Y, Z] at per-sample continuous indices
    [B, P, 3] -> [B, P, C] (border padding)."""
    g = normalized_grid(ijk.to(feat.dtype), feat.shape[2:])[:, :, None, None, :]  # [B, P, 1, 1, 3]
    out = F.grid_sample(feat, g, mode="bilinear", padding_mode="border", align_corners=True)
    return out[..., 0, 0].transpose(1, 2)  # [B, C, P, 1, 1] -> [B, P, C]
