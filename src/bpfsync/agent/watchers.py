"""Chooses and starts the agent's watcher, and hands back what it first saw, for seeding; moves
it to other map objects when the data plane recreates its maps (``reopen_watcher``).

Seeding must use the very scan the watcher diffs against: a change landing between a separate
seed dump and the watcher's baseline would be in neither the replica nor any later report.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Collection, Iterable, Mapping
from typing import Protocol

from bpfsync.agent.config import WatchConfig
from bpfsync.kernel.maps import Map
from bpfsync.model import WatchEvent
from bpfsync.watch.auto import AutoWatcher, drain
from bpfsync.watch.trace import Hooks, TraceWatcher

Items = Iterable[tuple[bytes, bytes]]
log = logging.getLogger("bpfsync.watch")


class BatchWatcher(Protocol):
    """A started watcher read in batches (AutoWatcher, TraceWatcher)."""

    @property
    def mode(self) -> str: ...

    def read(self, timeout: float | None = 0.0) -> list[WatchEvent]: ...

    def note_written(self, name: str, writes: Iterable[tuple[bytes, bytes | None]]) -> None: ...

    def note_filled(self, name: str, keys: bytes, values: bytes, count: int) -> None: ...

    def backoff(self, name: str) -> int: ...

    def close(self) -> None: ...


def open_watcher(
    cfg: WatchConfig, maps: Mapping[str, Map], in_place: Iterable[str] = (),
    *, hold_scans: bool = False,
) -> tuple[BatchWatcher, dict[str, Items]]:
    """Start the configured watcher on ``maps``; returns it and each map's content at start.

    ``in_place`` names maps whose values the data plane changes through lookup pointers
    (counter, max and min policies): they are polled at the full poll rate even when traced.
    ``hold_scans``: no periodic scan until the watcher's ``release_scans()`` (AutoWatcher)."""
    tgid = os.getpid()
    if cfg.mode == "trace" and in_place:
        log.warning(
            "watch mode trace cannot see writes through lookup pointers, which counter, max and"
            " min maps (%s) usually get: use mode auto or poll", ", ".join(sorted(in_place)),
        )
    if cfg.mode == "trace":
        if not maps:  # every pin empty so far: reopen_watcher starts the tracer
            return NoMaps(), {}
        # fexit only: the bpf(2) hooks would silently miss every write by a BPF program
        tracer = TraceWatcher(maps, agent_tgid=tgid, hooks=Hooks.FEXIT)
        tracer.start()  # attached before the dump: nothing between the two goes unseen
        return tracer, {name: m.dump() for name, m in maps.items()}
    auto = AutoWatcher(
        maps,
        poll_interval=cfg.poll_interval,
        repair_interval=cfg.auto_poll_interval,
        tracing=cfg.mode == "auto",
        agent_tgid=tgid,
        in_place=in_place,
        hooks=Hooks.AUTO if cfg.syscall_hooks else Hooks.FEXIT,
        hold_scans=hold_scans,
    )
    auto.start()
    return auto, {name: auto.baseline(name) for name in maps}


def reopen_watcher(
    cfg: WatchConfig, watcher: BatchWatcher, maps: Mapping[str, Map], fresh: Collection[str],
    in_place: Iterable[str] = (),
) -> tuple[BatchWatcher, list[WatchEvent], dict[str, Items]]:
    """Watch ``maps`` from now on, ``fresh`` naming those that are new objects (a recreated or
    newly pinned map). Call it from the thread that reads ``watcher``, between two reads.

    Returns the watcher to read from now on (``watcher`` itself, unless a tracer had to be
    replaced), the old watcher's last events of the maps that stay (to pass on first), and
    each fresh map's content as the watcher's reports are relative to (for seeding). The auto
    watcher moves in place and keeps its scans' state (``AutoWatcher.reopen``); a trace-only
    watcher filters the kernel's records by map id, so a new one is attached before the old is
    drained and closed, and nothing written in between goes unseen."""
    if isinstance(watcher, AutoWatcher):
        kept, dumps = watcher.reopen(maps, in_place)
        return watcher, kept, dict(dumps)
    tracer = TraceWatcher(maps, agent_tgid=os.getpid(), hooks=Hooks.FEXIT)
    tracer.start()  # before the dumps and before the old one goes
    try:
        baselines: dict[str, Items] = {name: maps[name].dump() for name in fresh}
    except BaseException:
        tracer.close()
        raise
    left = drain(watcher)  # bounded (auto.DRAIN_READS): the new tracer reports what follows
    watcher.close()
    stale = set(fresh)
    kept = [e for e in left if e.map is None or (e.map in maps and e.map not in stale)]
    new: BatchWatcher = tracer
    return new, kept, baselines


class NoMaps:
    """The watcher of an agent none of whose maps is pinned yet (watch mode trace, which cannot
    start a tracer on no map): reports nothing until ``reopen_watcher`` replaces it."""

    mode = "none"

    def __init__(self) -> None:
        self._closed = threading.Event()

    def read(self, timeout: float | None = 0.0) -> list[WatchEvent]:
        self._closed.wait(timeout)
        return []

    def note_written(self, name: str, writes: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Nothing is watched."""

    def note_filled(self, name: str, keys: bytes, values: bytes, count: int) -> None:
        """Nothing is watched."""

    def backoff(self, name: str) -> int:
        return 1

    def close(self) -> None:
        self._closed.set()
