"""Hybrid logical clock (Kulkarni et al., 2014): stamps that follow physical time yet respect
causality, so "highest stamp wins" means "the write that happened last" even across nodes.

Pure: the caller passes the physical time (ns since the epoch) to every call; nothing here reads
the OS clock.

Rules (``l`` is the clock's wall part, ``c`` its logical part, ``pt`` the physical time passed in):

    now(pt)         l' = max(l, pt); c = c + 1 if l' == l else 0
    observe(m, pt)  l' = max(l, m.wall, pt); c from whichever of l, m.wall reached l' (+1)

so a stamp issued after ``observe(m)`` is greater than ``m``, and ``l`` never runs behind ``pt``.

Bounded logical part: ``c`` never exceeds ``MAX_LOGICAL`` (2^32 - 1). A step that would pass it
carries into the wall part instead (``l + 1``, ``c = 0``): a stamp borrows one nanosecond rather
than overflow the 64-bit field it travels in, and the order above still holds. A legitimate
clock stays far below the bound (``c`` resets whenever physical time moves; even a one-hour NTP
step back at 250k changes/s reaches ~2^30), so peers refuse records whose logical part is above
it (register.py): otherwise one such record, observed, would make every clock of a cluster
overflow its 64-bit field.

Drift bound: a remote stamp more than ``max_drift_ns`` ahead of our physical time is *rejected*
(``ClockDriftError``), never clamped. A record's stamp is part of its identity: clamping would
give two nodes different versions of the same write and they would never converge. Rejection
only delays the record: once our physical clock is within the bound, the next digest repair
brings it in. Accepting it unchecked would drag every node's clock ahead with the fastest one.
"""

from __future__ import annotations

from bpfsync.core.messages import Stamp, new_stamp
from bpfsync.errors import ClockDriftError, MalformedMessageError

__all__ = ["DEFAULT_MAX_DRIFT_NS", "MAX_LOGICAL", "ClockDriftError", "HybridClock"]

DEFAULT_MAX_DRIFT_NS = 1_000_000_000  # NTP keeps real clusters within milliseconds
MAX_LOGICAL = (1 << 32) - 1  # see the module docstring: stamps carry into the wall part past it


class HybridClock:
    """One node's hybrid logical clock."""

    __slots__ = ("_logical", "_wall", "max_drift_ns", "node")

    def __init__(self, node: str, *, max_drift_ns: int = DEFAULT_MAX_DRIFT_NS) -> None:
        if not node:
            raise ValueError("HybridClock needs a non-empty node id")
        if max_drift_ns < 0:
            raise ValueError(f"max_drift_ns must be >= 0, got {max_drift_ns}")
        self.node = node
        self.max_drift_ns = max_drift_ns
        self._wall = 0
        self._logical = 0

    @property
    def last(self) -> Stamp:
        """The clock's current position (the last stamp issued or observed)."""
        return new_stamp((self._wall, self._logical, self.node))

    def now(self, physical_ns: int) -> Stamp:
        """A new stamp for a local event, greater than every stamp issued or observed so far."""
        wall, logical = self.reserve(physical_ns, 1)
        return new_stamp((wall, logical, self.node))

    def peek(self, physical_ns: int, n: int = 1) -> tuple[int, int]:
        """(wall, logical) of the first of ``n`` stamps for local events that ``now`` would
        issue one after another, the others following on the logical part; nothing issued."""
        if not 0 < n <= MAX_LOGICAL + 1:
            raise ValueError(f"stamps are reserved 1 to {MAX_LOGICAL + 1} at a time, not {n}")
        if physical_ns > self._wall:
            wall, logical = physical_ns, 0
        else:  # physical time stood still or went back (NTP step): count on the logical part
            wall, logical = self._wall, self._logical + 1
        if logical + n - 1 > MAX_LOGICAL:  # carry: see the module docstring
            wall, logical = wall + 1, 0
        return wall, logical

    def take(self, first: tuple[int, int], n: int) -> None:
        """Mark ``n`` stamps from ``first`` (as ``peek`` gave it, for at least ``n``) issued."""
        self._wall, self._logical = first[0], first[1] + n - 1

    def reserve(self, physical_ns: int, n: int) -> tuple[int, int]:
        """(wall, logical) of the first of ``n`` new stamps for local events, as ``now`` would
        issue them one after another: the others follow on the logical part."""
        first = self.peek(physical_ns, n)
        self.take(first, n)
        return first

    def check(self, stamp: Stamp, physical_ns: int, peer: str = "") -> None:
        """Raise ClockDriftError if ``stamp`` is too far ahead of ``physical_ns``, and
        MalformedMessageError if its logical part is beyond ``MAX_LOGICAL``."""
        if not 0 <= stamp.logical <= MAX_LOGICAL:
            raise MalformedMessageError(
                f"stamp of node {stamp.node!r} has logical part {stamp.logical}, beyond"
                f" {MAX_LOGICAL}: no bpfsync clock issues that", peer,
            )
        ahead = stamp.wall - physical_ns
        if ahead > self.max_drift_ns:
            raise ClockDriftError(
                f"stamp of node {stamp.node!r} is {ahead / 1e9:.3f} s ahead of this node's clock"
                f" (allowed {self.max_drift_ns / 1e9:.3f} s); check NTP on {stamp.node!r}",
                peer,
            )

    def observe(self, stamp: Stamp, physical_ns: int, peer: str = "") -> Stamp:
        """Take in a received stamp (after ``check``); returns the receive event's stamp."""
        self.check(stamp, physical_ns, peer)
        wall, logical = self._wall, self._logical
        new_wall = max(wall, stamp.wall, physical_ns)
        if new_wall == wall == stamp.wall:
            logical = max(logical, stamp.logical) + 1
        elif new_wall == wall:
            logical += 1
        elif new_wall == stamp.wall:
            logical = stamp.logical + 1
        else:
            logical = 0
        if logical > MAX_LOGICAL:  # carry: see the module docstring
            new_wall, logical = new_wall + 1, 0
        self._wall, self._logical = new_wall, logical
        return new_stamp((new_wall, logical, self.node))
