"""SAMNet: the SAM anatomical embedding network (Yan et al., TMI 2022), in plain PyTorch.

A 3D ResNet-18 with I3D-style kernels, an FPN over stages 1-3 for the **fine** embedding and a head
on stage 4 for the **coarse** embedding, both 128-d and L2-normalised per voxel.

Input: [B, 1, X, Y, Z] on the 2 mm isotropic RAS grid, HU scaled by `scale_hu`. Axis order is
(x, y, z), so the reference's "1x3x3" kernels (z, y, x) are (3, 3, 1) here.

Strides (in voxels of the 2 mm grid): stem 1, max-pool 2 -> stage 1 at 2, stage 2 at 4, stage 3 at
8, stage 4 at 16. **Fine = stride 2 (4 mm), coarse = stride 16 (32 mm)** by default. `coarse_stride`
per axis (4, 8 or 16) drops the stride of the last stages along that axis: (16, 16, 4) is the
reference's coarse grid, 32 mm in-plane and 8 mm along z (`sam-train --recipe reference`).
Every strided layer is an odd kernel with symmetric padding, so output voxel j of a stride-s grid is
centred on input voxel s*j (geometry.scaled_affine) and the upsampling in the FPN keeps that exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from alice_ds.sam import SAM_HU_WINDOW

EMBED_DIM = 128
FINE_STRIDE = 2
COARSE_STRIDE = 16
"""The default coarse stride, on every axis; also the multiple that views and tiles are cut to."""
COARSE_STRIDES = (4, 8, 16)
"""The coarse strides an axis can have: the stem's 2 x 2^(stride-2 stages among stages 2-4)."""
SAM_SPACING_MM = 2.0
BASE_WIDTHS = (64, 128, 256, 512)
MIN_CHANNELS = 8


def scale_hu(hu: torch.Tensor, window=SAM_HU_WINDOW) -> torch.Tensor:
    """HU -> network input in [-1, 1]: clipped to `window` (lo, hi), then linear."""
    lo, hi = window
    return (hu.float().clamp(lo, hi) - lo) / (hi - lo) * 2 - 1


def upsample_to(x: torch.Tensor, size, factors=(2, 2, 2)) -> torch.Tensor:
    """Trilinear upsampling by `factors` (2 or 1 per axis) where fine voxel i sits at coarse position
    i/2 (corner-aligned, as the strided convolutions are), cropped to `size`.
    [B, C, n...] -> [B, C, size...]."""
    n = x.shape[2:]
    pad = [p for f in reversed(factors) for p in (0, int(f == 2))]  # F.pad lists the last axis first
    x = F.pad(x, pad, mode="replicate")  # [.., n+1] where 2n+1 samples map i -> i/2
    x = F.interpolate(x, size=tuple(2 * s + 1 if f == 2 else s for s, f in zip(n, factors)),
                      mode="trilinear", align_corners=True)
    return x[:, :, :size[0], :size[1], :size[2]]


class BasicBlock(nn.Module):
    """ResNet basic block with a configurable (I3D) kernel."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        pad = tuple(k // 2 for k in kernel)
        self.conv1 = nn.Conv3d(cin, cout, kernel, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, kernel, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.down = None
        if any(st != 1 for st in stride) or cin != cout:
            self.down = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class SAMNet(nn.Module):
    """SAM embedding network. `width` scales every channel count (1.0 = ResNet-18 widths 64-512;
    tests and CPU runs use 0.125-0.25); `spacing_mm` is the input grid (default 2 mm);
    `coarse_stride` (X, Y, Z) each in COARSE_STRIDES.
    forward(x [B, 1, X, Y, Z]) -> (fine [B, 128, ceil(X/2), ...],
    coarse [B, 128, ceil(X/coarse_stride[0]), ...]), both L2-normalised over channels."""

    STAGE_KERNELS = ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3))  # (x, y, z): I3D 1x3x3 then 3x3x3
    BLOCKS_PER_STAGE = 2

    def __init__(self, width: float = 1.0, spacing_mm: float = SAM_SPACING_MM, hu_window=SAM_HU_WINDOW,
                 coarse_stride=(COARSE_STRIDE,) * 3):
        super().__init__()
        self.coarse_stride = tuple(int(s) for s in coarse_stride)
        if len(self.coarse_stride) != 3 or any(s not in COARSE_STRIDES for s in self.coarse_stride):
            raise ValueError(f"coarse_stride must be 3 values of {COARSE_STRIDES}, got {tuple(coarse_stride)}")
        # stage k's stride per axis: 2 in the first log2(coarse / 2) of stages 2-4, else 1
        halvings = [int(math.log2(s)) - 1 for s in self.coarse_stride]
        self.stage_strides = [(1, 1, 1)] + [tuple(2 if k < h else 1 for h in halvings) for k in range(3)]
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if spacing_mm <= 0:
            raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
        if len(hu_window) != 2 or not hu_window[1] > hu_window[0]:
            raise ValueError(f"hu_window must be (lo, hi) with hi > lo, got {tuple(hu_window)}")
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        """HU window of the input (scale_hu); embedding uses the model's own."""
        self.width = float(width)
        self.spacing_mm = float(spacing_mm)
        """Voxel size of the isotropic grid the network was trained on (2 mm as in SAM; the test
        suite uses 4 mm to stay fast). Embedding uses the same grid."""
        ch = [max(MIN_CHANNELS, int(round(c * width))) for c in BASE_WIDTHS]
        self.stem = nn.Sequential(nn.Conv3d(1, ch[0], (7, 7, 3), 1, (3, 3, 1), bias=False),
                                  nn.BatchNorm3d(ch[0]), nn.ReLU(inplace=True),
                                  nn.MaxPool3d(3, 2, 1))
        stages, cin = [], ch[0]
        for c, k, s in zip(ch, self.STAGE_KERNELS, self.stage_strides):
            blocks = [BasicBlock(cin, c, k, s)] + [BasicBlock(c, c, k, (1, 1, 1))
                                                   for _ in range(self.BLOCKS_PER_STAGE - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.stages = nn.ModuleList(stages)
        fpn = max(MIN_CHANNELS * 2, int(round(EMBED_DIM * width)))
        self.lateral = nn.ModuleList([nn.Conv3d(c, fpn, 1) for c in ch[:3]])
        self.fine_head = nn.Sequential(nn.Conv3d(fpn, fpn, 3, 1, 1), nn.ReLU(inplace=True),
                                       nn.Conv3d(fpn, EMBED_DIM, 1))
        self.coarse_head = nn.Sequential(nn.Conv3d(ch[3], ch[3], 3, 1, 1), nn.ReLU(inplace=True),
                                         nn.Conv3d(ch[3], EMBED_DIM, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        top = self.lateral[2](feats[2])  # stride 8
        for level in (1, 0):  # top-down: stride 8 -> 4 -> 2 (by default)
            lat = self.lateral[level](feats[level])
            top = lat + upsample_to(top, lat.shape[2:], self.stage_strides[level + 1])
        fine = F.normalize(self.fine_head(top), dim=1)
        coarse = F.normalize(self.coarse_head(feats[3]), dim=1)
        return fine, coarse

    def config(self) -> dict:
        """What is needed to rebuild the network (stored next to its weights)."""
        return {"arch": "samnet-resnet18-fpn", "width": self.width, "embed_dim": EMBED_DIM,
                "fine_stride": FINE_STRIDE, "coarse_stride": list(self.coarse_stride),
                "spacing_mm": self.spacing_mm, "hu_window": list(self.hu_window)}
