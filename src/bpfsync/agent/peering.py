"""Talking to peers: one PeerSession each, the transport's events, digests, paced repair
answers, relay and the ~1 ms flush. The agent hands it records to send and merges what it passes
back; every decision about records themselves stays in the core.

Rules of this module (the core's rules are in core/session.py and core/replica.py):

- Digests carry the links the sender has up. A record is relayed to a peer only when that peer's
  last digest says it has no link to the record's origin: in a healthy full mesh every origin
  reaches every peer itself, and relaying everything would double each node's receive work.
- A digest is answered, on one ordered stream, with a Pull for the buckets that differ, then our
  records in them, then Answered: that tells the asker it has everything we had for it
  (catch-up). The Pull goes first so the asker answers it from its own state, not from the
  records we are about to send it (the other order sent a fresh node's whole catch-up back).
  Urgent digests (catch-up, gap repair) are answered for every differing bucket. Routine ones
  (the periodic backstop, to ``sync.digest_fanout`` random peers a round: what one node
  lacks reaches it from whichever peer compares with it, since an answer carries state, not
  messages) only for buckets that differ *stably*: the same hash on both sides as
  at the peer's previous digest. While changes flow, buckets differ by what is in flight, and
  answering those would send each other whole maps of records both are about to receive; a
  bucket that stays different while neither side changes it is a real divergence. And no
  routine exchange with a peer that has not applied everything we have for it (records in its
  outbox, or batches it has not acked when its digest arrives: its acks precede its digest on
  its stream): the difference is then what is on its way, and a Pull would send it twice.
  Still, a node stalled for seconds (overload) makes in-flight differences look stable; so a
  routine answer covers at most ``_ROUTINE_BUCKETS`` buckets (taken in turn): a real divergence
  is small and repaired within a few rounds, a transient one costs little.
- Batches and repair answers are paced on the link's backlog: a 1M-entry answer is ~70 MB, and
  a peer slower than our writers would otherwise see its send queue overflow and its link reset
  (then everything unacked is sent again). Meanwhile records wait, coalesced, in the outbox.
- Peer input is bounded and answered once: a peer holds at most one answer per map (and one
  Pull answer) in the queue of repairs we owe it; a Digest or Pull beyond that is refused and
  counted (``repair_busy``): one small frame must not make us send a whole map again and again.
- An Answered is taken only from a peer we sent a digest of that map it has not answered yet;
  any other is refused and counted (``unsolicited_answered``). While this node catches up it
  sends urgent digests only (no routine round, no link announcements), so every Answered it
  takes then ends a catch-up answer: a routine answer covers a few buckets and must not make
  the node ready.
- A map that joins while the node runs (its pin was empty until now, or holds a new map
  object whose registers were dropped: core/replica.py S5) catches up on its own
  (``catch_up``): an urgent digest of it to every linked peer, and to each peer that links
  while it catches up, and no routine digest of it meanwhile, so that an Answered of it
  ends that catch-up (readiness.py Y5). A configured map this node cannot open yet
  (``absent``) is none of the peers' fault: their records and Pulls of it are dropped without
  a word (records counted per map in ``absent_records``), a digest of it is answered with
  nothing, so that a peer catching up is not held back, and the map is caught up in full
  once it joins.
- Input refused as the peer's fault (malformed, unauthenticated) disconnects the peer for a
  while (transport ``disconnect``); so does input that meets a bug here, which is logged with
  its traceback: one member's frames must never stop the agent. A config mismatch (a map the
  peer does not sync) is only logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from bpfsync.agent.config import SyncConfig
from bpfsync.agent.metrics import AgentMetrics
from bpfsync.core.messages import (
    Ack,
    Answered,
    Batch,
    Digest,
    Hello,
    MapSchema,
    Pull,
    Record,
)
from bpfsync.core.outbox import Outbox, split
from bpfsync.core.register import Packed
from bpfsync.core.replica import ApplyResult, Replica
from bpfsync.core.session import PeerSession, map_mismatches
from bpfsync.errors import (
    BpfsyncError,
    MalformedMessageError,
    PeerError,
    UnauthenticatedPeerError,
)
from bpfsync.transport.base import (
    PeerDown,
    PeerUp,
    Publisher,
    Received,
    Streamed,
    StreamRead,
    Transport,
)

log = logging.getLogger("bpfsync.agent")

_MAX_BATCH_BYTES = 4 << 20
_ROUTINE_BUCKETS = 64  # buckets one routine digest answer may repair (of 1024 by default)
_REPAIR_BACKLOG = 8 << 20  # bytes queued on a link before repair answers wait for it to drain
_SEND_BACKLOG = 16 << 20  # ... before new batches wait (the link resets past 64 MiB)
_CROSSED_S = 5.0  # a peer's Pull this soon after our answer to its digest answers the same
_MAX_ASKED = 8  # digests of one map counted as awaiting an answer, at most, per peer
STREAM = "stream"  # who answered a catch-up from the stream (readiness.py counts it as a peer)
_PUBLISH_BACKLOG = 8 << 20  # bytes of batches waiting for the stream before more wait here
_SNAPSHOT_AGAIN_S = 1.0  # the next round, when a round's budget ended it
_SNAPSHOT_BYTES = 4 << 20  # snapshots one round stores at most (a 40 MB map: ten rounds)

# (peer, records, whether they are a repair: a digest's or a pull's answer) -> what merging them
# asks of us; None when the records were not merged
OnRecords = Callable[[str, Sequence[Record], bool], ApplyResult | None]


class Peering:
    def __init__(
        self,
        node: str,
        replica: Replica,
        schemas: Sequence[MapSchema],
        transport: Transport,
        sync: SyncConfig,
        metrics: AgentMetrics,
        *,
        outbox_records: int,
        on_records: OnRecords,
        on_caught_up: Callable[[str, str, int], None],
        catching_up: Callable[[], bool],
        snapshot_every: float | None = None,
    ) -> None:
        """``snapshot_every``: on the bus, seconds between two rounds of snapshots (see
        ``snapshot_round``)."""
        self.node = node
        self.replica = replica
        self.schemas = list(schemas)
        self.transport = transport
        self.sync = sync
        self.metrics = metrics
        self.sessions: dict[str, PeerSession] = {}
        self._outbox_records = outbox_records
        self._on_records = on_records
        self._on_caught_up = on_caught_up
        self._catching_up = catching_up
        self._flush_scheduled = False
        self._sent = asyncio.Event()  # set by each flush that sent a batch (see wait_for_room)
        self._linked: set[str] = set()  # peers whose link from us is up
        self._peer_links: dict[str, frozenset[str]] = {}  # what each peer's digests said
        self.last_batch_at = 0.0  # ... of the last batch of any kind (repair answers included)
        # per peer, what its repair answers still have to send (batches cut as they go out)
        self._repairs: dict[str, deque[Batch | Pull | Answered | Iterator[Batch]]] = (
            defaultdict(deque)
        )
        self._unanswered: dict[str, dict[str, Digest]] = {}  # peer -> map -> its latest digest
        # (peer, map) -> (its last digest's buckets, ours then): what _stable_differences compares
        self._observed: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._repair_turn: Counter[tuple[str, str]] = Counter()
        # (peer, map) -> (when, bucket count, buckets): what our last answer to its digest sent
        self._answered: dict[tuple[str, str], tuple[float, int, frozenset[int]]] = {}
        # peer -> map -> digests we sent it and it has not answered (bounded: a busy peer does
        # not answer routine digests)
        self._asked: dict[str, Counter[str]] = {}
        # repairs owed to one peer at most: an answer (Pull, records, Answered) per map, a Pull's
        self._max_repairs = 3 * len(self.schemas) + 1
        self.catching: set[str] = set()  # maps catching up on their own (module docstring)
        self.absent: set[str] = set()  # configured maps not synced here yet (ditto)
        self.absent_records: Counter[str] = Counter()
        # a transport that publishes to a stream every node reads (the bus; module docstring)
        self.bus: Publisher | None = transport if isinstance(transport, Publisher) else None
        self._bus_outbox = Outbox(max_records=outbox_records,
                                  per_origin_maps=replica.per_origin_maps)
        self._stream_read = False
        self._stream_peer: str | None = None  # the peer asked to close the stream's gaps
        self._snapshot_every = snapshot_every
        self._next_snapshot = 0.0
        self._snapshotted: dict[str, dict[int, int]] = defaultdict(dict)  # map -> bucket -> sum
        self._snapshotted_at: dict[str, dict[int, int]] = defaultdict(dict)  # -> its round
        self._snapshot_rounds = 0

    # --- what the agent calls ------------------------------------------------------------------

    async def run(self) -> None:
        """Handle the transport's events until it closes."""
        async for ev in self.transport.events():
            if isinstance(ev, StreamRead):
                self._streamed_all()
                continue
            try:
                if isinstance(ev, Received):
                    self._received(ev.peer, ev.message, ev.incarnation)
                elif isinstance(ev, Streamed):
                    self._streamed(ev.peer, ev.message)
                elif isinstance(ev, PeerUp):
                    self._peer_up(ev.peer, ev.hello)
                elif isinstance(ev, PeerDown):
                    self._peer_down(ev.peer, ev.error)
            except PeerError as err:
                self.metrics.rejected.labels(type(err).__name__).inc()
                log.warning("refused input from peer %s: %s", ev.peer, err)
                if isinstance(err, MalformedMessageError | UnauthenticatedPeerError):
                    self.transport.disconnect(ev.peer, err, _incarnation(ev))
            except BpfsyncError:
                raise  # this node's own failure (kernel, config): not the peer's input
            except Exception as exc:  # see the module docstring
                self.metrics.rejected.labels("internal_error").inc()
                log.exception("input from peer %s met a bug; disconnecting it", ev.peer)
                self.transport.disconnect(ev.peer, MalformedMessageError(
                    f"input that this node failed to handle ({type(exc).__name__})", ev.peer),
                    _incarnation(ev))

    def broadcast(self, records: list[Record] | Packed) -> None:
        """Local changes: to every peer our link has reached at least once. One it never
        reached (a member that only dials us, one still down since we started) gets everything
        by the first-contact repair when our link comes up: queueing for it meanwhile would
        hold a record per key of every map for nothing."""
        if not records:
            return
        if self.bus is not None:  # published once, for every node
            self._bus_outbox.add(records, newest=True)
        else:
            for s in self.sessions.values():
                if s.peer_incarnation is not None:
                    s.outbox.add(records, newest=True)
        self._flush_soon()

    def add_map(self, schema: MapSchema, outbox_records: int) -> None:
        """Sync one more map with every peer (the replica syncs it already); ``outbox_records``:
        the outboxes' new bound."""
        self.schemas.append(schema)
        self.absent.discard(schema.name)
        self._max_repairs = 3 * len(self.schemas) + 1
        self._outbox_records = outbox_records
        per_origin = schema.name in self.replica.per_origin_maps
        for outbox in [self._bus_outbox, *(s.outbox for s in self.sessions.values())]:
            outbox.max_records = outbox_records
            if per_origin:
                outbox.add_per_origin(schema.name)

    def catch_up(self, name: str) -> None:
        """Map ``name`` joined while running: ask every linked peer for everything it has of it
        (an urgent digest), and keep asking those that link until ``caught_up(name)``."""
        self.catching.add(name)
        for peer in sorted(self._linked):
            self._send_digests(peer, urgent=True, only=(name,))

    def caught_up(self, name: str) -> None:
        """Map ``name``'s catch-up is over: routine digests of it again."""
        self.catching.discard(name)

    def snapshot_round(self, now: float) -> None:
        """On the bus, every ``snapshot_every`` seconds: the snapshots this node keeps up to
        date, of the buckets whose digest sum moved since it last stored them, the longest
        unstored first, at most ``_SNAPSHOT_BYTES`` a round (the rest waits for the next,
        within a second: a node without state skips the stream only as far as every
        bucket's snapshot holds it, natsbus.py). Each bucket is kept by one of the nodes up
        (rendezvous hashing over this node and the peers whose Hellos arrive), so the
        servers store each change once, not once per node; while two nodes see different
        peers up, both may store a bucket, which is harmless (any node's snapshot is valid).
        A node takes over the buckets of one that went away."""
        if self.bus is None or self._snapshot_every is None or now < self._next_snapshot:
            return
        if not self.bus.connected:
            return
        self._next_snapshot = now + self._snapshot_every
        self._snapshot_rounds += 1
        up = sorted({self.node, *self._linked})
        moved: list[tuple[int, str, int]] = []  # (round last stored, map, bucket)
        for schema in self.schemas:
            if schema.name in self.absent:
                continue
            stored, at = self._snapshotted[schema.name], self._snapshotted_at[schema.name]
            moved += [(at.get(b, -1), schema.name, b)
                      for b, digest_sum in enumerate(self.replica.bucket_sums(schema.name))
                      if stored.get(b) != digest_sum and _keeper(schema.name, b, up) == self.node]
        # the longest unstored first: under steady writes every bucket moves each round, and
        # a round in bucket order would store the same first ones each time, never the rest
        moved.sort()
        budget = _SNAPSHOT_BYTES
        for _, name, b in moved:  # one at a time: the budget may end the round before the last
            ((_, digest_sum, blob),) = self.replica.snapshot(name, [b])
            if budget <= 0 or not self.bus.put_snapshot(name, b, blob):
                self._next_snapshot = now + min(_SNAPSHOT_AGAIN_S, self._snapshot_every)
                return
            self._snapshotted[name][b] = digest_sum
            self._snapshotted_at[name][b] = self._snapshot_rounds
            budget -= len(blob)

    def digest_round(self, *, every: bool = False) -> None:
        """The periodic anti-entropy round: a digest of every map to ``sync.digest_fanout``
        peers we owe nothing, at random (``every``: to all of them; see the module
        docstring)."""
        owed_nothing = [peer for peer, s in self.sessions.items()
                        if not (s.outbox or s.unacked)]
        fanout = self.sync.digest_fanout
        if not every and 0 < fanout < len(owed_nothing):
            owed_nothing = random.sample(owed_nothing, fanout)
        for peer in owed_nothing:
            self._send_digests(peer)

    def peers(self) -> list[dict[str, Any]]:
        """One row per peer the transport knows, for /status; sets the per-peer lag gauge on
        the way (for members only: only they have a session)."""
        lag: dict[str, tuple[int, int]] = {}  # peer -> (records queued, records unacked)
        for peer, session in self.sessions.items():
            lag[peer] = (len(session.outbox), session.unacked_records)
            self.metrics.peer_lag.labels(peer).set(sum(lag[peer]))
        rows = []
        for p in self.transport.peers():
            s = self.sessions.get(p.node or "")
            queued, unacked = lag.get(p.node or "", (0, 0))
            rows.append({
                "address": p.address, "node": p.node, "connected": p.connected,
                "connected_since": p.connected_since,
                "inbound": p.inbound, "sent": p.messages_sent, "received": p.messages_received,
                "bytes_sent": p.bytes_sent, "bytes_received": p.bytes_received,
                "reconnects": p.reconnects, "last_error": p.last_error,
                "last_error_at": p.last_error_at,
                "queued_bytes": p.queued_bytes, "dropped": p.dropped,
                "unacked_batches": s.unacked if s else 0,
                "queued_records": queued, "unacked_records": unacked,
                "lag_records": queued + unacked,
            })
        return rows

    def queued(self) -> int:
        """Records queued for the linked peer that has the fewest (0 when none is linked);
        on the bus, records waiting to be published."""
        if self.bus is not None:
            return len(self._bus_outbox)
        return min(
            (len(s.outbox) for peer, s in self.sessions.items() if peer in self._linked),
            default=0,
        )

    async def wait_for_room(self, records: int, timeout: float) -> None:
        """Return once a linked peer has fewer than ``records`` queued, or after ``timeout``
        seconds. Local changes taken meanwhile would only replace queued records of their keys,
        stamped and queued for nothing; left in the watcher's bridge, they coalesce there."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.queued() >= records and (left := deadline - loop.time()) > 0:
            self._sent.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sent.wait(), left)

    def connected(self) -> list[str]:
        """Whom the node's readiness waits for (readiness.py Y1): the linked peers; on the
        bus, the stream while it can be reached, and the one peer asked for what the stream
        no longer held (``_streamed_all``)."""
        if self.bus is not None:
            peer = [self._stream_peer] if self._stream_peer in self._linked else []
            return ([STREAM] if self.bus.connected else []) + peer
        return sorted(self._linked)

    def behind(self) -> bool:
        """Whether records wait for a linked peer: queued, unacknowledged, or a repair answer
        (for a peer that is down, they may wait for hours)."""
        if self.bus is not None and (self._bus_outbox or self.bus.publish_backlog()):
            return True
        return any(
            s.outbox or s.unacked or self._repairs.get(peer)
            for peer, s in self.sessions.items()
            if peer in self._linked
        )

    # --- events --------------------------------------------------------------------------------

    def _session(self, peer: str) -> PeerSession:
        s = self.sessions.get(peer)
        if s is None:
            outbox = Outbox(max_records=self._outbox_records,
                            per_origin_maps=self.replica.per_origin_maps)
            s = self.sessions[peer] = PeerSession(self.node, peer, outbox=outbox)
        return s

    def _send(self, peer: str, message: Ack | Batch | Digest | Pull | Answered) -> bool:
        return self.transport.send(peer, message)

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
        if self.bus is not None:
            s.take_repair()  # the stream catches us up; routine digests repair the rest
        elif s.take_repair() or self._catching_up():
            self._send_digests(peer, urgent=True)  # until ready, any peer may catch us up
        elif self.catching:
            self._send_digests(peer, urgent=True, only=tuple(self.catching))
        self._announce_links(but=peer)
        self._flush_soon()

    def _peer_down(self, peer: str, error: BpfsyncError | None) -> None:
        self._session(peer).link_down()
        self._repairs.pop(peer, None)
        self._asked.pop(peer, None)
        for key in [key for key in self._answered if key[0] == peer]:
            del self._answered[key]
        self.metrics.peer_connected.labels(peer).set(0)
        for schema in self.schemas:  # unknown until its next digests are compared again
            self.metrics.divergent_buckets.remove(peer, schema.name)
        self._linked.discard(peer)
        log.info("peer down", extra={"peer": peer, "error": str(error) if error else None})
        self._announce_links(but=peer)

    def _announce_links(self, but: str) -> None:
        """Our links changed: tell the other peers at once (digests carry them), so they start
        or stop relaying to us without waiting for the next digest round. On the bus nothing
        is relayed: every node reads every origin's batches from the stream."""
        if self.bus is not None:
            return
        for other in self._linked:
            if other != but:
                self._send_digests(other)

    def _received(self, peer: str, msg: object, incarnation: int) -> None:
        s = self._session(peer)
        if isinstance(msg, Batch):
            self.last_batch_at = time.monotonic()
            if s.on_batch(msg, incarnation):
                records = self._synced_here(msg.records)
                res = self._on_records(peer, records, msg.seq == 0) if records else None
                if res is not None:
                    self._pass_on(peer, res)
            if msg.seq > 0:
                self._send(peer, s.ack())

        elif isinstance(msg, Ack):
            s.on_ack(msg)
            self._flush_soon()  # the window may have opened
        elif isinstance(msg, Digest):
            self._peer_links[peer] = frozenset(msg.linked)
            if self.replica.members is not None:
                self.replica.members.vouch(msg.linked)
            if not self._repairs_full(peer, msg):
                self._answer_digest(peer, s, msg)
        elif isinstance(msg, Pull):
            if msg.map not in self.absent and not self._repairs_full(peer, msg):
                self._send_repair(
                    peer, s, [self.replica.answer_pull(self._unsent(peer, msg), peer)])
        elif isinstance(msg, Answered):
            asked = self._asked.get(peer)
            if asked is None or asked[msg.map] <= 0:  # not ours to take (module docstring)
                self.metrics.rejected.labels("unsolicited_answered").inc()
            else:
                asked[msg.map] -= 1
                self._on_caught_up(msg.map, peer, msg.differing)
        elif isinstance(msg, Hello):
            self._send(peer, s.on_hello(msg))
        if s.take_repair():
            self._send_digests(peer, urgent=True)

    def _streamed(self, sender: str, batch: Batch) -> None:
        """A batch ``sender`` published for every node (the transport checked that it is a
        member's, on its own subject). Merged like a peer's batch; nothing is relayed or
        answered: every node reads the same stream, and digests repair the rest."""
        self.last_batch_at = time.monotonic()
        records = self._synced_here(batch.records)
        if records:
            self._on_records(sender, records, False)

    def _streamed_all(self) -> None:
        """The stream delivered everything it held when we first read it: every map is
        caught up with it (readiness.py Y1, with the stream as a peer). What the stream no
        longer held (past its retention) is asked of one linked peer, chosen at random, by
        an urgent digest; readiness waits for its answer too. One peer, not every one: each
        would answer the same differences."""
        if self._stream_read:
            return
        self._stream_read = True
        if self._linked and self._catching_up():
            self._stream_peer = random.choice(sorted(self._linked))
            self._send_digests(self._stream_peer, urgent=True)
        for schema in self.schemas:
            self._on_caught_up(schema.name, STREAM, 0)

    def _synced_here(self, records: Sequence[Record]) -> Sequence[Record]:
        """``records`` without those of ``absent`` maps (counted)."""
        if not self.absent:
            return records
        packed = Packed.of(records)
        keep = [i for i, name in enumerate(packed.maps) if name not in self.absent]
        if len(keep) == len(packed):
            return records
        for i in set(range(len(packed))) - set(keep):
            self.absent_records[packed.maps[i]] += 1
        return Packed([packed.maps[i] for i in keep], [packed.keys[i] for i in keep],
                      [packed.packed[i] for i in keep])  # fmt: skip

    def _pass_on(self, sender: str, res: ApplyResult) -> None:
        """Relay what changed our state to peers cut off from its origin; reply to the sender
        where we hold something newer."""
        if self.bus is not None:  # see _streamed
            return
        relayed = False
        others = [(o, s, links) for o, s in self.sessions.items()
                  if o != sender and s.peer_incarnation is not None
                  and (links := self._peer_links.get(o)) is not None]
        origins = res.forward.origins() if res.forward and others else set()
        if origins:
            for other, s, links in others:
                if origins <= links | {other}:
                    continue
                relay = [r for r in res.forward
                         if r.stamp.node not in links and r.stamp.node != other]
                if relay:
                    s.outbox.add(relay)
                    relayed = True
        back = self._session(sender)
        if res.reply and back.peer_incarnation is not None:  # see broadcast
            back.outbox.add(res.reply)
        if relayed or res.reply:
            self._flush_soon()

    # --- digests and repair --------------------------------------------------------------------

    def _send_digests(
        self, peer: str, *, urgent: bool = False, only: Iterable[str] | None = None
    ) -> None:
        """A digest of every map (of those ``only`` names) to ``peer``."""
        if not urgent and self._catching_up():  # see the module docstring
            return
        linked = tuple(sorted(self._linked))
        asked = self._asked.setdefault(peer, Counter())
        names = None if only is None else set(only)
        for schema in self.schemas:
            if names is not None and schema.name not in names:
                continue
            if not urgent and schema.name in self.catching:  # see the module docstring
                continue
            d = self.replica.digest(schema.name)
            if self._send(peer, Digest(d.map, d.buckets, linked, urgent)):
                asked[d.map] = min(asked[d.map] + 1, _MAX_ASKED)

    def _repairs_full(self, peer: str, msg: Digest | Pull) -> bool:
        """Whether the peer already has every answer it may have queued (module docstring)."""
        if len(self._repairs.get(peer, ())) < self._max_repairs:
            return False
        self.metrics.rejected.labels("repair_busy").inc()
        log.debug("peer %s: %s of %s refused, %d repairs still queued for it", peer,
                  type(msg).__name__, msg.map, len(self._repairs[peer]))
        return True

    def _stable_differences(self, peer: str, digest: Digest) -> set[int]:
        """Buckets that differ now and had the same hashes, on both sides, at the peer's
        previous digest of the map: no change touched them in between on either node."""
        local = self.replica.digest(digest.map, len(digest.buckets)).buckets
        before = self._observed.get((peer, digest.map))
        self._observed[(peer, digest.map)] = (digest.buckets, local)
        divergent = self.metrics.divergent_buckets.labels(peer, digest.map)
        if before is None or len(before[0]) != len(local):
            divergent.set(0)
            return set()
        stable = [
            i for i, (theirs, ours, was_theirs, was_ours)
            in enumerate(zip(digest.buckets, local, *before, strict=True))
            if theirs != ours and theirs == was_theirs and ours == was_ours
        ]  # fmt: skip
        divergent.set(len(stable))  # all of them, also those this answer leaves for later
        if len(stable) <= _ROUTINE_BUCKETS:
            return set(stable)
        self._repair_turn[(peer, digest.map)] += 1
        start = self._repair_turn[(peer, digest.map)] * _ROUTINE_BUCKETS % len(stable)
        return set((stable[start:] + stable[:start])[:_ROUTINE_BUCKETS])

    def _answer_digest(self, peer: str, s: PeerSession, digest: Digest) -> None:
        if self.transport.backlog(peer) is None:
            # our link to the peer is not up yet (it dialed us first): answer when it is
            self._unanswered.setdefault(peer, {})[digest.map] = digest
            return
        if digest.map in self.absent:  # nothing of it here: the peer's catch-up is not held
            self._send_repair(peer, s, [], Answered(digest.map, 0))
            return
        only = None
        if not digest.urgent:
            if s.outbox or s.unacked:  # records on their way: the difference is likely those
                self._observed.pop((peer, digest.map), None)
                self.metrics.divergent_buckets.labels(peer, digest.map).set(0)  # none known
                return
            only = self._stable_differences(peer, digest)
        pull, parts = self.replica.answer_digest(
            digest, peer, only=only, part=self.sync.max_batch_records
        )
        differing = 0 if pull is None else len(pull.buckets)
        if pull is not None:
            self.metrics.repairs.labels(digest.map).inc(differing)
            self._repairs[peer].append(pull)
            self._answered[(peer, digest.map)] = (
                time.monotonic(), len(digest.buckets), frozenset(pull.buckets))
        self._send_repair(peer, s, parts, Answered(digest.map, differing))

    def _unsent(self, peer: str, pull: Pull) -> Pull:
        """``pull`` without the buckets our answer to the peer's digest has just sent: when two
        nodes' digests cross (both at link-up), each answer's Pull asks for what the other
        answer carries already. A bucket left out that still differs is one digest round away."""
        sent = self._answered.pop((peer, pull.map), None)
        if sent is None or time.monotonic() - sent[0] > _CROSSED_S:
            return pull
        _, n, buckets = sent
        if n != self.replica.digest_buckets:  # counted otherwise than our digest's Pull
            return pull
        return Pull(pull.map, tuple(b for b in pull.buckets if b not in buckets))

    def _send_repair(
        self, peer: str, s: PeerSession, parts: Iterable[Sequence[Record]],
        tail: Answered | None = None,
    ) -> None:
        """Queue the records (read and cut as they go out: a whole map's first batch leaves at
        once), then ``tail``."""
        q = self._repairs[peer]
        limit, nbytes = self.sync.max_batch_records, self._batch_bytes()
        q.append(s.repair_batch(chunk) for part in parts for chunk in split(part, limit, nbytes))
        if tail is not None:
            q.append(tail)
        self._drain_repairs(peer)

    def _drain_repairs(self, peer: str) -> None:
        q = self._repairs.get(peer)
        while q:
            backlog = self.transport.backlog(peer)
            if backlog is None:  # link lost: the next digest exchange starts over
                q.clear()
                return
            if backlog > _REPAIR_BACKLOG:
                asyncio.get_running_loop().call_later(0.005, self._drain_repairs, peer)
                return
            head = q[0]
            msg: Batch | Pull | Answered | None
            if isinstance(head, Iterator):
                msg = next(head, None)
                if msg is None:
                    q.popleft()
                    continue
            else:
                msg = head
                q.popleft()
            if not self._send(peer, msg):
                q.clear()
                return

    # --- flushing ------------------------------------------------------------------------------

    def _batch_bytes(self) -> int:
        limit = min(_MAX_BATCH_BYTES, self.sync.max_message_bytes // 2)
        return limit if self.bus is None else min(limit, self.bus.max_message_bytes // 2)

    def _flush_soon(self) -> None:
        if self._flush_scheduled:
            return
        self._flush_scheduled = True
        asyncio.get_running_loop().call_later(self.sync.batch_window_ms / 1000, self._flush)

    def _flush(self) -> None:
        """Send what the outboxes hold, as long as each link keeps up. A peer that falls behind
        is not buried (its send queue would overflow and reset the link): its records wait in
        the outbox, where later changes of the same key replace earlier ones."""
        self._flush_scheduled = False
        limit, nbytes = self.sync.max_batch_records, self._batch_bytes()
        behind = self._publish(limit, nbytes) if self.bus is not None else False
        for peer, s in self.sessions.items():
            while True:
                backlog = self.transport.backlog(peer)
                if backlog is None:
                    break  # link down: the session resends when it is back
                if backlog > _SEND_BACKLOG:
                    behind = behind or bool(s.outbox)
                    break
                batch = s.next_batch(limit, nbytes)
                if batch is None or not self._send(peer, batch):
                    break
                self._sent.set()
            if s.take_repair():
                self._send_digests(peer, urgent=True)
        if behind:
            asyncio.get_running_loop().call_later(0.002, self._flush_soon)

    def _publish(self, limit: int, nbytes: int) -> bool:
        """The bus outbox into the stream, while the stream keeps up; whether records wait.
        A batch the transport refuses goes back into the outbox, where newer records of its
        keys win."""
        assert self.bus is not None
        while self._bus_outbox:
            if self.bus.publish_backlog() > _PUBLISH_BACKLOG:
                return True
            packed = self._bus_outbox.take_batch(limit, nbytes)
            batch = Batch(self.node, 0, packed)
            if not self.bus.publish(batch, self._published):
                self._bus_outbox.add(packed)
                return True
        if self._bus_outbox.take_overflow():  # records were dropped: digests repair them
            self.digest_round(every=True)
        return False

    def _published(self, ok: bool) -> None:
        self._sent.set()
        if self._bus_outbox:
            self._flush_soon()


def _keeper(map: str, bucket: int, nodes: Sequence[str]) -> str:
    """The node of ``nodes`` that keeps ``map``'s bucket's snapshot: the highest hash of the
    (map, bucket, node) triple (rendezvous hashing: one node's leaving moves its buckets only)."""
    return max(nodes, key=lambda n: hashlib.blake2b(
        f"{map}\0{bucket}\0{n}".encode(), digest_size=8).digest())


def _incarnation(ev: PeerUp | PeerDown | Received | Streamed) -> int | None:
    return ev.incarnation if isinstance(ev, Received) else None
