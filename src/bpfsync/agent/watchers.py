"""Chooses and starts the agent's watcher, and seeds the replica from what it first saw.

Seeding must use the very scan the watcher diffs against: a change landing between a separate
seed dump and the watcher's baseline would be in neither the replica nor any later report.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Protocol

from bpfsync.agent.config import WatchConfig
from bpfsync.core.replica import Replica
from bpfsync.kernel.maps import Map
from bpfsync.model import WatchEvent
from bpfsync.watch.auto import AutoWatcher
from bpfsync.watch.trace import TraceWatcher


class BatchWatcher(Protocol):
    """A started watcher read in batches (AutoWatcher, TraceWatcher)."""

    def read(self, timeout: float | None = 0.0) -> list[WatchEvent]: ...

    def close(self) -> None: ...


def open_watcher(cfg: WatchConfig, maps: Mapping[str, Map], replica: Replica) -> BatchWatcher:
    """Start the configured watcher on ``maps`` and seed ``replica`` with their content."""
    tgid = os.getpid()
    if cfg.mode == "trace":
        tracer = TraceWatcher(maps, agent_tgid=tgid)
        tracer.start()  # attached before the dump: nothing between the two goes unseen
        for name, m in maps.items():
            _seed(replica, name, m.dump())
        return tracer
    auto = AutoWatcher(
        maps,
        poll_interval=cfg.poll_interval,
        repair_interval=cfg.auto_poll_interval,
        tracing=cfg.mode == "auto",
        agent_tgid=tgid,
    )
    auto.start()
    for name in maps:
        _seed(replica, name, auto.baseline(name))
    return auto


def _seed(replica: Replica, name: str, items: Iterable[tuple[bytes, bytes]]) -> None:
    replica.seed(name, items)
