"""The node's replica state on disk, kept as core/replica.py's rules P1 and P2 ask: every
register in bucket snapshots, and every record that changed one since in a log (store.py
holds both in SQLite).

    log        ``log(records)``: called with a batch this node stamped before it is sent, and
               with a peer batch's changes before they are written to the kernel
    snapshots  ``tick()``, each turn of the agent's timers: up to ``_PER_TICK`` buckets of each
               map are visited in turn, and those whose digest sum moved since they were stored
               are stored again. Once every bucket was visited since a cycle began, the log
               rows written before it began are in the snapshots and are dropped.
    flush      at shutdown: every moved bucket, and the whole log dropped, so that the next
               start reads snapshots only

A map is stored whole (its identity row with every bucket, one transaction) before its log
counts: until then a restart treats it as a map without stored state (S1). A write that fails
(a full disk) breaks P1 for its map: the map's stored state is forgotten and stored whole again
once writes succeed, so a restart never trusts a store that missed a change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from bpfsync.agent.config import StateConfig
from bpfsync.agent.metrics import AgentMetrics
from bpfsync.agent.store import MapIdentity, MapShape, StateStore, StoredMap, open_store
from bpfsync.agent.synced import SyncedMap
from bpfsync.agent.watchers import Items
from bpfsync.core.frozen import seal
from bpfsync.core.messages import MapSchema, Record
from bpfsync.core.register import Packed, pack, stamp_of
from bpfsync.core.replica import Fill, Replica, Restart
from bpfsync.core.restart import Content
from bpfsync.core.table import records_layout
from bpfsync.kernel.dump import MapDump
from bpfsync.kernel.info import boot_id

__all__ = ["Persister", "State", "read_state", "resume", "take_map"]

log = logging.getLogger("bpfsync.agent")

# buckets visited per map and tick: 1024 buckets (the default) are visited every 2 s at the
# timers' 4 ticks a second, which bounds the log to ~2 s of changes while few buckets move ...
_PER_TICK_SHARE = 8
_MIN_PER_TICK = 16
# ... and at most this many bytes of moved buckets are stored per map and tick: under writes
# spread over every key every bucket moves, and re-storing them all each cycle would take the
# loop's time for what the log already holds; the cycle stretches instead (a 40 MB map: about
# 40 ticks, 10 s), and the log with it
_TICK_BYTES = 1 << 20


@dataclass(slots=True)
class _MapState:
    identity: MapIdentity
    key_size: int
    saved: list[int] | None  # each stored bucket's digest sum; None: not stored whole yet
    cursor: int = 0
    cycle_from: int = 0  # the last log seq when the current cycle of visits began
    broken: bool = False  # a write failed: forget the stored state before storing it again


class Persister:
    """Keeps ``store`` up to date with ``replica``'s registers."""

    def __init__(
        self, store: StateStore, replica: Replica, metrics: AgentMetrics, last_seq: int = 0
    ) -> None:
        """``last_seq``: the highest log seq the store holds."""
        self.store = store
        self.replica = replica
        self.metrics = metrics
        self._maps: dict[str, _MapState] = {}
        self._last_seq = last_seq
        self._errors_seen: dict[str, int] = {}
        self.set_aside_since_start = False  # the file was set aside since the store was opened

    def track(self, schema: MapSchema, identity: MapIdentity, saved: list[int] | None) -> None:
        """Keep ``schema``'s map stored; ``saved``: the digest sums of its stored buckets when
        the store holds it whole for ``identity`` (a resumed map), else None."""
        # the stored log is in the snapshots once a cycle of visits has stored what it moved
        self._maps[schema.name] = _MapState(identity, schema.key_size, saved,
                                            cycle_from=self._last_seq)
        if saved is None:  # stale rows (another map object, other buckets) go first
            self._forget(schema.name)

    def restart_all(self) -> None:
        """The store was emptied (set aside): every map is to be stored whole again."""
        for state in self._maps.values():
            state.saved = None

    def set_aside(self, why: str) -> Path:
        """The file cannot be trusted (a map's stored state is damaged): set it aside and go on
        with a fresh one (store.py D5), where every map tracked so far is stored whole again;
        where the file went. ``resume`` stores again those tracked later in the same start."""
        where = self.store.set_aside(why)
        self.metrics.state_set_aside.inc()
        self.set_aside_since_start = True
        self.restart_all()
        return where

    def stored(self, sm: SyncedMap) -> StoredMap | None:
        """What the store kept of a map first found while running (its pin was empty at
        start), to be taken in by ``take_map``; None when nothing, or when the file cannot be
        trusted (it is then set aside)."""
        try:
            return self.store.read_map(_shape(sm))
        except ValueError as err:
            where = self.set_aside(f"map {sm.name}: {err}")
            log.warning("the stored state of map %s cannot be used (%s); the state file was"
                        " set aside as %s and the map starts without it", sm.name, err, where)
            return None

    # --- the log -------------------------------------------------------------------------------

    def log(self, records: list[Record] | Packed) -> None:
        """P1: ``records`` are in the store when this returns (the kernel's page cache holds
        them; the syncer flushes them to disk every state.fsync_interval_s)."""
        packed = Packed.of(records)
        if not len(packed):
            return
        first = packed.maps[0]
        if packed.maps.count(first) == len(packed):
            self._append(first, packed.keys, packed.packed)
        else:
            by_map: dict[str, tuple[list[bytes], list[bytes]]] = {}
            for name, key, rec in zip(packed.maps, packed.keys, packed.packed, strict=True):
                keys, recs = by_map.setdefault(name, ([], []))
                keys.append(key)
                recs.append(rec)
            for name, (keys, recs) in by_map.items():
                self._append(name, keys, recs)
        self._count_failures()

    def _append(self, name: str, keys: list[bytes], recs: list[bytes]) -> None:
        state = self._maps.get(name)
        if state is None:
            return
        seq = self.store.append(name, seal(records_layout(keys, recs, state.key_size), 0))
        if seq is None:
            state.broken = True
        else:
            self._last_seq = max(self._last_seq, seq)

    # --- snapshots -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Store the next share of each map's moved buckets (the module docstring)."""
        for name, state in self._maps.items():
            saved = self._stored_whole(name, state)
            if saved is None:
                continue
            sums = self.replica.bucket_sums(name)
            n = len(sums)
            end = min(n, state.cursor + max(_MIN_PER_TICK, n // _PER_TICK_SHARE))
            rows: list[tuple[int, int, bytes]] = []
            size, b = 0, state.cursor
            while b < end and size < _TICK_BYTES:
                if sums[b] != saved[b]:
                    rows += self.replica.snapshot(name, (b,))
                    size += len(rows[-1][2])
                b += 1
            wraps = b == n
            if (rows or wraps) and not self._put(name, state, rows,
                                                 state.cycle_from if wraps else None):  # fmt: skip
                continue
            state.cursor = 0 if wraps else b
            if wraps:
                state.cycle_from = self._last_seq
        self._count_failures()

    def flush(self) -> None:
        """Every moved bucket of every map, and the log dropped (at shutdown)."""
        for name, state in self._maps.items():
            saved = self._stored_whole(name, state)
            if saved is not None:
                sums = self.replica.bucket_sums(name)
                moved = [b for b, s in enumerate(sums) if s != saved[b]]
                self._put(name, state, self.replica.snapshot(name, moved), self._last_seq)
        self._count_failures()

    def _stored_whole(self, name: str, state: _MapState) -> list[int] | None:
        """The stored buckets' digest sums when the map's stored state is whole and sound, so
        that moved buckets are all there is to store; else None, and a map that is not is
        forgotten and stored whole, if the store takes it."""
        if state.broken and not self._forget(name):
            return None
        if state.saved is None:
            self._store_whole(name, state)
            return None
        return state.saved

    def _put(
        self, name: str, state: _MapState, rows: list[tuple[int, int, bytes]],
        drop_log_upto: int | None,
    ) -> bool:
        assert state.saved is not None
        if not self.store.put_buckets(name, rows, horizon=self._horizon(name),
                                      drop_log_upto=drop_log_upto):  # fmt: skip
            state.broken = True
            return False
        for b, digest_sum, _ in rows:
            state.saved[b] = digest_sum
        return True

    def _store_whole(self, name: str, state: _MapState) -> None:
        nbuckets = state.identity.nbuckets
        rows = self.replica.snapshot(name, range(nbuckets))
        cycle_from = self._last_seq  # every change logged so far is in these rows
        horizon = self._horizon(name)
        if self.store.put_buckets(name, rows, identity=state.identity, horizon=horizon,
                                  drop_log_upto=cycle_from):  # fmt: skip
            state.saved = [digest_sum for _, digest_sum, _ in rows]
            state.cursor, state.cycle_from = 0, cycle_from

    def _forget(self, name: str) -> bool:
        """Drop the map's stored state (a write failed, or it is stale); True once done."""
        state = self._maps[name]
        if not self.store.forget(name):
            return False
        state.broken, state.saved = False, None
        return True

    def _horizon(self, name: str) -> bytes | None:
        horizon = self.replica.horizon(name)
        return None if horizon is None else pack(horizon, None)

    def _count_failures(self) -> None:
        for reason, n in self.store.errors.items():
            seen = self._errors_seen.get(reason, 0)
            if n > seen:
                self.metrics.state_failures.labels(reason).inc(n - seen)
                self._errors_seen[reason] = n

    # --- what is kept --------------------------------------------------------------------------

    def status(self) -> Mapping[str, object]:
        return {
            "file": str(self.store.path),
            "stored_whole": sorted(n for n, s in self._maps.items() if s.saved is not None),
            "write_failures": dict(self.store.errors),
        }


@dataclass(slots=True)
class _Loaded:
    """A stored map taken into the replica by ``read_state``, to be compared by ``resume``."""

    stored: StoredMap
    live: Content | None  # an lww map's live rows (restart.live_rows), with their fingerprint
    read_s: float
    load_s: float


@dataclass(slots=True)
class State:
    """What ``read_state`` found: the persister (None without a state dir) and the maps whose
    stored state the replica took in. A stored map not in ``loaded`` was damaged (the file
    was then set aside) or is of no synced map: it is seeded."""

    persister: Persister | None
    loaded: dict[str, _Loaded]
    fsync_interval_s: float = 1.0

    def close(self) -> None:
        """The start failed before ``resume``: close the store."""
        if self.persister is not None:
            self.persister.store.close()


def read_state(
    cfg: StateConfig, node: str, synced: Mapping[str, SyncedMap], replica: Replica,
    metrics: AgentMetrics,
) -> State:
    """The first half of a start: the state file read and each map's stored state taken into
    the replica (P2), with what the comparison needs of it. It touches neither the kernel nor
    the maps' watcher, so the agent runs it beside the watcher's baseline dump (a thread):
    at a million entries each takes a few tenths of a second. ``resume`` does the rest."""
    if cfg.dir is None:
        return State(None, {})
    shapes = [_shape(sm) for sm in synced.values()]
    started = time.perf_counter()
    opened = open_store(cfg.dir, node, shapes)
    read_s = time.perf_counter() - started
    if opened.set_aside is not None:
        metrics.state_set_aside.inc()
    last_seq = max((seq for st in opened.maps.values() for seq, _ in st.log), default=0)
    persister = Persister(opened.store, replica, metrics, last_seq)
    loaded: dict[str, _Loaded] = {}
    for name, sm in synced.items():
        stored = opened.maps.get(name)
        if stored is None:
            continue
        started = time.perf_counter()
        if not _load(sm, replica, persister, stored):
            continue
        live = replica.live_rows(name)
        if live is not None:
            live.fingerprint()
        loaded[name] = _Loaded(stored, live, read_s, time.perf_counter() - started)
    return State(persister, loaded, cfg.fsync_interval_s)


def resume(
    state: State, synced: Mapping[str, SyncedMap], replica: Replica,
    baselines: Mapping[str, Items], restore: Collection[str] = (),
) -> tuple[Persister | None, list[Fill]]:
    """The second half of a start: each map's kernel content (``baselines``) compared with
    the stored state ``read_state`` took in (replica.py S4-S6), or seeded (S1) where nothing
    usable is stored (``take_map``); the store's syncer started. ``restore``: the maps
    configured with restore: on_empty. Returns the persister (None without a state dir) and
    the writes that restore maps (S6)."""
    persister = state.persister
    fills: list[Fill] = []
    for name, kvs in baselines.items():
        loaded = state.loaded.get(name)
        if persister is None or loaded is None:
            fills += take_map(synced[name], kvs, replica, persister).fills
        else:
            fills += _compare(synced[name], kvs, replica, persister, loaded,
                              restore=name in restore).fills  # fmt: skip
    if persister is None:
        return None, fills
    if persister.set_aside_since_start:
        # the maps taken before it was set aside were read from the old file: every map is
        # stored whole again into the fresh one
        persister.restart_all()
    persister.store.start_syncer(state.fsync_interval_s)
    return persister, fills


def take_map(
    sm: SyncedMap, kvs: Items, replica: Replica, persister: Persister | None, *,
    stored: StoredMap | None = None, live: bool = False, restore: bool = False,
) -> Restart:
    """One kernel map object to sync from now on, and its content ``kvs`` (the watcher's
    baseline): the map found at start, or one found at the map's pin while the agent runs.
    Compared by core/replica.py's rules with what the replica holds of the map: the running
    agent's registers (``live``: another map object was synced until now, S5-S6), else what
    the store kept (``stored``: S4-S6), else nothing (S1: seeded). The replica must sync the
    map already (``Replica.add_map`` for one found late). ``persister``: keeps the map stored
    from now on, as the object ``sm`` holds. Returns what the rules decided; its ``fills`` are
    to be written to the map (S6)."""
    name = sm.name
    identity = MapIdentity(sm.map.info.id, boot_id(), replica.digest_buckets)
    if live:
        plan = replica.restart(name, _content(sm, kvs), same_object=False, restore=restore)
        if persister is not None:  # the stored rows are of the old object
            persister.track(sm.schema, identity, None)
        return plan
    if stored is not None and persister is not None:
        started = time.perf_counter()
        if _load(sm, replica, persister, stored):
            loaded = _Loaded(stored, None, 0.0, time.perf_counter() - started)
            return _compare(sm, kvs, replica, persister, loaded, restore=restore)
    seeded = replica.seed(name, ((sm.canon_key(k), sm.fold_value(v)) for k, v in kvs))
    if persister is not None:
        persister.track(sm.schema, identity, None)
    return Restart("seeded", seeded=seeded)


def _load(sm: SyncedMap, replica: Replica, persister: Persister, stored: StoredMap) -> bool:
    """P2: the stored state of ``sm``'s map taken into the replica; False when it is damaged
    (nothing of it was taken, and the file is set aside: the map is to be seeded)."""
    name = sm.name
    horizon = None if stored.horizon is None else stamp_of(stored.horizon)
    try:
        replica.load(name, [(b, blob) for b, _, blob in stored.buckets],
                     [blob for _, blob in stored.log], nbuckets=stored.identity.nbuckets,
                     horizon=horizon, now_ns=time.time_ns())  # fmt: skip
    except ValueError as err:
        where = persister.set_aside(f"map {name}: {err}")
        log.warning("the stored state of map %s is damaged (%s); the state file was set"
                    " aside as %s and the map starts without it", name, err, where)
        return False
    return True


def _compare(
    sm: SyncedMap, kvs: Items, replica: Replica, persister: Persister, loaded: _Loaded, *,
    restore: bool,
) -> Restart:
    """S4-S6 for a map whose stored state the replica took in: its kernel content compared
    with it, and the map tracked by the persister as resumed or to be stored whole."""
    name, stored = sm.name, loaded.stored
    identity = MapIdentity(sm.map.info.id, boot_id(), replica.digest_buckets)
    started = time.perf_counter()
    same = (stored.identity.map_id, stored.identity.boot_id) == (identity.map_id,
                                                                 identity.boot_id)
    plan = replica.restart(name, _content(sm, kvs), same_object=same, restore=restore,
                           live=loaded.live)
    log.info("restarted on stored state", extra={
        "map": name, "case": plan.case, "registers": replica.registers(name),
        "held_back": plan.held, "deleted_while_down": plan.deleted, "seeded": plan.seeded,
        "restored": sum(f.entries for f in plan.fills), "read_s": round(loaded.read_s, 3),
        "load_s": round(loaded.load_s, 3),
        "compare_s": round(time.perf_counter() - started, 3)})  # fmt: skip
    resumed = plan.case == "resumed" and stored.identity.nbuckets == replica.digest_buckets
    saved = [0] * replica.digest_buckets
    for b, digest_sum, _ in stored.buckets if resumed else ():
        saved[b] = digest_sum
    persister.track(sm.schema, identity, saved if resumed else None)
    return plan


def _shape(sm: SyncedMap) -> MapShape:
    return MapShape(sm.name, sm.schema.key_size, sm.schema.value_size, sm.schema.policy)


def _content(sm: SyncedMap, kvs: Items) -> Content:
    """The kernel map's entries as arrays: a dump's own, unless per-CPU values are folded or
    local bits zeroed, or an LPM trie's keys made canonical."""
    if isinstance(kvs, MapDump) and not sm.folds and not sm.lpm:
        return Content(kvs.key_array, kvs.value_array)
    items = [(sm.canon_key(k), sm.fold_value(v)) for k, v in kvs]
    return Content.of(items, sm.schema.key_size, sm.schema.value_size)
