"""Training methods as meta-architectures: one `nn.Module` per method that owns student, teacher and
method-specific blocks and returns a dict of losses. No DeepSpeed import (the engine hosts it)."""

from alice_ds.method.alice import AliceMetaArch, Branch

__all__ = ["AliceMetaArch", "Branch"]
