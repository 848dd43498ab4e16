"""The agent: wires the kernel maps, a watcher, the replica and a transport together.

Everything that decides lives in bpfsync.core; this module moves data between the parts:

    watcher thread ──Change──► replica.local_change ──Record──► each peer's session outbox
    transport ──Batch──► session.on_batch ──► replica.receive ──writes──► applier ──► kernel
                                                         └──forward/reply──► other outboxes
    flush timer (~1 ms): session.next_batch ──► transport.send
    digest timer, first contact, gaps: Digest ──► peer answers Pull + records ──► repaired

Readiness: the node reports ready once, for every map, a peer has answered its first digest
(the answer's records precede the Pull on the same stream, so a Pull means "caught up with that
peer"), or, when no peer is reachable at all, after ``catchup_timeout_s``: a lone first node of
a cluster must still come up.

Stale watcher reports: a scan or ring record may be read before an apply and processed after
it; its value then differs from what the replica knows the kernel holds and would look like a
fresh local write. For maps written by the applier within the last ``_STALE_WINDOW`` seconds, a
report that is neither an echo nor consistent is checked against the kernel by one lookup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bpfsync.agent.applier import Applier
from bpfsync.agent.bridge import WatchBridge
from bpfsync.agent.config import AgentConfig
from bpfsync.agent.http import StatusServer
from bpfsync.agent.metrics import AgentMetrics
from bpfsync.agent.synced import SyncedMap, open_synced
from bpfsync.agent.watchers import open_watcher
from bpfsync.core.messages import Ack, Batch, Digest, Hello, Pull, Record
from bpfsync.core.outbox import Outbox, split
from bpfsync.core.replica import Replica
from bpfsync.core.session import PeerSession, map_mismatches
from bpfsync.errors import BpfsyncError, PeerError
from bpfsync.kernel.maps import Map
from bpfsync.model import Change, Overflow, WatchEvent
from bpfsync.transport.base import PeerDown, PeerUp, Received, Transport
from bpfsync.transport.grpc_mesh import GrpcMesh
from bpfsync.transport.options import MeshOptions

log = logging.getLogger("bpfsync.agent")

_STALE_WINDOW = 5.0  # seconds after an apply during which odd watcher reports are re-read
_MAX_BATCH_BYTES = 4 << 20
_SLOTS_LIMIT = 100_000  # keys /slots returns at most
_LOCAL_SLICE = 8192  # watcher events handled between two turns of the event loop
_BUSY_S = 1.0  # a peer's batch within this many seconds defers routine (non-urgent) repair
_REPAIR_BACKLOG = 8 << 20  # bytes queued on a link before repair answers wait for it to drain


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
    """Which maps still wait for a peer's first answer."""

    pending: set[str]
    started: float = field(default_factory=time.monotonic)
    done_at: float | None = None


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
        self.replica = Replica(
            self.node, schemas, int(cfg.sync.tombstone_ttl_s * 1e9),
            digest_buckets=cfg.sync.digest_buckets,
            policies={name: sm.policy for name, sm in self.synced.items()},
        )
        self.applier = Applier(self.synced, self.replica)
        self.hello = Hello(self.node, self.incarnation, tuple(schemas))
        self._transport_factory = transport_factory or self._grpc
        self.transport: Transport | None = None
        self.sessions: dict[str, PeerSession] = {}
        self.catchup = _CatchUp(pending={s.name for s in schemas})
        self.ready = False
        self._stop = asyncio.Event()
        self._flush_scheduled = False
        self._held: list[WatchEvent] = []
        self._unanswered: dict[str, dict[str, Digest]] = {}  # peer -> map -> its latest digest
        self._linked: set[str] = set()  # peers whose link from us is up
        self._peer_links: dict[str, frozenset[str]] = {}  # what each peer's digests said
        self._last_batch = 0.0  # monotonic time of the last numbered batch received
        self._repairs: dict[str, deque[Batch | Pull]] = defaultdict(deque)  # paced answers
        self._status: dict[str, Any] = {"node": self.node, "ready": False}
        self._http: StatusServer | None = None
        self._bridge: WatchBridge | None = None
        self._watcher: object = None

    # --- set-up --------------------------------------------------------------------------------

    def _grpc(self, hello: Hello) -> Transport:
        opts = MeshOptions(max_message_bytes=self.cfg.sync.max_message_bytes)
        return GrpcMesh(hello, self.cfg.listen, self.cfg.peers, peers_dns=self.cfg.peers_dns,
                        options=opts)

    # --- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        watcher, baselines = open_watcher(self.cfg.watch, self.maps)
        self._watcher = watcher
        for name, items in baselines.items():
            sm = self.synced[name]
            self.replica.seed(name, ((k, sm.fold(v) or b"") for k, v in items))
        self._bridge = WatchBridge(watcher, loop)
        self.transport = self._transport_factory(self.hello)
        if self.cfg.http_listen:
            host, _, port = self.cfg.http_listen.rpartition(":")
            self._http = StatusServer(host, int(port), self.metrics.registry, self.status,
                                      self._slots_threadsafe)
            self._http.start()
        self._refresh_status()
        await self.transport.start()
        self._bridge.start()
        log.info("agent started", extra={"node": self.node, "listen": self.cfg.listen,
                                          "maps": sorted(self.maps)})
        tasks = [
            asyncio.create_task(self._transport_loop(), name="transport"),
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
        while True:
            events = await self._bridge.take()
            if not self.ready:
                self._held.extend(events)  # stamped only after catch-up (replica rule S3)
                continue
            # a scan of a busy map can report a million changes: take them in slices and let
            # the transport send and receive in between
            for i in range(0, len(events), _LOCAL_SLICE):
                self._local(events[i : i + _LOCAL_SLICE])
                await asyncio.sleep(0)

    def _local(self, events: list[WatchEvent]) -> None:
        now = _now()
        recent = time.monotonic() - _STALE_WINDOW
        records: list[Record] = []
        counts: Counter[tuple[str, str]] = Counter()  # metrics: one update per burst, not per key
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
                value = sm.fold(sm.map.lookup(ev.key))  # the report may predate an apply
            rec = self.replica.local_change(ev.map, ev.key, value, now)
            if rec is None:
                counts[(ev.map, "")] += 1
                continue
            st.local_changes += 1
            counts[(ev.map, ev.seen.value)] += 1
            records.append(rec)
        for (name, seen), n in counts.items():
            if seen:
                self.metrics.local_changes.labels(name, seen).inc(n)
            else:
                self.metrics.echoes.labels(name).inc(n)
        self._broadcast(records)

    def _broadcast(self, records: list[Record]) -> None:
        if records:
            for s in self.sessions.values():
                s.outbox.add(records)
            self._flush_soon()

    def _fold_races(self, records: tuple[Record, ...]) -> None:
        """In-place counters: before peers' counts are folded into a key, take the increments
        the data plane made since we last looked into our own slot, so the total written next
        includes them instead of overwriting them (synced.py)."""
        now = _now()
        mine: list[Record] = []
        seen: set[tuple[str, bytes]] = set()
        for rec in records:
            sm = self.synced.get(rec.map)
            if sm is None or not sm.in_place_counters or len(rec.key) != sm.map.key_size:
                continue  # not an in-place counter, or receive() refuses it anyway
            if (rec.map, rec.key) in seen:
                continue
            seen.add((rec.map, rec.key))
            current = sm.map.lookup(rec.key)
            if current == self.replica.kernel_view(rec.map, rec.key):
                continue
            self.metrics.raced.labels(rec.map).inc()
            own = self.replica.local_change(rec.map, rec.key, current, now)
            if own is not None:
                mine.append(own)
        self._broadcast(mine)

    # --- peers ---------------------------------------------------------------------------------

    def _session(self, peer: str) -> PeerSession:
        s = self.sessions.get(peer)
        if s is None:
            # coalescing keeps at most one record per key (per origin for per-origin maps), so
            # an outbox that holds every key never overflows into a digest repair
            keys = sum(sm.map.max_entries for sm in self.synced.values())
            outbox = Outbox(max_records=max(1 << 16, 2 * keys),
                            per_origin_maps=self.replica.per_origin_maps)
            s = PeerSession(self.node, peer, outbox=outbox)
            self.sessions[peer] = s
        return s

    def _send(self, peer: str, message: Ack | Batch | Digest | Pull) -> bool:
        assert self.transport is not None
        return self.transport.send(peer, message)

    async def _transport_loop(self) -> None:
        assert self.transport is not None
        async for ev in self.transport.events():
            try:
                if isinstance(ev, Received):
                    self._received(ev.peer, ev.message)
                elif isinstance(ev, PeerUp):
                    self._peer_up(ev.peer, ev.hello)
                elif isinstance(ev, PeerDown):
                    self._peer_down(ev.peer, ev.error)
            except PeerError as err:
                self.metrics.rejected.labels(type(err).__name__).inc()
                log.warning("refused input from peer %s: %s", ev.peer, err)

    def _peer_up(self, peer: str, hello: Hello) -> None:
        s = self._session(peer)
        for name, why in map_mismatches(self.schemas, hello).items():
            log.warning("peer %s does not sync map %s like this node: %s", peer, name, why)
        for batch in s.link_up(hello):
            self._send(peer, batch)
        for digest in self._unanswered.pop(peer, {}).values():
            self._answer_digest(peer, s, digest)
        self.metrics.peer_connected.labels(peer).set(1)
        self._linked.add(peer)
        log.info("peer up", extra={"peer": peer, "incarnation": hello.incarnation})
        if s.take_repair() or not self.ready:
            self._send_digests(peer, urgent=True)  # until ready, any peer may catch us up
        self._flush_soon()

    def _peer_down(self, peer: str, error: BpfsyncError | None) -> None:
        self._session(peer).link_down()
        self._repairs.pop(peer, None)
        self.metrics.peer_connected.labels(peer).set(0)
        self._linked.discard(peer)
        log.info("peer down", extra={"peer": peer, "error": str(error) if error else None})

    def _maybe_repair(self, peer: str, s: PeerSession) -> None:
        if s.take_repair():
            self._send_digests(peer, urgent=True)

    def _send_digests(self, peer: str, *, urgent: bool = False) -> None:
        linked = tuple(sorted(self._linked))
        for name in self.maps:
            d = self.replica.digest(name)
            self._send(peer, Digest(d.map, d.buckets, linked, urgent))

    def _busy(self) -> bool:
        """Changes are flowing: digests differ by what is in flight, so routine repair waits."""
        return time.monotonic() - self._last_batch < _BUSY_S or any(
            s.outbox or s.unacked for s in self.sessions.values()
        )

    def _received(self, peer: str, msg: object) -> None:
        s = self._session(peer)
        if isinstance(msg, Batch):
            if msg.seq > 0:
                self._last_batch = time.monotonic()
            if s.on_batch(msg):
                self._merge(peer, msg.records)
            if msg.seq > 0:
                self._send(peer, s.ack())
        elif isinstance(msg, Ack):
            s.on_ack(msg)
            self._flush_soon()  # the window may have opened
        elif isinstance(msg, Digest):
            self._peer_links[peer] = frozenset(msg.linked)
            if msg.urgent or not self._busy():
                self._answer_digest(peer, s, msg)
        elif isinstance(msg, Pull):
            self._send_repair(peer, s, self.replica.answer_pull(msg, peer))
            self._caught_up(msg.map, peer, len(msg.buckets))
        elif isinstance(msg, Hello):
            self._send(peer, s.on_hello(msg))
        self._maybe_repair(peer, s)

    def _answer_digest(self, peer: str, s: PeerSession, digest: Digest) -> None:
        """Our records where the peer's digest differs, then a Pull, empty or not: the Pull tells
        the peer it has everything we had for it (the catch-up mark, see ``_caught_up``)."""
        assert self.transport is not None
        if self.transport.backlog(peer) is None:
            # our link to the peer is not up yet (it dialed us first): answer when it is
            self._unanswered.setdefault(peer, {})[digest.map] = digest
            return
        pull, records = self.replica.answer_digest(digest, peer)
        self._send_repair(peer, s, records, pull or Pull(digest.map, ()))

    def _send_repair(
        self, peer: str, s: PeerSession, records: list[Record], tail: Pull | None = None
    ) -> None:
        """Queue a repair answer, paced by the link's backlog (a 1M-entry answer is ~70 MB:
        enqueued at once it would overflow the send queue and reset the link)."""
        q = self._repairs[peer]
        for chunk in split(records, self.cfg.sync.max_batch_records, self._batch_bytes()):
            q.append(s.repair_batch(chunk))
        if tail is not None:
            q.append(tail)
        self._drain_repairs(peer)

    def _drain_repairs(self, peer: str) -> None:
        assert self.transport is not None
        q = self._repairs.get(peer)
        while q:
            backlog = self.transport.backlog(peer)
            if backlog is None:  # link lost: the next digest exchange starts over
                q.clear()
                return
            if backlog > _REPAIR_BACKLOG:
                asyncio.get_running_loop().call_later(0.005, self._drain_repairs, peer)
                return
            if not self._send(peer, q[0]):
                q.clear()
                return
            q.popleft()

    def _merge(self, peer: str, records: tuple[Record, ...]) -> None:
        if self.ready:
            self._fold_races(records)
        res = self.replica.receive(records, _now(), peer)
        for rec, err in res.rejected:
            self.map_stats[rec.map].rejected += 1
            self.metrics.rejected.labels(type(err).__name__).inc()
        if res.rejected:
            log.warning("refused %d records from peer %s: %s", len(res.rejected), peer,
                        res.rejected[0][1])
        if res.writes:
            started = time.perf_counter()
            applied = self.applier.apply(res.writes)
            self._note_written(applied.written)
            self.metrics.apply_seconds.observe(time.perf_counter() - started)
            mono = time.monotonic()
            ops: Counter[tuple[str, str]] = Counter()
            for name, _, value in res.writes:
                ops[(name, "delete" if value is None else "update")] += 1
            for (name, op), n in ops.items():
                st = self.map_stats[name]
                st.applied += n
                st.last_apply = mono
                self.metrics.applied.labels(name, op).inc(n)
        # Relay a record to a peer only where that peer says (in its digests) that it has no link
        # to the record's origin: in a healthy full mesh every origin reaches every peer itself,
        # and relaying everything would double each node's receive work.
        relayed = False
        if res.forward:
            for other, s in self.sessions.items():
                links = self._peer_links.get(other)
                if other == peer or links is None:
                    continue
                relay = [r for r in res.forward if r.stamp.node not in links
                         and r.stamp.node != other]
                if relay:
                    s.outbox.add(relay)
                    relayed = True
        if res.reply:
            self._session(peer).outbox.add(res.reply)
        if relayed or res.reply:
            self._flush_soon()

    def _note_written(self, written: list[tuple[str, bytes, bytes | None]]) -> None:
        """Tell a polling watcher what we wrote, so its next scan is compared with it."""
        note = getattr(self._watcher, "note_written", None)
        if note is None or not written:
            return
        per_map: dict[str, list[tuple[bytes, bytes | None]]] = defaultdict(list)
        for name, key, value in written:
            per_map[name].append((key, value))
        for name, kvs in per_map.items():
            note(name, kvs)

    def _batch_bytes(self) -> int:
        return min(_MAX_BATCH_BYTES, self.cfg.sync.max_message_bytes // 2)

    def _flush_soon(self) -> None:
        if self._flush_scheduled:
            return
        self._flush_scheduled = True
        asyncio.get_running_loop().call_later(self.cfg.sync.batch_window_ms / 1000, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        limit, nbytes = self.cfg.sync.max_batch_records, self._batch_bytes()
        for peer, s in self.sessions.items():
            while (batch := s.next_batch(limit, nbytes)) is not None:
                if not self._send(peer, batch):
                    break  # held by the session: resent when the link comes back
            self._maybe_repair(peer, s)

    # --- catch-up and timers -------------------------------------------------------------------

    def _caught_up(self, name: str, peer: str, differing: int) -> None:
        if self.ready or name not in self.catchup.pending:
            return
        self.catchup.pending.discard(name)
        log.info("caught up", extra={"map": name, "peer": peer, "buckets_repaired": differing})
        if not self.catchup.pending:
            self._become_ready("caught up with peers")

    def _become_ready(self, why: str) -> None:
        self.ready = True
        self.catchup.done_at = time.monotonic()
        self.metrics.ready.set(1)
        log.info("ready", extra={"why": why,
                                 "after_s": round(self.catchup.done_at - self.catchup.started, 3)})
        held, self._held = self._held, []
        if held:
            self._local(held)
        self._refresh_status()

    async def _timer_loop(self) -> None:
        sync = self.cfg.sync
        next_digest = time.monotonic() + sync.anti_entropy_interval_s
        while True:
            await asyncio.sleep(0.25)
            mono = time.monotonic()
            if not self.ready and mono - self.catchup.started > sync.catchup_timeout_s:
                peers = self.transport.peers() if self.transport else []
                up = [p.node for p in peers if p.connected]
                if not up:
                    self._become_ready("no peer reachable: starting alone")
                elif mono - self.catchup.started > 3 * sync.catchup_timeout_s:
                    self._become_ready(f"peers {up} did not answer the catch-up digest")
            if mono >= next_digest:
                next_digest = mono + sync.anti_entropy_interval_s
                self.replica.expire(_now())
                for peer in self.sessions:
                    self._send_digests(peer)
            self._refresh_status()

    # --- status --------------------------------------------------------------------------------

    def _refresh_status(self) -> None:
        """Computed on the loop, read by the HTTP thread: never touches state off the loop."""
        peers = []
        if self.transport is not None:
            for p in self.transport.peers():
                s = self.sessions.get(p.node or "")
                peers.append({
                    "address": p.address, "node": p.node, "connected": p.connected,
                    "inbound": p.inbound, "sent": p.messages_sent, "received": p.messages_received,
                    "reconnects": p.reconnects, "last_error": p.last_error,
                    "queued_bytes": p.queued_bytes, "dropped": p.dropped,
                    "unacked_batches": s.unacked if s else 0,
                    "lag_records": len(s.outbox) if s else 0,
                })
        maps = []
        for name in self.maps:
            st = self.map_stats[name]
            registers = self.replica.registers(name)
            self.metrics.entries.labels(name).set(registers)
            maps.append({
                "name": name, "path": self.synced[name].path, "registers": registers,
                "policy": self.synced[name].policy.name,
                "reported": st.reported, "local_changes": st.local_changes,
                "applied": st.applied,
                "rejected": st.rejected,
            })
        self._status = {
            "node": self.node, "incarnation": self.incarnation, "ready": self.ready,
            "pid": os.getpid(), "peers": peers, "maps": maps,
            "replica": dict(self.replica.stats),
            "transport": dict(self.transport.stats) if self.transport else {},
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

        return asyncio.run_coroutine_threadsafe(collect(), self._loop).result(timeout=10)

    def status(self) -> dict[str, Any]:
        return self._status


def run_agent(cfg: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""

    async def main() -> None:
        agent = Agent(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    asyncio.run(main())
    return 0
