"""The poll watcher: scan each watched map every ``interval`` seconds and report what changed.

Sees everything the trace watcher cannot: in-place writes through lookup pointers (atomic
counters in XDP/TC programs), LRU evictions, deletions by any path. Costs one batch dump per map
per interval (about 0.3 s for 1M entries), so it is the slow safety net under ``auto`` and the
only detector where tracing is refused.

``MapPoller`` watches one map: ``poll()`` scans, diffs against the previous scan and makes the new
scan the baseline; ``rescan()`` reads the map fresh for a repair without moving the baseline, so
the next ``poll()`` still reports what changed since the last one. ``PollWatcher`` runs pollers
for several maps behind the ``Watcher`` protocol.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping

from bpfsync.kernel.dump import DEFAULT_CHUNK
from bpfsync.kernel.maps import Map
from bpfsync.model import Change, WatchEvent
from bpfsync.watch.snapshot import Snapshot, diff, full


class MapPoller:
    """Scans one map and diffs each scan against the previous one."""

    def __init__(
        self, name: str, map_: Map, *, emit_initial: bool = False, chunk: int = DEFAULT_CHUNK
    ) -> None:
        """``name`` is the map's cluster-wide name put in each ``Change``. With ``emit_initial``
        the first ``poll()`` reports every entry; otherwise it only records the baseline."""
        self.name = name
        self.map = map_
        self.emit_initial = emit_initial
        self.chunk = chunk
        self.baseline: Snapshot | None = None
        self.last_scan_seconds = 0.0
        self.last_diff_seconds = 0.0

    def rescan(self) -> Snapshot:
        """The map's full content now. Does not touch the baseline."""
        start = time.perf_counter()
        snap = Snapshot(self.map.dump(self.chunk))
        self.last_scan_seconds = time.perf_counter() - start
        return snap

    def poll(self) -> list[Change]:
        """Scan, report the changes since the baseline, and make this scan the baseline."""
        snap = self.rescan()
        start = time.perf_counter()
        prev, self.baseline = self.baseline, snap
        if prev is None:
            changes = full(self.name, snap) if self.emit_initial else []
        else:
            changes = diff(self.name, prev, snap)
        self.last_diff_seconds = time.perf_counter() - start
        return changes


class PollWatcher:
    """Polls a set of maps, named as the cluster knows them, every ``interval`` seconds."""

    def __init__(
        self,
        maps: Mapping[str, Map],
        interval: float = 1.0,
        *,
        emit_initial: bool = False,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        if interval <= 0:
            raise ValueError("the poll interval must be positive")
        self.interval = interval
        self.pollers = {
            name: MapPoller(name, m, emit_initial=emit_initial, chunk=chunk)
            for name, m in maps.items()
        }
        self._stop = threading.Event()

    def poll_once(self) -> list[Change]:
        """One scan of every map: the changes since the previous scan."""
        changes: list[Change] = []
        for poller in self.pollers.values():
            changes += poller.poll()
        return changes

    def rescan(self, name: str) -> Snapshot:
        """A fresh full read of map ``name`` (for repair); baselines are left alone."""
        return self.pollers[name].rescan()

    def snapshot(self, name: str) -> Snapshot | None:
        """The last scan of map ``name`` that ``poll_once`` diffed against, if any."""
        return self.pollers[name].baseline

    def events(self) -> Iterator[WatchEvent]:
        """Poll every ``interval`` seconds (start to start) until ``close()``."""
        while not self._stop.is_set():
            started = time.monotonic()
            yield from self.poll_once()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def close(self) -> None:
        """Stop ``events()``. The maps belong to the caller and stay open."""
        self._stop.set()
