"""Tiny distributed helpers that also work when `torch.distributed` is not initialised (one process,
tests, notebooks). Plain `torch.distributed`; no DeepSpeed import."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over all ranks (every rank gets the same result). Returns a new tensor under
    `torch.distributed`, `t` itself otherwise. Every rank must call it with the same shape and dtype."""
    if not is_dist():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(dist.get_world_size())
