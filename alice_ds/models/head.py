"""AliceHead: the DINO/iBOT projection head (Caron et al. 2021; Zhou et al. 2022), as Alice uses it.

Widths (F = backbone feature_size, D = `in_dim`, 16F for a SwinBackbone):
- `embed_enc`: encoder tokens [B, L16, 8F] -> [B, L16, D]   (the CASA queries)
- `embed_dec`: decoder tokens [B, L8, 4F]  -> [B, L8, D]    (the CASA keys/values)
- `forward_cls`:   global vector [B, D] -> [B, out_dim] logits
- `forward_patch`: tokens [B, L, D]     -> [B, L, patch_out_dim] logits
Both logit paths share the 3-layer MLP (D -> hidden -> hidden -> bottleneck, GELU) and the
L2-normalisation, and have their own weight-normalised last layer (iBOT's shared head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02
"""Truncated-normal std of the MLP and embedding weights (DINO `_init_weights`)."""


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, W = g * v / ||v|| per output row.

    `weight_v` [out, in] is always trained. `weight_g` [out, 1] starts at 1 (DINO); with
    `learn_norm=False` (DINO's `norm_last_layer=True`) it is a buffer fixed at 1, so no parameter
    exists that never receives a gradient."""

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        g = torch.ones(out_dim, 1)
        if learn_norm:
            self.weight_g = nn.Parameter(g)
        else:
            self.register_buffer("weight_g", g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class AliceHead(nn.Module):
    """Projection head mapping backbone outputs to prototype logits (DESIGN §4 step 4).

    The last layers are named `last_layer` (global, `out_dim`) and `patch_last_layer` (tokens,
    `patch_out_dim`) so the trainer can freeze them for the first steps by name.
    `seed`: when given, initialise from it without touching the global RNG."""

    def __init__(self, in_dim: int, enc_dim: int, dec_dim: int, out_dim: int = 512, patch_out_dim: int = 512,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, norm_last_layer: bool = True,
                 seed: int | None = None) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("enc_dim", enc_dim), ("dec_dim", dec_dim), ("out_dim", out_dim),
                            ("patch_out_dim", patch_out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.patch_out_dim = patch_out_dim
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.enc_proj = nn.Linear(enc_dim, in_dim)
            self.dec_proj = nn.Linear(dec_dim, in_dim)
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(),
                nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                nn.Linear(hidden_dim, bottleneck_dim))
            for m in (self.enc_proj, self.dec_proj, *self.mlp):
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=INIT_STD)
                    nn.init.zeros_(m.bias)
            self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)
            self.patch_last_layer = WeightNormLinear(bottleneck_dim, patch_out_dim, learn_norm=not norm_last_layer)

    @classmethod
    def for_backbone(cls, feature_size: int, **kwargs) -> AliceHead:
        """Head for a SwinBackbone of feature size F: in_dim 16F, encoder tokens 8F, decoder tokens 4F."""
        return cls(16 * feature_size, 8 * feature_size, 4 * feature_size, **kwargs)

    def _bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)  # [..., D] -> [..., bottleneck], unit L2 norm

    def forward_cls(self, global_feat: torch.Tensor) -> torch.Tensor:
        """global_feat [B, D] -> [B, out_dim] logits."""
        return self.last_layer(self._bottleneck(global_feat))

    def embed_enc(self, enc_tokens: torch.Tensor) -> torch.Tensor:
        """enc_tokens [B, L16, enc_dim] -> [B, L16, D]."""
        return self.enc_proj(enc_tokens)

    def embed_dec(self, dec_tokens: torch.Tensor) -> torch.Tensor:
        """dec_tokens [B, L8, dec_dim] -> [B, L8, D]."""
        return self.dec_proj(dec_tokens)

    def forward_patch(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, D] -> [B, L, patch_out_dim] logits."""
        return self.patch_last_layer(self._bottleneck(tokens))
