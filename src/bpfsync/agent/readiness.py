"""When a node reports ready: only after its first catch-up, so an HA pair never serves from an
empty map. The rules, decided here from what peering.py tells us (``answered``) and the clock:

  Y1  Ready once, for every map, every peer it is linked with right now (and at least one) has
      answered its first urgent digest. An answer's records precede its Answered on the same
      stream, so Answered means "caught up with that peer". Only the answer to a digest this
      node sent counts (peering.py): a peer cannot declare us caught up unasked.
  Y2  Alone: when no peer is linked ``catchup_timeout`` after start, the node comes up alone:
      the first node of a cluster must still come up.
  Y3  Silent peers: linked peers that send nothing (not even a repair batch) for three times
      ``catchup_timeout`` do not hold the node back for ever.
  Y4  Until ready, local changes wait in the bridge (one per key, bridge.py) and the watcher's
      periodic scans wait too; then they are stamped (replica rule S3).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["CatchUp"]


@dataclass(slots=True)
class CatchUp:
    """Which linked peers have answered our first digest of each map, and since when we wait."""

    maps: list[str]
    answered: dict[str, set[str]] = field(default_factory=dict)  # map -> peers
    started: float = field(default_factory=time.monotonic)
    done_at: float | None = None

    def answer(self, map: str, peer: str) -> None:
        """``peer`` answered our urgent digest of ``map``."""
        self.answered.setdefault(map, set()).add(peer)

    def done(self, linked: Sequence[str]) -> bool:
        """Y1: every map answered by at least one peer and by every peer linked right now."""
        return all(
            (got := self.answered.get(m)) and got.issuperset(linked) for m in self.maps
        )

    def verdict(
        self, now: float, linked: Sequence[str], last_batch_at: float, timeout: float,
    ) -> str | None:
        """Why to become ready now (Y1-Y3), or None to keep waiting."""
        if self.done(linked):
            return f"caught up with {', '.join(linked) or 'peers'}"
        if now - self.started <= timeout:
            return None
        if not linked:
            return "no peer reachable: starting alone"
        if now - max(self.started, last_batch_at) > 3 * timeout:
            return f"peers {list(linked)} did not answer the catch-up digest"
        return None
