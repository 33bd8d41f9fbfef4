"""Triton kernels compiled for a real GPU (not the interpreter) against the plain-PyTorch reference,
fp32 and bf16, at the sizes the trainer uses. Needs CUDA and TRITON_INTERPRET=0; on a machine
without a GPU (CI) the module is skipped: tests/test_kernels.py covers the same kernels there
through the interpreter. Run on a GPU with `TRITON_INTERPRET=0 python -m pytest tests/test_kernels_cuda.py`
(benchmarks/gpu_checks.sh does)."""

import os

import pytest
import torch

from alice_ds.losses import centered_cross_entropy, masked_mse, reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA GPU with TRITON_INTERPRET=0 (the interpreter runs these kernels in test_kernels.py)")

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
# fp32: gradients reach w/τs = 15 and the GPU reference reduces in another order than the kernel; one
# entry in 2M differed by 6.5e-5 on an H200 (2026-11-26), hence atol 2e-4 (~1e-5 of the largest entry)
TOL = {torch.float32: dict(ce=dict(atol=2e-4, rtol=1e-5), grad=dict(atol=2e-4, rtol=1e-4)),
       # bf16 inputs: both paths read the same bf16 values and accumulate in fp32; the reference
       # rounds its intermediate softmax to bf16, so its gradient carries bf16's 2^-8 relative error
       torch.bfloat16: dict(ce=dict(atol=1e-2, rtol=1e-3), grad=dict(atol=2e-2, rtol=2e-2))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 7), (33, 1500), (4096, 512), (257, 65536)])
def test_centered_ce_cuda_matches_reference(n, k, dtype):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    s = (torch.randn(n, k, device="cuda", generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(n, k, device="cuda", generator=g) * 3).to(dtype)
    c = torch.randn(k, device="cuda", generator=g) * 0.5
    w = torch.rand(n, device="cuda", generator=g) + 0.5
    tsum = torch.zeros(k, device="cuda")
    loss = centered_cross_entropy(s, t, c, STUDENT_TEMP, TEACHER_TEMP, teacher_sum=tsum, impl="triton")
    (loss * w).sum().backward()
    grad = s.grad.float()
    s.grad = None
    ref = reference.centered_cross_entropy(s.float(), t.float(), c, STUDENT_TEMP, TEACHER_TEMP)
    (ref * w).sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    torch.testing.assert_close(loss, ref.detach(), **TOL[dtype]["ce"])
    torch.testing.assert_close(grad, s.grad.float(), **TOL[dtype]["grad"])
    torch.testing.assert_close(tsum, t.float().sum(0), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,block", [((2, 1, 96, 96, 96), 2), ((1, 1, 7, 9, 5), 2), ((2, 1, 64, 64, 64), 4)])
def test_masked_mse_cuda_matches_reference(shape, block, dtype):
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    p = torch.randn(*shape, device="cuda", generator=g).to(dtype).requires_grad_()
    t = torch.randn(*shape, device="cuda", generator=g).to(dtype)
    mshape = (shape[0],) + tuple(-(-x // block) for x in shape[2:])
    m = torch.rand(*mshape, device="cuda", generator=g) < 0.75
    loss = masked_mse(p, t, m, block, impl="triton")
    (3.0 * loss).backward()
    grad = p.grad.float()
    p.grad = None
    ref = reference.masked_mse(p.float(), t.float(), m, block)
    (3.0 * ref).backward()
    torch.testing.assert_close(loss.float(), ref.detach(), atol=1e-5, rtol=1e-4)
    # the gradient is returned in the input's dtype
    torch.testing.assert_close(grad, p.grad.float(), atol=1e-6, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
