"""An in-memory cluster for the sans-I/O core, driven the way the agent drives it.

Each SimNode has a Replica, a simulated kernel (a dict per map) and a PeerSession per peer. A Mesh
joins nodes by ordered in-memory streams, one per direction as GrpcMesh does: a stream starts
with the sender's Hello; bringing our stream up is the transport's PeerUp (``link_up``); taking
it down loses whatever was in flight. Every kernel write the replica asks for is applied and then
reported back as a poll watcher would, and the harness checks the replica calls it an echo.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from bpfsync.core.messages import Ack, Batch, Digest, Hello, MapSchema, Message, Pull, Record
from bpfsync.core.outbox import Outbox, split
from bpfsync.core.replica import Replica, Write
from bpfsync.core.session import PeerSession

T0 = 1_700_000_000 * 10**9  # a realistic epoch time in ns
MAX_RECORDS = 64
MAX_BYTES = 16 * 1024


class SimNode:
    def __init__(
        self,
        name: str,
        maps: Iterable[MapSchema],
        *,
        ttl_ns: int = 60 * 10**9,
        incarnation: int = 1,
        nbuckets: int = 64,
        relay: bool = True,
    ) -> None:
        self.name = name
        self.maps = tuple(maps)
        self.ttl_ns = ttl_ns
        self.nbuckets = nbuckets
        self.relay = relay
        self.incarnation = incarnation
        self.replica = Replica(name, self.maps, ttl_ns, digest_buckets=nbuckets)
        self.kernel: dict[str, dict[bytes, bytes]] = {m.name: {} for m in self.maps}
        self.sessions: dict[str, PeerSession] = {}
        self.local_records = 0  # records made by local changes (echoes must not count)

    def hello(self) -> Hello:
        return Hello(self.name, self.incarnation, self.maps)

    def session(self, peer: str) -> PeerSession:
        if peer not in self.sessions:
            outbox = Outbox(per_origin_maps=self.replica.per_origin_maps)
            self.sessions[peer] = PeerSession(self.name, peer, outbox=outbox)
        return self.sessions[peer]

    def restart(self, incarnation: int) -> None:
        """The agent restarts: replica and sessions are lost, the kernel maps stay."""
        self.incarnation = incarnation
        self.replica = Replica(self.name, self.maps, self.ttl_ns, digest_buckets=self.nbuckets)
        self.sessions = {}
        for m in self.maps:  # seeded records reach peers by the first-contact repair
            self.replica.seed(m.name, list(self.kernel[m.name].items()))

    def write(self, map: str, key: bytes, value: bytes | None, now: int) -> Record | None:
        """The data plane writes (or deletes) a key; the watcher reports it."""
        if value is None:
            self.kernel[map].pop(key, None)
        else:
            self.kernel[map][key] = value
        rec = self.replica.local_change(map, key, value, now)
        if rec is not None:
            self.local_records += 1
            self.broadcast([rec])
        return rec

    def apply(self, writes: Iterable[Write], now: int) -> None:
        """The agent applies the replica's writes; a poll watcher then reports them back."""
        for map, key, value in writes:
            if value is None:
                self.kernel[map].pop(key, None)
            else:
                self.kernel[map][key] = value
            echo = self.replica.local_change(map, key, self.kernel[map].get(key), now)
            assert echo is None, f"{self.name}: own write of {key!r} was re-stamped as {echo}"

    def broadcast(self, records: list[Record], skip: str | None = None) -> None:
        for peer, session in self.sessions.items():
            if peer != skip:
                session.outbox.add(records)


