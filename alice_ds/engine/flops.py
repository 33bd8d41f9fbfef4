"""FLOPs of one training sample and the model FLOPs utilisation (DESIGN §8).

FLOPs are what `torch.utils.flop_counter.FlopCounterMode` counts (matrix products, convolutions and
attention; elementwise work is not counted) on the real `AliceMetaArch`: the teacher forward of both
views, the student forward and backward of both views, heads, CASA and losses. The model is built on
PyTorch's meta device, so counting costs no memory and no arithmetic (about 2 s for the tiny preset
at 64^3 on one CPU core) and activation checkpointing's recomputation is left out, as MFU wants.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from alice_ds.method import AliceMetaArch
from alice_ds.models.swin import PATCH_SIZE
from alice_ds.views import VIEWS

DATASHEET_BF16_TFLOPS = {"H100 80GB HBM3": 989, "H100 PCIe": 756, "H100 NVL": 835, "H200": 989, "A100": 312}
"""Dense bf16 tensor-core peak from NVIDIA datasheets, keyed by a substring of
`torch.cuda.get_device_name()`: the denominator of MFU (bf16 runs only)."""


def datasheet_tflops(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a known GPU, None for any other device."""
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in device_name), None)


def count_flops(run) -> int:
    """FLOPs of one call of `run()` as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def flops_per_sample(model_cfg, loss_cfg, roi: int) -> int:
    """FLOPs of one training sample (a query + anchor pair of `roi`^3 crops) through the Alice step."""
    model_cfg = type(model_cfg)(**{**vars(model_cfg), "checkpoint_activations": False})
    side = roi // PATCH_SIZE
    with torch.device("meta"):
        module = AliceMetaArch(model_cfg, loss_cfg)
        batch = {v: torch.zeros(1, 1, roi, roi, roi) for v in VIEWS}  # [B, 1, R, R, R]
        batch.update({f"{v}_mask": torch.zeros(1, side, side, side, dtype=torch.bool) for v in VIEWS})

    def step():
        module(batch, 0)["loss"].backward()

    return count_flops(step)


def device_peak_tflops(device: torch.device, bf16: bool) -> float | None:
    """The MFU denominator of a training device: its datasheet bf16 peak on a known GPU, else None."""
    if device.type != "cuda" or not bf16:
        return None
    return datasheet_tflops(torch.cuda.get_device_name(device))
