"""Routine anti-entropy between two real Peering instances over the in-memory transport: a
divergence no batch carries is repaired once it has been seen stable across two digests, and
one routine answer repairs at most ``_ROUTINE_BUCKETS`` buckets (in-flight differences under
load must not turn into whole-map exchanges)."""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

import pytest
from aio import eventually

from bpfsync.agent import peering as peering_mod
from bpfsync.agent.config import SyncConfig
from bpfsync.agent.metrics import AgentMetrics
from bpfsync.agent.peering import Peering
from bpfsync.core.messages import Batch, Hello, MapSchema, Record, Stamp
from bpfsync.core.replica import Replica
from bpfsync.transport.memory import MemoryNetwork, MemoryTransport

SCHEMA = MapSchema("m", 4, 8)


def node(net: MemoryNetwork, name: str, sync: SyncConfig | None = None,
         ) -> tuple[Peering, Replica]:
    replica = Replica(name, [SCHEMA], 3600 * 10**9)
    transport = net.transport(Hello(name, 1, (SCHEMA,)))
    p = Peering(
        name, replica, [SCHEMA], transport, sync or SyncConfig(), AgentMetrics(),
        outbox_records=1 << 16,
        on_records=lambda peer, recs, repair: replica.receive(recs, time.time_ns(), peer,
                                                             replies=not repair),
        on_caught_up=lambda *_: None,
        catching_up=lambda: False,
    )  # fmt: skip
    return p, replica


def diverge(replica: Replica, keys: range) -> None:
    """Records only ``replica`` holds, as if their batch had been lost on the way."""
    now = time.time_ns()
    recs = [Record("m", struct.pack("<I", k), struct.pack("<Q", k), Stamp(now, k + 1, "z"))
            for k in keys]  # fmt: skip
    replica.receive(recs, now, "z")


def with_pair(
    body: Callable[[Peering, Replica, Peering, Replica], Awaitable[None]],
    net: MemoryNetwork | None = None,
) -> None:
    """Two linked peers a and b on ``net`` (a new one by default) while ``body`` runs."""
    network = net or MemoryNetwork()

    async def main() -> None:
        a, ra = node(network, "a")
        b, rb = node(network, "b")
        await a.transport.start()
        await b.transport.start()
        tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
        await asyncio.sleep(0.05)  # links up, first-contact (urgent) repairs done
        try:
            await body(a, ra, b, rb)
        finally:
            await a.transport.close()
            await b.transport.close()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


async def round_(p: Peering) -> None:
    p.digest_round()
    await asyncio.sleep(0.05)


def test_a_stable_divergence_is_repaired_at_the_second_routine_digest() -> None:
    async def body(a: Peering, ra: Replica, b: Peering, rb: Replica) -> None:
        diverge(rb, range(5))
        await round_(a)  # b sees a's digest for the first time since: nothing to compare with
        assert ra.registers("m") == 0
        await round_(a)  # same hashes on both sides as last time: a real divergence
        assert ra.content("m") == rb.content("m") and ra.registers("m") == 5

    with_pair(body)


