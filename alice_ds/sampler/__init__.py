"""The SAM-conditioned pair sampler (DESIGN §4 steps 1-3): which crops Alice trains on.

`SamplerConfig` (the `sampler` section of a training config), `PairDataset` (the stream of pair
samples of one rank), `PairLoader` (its DataLoader, keeping position and counters for an exact
resume), `apply_device_augment` (augmentation of a batch on the training device). Augmentation
(`augment`) and block masks (`masks`) live here too.
"""

from alice_ds.sampler.augment import AUG_KEYS, apply_device_augment
from alice_ds.sampler.config import SamplerConfig
from alice_ds.sampler.dataset import PairDataset
from alice_ds.sampler.loader import PairLoader

__all__ = ["AUG_KEYS", "PairDataset", "PairLoader", "SamplerConfig", "apply_device_augment"]
