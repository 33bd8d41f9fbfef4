"""Fused masked reconstruction MSE (SimMIM-style, DESIGN §4.6 and §7).

The mask arrives at block (token) resolution and is expanded inside the kernel: voxel (x, y, z)
reads mask[x // block, y // block, z // block]. One pass over pred and target writes per-program
partial sums (squared error, masked-voxel count) and, when wanted, the unnormalised gradient
2·(pred − target)·mask in pred's dtype. The caller divides by the count (partials are summed in
torch, so the result is deterministic); backward scales the stored gradient by grad_out / count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
"""Voxels per program. Untuned (no GPU measurement yet); an element-wise pass only needs enough
bytes in flight per program."""


@triton.jit
def _masked_mse_kernel(
    p_ptr,      # [B, V] pred, V = X·Y·Z voxels, contiguous, fp32|bf16
    t_ptr,      # [B, V] target, contiguous
    m_ptr,      # [B, MX·MY·MZ] uint8 block mask, 1 = masked (only if HAS_MASK)
    g_ptr,      # [B, V] out, pred dtype: 2·(pred − target)·mask (only if HAS_GRAD)
    part_ptr,   # [B, NBLK, 2] fp32 out: (Σ squared error, masked voxel count) of this program
    V, Y, Z, MX, MY, MZ, EDGE,  # EDGE: mask block edge in voxels
    HAS_MASK: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    p = tl.load(p_ptr + b * V + offs, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + b * V + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        x = offs // (Y * Z)
        y = (offs // Z) % Y
        z = offs % Z
        m_idx = ((x // EDGE) * MY + y // EDGE) * MZ + z // EDGE
        m = tl.load(m_ptr + b * (MX * MY * MZ) + m_idx, mask=ok, other=0).to(tl.float32)
    else:
        m = ok.to(tl.float32)
    d = (p - t) * m
    part = part_ptr + (b * tl.num_programs(0) + pid) * 2
    tl.store(part, tl.sum(d * d, axis=0))
    tl.store(part + 1, tl.sum(m, axis=0))
    if HAS_GRAD:
        tl.store(g_ptr + b * V + offs, (2.0 * d).to(g_ptr.dtype.element_ty), mask=ok)


def masked_mse_forward(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                       block: int, need_grad: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the kernel: returns (Σ squared error over masked voxels fp32 scalar, masked-voxel
    count fp64 scalar, unnormalised gradient [B, 1, X, Y, Z] in pred's dtype or None).
    `mask` is uint8 [B, MX, MY, MZ] (already validated) or None."""
    bsz = pred.shape[0]
    xs, ys, zs = pred.shape[-3:]
    vox = xs * ys * zs
    pred = pred.contiguous()
    target = target.contiguous()
    nblk = triton.cdiv(vox, BLOCK)
    part = torch.empty((bsz, nblk, 2), dtype=torch.float32, device=pred.device)
    grad = torch.empty_like(pred) if need_grad else None
    if mask is not None:
        mask = mask.contiguous()
        mx, my, mz = mask.shape[-3:]
    else:
        mx = my = mz = 1
    _masked_mse_kernel[(nblk, bsz)](
        pred, target, mask if mask is not None else pred, grad if need_grad else pred, part,
        vox, ys, zs, mx, my, mz, block,
        HAS_MASK=mask is not None, HAS_GRAD=need_grad, BLOCK=BLOCK,
    )
    return part[..., 0].sum(), part[..., 1].double().sum(), grad
