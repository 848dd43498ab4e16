"""Applies merged peer changes to the local kernel maps, in batches.

The replica decides what each key should hold; this module only writes it. Updates of one map go
in one BPF_MAP_UPDATE_BATCH and deletes in one BPF_MAP_DELETE_BATCH. When a batch fails (a full
map, a key the kernel refuses) the writes are retried one by one, so one bad key costs only itself;
whatever the kernel ends up holding is told back to the replica (``note_kernel``), so the replica's
view of the kernel stays true and the watcher's report of our own write is recognised as an echo.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bpfsync.core.replica import Replica, Write
from bpfsync.errors import KernelError
from bpfsync.kernel.maps import Map

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ApplyStats:
    updated: int = 0
    deleted: int = 0
    failed: int = 0


class Applier:
    def __init__(self, maps: Mapping[str, Map], replica: Replica) -> None:
        self._maps = maps
        self._replica = replica

    def apply(self, writes: Iterable[Write]) -> ApplyStats:
        stats = ApplyStats()
        updates: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
        deletes: dict[str, list[bytes]] = defaultdict(list)
        for name, key, value in writes:
            if value is None:
                deletes[name].append(key)
            else:
                updates[name].append((key, value))
        for name, pairs in updates.items():
            self._update(name, pairs, stats)
        for name, keys in deletes.items():
            self._delete(name, keys, stats)
        return stats

    def _update(self, name: str, pairs: list[tuple[bytes, bytes]], stats: ApplyStats) -> None:
        m = self._maps[name]
        try:
            m.update_batch(b"".join(k for k, _ in pairs), b"".join(v for _, v in pairs), len(pairs))
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
                self._replica.note_kernel(name, key, m.lookup(key))

    def _delete(self, name: str, keys: list[bytes], stats: ApplyStats) -> None:
        m = self._maps[name]
        try:
            # keys already absent are skipped by delete_batch: absent is what we want
            m.delete_batch(b"".join(keys), len(keys))
            stats.deleted += len(keys)
        except KernelError as err:
            stats.failed += len(keys)
            log.error("cannot delete %d keys from map %s: %s", len(keys), name, err)
            for key in keys:
                self._replica.note_kernel(name, key, m.lookup(key))
