"""The losses the training step calls: fused on CUDA (Triton), row/slab-chunked PyTorch elsewhere.

Both paths compute in fp32 with the same formulas and write the gradient during the forward, so the
backward is one in-place scale of that stored gradient. Neither materialises an [N, K] (or
[B, 1, X, Y, Z]) fp32 temporary beyond the gradient itself, which is kept in the input dtype. The
stored gradient is scaled in place, so backward may run once per forward (no `retain_graph` reuse).
"""

from __future__ import annotations

import torch

IMPLS = ("auto", "triton", "chunked")
CHUNK_ELEMS = 1 << 17
"""Elements per chunk of the PyTorch path (512 KiB per fp32 buffer, two alive at once), so the peak
extra memory is O(chunk) whatever N·K is. Centered CE fwd+bwd at N=1024, K=8192 fp32, one thread:
199 / 277 / 281 ms with 2^16 / 2^18 / 2^20 (reference 620-840 ms); 2^17 still gives each op enough
elements to split over a few threads."""
EXP_FLOOR = -60.0
"""Shifted logits below this are clamped before exp. exp(-60) ≈ 9e-27 lies ~20 orders of magnitude
under the fp32 resolution of a softmax sum ≥ 1, so results do not change, but exp and the divisions
after it (down to K = 2^20) stay out of denormals, which are ~7× slower per element on x86. Measured,
N=1024, K=8192 fp32, one thread: 161-171 ms with the clamp, 593-618 ms without."""


