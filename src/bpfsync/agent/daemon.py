"""The agent: wires the kernel maps, a watcher, the replica and the peers together, and runs
them until stopped. Everything that decides lives in bpfsync.core; the parts here move data:

    synced.py     the kernel maps, with their policies and counter layouts
    watchers.py   the watcher, and bridge.py: its thread's changes, one per key, to the loop
    pipeline.py   local changes out, peers' records in (merge, kernel writes by applier.py)
    peering.py    the peers: sessions, digests, repair answers, relay, flushing
    readiness.py  when the node reports ready (its first catch-up; each map joining later)
    status.py     /status and /slots, http.py serves them, metrics.py the metrics

This module holds the lifecycle (start, the loops, stop) and the timers, and follows the pins:
a data plane that restarts recreates its map at the same pin path, a new map object, usually
empty. Each timer tick compares the id of the map pinned at each configured path with the
synced object's (two syscalls a pin). A new object is opened and the watcher moved to it
(watchers.py, bridge.py); its content is then taken in by the rule a restart uses for a new
map object (persist.take_map; core/replica.py S5, S6), never as a cluster-wide delete, and
the map catches up from its peers on its own (readiness.py Y5). A pin that is empty, at start
(the data plane is not up yet) or later (it unpinned its map), is reported, holds no readiness
(Y6), and the map pinned there next is taken in the same way. Only pin paths are followed: a
``name:`` map is opened at start, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bpfsync.agent import status
from bpfsync.agent.applier import Applier
from bpfsync.agent.bridge import Reopened, WatchBridge
from bpfsync.agent.config import AgentConfig, MapConfig, TlsConfig
from bpfsync.agent.http import StatusServer
from bpfsync.agent.metrics import AgentMetrics
from bpfsync.agent.peering import Peering
from bpfsync.agent.persist import Persister, read_state, resume, take_map
from bpfsync.agent.pipeline import Pipeline
from bpfsync.agent.readiness import CatchUp
from bpfsync.agent.runtime import tune_process
from bpfsync.agent.status import Presence
from bpfsync.agent.synced import SyncedMap, open_synced
from bpfsync.agent.watchers import BatchWatcher, open_watcher, reopen_watcher
from bpfsync.core.membership import Membership
from bpfsync.core.messages import Hello
from bpfsync.core.replica import Replica
from bpfsync.errors import BpfsyncError, NotFoundError
from bpfsync.kernel.maps import Map, pinned_map_id
from bpfsync.model import WatchEvent
from bpfsync.transport.base import Publisher, Transport
from bpfsync.transport.eventloop import GrpcEventLoop
from bpfsync.transport.grpc_mesh import GrpcMesh
from bpfsync.transport.options import MeshOptions
from bpfsync.transport.tls import TlsFiles, load_tls
from bpfsync.watch.auto import AutoWatcher

log = logging.getLogger("bpfsync.agent")

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
        self._configs: dict[str, MapConfig] = {mc.sync_name: mc for mc in cfg.maps}
        # what each configured map's pin holds (status.py; readiness.py Y6)
        self.presence: dict[str, Presence] = {}
        if cfg.tls is not None:  # a wrong file is a start-up error, before any map is opened
            load_tls(self._tls_files(cfg.tls), self.node)
        try:
            for mc in cfg.maps:
                try:
                    sm = open_synced(mc)
                except NotFoundError:
                    if not mc.path.startswith("/") or pinned_map_id(mc.path) is not None:
                        raise  # a name: map, or the map is there and its companion is not
                    self.presence[mc.sync_name] = Presence(mc.path, present=False)
                    continue
                self.synced[sm.name] = sm
                self.presence[sm.name] = Presence(mc.path)
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
        self.pipeline = Pipeline(self.synced, self.replica, self.applier, self.metrics)
        self.map_stats = self.pipeline.map_stats
        self.hello = Hello(self.node, self.incarnation, tuple(schemas))
        self._transport_factory = transport_factory or (
            self._nats if cfg.transport == "nats" else self._grpc)
        self.transport: Transport | None = None
        self.peering: Peering | None = None
        self.persister: Persister | None = None
        self.catchup = CatchUp(maps=[s.name for s in schemas])
        self.ready = False
        self._stop = asyncio.Event()
        self._became_ready = asyncio.Event()
        self._coalesced_seen = 0
        self._status: dict[str, Any] = {"node": self.node, "ready": False}
        self._http: StatusServer | None = None
        self._bridge: WatchBridge | None = None
        self._watcher: BatchWatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._moving: dict[str, SyncedMap] = {}  # new map objects the watcher moves to
        self._refused: dict[str, int] = {}  # per map, the id of the object last refused

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

    def _nats(self, hello: Hello) -> Transport:
        # nats-py is an optional dependency: imported only by the nodes that use it
        from bpfsync.transport.natsbus import NatsBus, NatsOptions

        nc = self.cfg.nats
        assert nc is not None  # config.py: transport nats needs it
        opts = NatsOptions(
            servers=nc.servers, cluster=nc.cluster, user=nc.user, password=nc.password,
            token=nc.token, creds=nc.creds, nkey_seed=nc.nkey_seed,
            tls_ca=nc.tls.ca if nc.tls else None, tls_cert=nc.tls.cert if nc.tls else None,
            tls_key=nc.tls.key if nc.tls else None, stream_max_age_s=nc.stream_max_age_s,
            stream_max_bytes=nc.stream_max_bytes, replicas=nc.replicas,
            connect_timeout_s=nc.connect_timeout_s, digest_buckets=self.cfg.sync.digest_buckets,
        )
        # a node that took nothing from a state file reads the snapshots, then the stream after
        # what they hold (natsbus.py)
        fresh = self.replica.stats["restart.loaded"] == 0
        return NatsBus(hello, opts, self.members, fresh=fresh)

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
        # the stored state is read in a thread while the watcher dumps the maps: the dump
        # waits in the kernel, the read mostly in SQLite and numpy, and each takes a few
        # tenths of a second at a million entries
        with ThreadPoolExecutor(1, thread_name_prefix="state") as pool:
            reading = pool.submit(read_state, self.cfg.state, self.node, self.synced,
                                  self.replica, self.metrics)  # fmt: skip
            try:
                # no scans while catching up: the agent fills its maps, takes no local change
                watcher, baselines = open_watcher(self.cfg.watch, self.maps, in_place,
                                                  hold_scans=True)  # fmt: skip
            except BaseException:
                with contextlib.suppress(Exception):
                    reading.result().close()
                raise
            try:
                state = reading.result()
            except BaseException:
                watcher.close()
                raise
        self._watcher = self.pipeline.watcher = watcher
        # the stored state, compared with what the maps hold (core/replica.py S4-S6)
        restore = {mc.sync_name for mc in self.cfg.maps if mc.restore == "on_empty"}
        self.persister, fills = resume(state, self.synced, self.replica, baselines, restore)
        self.pipeline.persister = self.persister
        if fills:  # restored maps: their stored content goes back into the kernel
            applied = self.applier.apply([], fills)
            self.pipeline.note_written(applied.written, applied.filled)
        gc.freeze()  # the seeded registers live long: keep the collector from walking them
        self._bridge = WatchBridge(watcher, loop)
        self.transport = self._transport_factory(self.hello)
        self.peering = Peering(
            self.node, self.replica, self.schemas, self.transport, self.cfg.sync, self.metrics,
            outbox_records=self._outbox_records(),
            on_records=self.pipeline.merge,
            on_caught_up=self._caught_up,
            catching_up=lambda: not self.ready,
            snapshot_every=self.cfg.nats.snapshot_interval_s if self.cfg.nats else None,
        )
        self.peering.absent = {name for name in self.presence if name not in self.synced}
        self.pipeline.peering = self.peering
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
        # a transport may wait for its servers (natsbus.py): a stop meanwhile ends the start
        starting = asyncio.ensure_future(self.transport.start())
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await self._shutdown()
            return
        starting.result()
        self.catchup.listening(time.monotonic())
        if self.cfg.tls is None and self.cfg.transport == "grpc":
            log.warning(
                "TLS is off: peers are not authenticated, and whoever reaches %s can claim a"
                " member's id (see docs/security.md)", self.cfg.listen,
                extra={"insecure": self.cfg.insecure, "members": self.members.mode},
            )
        self._bridge.start()
        log.info("agent started", extra={"node": self.node, "listen": self.cfg.listen,
                                          "maps": sorted(self.maps)})
        for name in sorted(self.peering.absent):
            log.warning("map %s: nothing is pinned at %s yet; it is synced once a map is pinned"
                        " there", name, self.presence[name].path)
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
        if self.persister is not None:  # the next start then reads snapshots only
            self.persister.flush()
            self.persister.store.close()
        if self._bridge is not None:
            await asyncio.to_thread(self._bridge.close)
        if self.transport is not None:
            await self.transport.close()
        if self._http is not None:
            self._http.close()
        for sm in [*self.synced.values(), *self._moving.values()]:
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
            changes: list[WatchEvent] = []
            for ev in await self._bridge.take(_LOCAL_SLICE):
                if isinstance(ev, Reopened):
                    self.pipeline.local(changes)  # before it: the replaced objects' changes
                    changes = []
                    self._moved(ev)
                else:
                    changes.append(ev)
            self.pipeline.local(changes)
            total = self._bridge.coalesced
            if total > self._coalesced_seen:
                self.metrics.coalesced.inc(total - self._coalesced_seen)
                self._coalesced_seen = total
            await asyncio.sleep(0)

    # --- catch-up and timers -------------------------------------------------------------------

    def _caught_up(self, name: str, peer: str, differing: int) -> None:
        if self.ready and name not in self.catchup.joined:
            return
        self.catchup.answer(name, peer)
        log.info("caught up", extra={"map": name, "peer": peer, "buckets_repaired": differing})
        self._check_ready()
        self._check_joined()

    def _check_ready(self) -> None:
        """readiness.py's verdict, now."""
        if self.ready or self.peering is None:
            return
        why = self.catchup.verdict(time.monotonic(), self.peering.connected(),
                                   self.peering.last_batch_at, self.cfg.sync.catchup_timeout_s)
        if why is not None:
            self._become_ready(why)

    def _become_ready(self, why: str) -> None:
        # the maps are current: the watcher compares its next scan with what was written
        self.pipeline.note_written(self.applier.finish_background().written)
        self.pipeline.take_held()  # what the data plane changed while the agent was down
        self.ready = self.pipeline.ready = True
        self.catchup.done_at = time.monotonic()
        self.metrics.ready.set(1)
        log.info("ready", extra={"why": why,
                                 "after_s": round(self.catchup.done_at - self.catchup.started, 3)})
        self._became_ready.set()  # the watch loop starts stamping what waited in the bridge
        if isinstance(self._watcher, AutoWatcher):
            self._watcher.release_scans()
        self._refresh_status()

    def _check_joined(self) -> None:
        """readiness.py Y5's verdict on each map that joined since the first catch-up, now."""
        if not self.ready or self.peering is None:
            return
        for name in list(self.catchup.joined):
            why = self.catchup.joined_verdict(
                name, time.monotonic(), self.peering.connected(), self.peering.last_batch_at,
                self.cfg.sync.catchup_timeout_s)  # fmt: skip
            if why is None:
                continue
            joined = self.catchup.joined.pop(name)
            self.peering.caught_up(name)
            self.pipeline.take_held()  # H1: what an object pinned again held that we did not
            log.info("map ready", extra={"map": name, "why": why,
                                         "after_s": round(time.monotonic() - joined, 3)})
            self._refresh_status()

    async def _timer_loop(self) -> None:
        sync = self.cfg.sync
        next_digest = time.monotonic() + sync.anti_entropy_interval_s
        while True:
            await asyncio.sleep(_TICK)
            mono = time.monotonic()
            self._check_ready()  # a peer that went away, or a timeout, no longer holds us back
            self._check_joined()  # ... also for a map that joined later
            self._follow_pins()
            # housekeeping waits while peers wait for us: freezing buckets in the tail of an
            # overload would take time from sending what they wait for
            if self.peering is None or not self.peering.behind():
                self.replica.settle(_SETTLE_BUCKETS, quiet=math.ceil(sync.freeze_after_s / _TICK))
            if self.persister is not None:  # bounded work a tick, also when behind
                self.persister.tick()
            if self.ready and self.pipeline.waiting:  # filters' age conditions (replica.py F3)
                self.pipeline.recheck()
            if self.peering is not None and self.ready:  # the bus's snapshots, if any
                self.peering.snapshot_round(mono)
            if mono >= next_digest:
                next_digest = mono + sync.anti_entropy_interval_s
                self.replica.expire(_now())
                if self.peering is not None:
                    self.peering.digest_round()
            self._refresh_status()

    # --- following the pins ----------------------------------------------------------------

    def _follow_pins(self) -> None:
        """Each configured pin path against the map object synced (the module docstring): an
        empty pin is reported, a new object found there is opened and the watcher moved to it;
        ``_moved`` takes it in once the watcher reports from it."""
        if not self.ready or self._moving or self._bridge is None:
            return  # before ready: the first catch-up fills what was found at start
        opened: dict[str, SyncedMap] = {}
        for name, pin in self.presence.items():
            if pin.path.startswith("/"):
                sm = self._open_new(name, pin)
                if sm is not None:
                    opened[name] = sm
        if not opened:
            return
        self._moving = opened
        maps = {**self.maps, **{name: sm.map for name, sm in opened.items()}}
        in_place = [name for name, sm in {**self.synced, **opened}.items()
                    if sm.policy.per_origin]  # fmt: skip
        cfg = self.cfg.watch
        self._bridge.reopen(lambda w: reopen_watcher(cfg, w, maps, list(opened), in_place),
                            opened)  # fmt: skip

    def _open_new(self, name: str, pin: Presence) -> SyncedMap | None:
        """The map object pinned at ``pin.path`` when it is another than the one synced and
        can be synced in its place; ``pin`` updated."""
        sm = self.synced.get(name)
        try:
            pinned, why = pinned_map_id(pin.path), None
        except BpfsyncError as err:  # another kind of object pinned there
            pinned, why = None, str(err)
        if pinned is None:
            pin.problem = why
            if pin.present:
                pin.present = False
                log.warning("map %s: nothing is pinned at %s any more; %s", name, pin.path,
                            "the map object open until now is still synced, and the next"
                            " map pinned there is taken in" if sm else "waiting for a map")
            return None
        if not pin.present:
            pin.present = True
            if sm is not None and pinned == sm.map.info.id:
                log.info("map %s: the synced map object is pinned at %s again", name, pin.path)
        if (sm is not None and pinned == sm.map.info.id) or pinned == self._refused.get(name):
            return None
        old = f"id {sm.map.info.id}" if sm is not None else "none"
        try:
            new = open_synced(self._configs[name])
        except BpfsyncError as err:
            self._refuse(name, pin, pinned, str(err))
            return None
        if sm is not None and new.schema != sm.schema:
            new.close()
            self._refuse(name, pin, pinned, (
                f"the map pinned at {pin.path} has {new.schema.key_size}-byte keys,"
                f" {new.schema.value_size}-byte values and policy {new.schema.policy}; the"
                f" cluster syncs {sm.schema.key_size}, {sm.schema.value_size} and"
                f" {sm.schema.policy}: restart the agents with the new layout"))
            return None
        pin.problem = None
        log.warning("map %s: a new map object is pinned at %s (id %d, synced until now: %s);"
                    " following it", name, pin.path, new.map.info.id, old)
        return new

    def _refuse(self, name: str, pin: Presence, pinned: int, why: str) -> None:
        """The object pinned at ``pin.path`` (id ``pinned``) cannot be synced: said once."""
        self._refused[name] = pinned
        pin.problem = why
        log.error("map %s: the map object pinned at %s (id %d) is not synced: %s", name,
                  pin.path, pinned, why)

    def _moved(self, ev: Reopened) -> None:
        """The watcher reports from the new objects now: take each one's content in
        (persist.take_map: the rule a restart uses for a new object) and catch it up."""
        opened, self._moving = self._moving, {}
        if ev.error is not None or self.peering is None:
            for sm in opened.values():  # the next tick tries again
                sm.close()
            return
        if ev.watcher is not None:
            self._watcher = self.pipeline.watcher = ev.watcher
        for name, new in opened.items():
            old = self.synced.get(name)
            stored = None
            if old is None:  # a map found late: synced from now on
                self.replica.add_map(new.schema, new.policy)
                self.schemas.append(new.schema)
                stored = self.persister.stored(new) if self.persister is not None else None
            self.synced[name] = new
            self.maps[name] = new.map
            if old is None:
                self.peering.add_map(new.schema, self._outbox_records())
            plan = take_map(new, ev.baselines[name], self.replica, self.persister,
                            stored=stored, live=old is not None,
                            restore=self._configs[name].restore == "on_empty")  # fmt: skip
            if plan.fills:  # S6
                applied = self.applier.apply([], plan.fills)
                self.pipeline.note_written(applied.written, applied.filled)
            if old is not None:
                old.close()
            self.catchup.join(name, time.monotonic())
            self.peering.catch_up(name)
            log.info("took in the new map object", extra={
                "map": name, "id": new.map.info.id, "case": plan.case, "seeded": plan.seeded,
                "restored": sum(f.entries for f in plan.fills), "held_back": plan.held})
        self._refresh_status()

    def _outbox_records(self) -> int:
        # coalescing keeps at most one record per key (per origin for per-origin maps), so an
        # outbox that holds every key never overflows into a digest repair
        keys = sum(sm.map.max_entries for sm in self.synced.values())
        return max(1 << 16, 2 * keys)

    # --- status --------------------------------------------------------------------------------

    @property
    def reported_ready(self) -> bool:
        """readiness.py: the first catch-up done, and every present map caught up (Y5, Y6)."""
        return self.ready and not self.catchup.joined

    def _refresh_status(self) -> None:
        """Computed on the loop, read by the HTTP thread: never touches state off the loop."""
        tls = self.transport.tls if isinstance(self.transport, GrpcMesh) else None
        ready = self.reported_ready
        self.metrics.ready.set(ready)
        self._status = {
            "node": self.node, "incarnation": self.incarnation, "ready": ready,
            "pid": os.getpid(),
            "peers": self.peering.peers() if self.peering is not None else [],
            "maps": status.map_rows(
                self.synced, self.replica, self.map_stats, self._watcher, self.metrics,
                self.presence, self.catchup.joined,
                self.peering.absent_records if self.peering is not None else None),
            "security": status.security(tls, self.members, self.metrics),
            "state": self.persister.status() if self.persister is not None else None,
            "watch": self._watcher.mode if self._watcher is not None else "starting",
            "replica": dict(self.replica.stats),
            "transport": dict(self.transport.stats) if self.transport else {},
        }
        if isinstance(self.transport, Publisher):  # the NATS bus: the stream's state
            self._status["stream"] = dict(self.transport.describe())
            self.metrics.stream_connected.set(self.transport.connected)
            self.metrics.stream_backlog.set(self.transport.publish_backlog())

    def _slots_threadsafe(self, name: str) -> dict[str, Any]:
        """Every node's register per key of map ``name``: computed on the loop (the replica is
        the loop's), asked for from the HTTP thread."""
        sm = self.synced.get(name)
        if sm is None:
            raise KeyError(name)

        async def collect() -> dict[str, Any]:
            return status.slots(self.replica, sm)

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