class Mesh:
    def __init__(self, *nodes: SimNode) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.now = T0
        self.streams: dict[tuple[str, str], deque[Message]] = {}
        self.delivered = 0

    # --- links -------------------------------------------------------------------------------

    def connect(self, a: str, b: str) -> None:
        for src, dst in ((a, b), (b, a)):
            if (src, dst) in self.streams:
                continue
            self.streams[(src, dst)] = deque([self.nodes[src].hello()])
            session = self.nodes[src].session(dst)
            for batch in session.link_up(self.nodes[dst].hello()):
                self.streams[(src, dst)].append(batch)

    def disconnect(self, a: str, b: str) -> None:
        for src, dst in ((a, b), (b, a)):
            if self.streams.pop((src, dst), None) is not None:
                self.nodes[src].session(dst).link_down()

    def isolate(self, name: str) -> None:
        for src, dst in list(self.streams):
            if name in (src, dst):
                self.disconnect(src, dst)

    def send(self, src: str, dst: str, msg: Message) -> None:
        stream = self.streams.get((src, dst))
        if stream is not None:  # a down link refuses, like Transport.send
            stream.append(msg)

    # --- driving -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Every node sends what it has: repair digests, then numbered batches."""
        for node in self.nodes.values():
            for peer, session in node.sessions.items():
                if (node.name, peer) not in self.streams:
                    continue
                if session.take_repair():
                    self.send_digests(node.name, peer)
                while (batch := session.next_batch(MAX_RECORDS, MAX_BYTES)) is not None:
                    self.send(node.name, peer, batch)

    def send_digests(self, src: str, dst: str) -> None:
        for m in self.nodes[src].maps:
            self.send(src, dst, self.nodes[src].replica.digest(m.name))

    def anti_entropy(self) -> None:
        """The agent's periodic digest round: every node to every peer it can reach."""
        for src, dst in list(self.streams):
            self.send_digests(src, dst)

    def step(self) -> bool:
        self.flush()
        moved = False
        for (src, dst), stream in list(self.streams.items()):
            if stream:
                msg = stream.popleft()
                self.deliver(self.nodes[dst], src, msg)
                moved = True
        return moved

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise AssertionError("mesh did not go quiet")

    def deliver(self, node: SimNode, src: str, msg: Message) -> None:
        self.delivered += 1
        session = node.session(src)
        replica = node.replica
        if isinstance(msg, Hello):
            self.send(node.name, src, session.on_hello(msg))
        elif isinstance(msg, Ack):
            session.on_ack(msg)
        elif isinstance(msg, Batch):
            if session.on_batch(msg, self.nodes[src].incarnation):
                res = replica.receive(msg.records, self.now, src)
                assert not res.rejected, res.rejected
                node.apply(res.writes, self.now)
                if node.relay:
                    node.broadcast(res.forward, skip=src)
                session.outbox.add(res.reply)
            if msg.seq:
                self.send(node.name, src, session.ack())
        elif isinstance(msg, Digest):
            pull, parts = replica.answer_digest(msg, src, part=MAX_RECORDS)
            if pull is not None:  # first, so it is answered from src's state (peering.py)
                self.send(node.name, src, pull)
            for part in parts:
                for chunk in split(part, MAX_RECORDS, MAX_BYTES):
                    self.send(node.name, src, session.repair_batch(chunk))
        elif isinstance(msg, Pull):
            for chunk in split(replica.answer_pull(msg, src), MAX_RECORDS, MAX_BYTES):
                self.send(node.name, src, session.repair_batch(chunk))

    # --- checks ------------------------------------------------------------------------------

    def contents(self, map: str) -> dict[str, dict[bytes, bytes]]:
        return {name: node.replica.content(map) for name, node in self.nodes.items()}

    def assert_converged(self, map: str) -> dict[bytes, bytes]:
        """Every replica holds the same content and digest, and every kernel matches it."""
        first = next(iter(self.nodes.values()))
        want = first.replica.content(map)
        digest = first.replica.digest(map)
        for node in self.nodes.values():
            assert node.replica.content(map) == want, f"{node.name} differs from {first.name}"
            assert node.kernel[map] == want, f"{node.name}'s kernel differs from its replica"
            assert node.replica.digest(map) == digest, f"{node.name}'s digest differs"
        return want
