"""When a node reports ready: only after its first catch-up, so an HA pair never serves from an
empty map; and, per map, while the map is present and caught up. The rules, decided here from
what peering.py tells us (``answered``) and the clock:

  Y1  Ready once, for every map, every peer it is linked with right now (and at least one) has
      answered its first urgent digest. An answer's records precede its Answered on the same
      stream, so Answered means "caught up with that peer". Only the answer to a digest this
      node sent counts (peering.py): a peer cannot declare us caught up unasked. On the NATS
      bus the linked "peers" are the stream (caught up once it delivered what it held) and
      the one peer asked for what the stream no longer held (peering.py ``connected``).
  Y2  Alone: when no peer is linked ``catchup_timeout`` after start, the node comes up alone:
      the first node of a cluster must still come up. "Start" is when the node can be dialed
      (``listening``), not when the agent was built: seeding or loading a million entries
      takes seconds, and a clock that ran meanwhile would give the peers less than the
      timeout to link and answer.
  Y3  Silent peers: linked peers that send nothing (not even a repair batch) for three times
      ``catchup_timeout`` do not hold the node back for ever.
  Y4  Until ready, local changes wait in the bridge (one per key, bridge.py) and the watcher's
      periodic scans wait too; then they are stamped (replica rule S3).
  Y5  A map that joins after start (its pin was empty, or holds a new map object: replica.py
      S5) catches up on its own, by Y1-Y3 over that one map, counted from when it joined, and
      the node reports not ready until it has: its data plane reads a map that is being
      filled. The first catch-up's rules about local changes (Y4) do not come back: the
      node's clock has seen its peers' stamps, and the new map's changes are stamped as they
      come.
  Y6  A map whose pin is empty (the data plane is not up yet, or unpinned it) holds no
      readiness: the node is ready when every present map is, and reports the missing one
      (``present`` false in /status, ``bpfsync_map_present`` 0). A map seen at start holds
      Y1 like any other; one that was never seen is not in it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["CatchUp"]


@dataclass(slots=True)
class CatchUp:
    """Which linked peers have answered our first digest of each map, and since when we wait;
    ``joined``: the maps catching up on their own (Y5), with when each joined."""

    maps: list[str]
    answered: dict[str, set[str]] = field(default_factory=dict)  # map -> peers
    started: float = field(default_factory=time.monotonic)
    done_at: float | None = None
    joined: dict[str, float] = field(default_factory=dict)

    def listening(self, now: float) -> None:
        """The node can be dialed from ``now`` on: Y2's and Y3's clock starts."""
        self.started = now

    def answer(self, map: str, peer: str) -> None:
        """``peer`` answered our urgent digest of ``map``."""
        self.answered.setdefault(map, set()).add(peer)

    def join(self, map: str, now: float) -> None:
        """``map`` joined at ``now`` (Y5): no answer of it counts from before."""
        self.joined[map] = now
        self.answered.pop(map, None)

    def done(self, linked: Sequence[str], maps: Sequence[str] | None = None) -> bool:
        """Y1: every map (of ``maps``) answered by at least one peer and by every peer linked
        right now."""
        return all(
            (got := self.answered.get(m)) and got.issuperset(linked)
            for m in (self.maps if maps is None else maps)
        )

    def verdict(
        self, now: float, linked: Sequence[str], last_batch_at: float, timeout: float,
    ) -> str | None:
        """Why to become ready now (Y1-Y3), or None to keep waiting."""
        return self._verdict(self.maps, self.started, now, linked, last_batch_at, timeout)

    def joined_verdict(
        self, map: str, now: float, linked: Sequence[str], last_batch_at: float, timeout: float,
    ) -> str | None:
        """Y5: why ``map``, which joined, is caught up now, or None to keep waiting."""
        return self._verdict([map], self.joined[map], now, linked, last_batch_at, timeout)

    def _verdict(
        self, maps: Sequence[str], started: float, now: float, linked: Sequence[str],
        last_batch_at: float, timeout: float,
    ) -> str | None:
        if self.done(linked, maps):
            return f"caught up with {', '.join(linked) or 'peers'}"
        if now - started <= timeout:
            return None
        if not linked:
            return "no peer reachable: starting alone"
        if now - max(started, last_batch_at) > 3 * timeout:
            return f"peers {list(linked)} did not answer the catch-up digest"
        return None
