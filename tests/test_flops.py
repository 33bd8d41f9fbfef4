"""FLOPs per training sample (alice_ds.engine.flops): counted on the meta device without arithmetic,
equal to the count of the same step on real tensors (attention included); MFU only against a known
GPU's datasheet peak."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from alice_ds.engine.config import LossConfig, ModelConfig
from alice_ds.engine.flops import count_flops, datasheet_tflops, device_peak_tflops, flops_per_sample
from alice_ds.method import AliceMetaArch

SMALL = dict(preset="tiny", out_dim=64, patch_out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32, casa_heads=2,
             casa_ffn_dim=64)
ROI = 64


@pytest.mark.slow  # a real forward and backward at 64^3 with math attention: ~1 CPU-minute
def test_meta_count_equals_the_real_step():
    cfg, loss = ModelConfig(**SMALL), LossConfig()
    meta = flops_per_sample(cfg, loss, ROI)
    torch.manual_seed(0)
    module = AliceMetaArch(cfg, loss)
    side = ROI // 2
    batch = {"query": torch.rand(1, 1, ROI, ROI, ROI), "anchor": torch.rand(1, 1, ROI, ROI, ROI),
             "query_mask": torch.rand(1, side, side, side) < 0.75,
             "anchor_mask": torch.rand(1, side, side, side) < 0.75}
    with sdpa_kernel(SDPBackend.MATH):  # the CPU's fused attention kernel is invisible to FlopCounterMode
        real = count_flops(lambda: module(batch, 0)["loss"].backward())
    assert meta == real
    # the backbone's share: the student's forward and backward (~3x a forward) of both views and the
    # teacher's forward of both, stopped at the stride-8 tokens; heads and CASA are small at this width
    backbone = module.student.backbone
    fwd = count_flops(lambda: backbone(batch["query"], None))
    lean = count_flops(lambda: backbone(batch["query"], None, recon=False))
    assert lean < 0.75 * fwd, (lean, fwd)  # the full-resolution decoder stages are most of a forward
    expected = 6 * fwd + 2 * lean
    assert expected < meta < 1.1 * expected, (meta, fwd, lean)


def test_activation_checkpointing_does_not_count_the_recomputation():
    loss = LossConfig()
    assert (flops_per_sample(ModelConfig(**SMALL, checkpoint_activations=True), loss, ROI)
            == flops_per_sample(ModelConfig(**SMALL), loss, ROI))


def test_peak_only_for_known_gpus_in_bf16():
    assert datasheet_tflops("NVIDIA H200") == 989 and datasheet_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert datasheet_tflops("NVIDIA GeForce RTX 4090") is None
    assert device_peak_tflops(torch.device("cpu"), bf16=True) is None
