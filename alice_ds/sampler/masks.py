"""Random 3D block masks on the backbone's token grid (DESIGN §4 step 3).

A mask is a bool array over the patch grid of one view (`True = masked`, the student sees a mask
token there). The grid is tiled by cubic blocks of `block` tokens; whole blocks are masked in random
order and the last one is filled partially in raster order, so the masked fraction is *exactly*
`round(ratio * grid_size)` tokens for every sample. The block tiling is shifted by a random offset
(wrapping around the grid), so block borders are not always at multiples of `block`.

The reference code drew one tube mask per batch, repeated along depth; here every sample and every
view gets its own mask.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def num_masked(grid: tuple[int, int, int], ratio: float) -> int:
    """Number of masked tokens for a grid and ratio (the exact count every mask has)."""
    return int(round(ratio * int(np.prod(grid))))


def block_mask(grid: tuple[int, int, int], ratio: float, block: int,
               rng: np.random.Generator) -> np.ndarray:
    """A bool mask `[gx, gy, gz]` with exactly `num_masked(grid, ratio)` True tokens made of cubic
    blocks of edge `block` tokens (the blocks at the far end of an axis are smaller when `block`
    does not divide the grid).

    `rng` is the only source of randomness (three offsets and one permutation of the blocks)."""
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive sizes, got {grid}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    if block < 1:
        raise ValueError(f"mask block must be >= 1 token, got {block}")
    block_id, sizes = _tiling(grid, int(block))
    target = num_masked(grid, ratio)
    order = rng.permutation(len(sizes))  # masking order of the blocks
    filled = np.cumsum(sizes[order])  # tokens masked after the first k+1 blocks of `order`
    full = int(np.searchsorted(filled, target, side="right"))  # whole blocks that fit
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    mask = rank[block_id] < full
    remaining = target - (int(filled[full - 1]) if full > 0 else 0)
    if remaining > 0:  # fill the next block partially, in raster order within it
        partial = np.flatnonzero(block_id.ravel() == order[full])[:remaining]
        mask.ravel()[partial] = True
    shift = [int(rng.integers(block)) for _ in grid]  # random tiling offset per axis (wraps)
    return np.roll(mask, shift, axis=(0, 1, 2))


@lru_cache(maxsize=8)
def _tiling(grid: tuple[int, int, int], block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block id of every token of the unshifted tiling, int64 `[gx, gy, gz]`, and the tokens per
    block `[num_blocks]`. Fixed per (grid, block), so computed once per process (it was half of
    `block_mask`'s 0.65 ms at a 48^3 grid); read-only, shared by every call."""
    nblocks = [-(-g // block) for g in grid]  # blocks per axis, last one possibly partial
    ax = [np.arange(g) // block for g in grid]
    block_id = (ax[0][:, None, None] * nblocks[1] + ax[1][None, :, None]) * nblocks[2] + ax[2][None, None, :]
    sizes = np.bincount(block_id.ravel(), minlength=int(np.prod(nblocks)))
    block_id.flags.writeable = False
    sizes.flags.writeable = False
    return block_id, sizes
