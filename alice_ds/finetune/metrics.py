"""Segmentation scores of one case, shared by validation during fine-tuning and `alice-ds evaluate`:
per-class Dice and HD95 (MONAI `DiceMetric`, `HausdorffDistanceMetric(percentile=95)` in mm), and
the sliding-window prediction they are computed from."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric

SW_OVERLAP = 0.25
"""Sliding-window overlap of validation/evaluation (MONAI's common choice for SwinUNETR)."""
HD_PERCENTILE = 95


def one_hot(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, 1, X, Y, Z] class indices -> [B, C, X, Y, Z] float one-hot."""
    return F.one_hot(classes[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3).float()


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of classes 1..C-1 ([C-1] float) of one case; pred, label [1, 1, X, Y, Z] class indices.
    NaN where the label lacks the class (MONAI's `ignore_empty`): such a class does not count in a
    mean, whatever was predicted."""
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    return metric(one_hot(pred, num_classes), one_hot(label, num_classes))[0].float().cpu()


def hd95_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int, spacing) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance in mm of classes 1..C-1 ([C-1]). NaN where the
    label lacks the class; inf where the label has it and the prediction does not (MONAI's value)."""
    metric = HausdorffDistanceMetric(include_background=False, percentile=HD_PERCENTILE, reduction="none")
    p, y = one_hot(pred, num_classes), one_hot(label, num_classes)
    with warnings.catch_warnings():  # an empty class is expected (a missed organ): its value is set below
        warnings.filterwarnings("ignore", message=r"the (prediction|ground truth) of class \d+ is all 0")
        out = metric(p, y, spacing=[float(s) for s in spacing])[0].float().cpu()
    present = y[0, 1:].flatten(1).any(1).cpu()  # [C-1]
    predicted = p[0, 1:].flatten(1).any(1).cpu()
    out[~present] = math.nan
    out[present & ~predicted] = math.inf
    return out


@torch.no_grad()
def predict(model, image: torch.Tensor, roi: int, sw_batch_size: int = 2) -> torch.Tensor:
    """[1, 1, X, Y, Z] image -> [1, 1, X, Y, Z] argmax class indices (uint8), by overlapping ROI
    windows (`SW_OVERLAP`, Gaussian blending)."""
    logits = sliding_window_inference(image, (roi,) * 3, sw_batch_size, model, overlap=SW_OVERLAP, mode="gaussian")
    return logits.argmax(1, keepdim=True).to(torch.uint8)


def nanmean(values) -> float:
    """Mean of the finite-or-inf values, NaN ignored (a class absent from every case); NaN if none."""
    v = [float(x) for x in values if not math.isnan(float(x))]
    return sum(v) / len(v) if v else math.nan
