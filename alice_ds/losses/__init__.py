"""Loss math: fused/chunked functional losses, their plain-PyTorch reference, and AliceLoss."""

from . import reference
from .alice import AliceLoss
from .functional import centered_cross_entropy, masked_mse

__all__ = ["AliceLoss", "centered_cross_entropy", "masked_mse", "reference"]
