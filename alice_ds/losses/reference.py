"""Plain-PyTorch oracles for the fused losses: written for clarity, not memory. Tests compare the
Triton kernels and the chunked CPU path against these; the benchmark uses them as the "eager" baseline.

Both compute in fp32 whatever the input dtype, like the fused versions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def centered_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                           student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Per-row DINO cross-entropy H(p_t, p_s) (Caron et al. 2021, eq. 1; Alice eq. 5-6, DESIGN §4.6):
    p_t = softmax((teacher - center)/teacher_temp), loss_i = -sum_k p_t[i, k] log_softmax(student/student_temp)[i, k].

    `student`, `teacher` [N, K]; `center` [K] or [1, K]. Returns fp32 [N]; no gradient reaches the
    teacher or the center."""
    t = (teacher.detach().float() - center.detach().float().reshape(1, -1)) / teacher_temp
    p = F.softmax(t, dim=-1)
    log_q = F.log_softmax(student.float() / student_temp, dim=-1)
    return -(p * log_q).sum(dim=-1)


def expand_block_mask(mask: torch.Tensor, block: int, spatial: tuple[int, int, int]) -> torch.Tensor:
    """Block mask [B, mx, my, mz] -> voxel mask [B, 1, X, Y, Z] (same dtype): voxel (x, y, z) takes
    mask[x // block, y // block, z // block]; a last partial block is cut at the volume edge."""
    x, y, z = spatial
    full = mask.repeat_interleave(block, 1).repeat_interleave(block, 2).repeat_interleave(block, 3)
    return full[:, None, :x, :y, :z]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
               block: int) -> torch.Tensor:
    """Mean squared error over masked voxels (SimMIM-style reconstruction, DESIGN §4.6).

    `pred`, `target` [B, 1, X, Y, Z]; `mask` [B, ceil(X/block), ceil(Y/block), ceil(Z/block)] with
    1 = masked, or None for every voxel. Returns an fp32 scalar; 0 when no voxel is masked (so an
    unlucky batch gives a zero loss, not NaN)."""
    err = (pred.float() - target.detach().float()) ** 2
    if mask is None:
        return err.mean()
    m = expand_block_mask(mask.detach().float(), block, pred.shape[-3:])
    return (err * m).sum() / m.sum().clamp_min(1.0)
