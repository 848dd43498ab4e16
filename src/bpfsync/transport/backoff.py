"""Redial delays: exponential backoff with full jitter.

Full jitter (a uniform draw in [0, min(cap, base * 2**attempt)]) spreads the redials of many nodes
that lost the same peer at the same moment, so a restarted node is not hit by the whole mesh at
once. See "Exponential Backoff And Jitter" (AWS Architecture Blog, 2015).
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        if not 0 < base <= cap:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the ceiling up to ``cap``."""
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt, 62))
        self.attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Start again from ``base`` (after a link stayed up long enough to count as healthy)."""
        self.attempt = 0
