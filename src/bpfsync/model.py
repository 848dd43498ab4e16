"""Plain data shared by every layer: what a watcher reports.

A watcher turns whatever it observes in the kernel into a stream of ``WatchEvent``: a ``Change``
for each key whose value it saw change, an ``Overflow`` when it knows it missed some (a full ring
buffer). Nothing here knows how a change was detected or where it will be sent.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import NamedTuple, cast


class Seen(enum.StrEnum):
    """Which detector saw a change."""

    TRACE = "trace"  # fexit program on the kernel's map-update functions
    POLL = "poll"  # batch scan diffed against the previous scan
    RESTART = "restart"  # the map at start compared with the stored state (changed while down)


class Op(enum.StrEnum):
    UPDATE = "update"
    DELETE = "delete"


class Change(NamedTuple):
    """One key of one watched map changed.

    ``value`` is the map's value as the kernel lays it out (for per-CPU maps: every possible CPU's
    value, each padded to 8 bytes), or None when the key was deleted or evicted.

    A tuple, not a frozen dataclass: watchers make one per write they see, millions a second
    under load, and a tuple is built ~5x faster.
    """

    map: str
    key: bytes
    value: bytes | None
    seen: Seen

    @property
    def op(self) -> Op:
        return Op.DELETE if self.value is None else Op.UPDATE


# a Change from (map, key, value, seen) without the Python-level __new__
_new_change = cast(
    Callable[[tuple[str, bytes, bytes | None, Seen]], Change], partial(tuple.__new__, Change)
)


def changes(
    name: str, keys: Sequence[bytes], values: Iterable[bytes | None], seen: Seen
) -> list[Change]:
    """A Change of map ``name`` for each key and its value, built in C: watchers make one per
    write they see."""
    n = len(keys)
    rows = zip(repeat(name, n), keys, values, repeat(seen, n), strict=True)
    return list(map(_new_change, rows))


@dataclass(frozen=True, slots=True)
class Overflow:
    """The watcher missed ``dropped`` events (0 if unknown) and rescans ``map`` (all if None)."""

    map: str | None
    dropped: int


WatchEvent = Change | Overflow
