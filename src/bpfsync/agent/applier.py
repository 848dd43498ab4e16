"""Applies merged peer changes to the local kernel maps, in batches.

The replica decides what each key should hold; this module only writes it. Updates of one map go
in one BPF_MAP_UPDATE_BATCH and deletes in one BPF_MAP_DELETE_BATCH. When a batch fails (a full
map, a key the kernel refuses) the writes are retried one by one, so one bad key costs only itself;
whatever the kernel ends up holding is told back to the replica (``note_kernel``), so the replica's
view of the kernel stays true and the watcher's report of our own write is recognised as an echo.

Counter maps (see synced.py): with the exact layout the writes go to the companion map and hold
the other nodes' merged value; in place they go to the map itself (the pipeline re-reads racing
keys before merging, see ``Pipeline.merge``).

Maps whose kernel bytes differ from the core's (per-CPU slots, local bits: ``SyncedMap.folds``)
or that have a filter are written key by key, each after reading the key's current value, which
the written bytes keep their local bits and per-CPU counts from, and which is not overwritten
if it does not pass the filter; what the watcher is told is what was written.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bpfsync.agent.synced import SyncedMap
from bpfsync.core.replica import Fill, Replica, Write
from bpfsync.errors import KernelError
from bpfsync.kernel.maps import Map

log = logging.getLogger(__name__)


Pairs = list[tuple[bytes, bytes | None]]  # (key, value or None to delete)


@dataclass(slots=True)
class _Job:
    """One batch write for the background writer (values None: a delete)."""

    name: str
    map: Map
    joined: bytes  # the keys
    count: int
    values: bytes | None
    note: bool  # a write to the watched map itself (else to a companion)

    def key_list(self) -> list[bytes]:
        return _split(self.joined, self.count)


def _split(joined: bytes, count: int) -> list[bytes]:
    size = len(joined) // count
    return [joined[i : i + size] for i in range(0, len(joined), size)]


def _pairs(keys: bytes, values: bytes, count: int) -> list[tuple[bytes, bytes | None]]:
    return list(zip(_split(keys, count), _split(values, count), strict=True))


@dataclass(slots=True)
class ApplyStats:
    updated: int = 0
    deleted: int = 0
    failed: int = 0
    # per map: what was written to the watched map itself (not to a companion)
    written: dict[str, Pairs] = field(default_factory=dict)
    filled: list[Fill] = field(default_factory=list)  # ... and as columns
    # per map: how many updates and deletes were asked for
    asked: dict[str, tuple[int, int]] = field(default_factory=dict)


class Applier:
    def __init__(self, maps: Mapping[str, SyncedMap], replica: Replica) -> None:
        self._maps = maps
        self._replica = replica
        # background writing (see start_background): the writer's queue, thread, refusals
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        self._writer: threading.Thread | None = None
        self._refused: list[_Job] = []

    # --- writing in the background while catching up ----------------------------------------

    def start_background(self) -> None:
        """Until ``finish_background()``, batch writes go to a writer thread, in order, and
        ``apply`` returns at once: a catching-up agent merges its next batch meanwhile (a 1M-key
        catch-up spends ~0.5 s in the kernel). Meant for the time before the agent is ready,
        when nothing reads the maps back; stats count what was asked."""
        if self._jobs is not None:
            return
        self._jobs = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_jobs, args=(self._jobs,),
                                        name="bpfsync-apply", daemon=True)
        self._writer.start()

    def finish_background(self) -> ApplyStats:
        """Wait for the writer, then redo key by key, here, each batch the kernel refused, with
        the values the replica wants now (a later batch may have changed them)."""
        stats = ApplyStats()
        if self._jobs is None or self._writer is None:
            return stats
        self._jobs.put(None)
        self._writer.join()
        self._jobs = self._writer = None
        refused, self._refused = self._refused, []
        for job in refused:
            log.warning("batch write to %s failed; retrying key by key", job.name)
            want = self._replica.desired if job.note else self._replica.peers_value
            kvs = [(key, want(job.name, key)) for key in job.key_list()]
            if job.note:
                kvs, _ = self._kernel_pairs(self._maps[job.name], kvs)
            self._write_keys(job.name, job.map, kvs, stats, job.note)
            if job.note:
                stats.written.setdefault(job.name, []).extend(kvs)
        return stats

    def _write_jobs(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        while (job := jobs.get()) is not None:
            try:
                if job.values is None:
                    job.map.delete_batch(job.joined, job.count)
                else:
                    job.map.update_batch(job.joined, job.values, job.count)
            except KernelError:
                self._refused.append(job)  # read by finish_background() after join()

    def apply(
        self, writes: Iterable[Write], fills: Iterable[Fill] = (),
        believed: Mapping[tuple[str, bytes], bytes | None] | None = None,
    ) -> ApplyStats:
        """Write what the replica decided. ``believed``: per (map, key) of in-place counters,
        the folded value the merge started from (``SyncedMap.kernel_value``)."""
        stats = ApplyStats()
        per_map: dict[str, Pairs] = defaultdict(list)
        for name, key, value in writes:
            per_map[name].append((key, value))
        for fill in fills:
            sm = self._maps[fill.map]
            if sm.companion is not None or sm.rewrites:  # key by key (companions: not expected)
                per_map[fill.map] += _pairs(fill.keys, fill.values, fill.entries)
                continue
            ups, dels = stats.asked.get(fill.map, (0, 0))
            stats.asked[fill.map] = (ups + fill.entries, dels)
            self._update(fill.map, self._maps[fill.map].map, fill.keys, fill.values, fill.entries,
                         stats, True)
            stats.filled.append(fill)
        for name, kvs in per_map.items():
            sm = self._maps[name]
            if sm.companion is not None:
                kvs = [(k, self._replica.peers_value(name, k)) for k, _ in kvs]
                self._write(name, sm.companion, kvs, stats, note=False)
                continue
            kvs, noted = self._kernel_pairs(sm, kvs, believed)
            self._write(name, sm.map, kvs, stats, note=True)
            stats.written[name] = noted
        return stats

    @staticmethod
    def _kernel_pairs(
        sm: SyncedMap, kvs: Pairs, believed: Mapping[tuple[str, bytes], bytes | None] | None = None,
    ) -> tuple[Pairs, Pairs]:
        """The core's values as the kernel bytes to write (synced.py), each key read first,
        and what to tell the watcher: the bytes without the increments the data plane made
        since ``believed`` (kept in the write), so that its next scan reports them."""
        if not (sm.rewrites or believed):
            return kvs, kvs
        was = believed or {}
        out: Pairs = []
        noted: Pairs = []
        for key, value in kvs:
            since = was.get((sm.name, key))
            if not sm.rewrites and since is None:
                out.append((key, value))
                noted.append((key, value))
                continue
            current = sm.map.lookup(key)
            if current is not None and not sm.passes(key, current):
                continue  # the node's own entry, which does not sync, stays (replica.py F2)
            if value is None:
                out.append((key, None))
                noted.append((key, None))
                continue
            raw = sm.kernel_value(value, current, since)
            out.append((key, raw))
            noted.append((key, raw if since is None else sm.kernel_value(value, current)))
        return out, noted

    def _write_keys(
        self, name: str, m: Map, kvs: Sequence[tuple[bytes, bytes | None]], stats: ApplyStats,
        note: bool,
    ) -> None:
        """One by one, after a batch failed: each key costs only itself."""
        for key, value in kvs:
            try:
                if value is None:
                    m.delete(key)
                    stats.deleted += 1
                else:
                    m.update(key, value)
                    stats.updated += 1
            except KernelError as err:
                stats.failed += 1
                log.error("cannot write key %s to map %s: %s", key.hex(), name, err)
                if note:
                    self._replica.note_kernel(name, key, self._maps[name].fold(m.lookup(key)))

    def _write(
        self, name: str, m: Map, kvs: Pairs, stats: ApplyStats, *, note: bool
    ) -> None:
        ups = [(k, v) for k, v in kvs if v is not None]
        dels = [k for k, v in kvs if v is None]
        before = stats.asked.get(name, (0, 0))
        stats.asked[name] = (before[0] + len(ups), before[1] + len(dels))
        if ups:
            joined, values = b"".join([k for k, _ in ups]), b"".join([v for _, v in ups])
            self._update(name, m, joined, values, len(ups), stats, note)
        if dels:
            self._delete(name, m, dels, stats, note)

    def _update(
        self, name: str, m: Map, joined: bytes, values: bytes, count: int, stats: ApplyStats,
        note: bool,
    ) -> None:
        """Write ``count`` keys (``joined``) with their ``values`` (joined, in order)."""
        job = _Job(name, m, joined, count, values, note)
        try:
            if self._jobs is not None:
                self._jobs.put(job)
            else:
                m.update_batch(joined, values, count)
            stats.updated += count
            return
        except KernelError as err:
            log.warning("batch update of %s failed (%s); retrying key by key", name, err)
        self._write_keys(name, m, _pairs(joined, values, count), stats, note)

    def _delete(self, name: str, m: Map, keys: list[bytes], stats: ApplyStats, note: bool) -> None:
        if self._jobs is not None:
            self._jobs.put(_Job(name, m, b"".join(keys), len(keys), None, note))
            stats.deleted += len(keys)
            return
        try:
            # keys already absent are skipped by delete_batch: absent is what we want
            m.delete_batch(b"".join(keys), len(keys))
            stats.deleted += len(keys)
        except KernelError as err:
            stats.failed += len(keys)
            log.error("cannot delete %d keys from map %s: %s", len(keys), name, err)
            if note:
                for key in keys:
                    self._replica.note_kernel(name, key, self._maps[name].fold(m.lookup(key)))
