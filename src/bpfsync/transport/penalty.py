"""Peers this node refuses for a while after they misbehaved.

A peer whose input the agent refused as malformed or unauthenticated (not merely a record for a
map it does not sync, or a clock off by more than the drift bound: those are configuration, and
the records are refused one by one) is disconnected and its streams are refused for a time that
doubles with each offence, from ``base`` up to ``cap``, and is forgiven after ``forgive`` seconds
of good behaviour. The others keep syncing meanwhile. Only members get here (the Hello check
comes first), so the table is bounded by the membership.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Penalties"]


class Penalties:
    def __init__(
        self, base: float = 1.0, cap: float = 60.0, forgive: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < base <= cap:
            raise ValueError("penalties need 0 < base <= cap")
        self.base, self.cap, self.forgive = base, cap, forgive
        self._clock: Callable[[], float] = clock
        self._until: dict[str, tuple[float, int]] = {}  # node -> (refused until, offences)

    def punish(self, node: str) -> float:
        """Another offence of ``node``: how many seconds it is refused from now."""
        now = self._clock()
        until, offences = self._until.get(node, (0.0, 0))
        if now - until > self.forgive:
            offences = 0
        hold = min(self.cap, self.base * (1 << min(offences, 30)))
        self._until[node] = (now + hold, offences + 1)
        return hold

    def left(self, node: str) -> float:
        """Seconds ``node`` is still refused (0 when it is not)."""
        entry = self._until.get(node)
        if entry is None:
            return 0.0
        now: float = self._clock()
        if now - entry[0] > self.forgive:
            del self._until[node]
            return 0.0
        return max(0.0, entry[0] - now)
