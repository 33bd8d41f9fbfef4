"""View augmentation for the pair sampler (DESIGN §4 step 2), with MONAI's random transforms.

Every transform's random state `R` is re-seeded per call from the caller's generator, so a view
depends only on that generator (seeded per sample by (seed, rank, stream index)), never on the global
NumPy RNG or on which worker produced it. The reference code computed its augmentations and then
forgot to apply them; these are applied.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import RandGaussianNoise, RandRotate, RandScaleIntensity, RandShiftIntensity

SEED_LIMIT = 2**31
"""Exclusive bound of the seeds handed to MONAI (`np.random.RandomState` takes < 2**32)."""


class ViewAugment:
    """Random rotation (uniform in ±`rotation_deg` about each axis, applied with probability
    `rotation_prob`, bilinear, zero = bottom of the HU window outside the crop), Gaussian noise of
    fixed `noise_std` on the [0, 1] scale, and optional intensity scale (`v * (1 + f)`,
    f ~ U(±scale)) and shift (`v + o`, o ~ U(±shift)). The output is clipped back to [0, 1].
    A zero magnitude disables a transform (it then draws nothing)."""

    def __init__(self, rotation_deg: float, rotation_prob: float, noise_std: float,
                 intensity_scale: float = 0.0, intensity_shift: float = 0.0):
        rad = math.radians(rotation_deg)
        self.transforms = []
        if rotation_deg > 0 and rotation_prob > 0:
            self.transforms.append(RandRotate(range_x=rad, range_y=rad, range_z=rad, prob=rotation_prob,
                                              keep_size=True, mode="bilinear", padding_mode="zeros"))
        if noise_std > 0:
            self.transforms.append(RandGaussianNoise(prob=1.0, mean=0.0, std=noise_std, sample_std=False))
        if intensity_scale > 0:
            self.transforms.append(RandScaleIntensity(factors=intensity_scale, prob=1.0))
        if intensity_shift > 0:
            self.transforms.append(RandShiftIntensity(offsets=intensity_shift, prob=1.0))

    def __call__(self, view: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """view float32 `[1, X, Y, Z]` in [0, 1] -> augmented plain tensor, same shape, in [0, 1]."""
        out = view
        for t in self.transforms:
            t.set_random_state(seed=int(rng.integers(SEED_LIMIT)))
            out = t(out)
        out = torch.as_tensor(out).as_subclass(torch.Tensor)  # drop MONAI's MetaTensor wrapper
        return out.float().clamp_(0.0, 1.0)
