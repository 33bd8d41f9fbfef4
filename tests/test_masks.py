"""Block masks: exact ratio, block structure, per-draw randomness from the given generator only."""

import itertools

import numpy as np
import pytest

from alice_ds.sampler.masks import block_mask, num_masked


@pytest.mark.parametrize("grid,ratio,block", [((48, 48, 48), 0.75, 8), ((32, 32, 32), 0.75, 8),
                                              ((10, 12, 7), 0.5, 4), ((16, 16, 16), 0.3, 3),
                                              ((8, 8, 8), 0.0, 4), ((8, 8, 8), 1.0, 4)])
def test_exact_ratio(grid, ratio, block):
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = block_mask(grid, ratio, block, rng)
        assert m.shape == grid and m.dtype == bool
        assert int(m.sum()) == num_masked(grid, ratio) == int(round(ratio * np.prod(grid)))


def _unrolled_blocks(mask, block):
    """The offset that makes the mask constant on an aligned block tiling, and the block values."""
    g = mask.shape[0]
    n = g // block
    for off in itertools.product(range(block), repeat=3):
        m = np.roll(mask, [-o for o in off], axis=(0, 1, 2))
        blocks = m.reshape(n, block, n, block, n, block)  # [X, Y, Z] -> [bx, ex, by, ey, bz, ez]
        if (blocks.all(axis=(1, 3, 5)) == blocks.any(axis=(1, 3, 5))).all():
            return off, blocks.any(axis=(1, 3, 5))
    return None, None


def test_block_structure_when_blocks_tile_the_grid():
    # 24^3 tokens, 8-token blocks: 27 blocks; 0.75 * 13824 = 10368 = 20.25 blocks -> not whole, so use
    # a ratio that is a whole number of blocks (18 / 27) to see pure block structure
    rng = np.random.default_rng(3)
    grid, block = (24, 24, 24), 8
    ratio = 18 / 27
    offsets = set()
    for _ in range(4):
        m = block_mask(grid, ratio, block, rng)
        off, blocks = _unrolled_blocks(m, block)
        assert off is not None, "mask is not a union of shifted 8^3 blocks"
        assert int(blocks.sum()) == 18
        offsets.add(off)
    assert len(offsets) > 1  # the tiling offset is random


def test_default_sampler_grid_is_whole_blocks():
    # the sampler's default: roi 96, patch 2 -> 48^3 tokens, block 16 voxels = 8 tokens: 216 blocks,
    # 0.75 * 216 = 162 whole blocks
    m = block_mask((48, 48, 48), 0.75, 8, np.random.default_rng(7))
    off, blocks = _unrolled_blocks(m, 8)
    assert off is not None and int(blocks.sum()) == 162


def test_partial_block_is_single_and_rest_whole():
    # 0.75 of 24^3 = 20.25 blocks of 512: 20 whole blocks and 128 tokens of one more block
    m = block_mask((24, 24, 24), 0.75, 8, np.random.default_rng(11))
    assert int(m.sum()) == 10368
    off = None
    for cand in itertools.product(range(8), repeat=3):
        r = np.roll(m, [-o for o in cand], axis=(0, 1, 2)).reshape(3, 8, 3, 8, 3, 8)
        counts = np.sort(r.sum(axis=(1, 3, 5)).ravel())
        if set(counts.tolist()) <= {0, 128, 512}:
            off = cand
            break
    assert off is not None
    assert counts.tolist().count(512) == 20 and counts.tolist().count(128) == 1


def test_randomness_comes_from_the_generator():
    a = block_mask((16, 16, 16), 0.75, 4, np.random.default_rng(5))
    b = block_mask((16, 16, 16), 0.75, 4, np.random.default_rng(5))
    c = block_mask((16, 16, 16), 0.75, 4, np.random.default_rng(6))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kwargs,needle", [(dict(grid=(8, 8), ratio=0.5, block=2), "grid"),
                                           (dict(grid=(8, 8, 8), ratio=1.5, block=2), "1.5"),
                                           (dict(grid=(8, 8, 8), ratio=0.5, block=0), "block")])
def test_bad_arguments_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        block_mask(rng=np.random.default_rng(0), **kwargs)
