"""fp32 for the Conv3d calls that hit oneDNN's bf16 weight-gradient bug on the CPU (alice_ds.engine.cpu_bf16)."""

import copy

import torch

from alice_ds.engine.cpu_bf16 import guard_cpu_bf16_conv3d


def test_cpu_bf16_conv3d_guard():
    """alice_ds/engine/cpu_bf16.py: under CPU bf16 autocast a guarded depth-2 Conv3d (oneDNN's bf16
    weight gradient is garbage there; benchmarks/cpu_bf16_conv3d.py) gives the fp32 weight gradient
    on every draw; convs outside the bug (depth >= kernel, or no weight gradient) stay bf16."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1)
    net = torch.nn.Sequential(conv, torch.nn.Conv3d(32, 32, 1))
    assert guard_cpu_bf16_conv3d(net) == 2
    for _ in range(8):
        x, g = torch.randn(1, 32, 2, 4, 4), torch.randn(1, 32, 2, 4, 4)  # [B, C, D, H, W], depth 2 < kernel 3
        conv.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            y = conv(x)
        assert y.dtype == torch.float32
        y.backward(g)
        got = conv.weight.grad.clone()
        conv.zero_grad()
        torch.nn.Conv3d.forward(conv, x).backward(g)  # unguarded fp32 reference
        torch.testing.assert_close(got, conv.weight.grad, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", torch.bfloat16):
        assert conv(torch.randn(1, 32, 3, 3, 3)).dtype == torch.bfloat16  # depth 3 >= kernel 3
        with torch.no_grad():
            assert conv(x).dtype == torch.bfloat16  # no weight gradient (the teacher)
    twin = copy.deepcopy(net)  # the teacher is a deepcopy: its guard is bound to its own conv
    assert twin[0].forward.__self__ is twin[0]
