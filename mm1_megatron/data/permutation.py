"""A seeded bijection of [0, n) evaluated per position, in O(1) memory.

`torch.randperm(n)` per source and epoch holds n int64s: 16 GB for 2B captions, in every
process. Instead position i maps to `permute(i)`, a balanced Feistel network on the smallest
even number of bits covering n, with cycle walking (re-apply until the value falls in
[0, n)): a Feistel network is a bijection of its bit domain whatever its round function, and
walking restricted to [0, n) keeps it one (Black & Rogaway, "Ciphers with arbitrary finite
domains", 2002). The domain is < 4n, so a position walks fewer than 4 times on average.

The round function is the splitmix64 finaliser of (half, round key), keys derived from
(seed, stream); 6 rounds. `block(start, count)` evaluates many positions at once in numpy;
`__getitem__` is the same arithmetic on Python ints (tests check they agree).
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
ROUNDS = 6


def _mix(x: int) -> int:
    """splitmix64's finaliser (Steele et al., 2014) on a Python int."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def _mix_np(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """`p[i]` for i in [0, n): a bijection of [0, n) fixed by (seed, stream)."""

    def __init__(self, n: int, seed: int, stream: int = 0):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half_bits = (bits + 1) // 2
        self.half_mask = (1 << self.half_bits) - 1
        base = _mix((seed & _MASK64) ^ _mix(stream & _MASK64))
        self.keys = [_mix(base + r + 1) for r in range(ROUNDS)]

    def _encrypt(self, x: int) -> int:
        h, mask = self.half_bits, self.half_mask
        left, right = x >> h, x & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << h) | right

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"position {i} outside [0, {self.n})")
        x = self._encrypt(i)
        while x >= self.n:  # cycle walking: stays inside [0, n), still a bijection
            x = self._encrypt(x)
        return x

    def _encrypt_np(self, x: np.ndarray) -> np.ndarray:
        h, mask = np.uint64(self.half_bits), np.uint64(self.half_mask)
        left, right = x >> h, x & mask
        for key in self.keys:
            left, right = right, left ^ (_mix_np(right ^ np.uint64(key)) & mask)
        return (left << h) | right

    def block(self, start: int, count: int) -> np.ndarray:
        """`[p[start], ..., p[start + count - 1]]` as int64, vectorised."""
        if start < 0 or count < 0 or start + count > self.n:
            raise IndexError(f"positions [{start}, {start + count}) outside [0, {self.n})")
        with np.errstate(over="ignore"):
            x = self._encrypt_np(np.arange(start, start + count, dtype=np.uint64))
            out_of_range = x >= np.uint64(self.n)
            while out_of_range.any():
                x[out_of_range] = self._encrypt_np(x[out_of_range])
                out_of_range = x >= np.uint64(self.n)
        return x.astype(np.int64)