def _pick_impl(impl: str, t: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if t.is_cuda else "chunked"
    return impl


def _chunked_centered_ce(student, teacher, center, student_temp, teacher_temp, need_grad,
                         teacher_sum):
    """Row-chunked PyTorch twin of kernels.centered_ce: fp32 accumulation, in-place ops on two
    chunk-sized fp32 buffers, one exp per element and operand. With m = max_k a and Σ_k p_k = 1,
    loss = log Σ_k exp(a_k − m) − Σ_k p_k (a_k − m)."""
    n, k = student.shape
    c = center.detach().reshape(1, -1).float()
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, k), dtype=student.dtype, device=student.device) if need_grad else None
    in_grad = need_grad and student.dtype == torch.float32  # work directly in the gradient rows
    rows = max(1, CHUNK_ELEMS // k)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        # copies (`.float()` would alias fp32 inputs, and both are modified in place below)
        if in_grad:
            a = grad[r0:r1]
            a.copy_(student[r0:r1])
        else:
            a = student[r0:r1].to(torch.float32, copy=True)       # [n_c, K]
        a.mul_(1.0 / student_temp)                                 # a = s/τs
        t = teacher[r0:r1].to(torch.float32, copy=True)            # [n_c, K] raw teacher logits
        if teacher_sum is not None:
            teacher_sum += t.sum(0)
        t.sub_(c).mul_(1.0 / teacher_temp)                         # b = (t − c)/τt
        t.sub_(t.amax(1, keepdim=True)).clamp_(min=EXP_FLOOR).exp_()
        p = t.div_(t.sum(1, keepdim=True))                         # p = softmax(b), in place
        a.sub_(a.amax(1, keepdim=True))                            # a − m
        dot = torch.linalg.vecdot(p, a)                            # [n_c] Σ p (a − m)
        l_s = a.clamp_(min=EXP_FLOOR).exp_().sum(1)                # [n_c] Σ exp(a − m)
        loss[r0:r1] = l_s.log() - dot
        if need_grad:
            a.div_(l_s[:, None]).sub_(p).mul_(1.0 / student_temp)  # (softmax(a) − p)/τs
            if not in_grad:
                grad[r0:r1] = a
    return loss, grad


def _scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad[i, :] *= scale[i] in place ([N, K] · [N] fp32: d(Σ_i g_i loss_i)/ds_ik). On CPU a bf16
    gradient times an fp32 scale makes TensorIterator cast through full-size fp32 temporaries (measured:
    +1 GiB at N=16384, K=8192), so CPU goes by row chunks; CUDA casts inside the kernel."""
    if grad.is_cuda:
        grad.mul_(scale[:, None])
        return
    rows = max(1, CHUNK_ELEMS // grad.shape[1])
    for r0 in range(0, grad.shape[0], rows):
        grad[r0:r0 + rows].mul_(scale[r0:r0 + rows, None])


def _centered_ce_forward(impl, student, teacher, center, student_temp, teacher_temp, need_grad,
                         teacher_sum):
    if impl == "triton":
        from alice_ds.kernels import centered_ce_forward
        return centered_ce_forward(student, teacher, center, student_temp, teacher_temp, need_grad,
                                   teacher_sum)
    return _chunked_centered_ce(student, teacher, center, student_temp, teacher_temp, need_grad,
                                teacher_sum)


class _CenteredCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, student_temp, teacher_temp, impl, teacher_sum):
        loss, ctx.grad = _centered_ce_forward(impl, student, teacher, center, student_temp,
                                              teacher_temp, True, teacher_sum)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("centered_cross_entropy: backward ran twice; the stored gradient is "
                               "scaled in place and can be used once")
        ctx.grad = None
        _scale_rows_(grad, grad_loss)
        return grad, None, None, None, None, None, None


def centered_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                           student_temp: float, teacher_temp: float,
                           teacher_sum: torch.Tensor | None = None,
                           impl: str = "auto") -> torch.Tensor:
    """Per-row centered cross-entropy, fp32 [N] (DINO eq. 1 with centering; Alice cls and CASA
    patch terms): -Σ_k softmax((teacher - center)/teacher_temp)_k · log_softmax(student/student_temp)_k.

    `student`, `teacher` [N, K] fp32 or bf16 (accumulated in fp32); `center` [K] or [1, K].
    Differentiable in `student` only. `teacher_sum`: optional fp32 [K] buffer on the same device
    that receives += Σ_i teacher[i] (raw logits, for the center EMA). `impl`: "auto" (Triton on
    CUDA, chunked otherwise), "triton", "chunked"."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"student and teacher must both be [N, K], got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if center.numel() != student.shape[1]:
        raise ValueError(f"center must have K={student.shape[1]} entries, got {tuple(center.shape)}")
    if student_temp <= 0 or teacher_temp <= 0:
        raise ValueError(f"temperatures must be > 0, got student_temp={student_temp}, "
                         f"teacher_temp={teacher_temp}")
    if teacher_sum is not None and (teacher_sum.dtype != torch.float32
                                    or teacher_sum.shape != (student.shape[1],)
                                    or not teacher_sum.is_contiguous()):
        raise ValueError(f"teacher_sum must be a contiguous fp32 [{student.shape[1]}] tensor, got "
                         f"{teacher_sum.dtype} {tuple(teacher_sum.shape)}")
    impl = _pick_impl(impl, student)
    if not (torch.is_grad_enabled() and student.requires_grad):
        # no graph: skip the [N, K] gradient (autograd.Function would still report needs_input_grad
        # under torch.no_grad())
        return _centered_ce_forward(impl, student.detach(), teacher.detach(), center, student_temp,
                                    teacher_temp, False, teacher_sum)[0]
    return _CenteredCrossEntropy.apply(student, teacher.detach(), center.detach(),
                                       float(student_temp), float(teacher_temp), impl, teacher_sum)


def _check_mask(pred: torch.Tensor, mask: torch.Tensor | None, block: int) -> torch.Tensor | None:
    """Validate shapes; return the mask as uint8 0/1 (1 = masked) or None."""
    if pred.dim() != 5 or pred.shape[1] != 1:
        raise ValueError(f"pred must be [B, 1, X, Y, Z], got {list(pred.shape)}")
    if mask is None:
        return None
    if block < 1:
        raise ValueError(f"block must be >= 1 voxel, got {block}")
    want = (pred.shape[0],) + tuple(-(-s // block) for s in pred.shape[-3:])
    if tuple(mask.shape) != want:
        raise ValueError(f"mask must be [B, ceil(X/{block}), ceil(Y/{block}), ceil(Z/{block})] = "
                         f"{list(want)} for pred {list(pred.shape)}, got {list(mask.shape)}")
    return (mask.detach() != 0).to(torch.uint8)


def _chunked_masked_mse(pred, target, mask, block, need_grad):
    """Slab-chunked PyTorch twin of kernels.masked_mse: one sample and a slab of x-planes (a multiple
    of `block` thick) at a time."""
    xs, ys, zs = pred.shape[-3:]
    slab = max(block, (CHUNK_ELEMS // (ys * zs)) // block * block)
    grad = torch.empty_like(pred) if need_grad else None
    sse = torch.zeros((), dtype=torch.float32, device=pred.device)
    count = torch.zeros((), dtype=torch.float64, device=pred.device)
    for b in range(pred.shape[0]):
        for x0 in range(0, xs, slab):
            x1 = min(xs, x0 + slab)
            d = pred[b, 0, x0:x1].float() - target[b, 0, x0:x1].float()  # [x1-x0, Y, Z]
            if mask is not None:
                m = mask[b, x0 // block:-(-x1 // block)]                     # [mx_c, MY, MZ]
                # [mx_c, MY, MZ] -> [mx_c·block, MY·block, MZ·block] -> cut to [x1-x0, Y, Z]
                m = m.repeat_interleave(block, 0).repeat_interleave(block, 1)
                m = m.repeat_interleave(block, 2)[: x1 - x0, :ys, :zs]
                d.mul_(m)
                count += m.sum(dtype=torch.float64)
            else:
                count += d.numel()
            sse += torch.linalg.vecdot(d.reshape(-1), d.reshape(-1))
            if need_grad:
                grad[b, 0, x0:x1] = d.mul_(2.0)
    return sse, count, grad


def _masked_mse_forward(impl, pred, target, mask, block, need_grad):
    """(loss fp32 scalar, unnormalised gradient or None, 1/count)."""
    if impl == "triton":
        from alice_ds.kernels import masked_mse_forward
        sse, count, grad = masked_mse_forward(pred, target, mask, block, need_grad)
    else:
        sse, count, grad = _chunked_masked_mse(pred, target, mask, block, need_grad)
    inv_count = 1.0 / count.clamp_min(1.0)  # nothing masked -> loss 0, gradient 0
    return (sse * inv_count).float(), grad, inv_count


class _MaskedMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, mask, block, impl):
        loss, ctx.grad, ctx.inv_count = _masked_mse_forward(impl, pred, target, mask, block, True)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("masked_mse: backward ran twice; the stored gradient is scaled in "
                               "place and can be used once")
        ctx.grad = None
        return grad.mul_((grad_loss * ctx.inv_count).to(torch.float32)), None, None, None, None


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, block: int,
               impl: str = "auto") -> torch.Tensor:
    """Mean squared error over masked voxels, fp32 scalar (SimMIM-style reconstruction term).

    `pred`, `target` [B, 1, X, Y, Z] (fp32 or bf16, accumulated in fp32); `mask`
    [B, ceil(X/block), ceil(Y/block), ceil(Z/block)] at token/block resolution, 1 = masked (any
    dtype, nonzero = masked), or None for every voxel; `block` the mask's edge in voxels.
    Differentiable in `pred`. 0 (and a zero gradient) when nothing is masked."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {list(pred.shape)} vs {list(target.shape)}")
    mask = _check_mask(pred, mask, block)
    impl = _pick_impl(impl, pred)
    if not (torch.is_grad_enabled() and pred.requires_grad):
        return _masked_mse_forward(impl, pred.detach(), target.detach(), mask, int(block), False)[0]
    return _MaskedMSE.apply(pred, target.detach(), mask, int(block), impl)
