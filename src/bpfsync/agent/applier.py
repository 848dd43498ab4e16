"""Applies merged peer changes to the local kernel maps, in batches.

The replica decides what each key should hold; this module only writes it. Updates of one map go
in one BPF_MAP_UPDATE_BATCH and deletes in one BPF_MAP_DELETE_BATCH. When a batch fails (a full
map, a key the kernel refuses) the writes are retried one by one, so one bad key costs only itself;
whatever the kernel ends up holding is told back to the replica (``note_kernel``), so the replica's
view of the kernel stays true and the watcher's report of our own write is recognised as an echo.

Counter maps (see synced.py): with the exact layout the writes go to the companion map and hold
the other nodes' merged value; in place they go to the map itself (the daemon re-reads racing
keys before merging, see ``Agent._fold_races``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bpfsync.agent.synced import SyncedMap
from bpfsync.core.replica import Replica, Write
from bpfsync.errors import KernelError
from bpfsync.kernel.maps import Map

log = logging.getLogger(__name__)


Pairs = list[tuple[bytes, bytes | None]]  # (key, value or None to delete)


@dataclass(slots=True)
class ApplyStats:
    updated: int = 0
    deleted: int = 0
    failed: int = 0
    # per map: what was written to the watched map itself (not to a companion)
    written: dict[str, Pairs] = field(default_factory=dict)
    # per map: how many updates and deletes were asked for
    asked: dict[str, tuple[int, int]] = field(default_factory=dict)


class Applier:
    def __init__(self, maps: Mapping[str, SyncedMap], replica: Replica) -> None:
        self._maps = maps
        self._replica = replica

    def apply(self, writes: Iterable[Write]) -> ApplyStats:
        stats = ApplyStats()
        per_map: dict[str, Pairs] = defaultdict(list)
        for name, key, value in writes:
            per_map[name].append((key, value))
        for name, kvs in per_map.items():
            sm = self._maps[name]
            if sm.companion is not None:
                kvs = [(k, self._replica.peers_value(name, k)) for k, _ in kvs]
                self._write(name, sm.companion, kvs, stats, note=False)
                continue
            self._write(name, sm.map, kvs, stats, note=True)
            stats.written[name] = kvs
        return stats

    def _write(
        self, name: str, m: Map, kvs: Pairs, stats: ApplyStats, *, note: bool
    ) -> None:
        ups = [(k, v) for k, v in kvs if v is not None]
        dels = [k for k, v in kvs if v is None]
        stats.asked[name] = (len(ups), len(dels))
        if ups:
            self._update(name, m, ups, stats, note)
        if dels:
            self._delete(name, m, dels, stats, note)

    def _update(
        self, name: str, m: Map, pairs: list[tuple[bytes, bytes]], stats: ApplyStats, note: bool
    ) -> None:
        try:
            keys, values = b"".join([k for k, _ in pairs]), b"".join([v for _, v in pairs])
            m.update_batch(keys, values, len(pairs))
            stats.updated += len(pairs)
            return
        except KernelError as err:
            log.warning("batch update of %s failed (%s); retrying key by key", name, err)
        for key, value in pairs:
            try:
                m.update(key, value)
                stats.updated += 1
            except KernelError as err:
                stats.failed += 1
                log.error("cannot write key %s to map %s: %s", key.hex(), name, err)
                if note:
                    self._replica.note_kernel(name, key, m.lookup(key))

    def _delete(self, name: str, m: Map, keys: list[bytes], stats: ApplyStats, note: bool) -> None:
        try:
            # keys already absent are skipped by delete_batch: absent is what we want
            m.delete_batch(b"".join(keys), len(keys))
            stats.deleted += len(keys)
        except KernelError as err:
            stats.failed += len(keys)
            log.error("cannot delete %d keys from map %s: %s", len(keys), name, err)
            if note:
                for key in keys:
                    self._replica.note_kernel(name, key, m.lookup(key))
