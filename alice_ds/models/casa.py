"""CASA: conditional anatomical semantic alignment (Alice, Jiang et al. ICCV 2023, §3.3).

One post-LN cross-attention block in the original Transformer layout (Vaswani et al. 2017):
    h = LN(q + Drop(MHA(q, kv, kv)));  out = LN(h + Drop(FFN(h)))
with 8 heads of d_k = d_v = 64 and a ReLU FFN of width 2048 (the reference code's sizes). Queries
are the head-mapped (masked) student encoder tokens, keys/values the head-mapped decoder tokens of
the student (student branch) or of the teacher (target branch); the same weights serve both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CASA(nn.Module):
    """Cross-attention block; `dim` is the head width D (`AliceHead.in_dim`).

    Every parameter takes part in every forward (the reference CASA carried unused layers).
    `seed`: when given, initialise from it without touching the global RNG."""

    def __init__(self, dim: int, num_heads: int = 8, head_dim: int = 64, ffn_dim: int = 2048,
                 dropout: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or head_dim <= 0 or ffn_dim <= 0:
            raise ValueError(f"CASA sizes must be positive, got dim={dim}, num_heads={num_heads}, "
                             f"head_dim={head_dim}, ffn_dim={ffn_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        inner = num_heads * head_dim
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.q_proj = nn.Linear(dim, inner)
            self.k_proj = nn.Linear(dim, inner)
            self.v_proj = nn.Linear(dim, inner)
            self.out_proj = nn.Linear(inner, dim)
            self.norm1 = nn.LayerNorm(dim)
            self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
            self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, L, H*dk] -> [B, H, L, dk]

    def forward(self, query: torch.Tensor, kv: torch.Tensor, return_attn_ratio: bool = False):
        """query [B, Lq, D], kv [B, Lk, D] -> [B, Lq, D]; with `return_attn_ratio` also the mean over
        tokens of |attention output| / |query| (detached): how much the block adds to the queries it
        passes on through its residual path (0: it ignores kv)."""
        if query.shape[0] != kv.shape[0] or query.shape[-1] != kv.shape[-1]:
            raise ValueError(f"query and kv must share batch and width, got {tuple(query.shape)} and {tuple(kv.shape)}")
        b, lq, _ = query.shape
        attn = F.scaled_dot_product_attention(
            self._heads(self.q_proj(query)), self._heads(self.k_proj(kv)), self._heads(self.v_proj(kv)),
            dropout_p=self.dropout if self.training else 0.0)  # [B, H, Lq, dv]
        attn = self.out_proj(attn.transpose(1, 2).reshape(b, lq, -1))  # [B, H, Lq, dv] -> [B, Lq, D]
        h = self.norm1(query + self.drop(attn))
        out = self.norm2(h + self.drop(self.ffn(h)))
        if not return_attn_ratio:
            return out
        with torch.no_grad():
            ratio = (attn.float().norm(dim=-1) / query.float().norm(dim=-1).clamp_min(1e-12)).mean()
        return out, ratio
