"""The training recipes of `alice-ds sam-train --recipe`: what differs between ours and the reference
SAM's (`configs/sam/sam_NIHLN.py` and `sam/models/frameworks/sam.py` of the official code).

- `default`: cubic views (64^3), view 2 shifted from view 1 by up to 35 % per axis, 2 cases x 1
  pair per step, coarse negatives = same-case voxels farther than 64 mm (loss.COARSE_POSITIVE_MM),
  AdamW 1e-3 with cosine decay, 2000 steps. Measured best on the built-in phantoms at CPU scale.
- `reference`: thin wide slabs (96 x 96 x 32 voxels at 2 mm x 0.8-1.2: 154-230 mm in-plane, 51-77 mm
  in z), both views around one seed point (80 %) or two independent points (20 %, possibly
  disjoint), 6 cases x 1 pair per step, the reference's coarse negatives (loss.py, coarse_rule
  "reference": all but < 5 mm of the pair's views, plus 1000 of the other cases'), SGD 0.02 with
  momentum 0.9, a linear warm-up, then constant, 20 000 steps. Meant for GPU-scale runs.

`reference` also has the reference's coarse grid: 32 mm in-plane, 8 mm along z (SAMNet
coarse_stride (16, 16, 4)); `default` keeps 32 mm on every axis. Not reproduced: the reference's fine
loss (negatives from both views, 20 mm ignore radius, symmetric); its coarse loss's queries (every
coarse voxel of both views, the positive the nearest coarse voxel of the other view within 25 mm and
|dz| < 6-8 mm; ours: the coarse embedding at the fine positives, the positive interpolated at the same
world point); its ImageNet initialisation; its HU mapping ([-1024, 3071]) is `--hu_window -1024 3071`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WARMUP_STEPS = 500
"""The reference's linear warm-up; a run shorter than 10x this warms up over a tenth of its steps."""
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class Recipe:
    """Defaults and fixed choices of one training recipe (module doc)."""

    name: str
    roi: tuple[int, int, int]
    """View shape (X, Y, Z) in voxels of the --spacing grid."""
    batch_size: int
    pairs_per_case: int
    steps: int
    lr: float
    optimizer: str
    """"adamw" (cosine decay to 0) or "sgd" (momentum, linear warm-up, then constant)."""
    coarse_rule: str
    """loss.sam_loss's coarse_rule."""
    disjoint_fraction: float | None
    """None: view 2 shifted from view 1 (crops.view_pair); else crops.reference_pair, with this
    fraction of independent (possibly disjoint) pairs."""
    coarse_stride: tuple[int, int, int]
    """SAMNet's coarse grid (X, Y, Z) in voxels of the 2 mm grid."""

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
        return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)

    def lr_at(self, step: int, steps: int, lr: float) -> float:
        """Learning rate of 0-based `step` of a `steps`-step run; a pure function of the step."""
        if self.optimizer == "sgd":
            warmup = max(1, min(WARMUP_STEPS, steps // 10))
            return lr * min(1.0, (step + 1) / warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


RECIPES = {
    "default": Recipe("default", (64, 64, 64), batch_size=2, pairs_per_case=1, steps=2000, lr=1e-3,
                      optimizer="adamw", coarse_rule="far", disjoint_fraction=None, coarse_stride=(16, 16, 16)),
    "reference": Recipe("reference", (96, 96, 32), batch_size=6, pairs_per_case=1, steps=20000, lr=0.02,
                        optimizer="sgd", coarse_rule="reference", disjoint_fraction=0.2, coarse_stride=(16, 16, 4)),
}
