"""The agent: wires the kernel maps, a watcher, the replica and the peers together, and runs
them until stopped. Everything that decides lives in bpfsync.core; the parts here move data:

    synced.py     the kernel maps, with their policies and counter layouts
    watchers.py   the watcher, and bridge.py: its thread's changes, one per key, to the loop
    pipeline.py   local changes out, peers' records in (merge, kernel writes by applier.py)
    peering.py    the peers: sessions, digests, repair answers, relay, flushing
    readiness.py  when the node reports ready (its first catch-up)
    status.py     /status and /slots, http.py serves them, metrics.py the metrics

This module holds the lifecycle (start, the loops, stop) and the timers.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from bpfsync.agent import status
from bpfsync.agent.applier import Applier
from bpfsync.agent.bridge import WatchBridge
from bpfsync.agent.config import AgentConfig, TlsConfig
from bpfsync.agent.http import StatusServer
from bpfsync.agent.metrics import AgentMetrics
from bpfsync.agent.peering import Peering
from bpfsync.agent.persist import Persister, resume
from bpfsync.agent.pipeline import Pipeline
from bpfsync.agent.readiness import CatchUp
from bpfsync.agent.runtime import tune_process
from bpfsync.agent.synced import SyncedMap, open_synced
from bpfsync.agent.watchers import BatchWatcher, open_watcher
from bpfsync.core.membership import Membership
from bpfsync.core.messages import Hello
from bpfsync.core.replica import Replica
from bpfsync.kernel.maps import Map
from bpfsync.transport.base import Transport
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
        self.pipeline = Pipeline(self.synced, self.replica, self.applier, self.metrics)
        self.map_stats = self.pipeline.map_stats
        self.hello = Hello(self.node, self.incarnation, tuple(schemas))
        self._transport_factory = transport_factory or self._grpc
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
        self._watcher = self.pipeline.watcher = watcher
        # the stored state, compared with what the maps hold (core/replica.py S4-S6)
        restore = {mc.sync_name for mc in self.cfg.maps if mc.restore == "on_empty"}
        self.persister, fills = resume(self.cfg.state, self.node, self.synced, self.replica,
                                       baselines, self.metrics, restore)  # fmt: skip
        self.pipeline.persister = self.persister
        if fills:  # restored maps: their stored content goes back into the kernel
            applied = self.applier.apply([], fills)
            self.pipeline.note_written(applied.written, applied.filled)
        gc.freeze()  # the seeded registers live long: keep the collector from walking them
        self._bridge = WatchBridge(watcher, loop)
        self.transport = self._transport_factory(self.hello)
        keys = sum(sm.map.max_entries for sm in self.synced.values())
        self.peering = Peering(
            self.node, self.replica, self.schemas, self.transport, self.cfg.sync, self.metrics,
            # coalescing keeps at most one record per key (per origin for per-origin maps), so
            # an outbox that holds every key never overflows into a digest repair
            outbox_records=max(1 << 16, 2 * keys),
            on_records=self.pipeline.merge,
            on_caught_up=self._caught_up,
            catching_up=lambda: not self.ready,
        )
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
        if self.persister is not None:  # the next start then reads snapshots only
            self.persister.flush()
            self.persister.store.close()
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
            self.pipeline.local(await self._bridge.take(_LOCAL_SLICE))
            total = self._bridge.coalesced
            if total > self._coalesced_seen:
                self.metrics.coalesced.inc(total - self._coalesced_seen)
                self._coalesced_seen = total
            await asyncio.sleep(0)

    # --- catch-up and timers -------------------------------------------------------------------

    def _caught_up(self, name: str, peer: str, differing: int) -> None:
        if self.ready:
            return
        self.catchup.answer(name, peer)
        log.info("caught up", extra={"map": name, "peer": peer, "buckets_repaired": differing})
        self._check_ready()

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

    async def _timer_loop(self) -> None:
        sync = self.cfg.sync
        next_digest = time.monotonic() + sync.anti_entropy_interval_s
        while True:
            await asyncio.sleep(_TICK)
            mono = time.monotonic()
            self._check_ready()  # a peer that went away, or a timeout, no longer holds us back
            # housekeeping waits while peers wait for us: freezing buckets in the tail of an
            # overload would take time from sending what they wait for
            if self.peering is None or not self.peering.behind():
                self.replica.settle(_SETTLE_BUCKETS, quiet=math.ceil(sync.freeze_after_s / _TICK))
            if self.persister is not None:  # bounded work a tick, also when behind
                self.persister.tick()
            if mono >= next_digest:
                next_digest = mono + sync.anti_entropy_interval_s
                self.replica.expire(_now())
                if self.peering is not None:
                    self.peering.digest_round()
            self._refresh_status()

    # --- status --------------------------------------------------------------------------------

    def _refresh_status(self) -> None:
        """Computed on the loop, read by the HTTP thread: never touches state off the loop."""
        tls = self.transport.tls if isinstance(self.transport, GrpcMesh) else None
        self._status = {
            "node": self.node, "incarnation": self.incarnation, "ready": self.ready,
            "pid": os.getpid(),
            "peers": self.peering.peers() if self.peering is not None else [],
            "maps": status.map_rows(self.synced, self.replica, self.map_stats, self._watcher,
                                    self.metrics),
            "security": status.security(tls, self.members, self.metrics),
            "state": self.persister.status() if self.persister is not None else None,
            "watch": self._watcher.mode if self._watcher is not None else "starting",
            "replica": dict(self.replica.stats),
            "transport": dict(self.transport.stats) if self.transport else {},
        }

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