def test_one_routine_answer_repairs_a_bounded_number_of_buckets() -> None:
    async def body(a: Peering, ra: Replica, b: Peering, rb: Replica) -> None:
        diverge(rb, range(20_000))  # every one of the 1024 buckets differs
        await round_(a)
        await round_(a)
        ours, theirs = ra.digest("m").buckets, rb.digest("m").buckets
        same = sum(x == y for x, y in zip(ours, theirs, strict=True))
        assert same == peering_mod._ROUTINE_BUCKETS  # of 1024 differing buckets
        for _ in range(1024 // peering_mod._ROUTINE_BUCKETS + 2):
            await round_(a)  # bucket by bucket, every one in turn
        assert ra.content("m") == rb.content("m")

    with_pair(body)


def test_a_routine_round_goes_to_fanout_peers_at_random_and_repairs_every_node() -> None:
    """Six nodes, fanout 2: each round sends a's digests to two peers, a different pair from
    round to round (every peer within a few rounds); what one node alone holds reaches every
    other through the peers that compare with it, whether or not a's round named them."""
    names = ["a", "b", "c", "d", "e", "f"]

    async def main() -> None:
        net = MemoryNetwork()
        nodes = [node(net, n, SyncConfig(digest_fanout=2)) for n in names]
        for p, _ in nodes:
            await p.transport.start()
        tasks = [asyncio.create_task(p.run()) for p, _ in nodes]
        await asyncio.sleep(0.1)  # links up, first-contact (urgent) repairs done
        a = nodes[0][0]
        try:
            to: list[str] = []
            original = a.transport.send
            a.transport.send = lambda peer, msg: (  # type: ignore[method-assign]
                to.append(peer) if type(msg).__name__ == "Digest" else None,
                original(peer, msg))[1]
            met: set[str] = set()
            for _ in range(40):
                to.clear()
                a.digest_round()
                assert len(set(to)) == 2, to
                met |= set(to)
            assert met == set(names[1:])  # 40 rounds of 2 of 5: one missed has p 5 * 0.6^40
            to.clear()
            a.digest_round(every=True)
            assert set(to) == set(names[1:])
            a.transport.send = original  # type: ignore[method-assign]
            diverge(nodes[-1][1], range(50))  # f alone holds 50 records
            for _ in range(100):
                if all(r.registers("m") == 50 for _, r in nodes):
                    break
                for p, _ in nodes:
                    p.digest_round()
                await asyncio.sleep(0.02)
            assert [r.registers("m") for _, r in nodes] == [50] * 6
        finally:
            for p, _ in nodes:
                await p.transport.close()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def test_no_routine_digest_while_records_for_the_peer_wait() -> None:
    async def body(a: Peering, ra: Replica, b: Peering, rb: Replica) -> None:
        sent = []
        original = a.transport.send
        a.transport.send = lambda peer, msg: sent.append(msg) or original(peer, msg)  # type: ignore[method-assign]
        a.sessions["b"].outbox.add([Record("m", b"\0\0\0\1", b"\0" * 8, Stamp(1, 1, "a"))])
        a.digest_round()
        assert not any(type(m).__name__ == "Digest" for m in sent)

    with_pair(body)


def test_behind_while_records_wait_for_a_linked_peer_only() -> None:
    """The agent's housekeeping (freezing quiet buckets) waits while a peer waits for us; a
    peer that is down must not hold it off for the length of the outage."""

    async def body(a: Peering, ra: Replica, b: Peering, rb: Replica) -> None:
        assert not a.behind()
        now = time.time_ns()
        recs = [ra.local_change("m", struct.pack("<I", k), struct.pack("<Q", k), now)
                for k in range(3)]  # fmt: skip
        a.broadcast([r for r in recs if r is not None])
        assert a.behind()  # queued for b
        await eventually(lambda: not a.behind(), "b acknowledging", timeout=1.0, every=0.02)
        assert not a.behind() and rb.registers("m") == 3  # sent and acknowledged
        a._linked.discard("b")  # b is down: what waits for it waits for its return
        a.sessions["b"].outbox.add([Record("m", b"\0\0\0\x09", b"\0" * 8, Stamp(1, 1, "a"))])
        assert not a.behind()

    with_pair(body)


def catch_up(seeded: int) -> tuple[Replica, Replica, dict[str, list[object]], list[object]]:
    """a holds 3000 records; b starts with ``seeded`` of their keys in its map (a restart) and
    catches up from a (it sends an urgent digest at link-up). Returns both replicas, what each
    node sent, and b's catch-up reports, once b reported caught up and both agree."""
    sent: dict[str, list[object]] = {"a": [], "b": []}
    caught_up: list[object] = []

    async def main() -> tuple[Replica, Replica]:
        net = MemoryNetwork()
        a, ra = node(net, "a")
        diverge(ra, range(3000))
        b, rb = node(net, "b")
        rb.seed("m", [(struct.pack("<I", k), struct.pack("<Q", k)) for k in range(seeded)])
        b._on_caught_up = lambda *args: caught_up.append(args)
        b._catching_up = lambda: True
        for p in (a, b):
            original = p.transport.send
            p.transport.send = (lambda peer, msg, log=sent[p.node], send=original:  # type: ignore[method-assign]
                                log.append(msg) or send(peer, msg))  # fmt: skip
        await a.transport.start()
        await b.transport.start()
        tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
        try:
            await eventually(lambda: caught_up and rb.digest("m") == ra.digest("m"),
                             "b caught up from a", timeout=2.0, every=0.02)
        finally:
            await a.transport.close()
            await b.transport.close()
            await asyncio.gather(*tasks, return_exceptions=True)
        return ra, rb

    ra, rb = asyncio.run(main())
    return ra, rb, sent, caught_up


def records_sent(msgs: list[object]) -> int:
    return sum(len(m.records) for m in msgs if isinstance(m, Batch))


def test_a_fresh_node_sends_nothing_back_of_its_catch_up() -> None:
    """The answer to a digest puts its Pull before its records: a fresh node answers that Pull
    from its empty state, not with the records it is being sent (which it used to return)."""
    ra, rb, sent, caught_up = catch_up(seeded=0)
    filled = sum(1 for h in ra.digest("m").buckets if h)
    assert caught_up == [("m", "a", filled)]
    assert rb.content("m") == ra.content("m") and rb.registers("m") == 3000
    assert records_sent(sent["b"]) == 0
    assert ra.stats["received.ignored"] == 0


def test_a_node_restarting_on_its_map_is_sent_each_record_once() -> None:
    """A restarted node's entries come back with seed stamps, which rank lowest: it is sent
    every record. Its own records go back once, answering the Pull of the digest answer; the
    peer neither replies to them (R2) nor answers a Pull crossing its answer with the same
    records again: its answer carries them already."""
    ra, rb, sent, _ = catch_up(seeded=3000)
    assert rb.content("m") == ra.content("m") and rb.registers("m") == 3000
    assert {n: records_sent(msgs) for n, msgs in sent.items()} == {"a": 3000, "b": 3000}


def test_room_for_local_changes_is_a_linked_peer_short_of_records() -> None:
    """The agent stamps local changes while some linked peer has fewer than N records queued:
    wait_for_room returns once a flush leaves one short, after its timeout while no link takes
    any, and at once when no peer is linked (records for a peer that is down wait anyway)."""

    async def body(a: Peering, ra: Replica, b: Peering, rb: Replica) -> None:
        now = time.time_ns()
        recs = [ra.local_change("m", struct.pack("<I", k), struct.pack("<Q", k), now)
                for k in range(20)]  # fmt: skip
        a.broadcast([r for r in recs if r is not None])
        assert a.queued() == 20
        await asyncio.wait_for(a.wait_for_room(10, 60.0), 10)  # the flush sends them
        assert a.queued() < 10
        await eventually(lambda: rb.registers("m") == 20, "b holding the 20 records",
                         timeout=1.0, every=0.02)
        assert rb.registers("m") == 20

        a.transport.backlog = lambda peer: 1 << 30  # type: ignore[method-assign]
        a.sessions["b"].outbox.add([Record("m", struct.pack("<I", k), b"\0" * 8,
                                           Stamp(now, 1, "a")) for k in range(20)])  # fmt: skip
        await asyncio.wait_for(a.wait_for_room(10, 0.2), 10)  # nothing leaves: the timeout
        assert a.queued() == 20

        a._linked.discard("b")
        assert a.queued() == 0
        await asyncio.wait_for(a.wait_for_room(10, 60.0), 10)

    with_pair(body)


def sample(p: Peering, name: str, **labels: str) -> float | None:
    return p.metrics.registry.get_sample_value(name, labels)


def test_lag_counts_records_queued_and_records_sent_but_not_acknowledged() -> None:
    """``bpfsync_peer_lag_records`` (set by ``peers()``, which the agent calls at each status
    refresh) and the /status row: the outbox, then the batches in flight, then nothing."""
    net = MemoryNetwork()

    async def body(a: Peering, ra: Replica, b: Peering, rb: Replica) -> None:
        def row() -> dict[str, object]:
            return next(r for r in a.peers() if r["node"] == "b")

        assert row()["lag_records"] == 0 and sample(a, "bpfsync_peer_lag_records",
                                                    peer="b") == 0
        backlog = a.transport.backlog
        a.transport.backlog = lambda peer: 1 << 30  # type: ignore[method-assign]
        now = time.time_ns()
        recs = [ra.local_change("m", struct.pack("<I", k), struct.pack("<Q", k), now)
                for k in range(20)]  # fmt: skip
        a.broadcast([r for r in recs if r is not None])
        await asyncio.sleep(0.05)  # the link is backed up: they wait in the outbox
        assert (row()["queued_records"], row()["unacked_records"]) == (20, 0)
        assert sample(a, "bpfsync_peer_lag_records", peer="b") == 20

        net.hold("a", "b")  # sent, but b neither gets them nor acks them
        a.transport.backlog = backlog  # type: ignore[method-assign]
        a.broadcast([])
        a._flush_soon()
        await asyncio.sleep(0.05)
        assert (row()["queued_records"], row()["unacked_records"]) == (0, 20)
        assert row()["lag_records"] == 20 and row()["unacked_batches"] == 1
        assert sample(a, "bpfsync_peer_lag_records", peer="b") == 20

        net.release("a", "b")
        await eventually(lambda: row()["lag_records"] == 0, "b acknowledging", timeout=1.0,
                         every=0.02)
        assert sample(a, "bpfsync_peer_lag_records", peer="b") == 0
        assert rb.registers("m") == 20

    with_pair(body, net)


def test_divergent_buckets_are_those_stable_at_the_peers_routine_digest() -> None:
    """``bpfsync_divergent_buckets{peer, map}``: 0 at the first digest (nothing to compare
    with), the stably differing buckets at the next (all of them, also those the answer leaves
    for later rounds), 0 once repaired, and gone while the peer is down."""

    async def body(a: Peering, ra: Replica, b: Peering, rb: Replica) -> None:
        diverge(rb, range(3000))
        differing = sum(x != y for x, y in zip(ra.digest("m").buckets, rb.digest("m").buckets,
                                               strict=True))
        assert differing > 2 * peering_mod._ROUTINE_BUCKETS
        await round_(a)
        assert sample(b, "bpfsync_divergent_buckets", peer="a", map="m") == 0
        await round_(a)
        assert sample(b, "bpfsync_divergent_buckets", peer="a", map="m") == differing
        await round_(a)  # 64 repaired by the previous answer
        assert sample(b, "bpfsync_divergent_buckets", peer="a", map="m") == (
            differing - peering_mod._ROUTINE_BUCKETS)
        for _ in range(1024 // peering_mod._ROUTINE_BUCKETS + 2):
            await round_(a)
        assert ra.content("m") == rb.content("m")
        assert sample(b, "bpfsync_divergent_buckets", peer="a", map="m") == 0
        assert sample(a, "bpfsync_divergent_buckets", peer="b", map="m") is None  # b sent none
        b._peer_down("a", None)
        assert sample(b, "bpfsync_divergent_buckets", peer="a", map="m") is None

    with_pair(body)


class ShelfBus(MemoryTransport):
    """A memory transport that is also a bus (a Publisher): it keeps each snapshot given."""

    def __init__(self, net: MemoryNetwork, hello: Hello) -> None:
        super().__init__(net, hello)
        self.shelf: dict[int, int] = Counter()  # bucket -> times stored

    def publish(self, batch: Batch, done: Callable[[bool], None] | None = None) -> bool:
        return True

    def publish_backlog(self) -> int:
        return 0

    def put_snapshot(self, map: str, bucket: int, blob: bytes) -> bool:
        self.shelf[bucket] += 1
        return True

    @property
    def max_message_bytes(self) -> int:
        return 1 << 20

    @property
    def connected(self) -> bool:
        return True

    def describe(self) -> Mapping[str, object]:
        return {"kind": "shelf"}


def test_snapshot_rounds_cut_by_their_budget_store_every_bucket_while_all_keep_moving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writes land in every bucket between two rounds, and a round's budget holds a few
    buckets: the rounds still go round every bucket, the longest unstored first."""
    monkeypatch.setattr(peering_mod, "_SNAPSHOT_BYTES", 1)  # one bucket a round
    buckets = 16
    replica = Replica("a", [SCHEMA], 3600 * 10**9, digest_buckets=buckets)
    bus = ShelfBus(MemoryNetwork(), Hello("a", 1, (SCHEMA,)))
    p = Peering(
        "a", replica, [SCHEMA], bus, SyncConfig(digest_buckets=buckets), AgentMetrics(),
        outbox_records=1 << 16, on_records=lambda *_: None, on_caught_up=lambda *_: None,
        catching_up=lambda: False, snapshot_every=1.0,
    )  # fmt: skip
    assert p.bus is bus
    rounds = 2 * buckets
    for r in range(rounds):
        diverge(replica, range(r * 400, (r + 1) * 400))  # every bucket moves
        p.snapshot_round(float(2 * r))
    assert sorted(bus.shelf) == list(range(buckets)), bus.shelf
    assert max(bus.shelf.values()) - min(bus.shelf.values()) <= 1, bus.shelf  # round robin
