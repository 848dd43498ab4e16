"""Chooses and starts the agent's watcher, and hands back what it first saw, for seeding.

Seeding must use the very scan the watcher diffs against: a change landing between a separate
seed dump and the watcher's baseline would be in neither the replica nor any later report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Protocol

from bpfsync.agent.config import WatchConfig
from bpfsync.kernel.maps import Map
from bpfsync.model import WatchEvent
from bpfsync.watch.auto import AutoWatcher
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
