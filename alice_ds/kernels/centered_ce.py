"""Fused centered cross-entropy (DINO/iBOT loss with a centered, sharpened teacher), DESIGN §7.

For rows i and prototypes k, with a_ik = s_ik/τs and b_ik = (t_ik - c_k)/τt:
    loss_i        = logsumexp_k(a_i) - Σ_k p_ik a_ik,     p_i = softmax(b_i)
    ∂loss_i/∂s_ik = (softmax(a_i)_k - p_ik) / τs
One program owns BLOCK_N rows and sweeps K in BLOCK_K tiles with an online softmax (running max and
sum for the student logsumexp and the teacher softmax, plus the running Σ exp(b - max_b)·a). When the
gradient is wanted a second sweep over the same rows writes it, now that both maxima are known. No
[N, K] fp32 temporaries: the only [N, K] output is the gradient, stored in the input dtype.
Optionally the raw teacher column sums Σ_i t_ik are accumulated (atomics, one per column per row
block) for the center update.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_K = 1024
"""K tile width. Untuned: no GPU measurement has been made yet; 1024 fp32 columns × BLOCK_N rows keeps
the tiles of s, t and c in registers on current GPUs."""
TILE_ELEMS = 4096
"""BLOCK_N × BLOCK_K. Several rows per program for small K so a program moves enough bytes, and the
teacher column sums need one atomic per column per BLOCK_N rows instead of per row."""


@triton.jit
def _centered_ce_kernel(
    s_ptr,      # [N, K] student logits, fp32|bf16, row stride s_stride, unit column stride
    t_ptr,      # [N, K] teacher logits, fp32|bf16, row stride t_stride
    c_ptr,      # [K] fp32 center
    loss_ptr,   # [N] fp32 out: per-row loss
    grad_ptr,   # [N, K] out, student dtype, row stride g_stride: ∂loss_i/∂s_ik (only if HAS_GRAD)
    tsum_ptr,   # [K] fp32 in/out: += Σ_i t_ik (only if HAS_TSUM)
    N, K, s_stride, t_stride, g_stride,
    inv_ts, inv_tt,  # 1/τs, 1/τt
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_GRAD: tl.constexpr, HAS_TSUM: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N·K can exceed 2^31 (65536 × 65536)
    m_s = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max of a
    l_s = tl.zeros([BLOCK_N], tl.float32)                 # running Σ exp(a - m_s)
    m_t = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max of b
    l_t = tl.zeros([BLOCK_N], tl.float32)                 # running Σ exp(b - m_t)
    w = tl.zeros([BLOCK_N], tl.float32)                   # running Σ exp(b - m_t) · a

    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        ok = row_ok[:, None] & col_ok[None, :]
        a = tl.load(s_ptr + rows64[:, None] * s_stride + cols[None, :], mask=ok, other=0.0)
        a = a.to(tl.float32) * inv_ts                                   # [BLOCK_N, BLOCK_K]
        t = tl.load(t_ptr + rows64[:, None] * t_stride + cols[None, :], mask=ok, other=0.0)
        t = t.to(tl.float32)
        if HAS_TSUM:
            tl.atomic_add(tsum_ptr + cols, tl.sum(t, axis=0), mask=col_ok)
        c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
        b = (t - c[None, :]) * inv_tt
        a_inf = tl.where(col_ok[None, :], a, float("-inf"))
        b_inf = tl.where(col_ok[None, :], b, float("-inf"))

        m_s_new = tl.maximum(m_s, tl.max(a_inf, axis=1))
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(a_inf - m_s_new[:, None]), axis=1)
        m_s = m_s_new

        m_t_new = tl.maximum(m_t, tl.max(b_inf, axis=1))
        alpha = tl.exp(m_t - m_t_new)
        e = tl.exp(b_inf - m_t_new[:, None])  # 0 outside K, where a is 0 too
        l_t = l_t * alpha + tl.sum(e, axis=1)
        w = w * alpha + tl.sum(e * a, axis=1)
        m_t = m_t_new

    lse_s = m_s + tl.log(l_s)
    tl.store(loss_ptr + rows, lse_s - w / l_t, mask=row_ok)

    if HAS_GRAD:
        inv_l_t = 1.0 / l_t
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            ok = row_ok[:, None] & col_ok[None, :]
            a = tl.load(s_ptr + rows64[:, None] * s_stride + cols[None, :], mask=ok, other=0.0)
            a = a.to(tl.float32) * inv_ts
            t = tl.load(t_ptr + rows64[:, None] * t_stride + cols[None, :], mask=ok, other=0.0)
            c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
            b = (t.to(tl.float32) - c[None, :]) * inv_tt
            g = (tl.exp(a - lse_s[:, None]) - tl.exp(b - m_t[:, None]) * inv_l_t[:, None]) * inv_ts
            tl.store(grad_ptr + rows64[:, None] * g_stride + cols[None, :],
                     g.to(grad_ptr.dtype.element_ty), mask=ok)


def block_sizes(k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for K prototypes."""
    block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
    return max(1, TILE_ELEMS // block_k), block_k


def centered_ce_forward(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                        student_temp: float, teacher_temp: float, need_grad: bool,
                        teacher_sum: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel: returns (loss fp32 [N], gradient [N, K] in the student dtype or None).
    `teacher_sum` (fp32 [K], contiguous) receives += the raw teacher column sums."""
    n, k = student.shape
    student = student if student.stride(1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(1) == 1 else teacher.contiguous()
    center = center.detach().reshape(-1).to(torch.float32).contiguous()
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, k), dtype=student.dtype, device=student.device) if need_grad else None
    block_n, block_k = block_sizes(k)
    grid = (triton.cdiv(n, block_n),)
    _centered_ce_kernel[grid](
        student, teacher, center, loss,
        grad if need_grad else student,          # placeholder, never written without HAS_GRAD
        teacher_sum if teacher_sum is not None else loss,  # placeholder without HAS_TSUM
        n, k, student.stride(0), teacher.stride(0), grad.stride(0) if need_grad else 0,
        1.0 / student_temp, 1.0 / teacher_temp,
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_GRAD=need_grad, HAS_TSUM=teacher_sum is not None,
    )
    return loss, grad
