"""Turning true counts into published cells: k-anonymity suppression and optional Laplace noise.

A count cell is published as:

1. the true count `n`, plus Laplace noise of scale 1/epsilon when `epsilon` is set (drawn
   once per cell and interval), rounded to an integer;
2. then: <= 0 becomes 0 (nobody), 1..k-1 becomes None (suppressed, and counted), k or more
   is published.

Deciding suppression on the noised value is post-processing of a differentially private
release, so it keeps the guarantee; deciding on the true count would not. Derived figures
(conversion, dwell statistics, occupancy means) are published only when the cells they come
from are (see docs/analytics.md).
"""

from __future__ import annotations

import math
import random


def laplace(rng: random.Random, scale: float) -> float:
    """One draw from Laplace(0, scale) by inverse transform."""
    u = rng.random() - 0.5
    return -scale * math.copysign(1.0, u) * math.log(1.0 - 2.0 * abs(u))


class Cells:
    """Publishes the cells of one interval (or one day's totals) under one noise memory.

    `suppressed` counts cells published as None since this object was made, or since the
    caller last reset it.
    """

    __slots__ = ("_eps", "_k", "_noise", "_rng", "_shown", "suppressed")

    def __init__(self, k: int, epsilon: float | None, rng: random.Random) -> None:
        self._k = k
        self._eps = epsilon
        self._rng = rng
        self._noise: dict[str, float] = {}
        self._shown: dict[str, int] = {}  # the rounded noised value behind each count cell
        self.suppressed = 0

    @property
    def k(self) -> int:
        return self._k

    @property
    def epsilon(self) -> float | None:
        return self._eps

    def shown(self, key: str) -> int:
        """The rounded (noised) value behind count cell `key`, >= 0; what a suppressed cell
        would have shown. Deciding on it, not the true count, is post-processing."""
        return max(0, self._shown.get(key, 0))

    def hide(self) -> None:
        """Count one more cell published as None (complementary suppression)."""
        self.suppressed += 1

    def laplace(self, scale: float) -> float:
        """A fresh noise draw of `scale` (0 without epsilon)."""
        return laplace(self._rng, scale) if self._eps is not None else 0.0

    def _noised(self, key: str, x: float) -> float:
        if self._eps is None:
            return x
        z = self._noise.get(key)
        if z is None:
            z = self._noise[key] = laplace(self._rng, 1.0 / self._eps)
        return x + z

    def count(self, key: str, n: int) -> int | None:
        """A count cell: 0, None (suppressed) or a count >= k."""
        v = self._shown[key] = round(self._noised(key, n))
        if v <= 0:
            return 0
        if v < self._k:
            self.suppressed += 1
            return None
        return v

    def level(self, key: str, x: float, gate: int | None) -> float | None:
        """A mean of counts (e.g. mean occupancy, sensitivity 1 like a count), noised like a
        count and rounded to 0.1; None when its `gate` cell (the peak) is None."""
        if gate is None:
            return None
        return max(0.0, round(self._noised(key, x), 1))
