"""The per-change pipeline of one agent: what a watcher saw becomes records for every peer, and
what peers sent is merged and written to the kernel. Everything that decides lives in
bpfsync.core (replica.py); this module moves data between the replica, the applier, the
watcher and the peers:

    watcher ──Change──► local ──► replica.local_changes ──Record──► broadcast ──► peering
    peering ──records──► merge ──► replica.receive ──writes──► applier ──► kernel
                                                  └──forward/reply──► peering (relay)

Stale watcher reports: a scan or ring record may be read before an apply and processed after
it; its value then differs from what the replica knows the kernel holds and would look like a
fresh local write. For maps written by the applier within the last ``_STALE_WINDOW`` seconds, a
report that is neither an echo nor consistent is checked against the kernel by one lookup.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from bpfsync.agent.applier import Applier, Pairs
from bpfsync.agent.metrics import AgentMetrics
from bpfsync.agent.peering import Peering
from bpfsync.agent.persist import Persister
from bpfsync.agent.synced import SyncedMap
from bpfsync.agent.watchers import BatchWatcher
from bpfsync.core.messages import Record
from bpfsync.core.register import Packed
from bpfsync.core.replica import ApplyResult, Fill, Replica
from bpfsync.model import Change, Overflow, Seen, WatchEvent

__all__ = ["MapStats", "Pipeline"]

log = logging.getLogger("bpfsync.agent")

_STALE_WINDOW = 5.0  # seconds after an apply during which odd watcher reports are re-read


def _now() -> int:
    return time.time_ns()


# entries of filtered maps looked at again per timer tick (F3): a lookup each, so a map with a
# million young entries is gone through in minutes without taking the loop's time
RECHECK_PER_TICK = 4096


@dataclass(slots=True)
class MapStats:
    reported: int = 0  # changes the watcher reported (echoes of our own writes included)
    local_changes: int = 0
    applied: int = 0
    rejected: int = 0
    last_apply: float = 0.0


class Pipeline:
    """Local changes out, peers' records in, for one agent's maps. ``ready``, ``peering`` and
    ``watcher`` are set by the agent as they come to be."""

    def __init__(
        self, synced: Mapping[str, SyncedMap], replica: Replica, applier: Applier,
        metrics: AgentMetrics,
    ) -> None:
        self.synced = synced
        self.replica = replica
        self.applier = applier
        self.metrics = metrics
        self.map_stats: dict[str, MapStats] = defaultdict(MapStats)
        # per map, oldest first: keys whose entry did not pass an age condition of the
        # filter yet (F3); at most the map's entries
        self.waiting: dict[str, dict[bytes, None]] = {}
        self.ready = False
        self.peering: Peering | None = None
        self.watcher: BatchWatcher | None = None
        self.persister: Persister | None = None

    @property
    def in_place(self) -> bool:
        """Whether a synced map has in-place counters (merge's key-by-key path); maps may
        join while the agent runs, so asked each time."""
        return any(sm.in_place_counters for sm in self.synced.values())

    def local(self, events: list[WatchEvent]) -> None:
        """What the watcher saw: stamp what changed and send it to every peer."""
        now = _now()
        recent = time.monotonic() - _STALE_WINDOW
        reread: dict[str, Pairs] = defaultdict(list)  # per map: (key, kernel value)
        # per map, in the order reported: the keys, the values to take in, how each was seen
        batches: dict[str, tuple[list[bytes], list[bytes | None], list[Seen]]] = {}
        for ev in events:
            if isinstance(ev, Overflow):
                self.metrics.overflows.inc()
                continue
            assert isinstance(ev, Change)
            sm = self.synced[ev.map]
            st = self.map_stats[ev.map]
            st.reported += 1
            if sm.lpm:
                ev = ev._replace(key=sm.canon_key(ev.key))
            raw = ev.value
            value = sm.fold(raw)
            if st.last_apply > recent and value != self.replica.kernel_view(ev.map, ev.key):
                raw = sm.map.lookup(ev.key)  # the report may predate an apply
                value = sm.fold(raw)
                if raw != ev.value:  # we now believe another value than the watcher reported
                    reread[ev.map].append((ev.key, raw))
            if raw is not None and sm.filter is not None and not self._passes(sm, ev.key, raw):
                continue
            batch = batches.get(ev.map)
            if batch is None:
                batch = batches[ev.map] = ([], [], [])
            batch[0].append(ev.key)
            batch[1].append(value)
            batch[2].append(ev.seen)
        records = Packed.empty()
        for name, (keys, values, seen) in batches.items():
            packed, changed = self.replica.local_changes(name, keys, values, now)
            records.extend(packed)
            self.map_stats[name].local_changes += len(changed)
            # metrics: one update per burst, not per key
            for how, n in Counter(seen[i].value for i in changed).items():
                self.metrics.local_changes.labels(name, how).inc(n)
            if len(keys) > len(changed):
                self.metrics.echoes.labels(name).inc(len(keys) - len(changed))
        # the watcher compares its next scan with what we believe: without this, a key whose
        # report we replaced by a re-read value, then deleted by the data plane back to the
        # reported state, would look unchanged to it and never be reported
        self.note_written(reread)
        self.broadcast(records)

    def _passes(self, sm: SyncedMap, key: bytes, raw: bytes) -> bool:
        """replica.py F1: an entry that does not pass its map's filter is no change; one whose
        filter has an age condition waits for ``recheck`` to see it pass as time goes by."""
        if sm.passes(key, raw):
            self.waiting.get(sm.name, {}).pop(key, None)
            return True
        assert sm.filter is not None
        if sm.filter.has_age:
            self.waiting.setdefault(sm.name, {})[key] = None
        self.metrics.filtered.labels(sm.name).inc()
        return False

    def recheck(self, budget: int = RECHECK_PER_TICK) -> None:
        """Entries held back by an age condition that they may meet by now, ``budget`` of them
        a call, oldest first: those that pass are local changes (F3), deleted ones stop
        waiting, the others wait at the back."""
        events: list[WatchEvent] = []
        for name, keys in self.waiting.items():
            sm = self.synced[name]
            for key in list(itertools.islice(keys, budget)):
                budget -= 1
                del keys[key]
                raw = sm.map.lookup(key)
                if raw is None:
                    continue
                if sm.passes(key, raw):
                    events.append(Change(name, key, raw, Seen.POLL))
                else:
                    keys[key] = None
        if events:
            self.local(events)

    def broadcast(self, records: list[Record] | Packed) -> None:
        """This node's own records, to every peer: stored first (replica.py P1)."""
        if self.persister is not None:
            self.persister.log(records)
        if self.peering is not None:
            self.peering.broadcast(records)

    def take_held(self) -> None:
        """After the first catch-up: stamp what the data plane changed while the agent was
        down (replica.py H1), with the maps' values now, and send it."""
        held = self.replica.held_keys()
        if not held:
            return
        current = {name: {key: self.synced[name].fold(self.synced[name].map.lookup(key))
                          for key in keys} for name, keys in held.items()}  # fmt: skip
        records, writes = self.replica.take_held(_now(), current)
        for name, n in Counter(records.maps).items():
            self.map_stats[name].local_changes += n
            self.metrics.local_changes.labels(name, Seen.RESTART.value).inc(n)
        log.info("took the changes made while the agent was down", extra={
            "keys": {name: len(keys) for name, keys in held.items()}, "records": len(records)})
        self.broadcast(records)
        if writes:
            applied = self.applier.apply(writes, [])
            self.note_written(applied.written)

    def merge(self, peer: str, records: Sequence[Record], repair: bool = False) -> ApplyResult:
        """Peer records: merge, write what changed to the kernel, return what to pass on
        (``repair``: records of a digest exchange, which answers the sender with ours already).

        In-place counters go key by key: re-read the key (``_fold_race``), merge the peers'
        records of that key and write the merge's difference on top of the counts the key
        holds now. The data plane's increments can then only be lost between the applier's
        read of the key and its write (synced.py; `exact` has no window).
        """
        res = ApplyResult()
        if not (self.ready and self.in_place):
            self._receive(peer, records, res, repair)
            return res
        rest: list[Record] = []
        per_key: dict[tuple[str, bytes], list[Record]] = defaultdict(list)
        for rec in records:
            sm = self.synced.get(rec.map)
            if self.ready and sm is not None and sm.in_place_counters and (
                len(rec.key) == sm.map.key_size
            ):
                per_key[(rec.map, rec.key)].append(rec)
            else:
                rest.append(rec)
        mine: list[Record] = []
        for (name, key), recs in per_key.items():
            own, seen = self._fold_race(self.synced[name], key)
            if own is not None:
                mine.append(own)
            self._receive(peer, tuple(recs), res, repair, {(name, key): seen})
        self.broadcast(mine)
        if rest:
            self._receive(peer, tuple(rest), res, repair)
        if res.rejected:
            log.warning("refused %d records from peer %s: %s", len(res.rejected), peer,
                        res.rejected[0][1])
        return res

    def _fold_race(self, sm: SyncedMap, key: bytes) -> tuple[Record | None, bytes | None]:
        """What the data plane changed in the key since we last looked, before the peers'
        records of it merge: as our own record (None if nothing), and the folded value the
        merge's write starts from (``SyncedMap.kernel_value``'s ``believed``).

        Counts alone are left in the kernel: the write adds the merge's difference on top of
        them, and the next scan takes them into our slot. Stamped now, they would carry the
        lww bits this node holds with a stamp above the peer record being merged, undoing a
        peer's newer flags (policy.py: a per-origin record's lww bits are its origin's)."""
        raw = sm.map.lookup(key)
        current = sm.fold(raw)
        view = self.replica.kernel_view(sm.name, key)
        if current == view or (
            raw is not None and sm.filter is not None and not self._passes(sm, key, raw)
        ):
            return None, current
        self.metrics.raced.labels(sm.name).inc()
        if current is not None and view is not None and sm.counts_only(current, view):
            return None, view
        return self.replica.local_change(sm.name, key, current, _now()), current

    def _receive(
        self, peer: str, records: Sequence[Record], into: ApplyResult, repair: bool,
        believed: Mapping[tuple[str, bytes], bytes | None] | None = None,
    ) -> None:
        res = self.replica.receive(records, _now(), peer, replies=not repair)
        if self.persister is not None and len(res.forward):  # stored before written (P1)
            self.persister.log(res.forward)
        for rec, err in res.rejected:
            self.map_stats[rec.map].rejected += 1
            self.metrics.rejected.labels(type(err).__name__).inc()
        if res.writes or res.fills:
            started = time.perf_counter()
            applied = self.applier.apply(res.writes, res.fills, believed)
            self.note_written(applied.written, applied.filled)
            self.metrics.apply_seconds.observe(time.perf_counter() - started)
            mono = time.monotonic()
            for name, (updates, deletes) in applied.asked.items():
                st = self.map_stats[name]
                st.applied += updates + deletes
                st.last_apply = mono
                for op, n in (("update", updates), ("delete", deletes)):
                    if n:
                        self.metrics.applied.labels(name, op).inc(n)
        into.writes += res.writes
        into.fills += res.fills
        into.forward.extend(res.forward)
        into.reply += res.reply
        into.rejected += res.rejected

    def note_written(self, written: Mapping[str, Pairs], filled: Iterable[Fill] = ()) -> None:
        """Tell a polling watcher what we wrote (per map), so its next scan is compared with it."""
        if self.watcher is None:
            return
        for name, kvs in written.items():
            if kvs:
                self.watcher.note_written(name, kvs)
        for fill in filled:
            self.watcher.note_filled(fill.map, fill.keys, fill.values, fill.entries)
