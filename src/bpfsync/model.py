"""Plain data shared by every layer: what a watcher reports.

A watcher turns whatever it observes in the kernel into a stream of ``WatchEvent``: a ``Change``
for each key whose value it saw change, an ``Overflow`` when it knows it missed some (a full ring
buffer). Nothing here knows how a change was detected or where it will be sent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Seen(enum.StrEnum):
    """Which detector saw a change."""

    TRACE = "trace"  # fexit program on the kernel's map-update functions
    POLL = "poll"  # batch scan diffed against the previous scan


class Op(enum.StrEnum):
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Change:
    """One key of one watched map changed.

    ``value`` is the map's value as the kernel lays it out (for per-CPU maps: every possible CPU's
    value, each padded to 8 bytes), or None when the key was deleted or evicted.
    """

    map: str
    key: bytes
    value: bytes | None
    seen: Seen

    @property
    def op(self) -> Op:
        return Op.DELETE if self.value is None else Op.UPDATE


@dataclass(frozen=True, slots=True)
class Overflow:
    """The watcher missed ``dropped`` events (0 if unknown) and rescans ``map`` (all if None)."""

    map: str | None
    dropped: int


WatchEvent = Change | Overflow
