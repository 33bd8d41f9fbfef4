"""Pure `nn.Module`s of Alice: the MONAI-compatible Swin backbone, the DINO/iBOT-style head and CASA.

Nothing here imports DeepSpeed; parallelism lives in `alice_ds.engine`."""

from alice_ds.models.casa import CASA
from alice_ds.models.head import AliceHead
from alice_ds.models.swin import PRESETS, BackboneOutput, SwinBackbone, parameter_count

__all__ = ["CASA", "PRESETS", "AliceHead", "BackboneOutput", "SwinBackbone", "parameter_count"]
