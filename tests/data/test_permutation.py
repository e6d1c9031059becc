"""The O(1)-memory shuffle: a bijection for every n, deterministic per seed and stream, and
statistically indistinguishable from `torch.randperm` on the checks a shuffle must pass."""

import math
import random

import numpy as np
import pytest
import torch

from mm1_megatron.data.permutation import FeistelPermutation

SIZES = [1, 2, 3, 4, 5, 7, 13, 64, 65, 97, 255, 256, 257, 1000, 7919, 65536, 65537, 100_003]


@pytest.mark.parametrize("n", SIZES)
def test_bijection_and_scalar_equals_block(n):
    p = FeistelPermutation(n, seed=11, stream=n)
    values = p.block(0, n)
    assert np.array_equal(np.sort(values), np.arange(n))
    for i in random.Random(n).sample(range(n), min(n, 200)):
        assert p[i] == values[i]
    assert np.array_equal(p.block(n // 3, n - n // 3), values[n // 3:])
    with pytest.raises(IndexError):
        p[n]


def test_deterministic_per_seed_and_stream_and_different_across_them():
    n = 10_000
    first = FeistelPermutation(n, seed=5, stream=3).block(0, n)
    assert np.array_equal(first, FeistelPermutation(n, seed=5, stream=3).block(0, n))
    for other in (FeistelPermutation(n, seed=5, stream=4), FeistelPermutation(n, seed=6, stream=3)):
        values = other.block(0, n)
        assert (values == first).mean() < 0.01  # ~1/n agree by chance
    with pytest.raises(ValueError):
        FeistelPermutation(0, seed=0)


def _statistics(values: np.ndarray) -> dict:
    """Position/value correlation, chi-square of the (position, value) grid, chi-square of
    successive pairs (p[i], p[i+1]), and the share of near-collisions of successive values."""
    n, b = values.size, 100
    positions = np.arange(n)
    r = float(np.corrcoef(positions, values)[0, 1])
    grid = np.zeros((b, b))
    np.add.at(grid, (positions * b // n, values * b // n), 1)
    pairs = np.zeros((b, b))
    np.add.at(pairs, (values[:-1] * b // n, values[1:] * b // n), 1)

    def chi2(counts):
        expected = counts.sum() / counts.size
        return float(((counts - expected) ** 2 / expected).sum())
    near = float((np.abs(np.diff(values)) < n // 1000).mean())
    return {"r": r, "grid_chi2": chi2(grid), "pair_chi2": chi2(pairs), "near": near}


def test_uniformity_against_randperm_on_a_million():
    n = 1_000_000
    ours = [_statistics(FeistelPermutation(n, seed=s, stream=0).block(0, n)) for s in (1, 2)]
    g = torch.Generator().manual_seed(0)
    reference = [_statistics(torch.randperm(n, generator=g).numpy()) for _ in range(2)]
    dof = 100 * 100 - 1
    band = 6 * math.sqrt(2 * dof)  # chi-square: mean dof, sd sqrt(2 dof)
    for stats in ours + reference:
        assert abs(stats["r"]) < 5 / math.sqrt(n)
        assert abs(stats["grid_chi2"] - dof) < band
        assert abs(stats["pair_chi2"] - dof) < band
        assert abs(stats["near"] - 2e-3) < 5e-4  # P(|a - b| < n/1000) ~ 2/1000
