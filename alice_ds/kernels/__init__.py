"""Triton kernels (one op per file: jit kernel -> launcher). Importing this package imports triton;
`alice_ds.losses` imports it only when the Triton path is used (CUDA tensors, or `impl="triton"` under
TRITON_INTERPRET=1 in tests)."""

from .centered_ce import centered_ce_forward
from .masked_mse import masked_mse_forward

__all__ = ["centered_ce_forward", "masked_mse_forward"]
