"""The agent: wires the kernel maps, a watcher, the replica and the peers together.

Everything that decides lives in bpfsync.core; this module and peering.py move data between the
parts:

    watcher thread ──Change──► replica.local_change ──Record──► peering.broadcast
    peering (transport) ──records──► replica.receive ──writes──► applier ──► kernel
                                                       └──forward/reply──► peering (relay)

Readiness: the node reports ready once, for every map, every peer it is linked with (and at
least one) has answered its first digest (the answer's records precede its Answered on the
same stream, so Answered means "caught up with that peer"), or, when no peer is reachable at
all, after ``catchup_timeout_s``: a lone first node of a cluster must still come up. Local
changes seen before that wait in the bridge (one per key, bridge.py), then are stamped; the
watcher's periodic scans wait for it too.

Stale watcher reports: a scan or ring record may be read before an apply and processed after
it; its value then differs from what the replica knows the kernel holds and would look like a
fresh local write. For maps written by the applier within the last ``_STALE_WINDOW`` seconds, a
report that is neither an echo nor consistent is checked against the kernel by one lookup.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bpfsync.agent.applier import Applier, Pairs
from bpfsync.agent.bridge import WatchBridge
from bpfsync.agent.config import AgentConfig, TlsConfig
from bpfsync.agent.http import StatusServer
from bpfsync.agent.metrics import AgentMetrics
from bpfsync.agent.peering import Peering
from bpfsync.agent.runtime import tune_process
from bpfsync.agent.synced import SyncedMap, open_synced
from bpfsync.agent.watchers import BatchWatcher, open_watcher
from bpfsync.core.membership import Membership
from bpfsync.core.messages import Hello, Record
from bpfsync.core.register import Packed
from bpfsync.core.replica import ApplyResult, Fill, Replica
from bpfsync.kernel.maps import Map
from bpfsync.model import Change, Overflow, Seen, WatchEvent
from bpfsync.transport.base import Transport
from bpfsync.transport.eventloop import GrpcEventLoop
from bpfsync.transport.grpc_mesh import GrpcMesh
from bpfsync.transport.options import MeshOptions
from bpfsync.transport.tls import TlsFiles, load_tls
from bpfsync.watch.auto import AutoWatcher

log = logging.getLogger("bpfsync.agent")

_STALE_WINDOW = 5.0  # seconds after an apply during which odd watcher reports are re-read
_SLOTS_LIMIT = 100_000  # keys /slots returns at most
_LOCAL_SLICE = 8192  # watcher events handled between two turns of the event loop
# Local changes are stamped while a linked peer has fewer than this many batches queued, or
# after waiting this long. A change stamped while the outboxes are full would only replace a
# queued record of its key, stamped and queued for nothing; left in the bridge, changes of
# one key coalesce there, where it costs least, and overload is paid once per key.
_AHEAD_BATCHES = 2
_AHEAD_WAIT_S = 0.05
_TICK = 0.25  # seconds between two turns of the timers
# quiet buckets freeze (core/lww_table.py, sync.freeze_after_s) this many a tick: few enough that a
# tick's freezing stays a few milliseconds of the loop, also when buckets keep thawing, and
# enough that a map of 1024 buckets at rest settles within a minute
_SETTLE_BUCKETS = 16


def _now() -> int:
    return time.time_ns()


@dataclass(slots=True)
class MapStats:
    reported: int = 0  # changes the watcher reported (echoes of our own writes included)
    local_changes: int = 0
    applied: int = 0
    rejected: int = 0
    last_apply: float = 0.0


@dataclass(slots=True)
class _CatchUp:
    """Which peers have answered our first digest of each map."""

    maps: list[str]
    answered: dict[str, set[str]] = field(default_factory=dict)  # map -> peers
    started: float = field(default_factory=time.monotonic)
    done_at: float | None = None

    def done(self, linked: list[str]) -> bool:
        """Every map answered by at least one peer and by every peer linked right now."""
        return all(
            (got := self.answered.get(m)) and got.issuperset(linked) for m in self.maps
        )


class Agent:
    """One node of the cluster. ``run()`` until ``stop()``."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        metrics: AgentMetrics | None = None,
        transport_factory: Callable[[Hello], Transport] | None = None,
    ) -> None:
        self.cfg = cfg
        self.node = cfg.node_id
        self.metrics = metrics or AgentMetrics()
        self.incarnation = _now()
        self.synced: dict[str, SyncedMap] = {}
        self.map_stats: dict[str, MapStats] = defaultdict(MapStats)
        if cfg.tls is not None:  # a wrong file is a start-up error, before any map is opened
            load_tls(self._tls_files(cfg.tls), self.node)
        try:
            for mc in cfg.maps:
                sm = open_synced(mc)
                self.synced[sm.name] = sm
        except BaseException:
            for sm in self.synced.values():
                sm.close()
            raise
        self.maps: dict[str, Map] = {name: sm.map for name, sm in self.synced.items()}
        schemas = [sm.schema for sm in self.synced.values()]
        self.schemas = schemas
        # who may connect and whose records count (core/membership.py)
        self.members = Membership(self.node, cfg.members, ca=cfg.tls is not None)
        self.replica = Replica(
            self.node, schemas, int(cfg.sync.tombstone_ttl_s * 1e9),
            digest_buckets=cfg.sync.digest_buckets,
            policies={name: sm.policy for name, sm in self.synced.items()},
            max_drift_ns=int(cfg.sync.max_clock_drift_ms * 1e6),
            members=self.members,
        )
        self.applier = Applier(self.synced, self.replica)
        self._in_place = any(sm.in_place_counters for sm in self.synced.values())
        self.hello = Hello(self.node, self.incarnation, tuple(schemas))
        self._transport_factory = transport_factory or self._grpc
        self.transport: Transport | None = None
        self.peering: Peering | None = None
        self.catchup = _CatchUp(maps=[s.name for s in schemas])
        self.ready = False
        self._stop = asyncio.Event()
        self._became_ready = asyncio.Event()
        self._coalesced_seen = 0
        self._status: dict[str, Any] = {"node": self.node, "ready": False}
        self._http: StatusServer | None = None
        self._bridge: WatchBridge | None = None
        self._watcher: BatchWatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- set-up --------------------------------------------------------------------------------

    def _grpc(self, hello: Hello) -> Transport:
        tls = self.cfg.tls
        sync = self.cfg.sync
        opts = MeshOptions(
            max_message_bytes=sync.max_message_bytes,
            tls=None if tls is None else self._tls_files(tls),
            penalty_base=sync.penalty_base_s, penalty_cap=sync.penalty_cap_s,
        )
        return GrpcMesh(hello, self.cfg.listen, self.cfg.peers, peers_dns=self.cfg.peers_dns,
                        options=opts, members=self.members)

    @staticmethod
    def _tls_files(tls: TlsConfig) -> TlsFiles:
        return TlsFiles(tls.cert, tls.key, tls.ca, tls.server_name)

    def reload_tls(self) -> None:
        """SIGHUP: re-read the TLS files now (the mesh also does every few seconds)."""
        if isinstance(self.transport, GrpcMesh) and self._loop is not None:
            self._loop.create_task(self.transport.reload_tls(), name="tls-reload")

    # --- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        in_place = [name for name, sm in self.synced.items() if sm.policy.per_origin]
        # no scans while catching up: the agent fills its maps and takes no local change yet
        watcher, baselines = open_watcher(self.cfg.watch, self.maps, in_place, hold_scans=True)
        self._watcher = watcher
        for name, items in baselines.items():
            sm = self.synced[name]
            self.replica.seed(name, ((k, sm.fold_value(v)) for k, v in items))
        gc.freeze()  # the seeded registers live long: keep the collector from walking them
        self._bridge = WatchBridge(watcher, loop)
        self.transport = self._transport_factory(self.hello)
        keys = sum(sm.map.max_entries for sm in self.synced.values())
        self.peering = Peering(
            self.node, self.replica, self.schemas, self.transport, self.cfg.sync, self.metrics,
            # coalescing keeps at most one record per key (per origin for per-origin maps), so
            # an outbox that holds every key never overflows into a digest repair
            outbox_records=max(1 << 16, 2 * keys),
            on_records=self._merge,
            on_caught_up=self._caught_up,
            catching_up=lambda: not self.ready,
        )
        if self.cfg.http_listen:
            host, _, port = self.cfg.http_listen.rpartition(":")
            self._http = StatusServer(host, int(port), self.metrics.registry, self.status,
                                      self._slots_threadsafe)
            self._http.start()
        self.metrics.watch_transport(lambda: self.transport.stats if self.transport else {})
        self._refresh_status()
        # until ready, kernel writes go to a thread of their own (applier.py), so a catch-up
        # merges its next batch while the kernel takes the last
        self.applier.start_background()
        await self.transport.start()
        if self.cfg.tls is None:
            log.warning(
                "TLS is off: peers are not authenticated, and whoever reaches %s can claim a"
                " member's id (see docs/security.md)", self.cfg.listen,
                extra={"insecure": self.cfg.insecure, "members": self.members.mode},
            )
        self._bridge.start()
        log.info("agent started", extra={"node": self.node, "listen": self.cfg.listen,
                                          "maps": sorted(self.maps)})
        tasks = [
            asyncio.create_task(self.peering.run(), name="peers"),
            asyncio.create_task(self._watch_loop(), name="watch"),
            asyncio.create_task(self._timer_loop(), name="timers"),
        ]
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failure = next((t.exception() for t in tasks if t.done() and not t.cancelled()), None)
        for t in (stopper, *tasks):
            t.cancel()
        await asyncio.gather(stopper, *tasks, return_exceptions=True)
        await self._shutdown()
        if failure is not None:
            raise failure

    async def _shutdown(self) -> None:
        self.applier.finish_background()
        if self._bridge is not None:
            await asyncio.to_thread(self._bridge.close)
        if self.transport is not None:
            await self.transport.close()
        if self._http is not None:
            self._http.close()
        for sm in self.synced.values():
            sm.close()
        log.info("agent stopped", extra={"node": self.node})

    # --- local changes ---------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        assert self._bridge is not None
        # local changes are stamped only after catch-up (replica rule S3); until then they wait
        # in the bridge, one per key
        await self._became_ready.wait()
        ahead = _AHEAD_BATCHES * self.cfg.sync.max_batch_records
        while True:
            if self.peering is not None:
                await self.peering.wait_for_room(ahead, _AHEAD_WAIT_S)
            # in slices: a scan of a busy map can report a million changes, and the transport
            # must send and receive in between (meanwhile newer changes of waiting keys coalesce)
            self._local(await self._bridge.take(_LOCAL_SLICE))
            total = self._bridge.coalesced
            if total > self._coalesced_seen:
                self.metrics.coalesced.inc(total - self._coalesced_seen)
                self._coalesced_seen = total
            await asyncio.sleep(0)

    def _local(self, events: list[WatchEvent]) -> None:
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
            value = sm.fold(ev.value)
            if st.last_apply > recent and value != self.replica.kernel_view(ev.map, ev.key):
                raw = sm.map.lookup(ev.key)  # the report may predate an apply
                value = sm.fold(raw)
                if raw != ev.value:  # we now believe another value than the watcher reported
                    reread[ev.map].append((ev.key, raw))
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
        self._note_written(reread)
        self._broadcast(records)

    def _broadcast(self, records: list[Record] | Packed) -> None:
        if self.peering is not None:
            self.peering.broadcast(records)

    def _merge(self, peer: str, records: Sequence[Record], repair: bool = False) -> ApplyResult:
        """Peer records: merge, write what changed to the kernel, return what to pass on
        (``repair``: records of a digest exchange, which answers the sender with ours already).

        In-place counters go key by key: re-read the key, take the increments the data plane
        made since we last looked into our own slot, merge the peers' records of that key and
        write the new total at once. The data plane's increments can then only be lost in the
        few microseconds between that read and that write (synced.py; `exact` has no window).
        """
        res = ApplyResult()
        if not (self.ready and self._in_place):
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
            own = self._fold_race(self.synced[name], key)
            if own is not None:
                mine.append(own)
            self._receive(peer, tuple(recs), res, repair)
        self._broadcast(mine)
        if rest:
            self._receive(peer, tuple(rest), res, repair)
        if res.rejected:
            log.warning("refused %d records from peer %s: %s", len(res.rejected), peer,
                        res.rejected[0][1])
        return res

    def _fold_race(self, sm: SyncedMap, key: bytes) -> Record | None:
        current = sm.map.lookup(key)
        if current == self.replica.kernel_view(sm.name, key):
            return None
        self.metrics.raced.labels(sm.name).inc()
        return self.replica.local_change(sm.name, key, current, _now())

    def _receive(
        self, peer: str, records: Sequence[Record], into: ApplyResult, repair: bool
    ) -> None:
        res = self.replica.receive(records, _now(), peer, replies=not repair)
        for rec, err in res.rejected:
            self.map_stats[rec.map].rejected += 1
            self.metrics.rejected.labels(type(err).__name__).inc()
        if res.writes or res.fills:
            started = time.perf_counter()
            applied = self.applier.apply(res.writes, res.fills)
            self._note_written(applied.written, applied.filled)
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

    def _note_written(self, written: Mapping[str, Pairs], filled: Iterable[Fill] = ()) -> None:
        """Tell a polling watcher what we wrote (per map), so its next scan is compared with it."""
        if self._watcher is None:
            return
        for name, kvs in written.items():
            if kvs:
                self._watcher.note_written(name, kvs)
        for fill in filled:
            self._watcher.note_filled(fill.map, fill.keys, fill.values, fill.entries)

    # --- catch-up and timers -------------------------------------------------------------------

    def _caught_up(self, name: str, peer: str, differing: int) -> None:
        if self.ready:
            return
        self.catchup.answered.setdefault(name, set()).add(peer)
        log.info("caught up", extra={"map": name, "peer": peer, "buckets_repaired": differing})
        self._check_caught_up()

    def _check_caught_up(self) -> None:
        linked = self.peering.connected() if self.peering is not None else []
        if not self.ready and self.catchup.done(linked):
            self._become_ready(f"caught up with {', '.join(linked) or 'peers'}")

    def _become_ready(self, why: str) -> None:
        self._note_written(self.applier.finish_background().written)  # the maps are current
        self.ready = True
        self.catchup.done_at = time.monotonic()
        self.metrics.ready.set(1)
        log.info("ready", extra={"why": why,
                                 "after_s": round(self.catchup.done_at - self.catchup.started, 3)})
        self._became_ready.set()  # the watch loop starts stamping what waited in the bridge
        if isinstance(self._watcher, AutoWatcher):
            self._watcher.release_scans()
        self._refresh_status()

    async def _timer_loop(self) -> None:
        sync = self.cfg.sync
        next_digest = time.monotonic() + sync.anti_entropy_interval_s
        while True:
            await asyncio.sleep(_TICK)
            mono = time.monotonic()
            self._check_caught_up()  # a peer that went away no longer holds us back
            if not self.ready and mono - self.catchup.started > sync.catchup_timeout_s:
                assert self.peering is not None
                up = self.peering.connected()
                if not up:
                    self._become_ready("no peer reachable: starting alone")
                elif mono - max(self.catchup.started, self.peering.last_batch_at) > (
                    3 * sync.catchup_timeout_s
                ):  # linked, but silent: not even a repair batch for that long
                    self._become_ready(f"peers {up} did not answer the catch-up digest")
            # housekeeping waits while peers wait for us: freezing buckets in the tail of an
            # overload would take time from sending what they wait for
            if self.peering is None or not self.peering.behind():
                self.replica.settle(_SETTLE_BUCKETS, quiet=math.ceil(sync.freeze_after_s / _TICK))
            if mono >= next_digest:
                next_digest = mono + sync.anti_entropy_interval_s
                self.replica.expire(_now())
                if self.peering is not None:
                    self.peering.digest_round()
            self._refresh_status()

    # --- status --------------------------------------------------------------------------------

    def _refresh_status(self) -> None:
        """Computed on the loop, read by the HTTP thread: never touches state off the loop."""
        peers = self.peering.peers() if self.peering is not None else []
        maps = []
        for name in self.maps:
            st = self.map_stats[name]
            registers = self.replica.registers(name)
            self.metrics.entries.labels(name).set(registers)
            backoff = self._watcher.backoff(name) if self._watcher is not None else 1
            self.metrics.scan_backoff.labels(name).set(backoff)
            maps.append({
                "name": name, "path": self.synced[name].path, "registers": registers,
                "buckets_at_rest": self.replica.buckets_at_rest(name),
                "policy": self.synced[name].policy.name,
                "reported": st.reported, "local_changes": st.local_changes,
                "applied": st.applied,
                "rejected": st.rejected,
                "scan_backoff": backoff,
            })
        self._status = {
            "node": self.node, "incarnation": self.incarnation, "ready": self.ready,
            "pid": os.getpid(), "peers": peers, "maps": maps, "security": self._security(),
            "watch": self._watcher.mode if self._watcher is not None else "starting",
            "replica": dict(self.replica.stats),
            "transport": dict(self.transport.stats) if self.transport else {},
        }

    def _security(self) -> dict[str, Any]:
        tls = self.transport.tls if isinstance(self.transport, GrpcMesh) else None
        if tls is not None:
            self.metrics.tls_expiry.set(tls.not_after)
        return {
            "tls": None if tls is None else {
                "fingerprint": tls.fingerprint, "names": list(tls.names),
                "not_after": tls.not_after,
            },
            "membership": self.members.mode, "members": self.members.known(),
        }

    def _slots_threadsafe(self, name: str) -> dict[str, Any]:
        """Every node's register per key of map ``name``: computed on the loop (the replica is
        the loop's), asked for from the HTTP thread."""
        if name not in self.synced:
            raise KeyError(name)

        async def collect() -> dict[str, Any]:
            keys: dict[str, dict[str, Any]] = {}
            for rec in self.replica.records(name):
                if len(keys) >= _SLOTS_LIMIT and rec.key.hex() not in keys:
                    continue
                keys.setdefault(rec.key.hex(), {})[rec.stamp.node] = {
                    "value": None if rec.value is None else rec.value.hex(),
                    "stamp": [rec.stamp.wall, rec.stamp.logical],
                }
            return {"map": name, "policy": self.synced[name].policy.name, "keys": keys}

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(collect(), self._loop).result(timeout=10)

    def status(self) -> dict[str, Any]:
        return self._status


def run_agent(cfg: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    tune_process()

    async def main() -> None:
        agent = Agent(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        loop.add_signal_handler(signal.SIGHUP, agent.reload_tls)
        await agent.run()

    # grpcio's wake-up socket drained (transport/eventloop.py): a busy loop stalled every stream
    with asyncio.Runner(loop_factory=GrpcEventLoop) as runner:
        runner.run(main())
    return 0
