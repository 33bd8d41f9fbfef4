"""Workaround for a CPU bf16 Conv3d weight-gradient bug (PyTorch 2.13.0 CPU, oneDNN v3.12.0).

Measured on this machine (AMD EPYC, AVX512-BF16) with `benchmarks/cpu_bf16_conv3d.py`: under
`torch.autocast("cpu", torch.bfloat16)` (or with bf16 tensors directly), the backward of a Conv3d
whose input *depth* (first spatial axis) is larger than 1 but smaller than the kernel's returns, on
10-100% of random inputs (by shape and seed), a weight gradient with a few finite but huge entries
(1e29-1e34) or inf/NaN. Forward and input gradient are correct. Triggers: depth 2 with kernel 3 (any
height/width: 2x2x2, 2x4x4, 2x16x16), depth 3 or 4 with kernel 5, from 24 channels up (16 never
failed), also with channels_last_3d inputs and with batch 2. Not affected: depth >= kernel, depth 1,
a size-2 height/width with depth >= 3 (4x4x2), Conv2d, ConvTranspose3d. With `torch.backends.mkldnn`
disabled the gradient is correct, so it is oneDNN's bf16 convolution backward-weights.

In SwinUNETR this is `encoder10` (two 16F x 16F x 3^3 convs) at roi 64 (deepest grid 2^3), and the
`decoder5` residual block at roi 32. DeepSpeed's fp32 sum of squares of the global gradient norm then
overflows, ZeRO-1/2/3 skip the update and ZeRO-0 applies the garbage.

Fix, smallest scope: only those convolutions, only on the CPU under bf16 autocast and only when a
weight gradient will be computed, run in fp32 (autocast off, input cast up; a depth-2 conv is a few
MFLOP). Everything else stays bf16, and the CUDA path is untouched. Disabling oneDNN instead would have
to cover the backward pass, which runs outside any context manager around the forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

_MIN_BAD_DEPTH = 2
"""Depth 1 never failed (oneDNN takes another path); depth 2..kernel-1 did."""


def needs_fp32(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """True when `conv(x)` would hit the CPU bf16 weight-gradient bug (see the module docstring):
    x [B, C, D, H, W] on the CPU, bf16 autocast on, a weight gradient to compute, 2 <= D < kernel depth."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and torch.is_grad_enabled() and conv.weight.requires_grad
            and _MIN_BAD_DEPTH <= x.shape[2] < conv.kernel_size[0])


def _guarded_forward(self: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if needs_fp32(self, x):
        with torch.autocast("cpu", enabled=False):
            return nn.Conv3d.forward(self, x.float())
    return nn.Conv3d.forward(self, x)


def guard_cpu_bf16_conv3d(module: nn.Module) -> int:
    """Route every `nn.Conv3d` of `module` through `_guarded_forward`; returns how many.

    Set per instance (not by swapping the class) so that the state dict, `isinstance` and DeepSpeed's
    exact-class checks (`torch_autocast.lower_precision_safe_modules`) see a plain Conv3d. Call after
    any `copy.deepcopy` of the module or again on the copy (deepcopy rebinds the method to the copy)."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.forward = types.MethodType(_guarded_forward, m)
            n += 1
    return n
