"""natsbus.py's rules against a real nats-server: presence by Hello, messages to one node, the
change stream (published once, read by each node's durable consumer, acknowledged once
handled), snapshots for a node without state, and what it refuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
from aio import run
from natslab import NatsServer

from bpfsync.core.frozen import seal
from bpfsync.core.membership import Membership
from bpfsync.core.messages import Batch, Digest, Hello, MapSchema, Record, Stamp
from bpfsync.core.register import pack
from bpfsync.core.table import records_layout
from bpfsync.errors import OversizedMessageError
from bpfsync.transport import codec
from bpfsync.transport.base import Event, PeerUp, Received, Streamed, StreamRead
from bpfsync.transport.natsbus import SNAPSHOT, NatsBus, NatsOptions

MAPS = (MapSchema("m", 4, 8),)
MEMBERS = ("a", "b", "c")


def record(key: int, value: int, node: str = "a") -> Record:
    return Record("m", key.to_bytes(4, "little"), value.to_bytes(8, "little"),
                  Stamp(time.time_ns(), 0, node))


def bus(server: NatsServer, node: str, incarnation: int = 1, *, fresh: bool = False,
        cluster: str = "t", buckets: int = 1024) -> NatsBus:
    options = NatsOptions(servers=(server.url,), cluster=cluster, hello_interval=0.2,
                          peer_timeout=1.0, digest_buckets=buckets)
    return NatsBus(Hello(node, incarnation, MAPS), options, Membership(node, MEMBERS),
                   fresh=fresh)


class Events:
    """What a bus delivers, read on a task as the agent would (so that acks follow)."""

    def __init__(self, b: NatsBus) -> None:
        self.seen: list[Event] = []
        self._task = asyncio.create_task(self._read(b.events()))

    async def _read(self, events: AsyncIterator[Event]) -> None:
        async for ev in events:
            self.seen.append(ev)

    async def until(self, cond: Callable[[list[Event]], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond(self.seen):
            assert time.monotonic() < deadline, f"not within {timeout} s: {self.seen}"
            await asyncio.sleep(0.02)

    def streamed(self) -> list[Streamed]:
        return [ev for ev in self.seen if isinstance(ev, Streamed)]

    def records(self) -> int:
        """Records delivered from the stream (one fetch's batches come joined)."""
        return sum(len(ev.message.records) for ev in self.streamed() if ev.peer != SNAPSHOT)


async def both(*coros: Awaitable[None]) -> None:
    await asyncio.gather(*coros)


def test_peers_meet_by_hello_and_talk_one_to_one(nats_server: NatsServer) -> None:
    async def body() -> None:
        a, b = bus(nats_server, "a"), bus(nats_server, "b")
        await both(a.start(), b.start())
        ea, eb = Events(a), Events(b)
        await eb.until(lambda s: any(isinstance(e, PeerUp) and e.peer == "a" for e in s))
        # the Hello comes first, as on a mesh link
        first = next(e for e in eb.seen if getattr(e, "peer", None) == "a")
        assert isinstance(first, Received) and isinstance(first.message, Hello)
        await ea.until(lambda s: any(isinstance(e, PeerUp) for e in s))
        assert a.send("b", Digest("m", (1, 2, 3)))
        await eb.until(lambda s: any(isinstance(e, Received) and isinstance(e.message, Digest)
                                     for e in s))  # fmt: skip
        assert not a.send("c", Digest("m", (1,)))  # c is not up: refused, as on the mesh
        await a.close()
        await eb.until(lambda s: any(getattr(e, "peer", None) == "a" and type(e).__name__
                                     == "PeerDown" for e in s), 5)  # fmt: skip
        await b.close()

    run(body, timeout=60)


def test_a_batch_is_published_once_and_read_by_every_other_node(
    nats_server: NatsServer,
) -> None:
    async def body() -> None:
        a, b, c = (bus(nats_server, n) for n in MEMBERS)
        await both(a.start(), b.start(), c.start())
        ea, eb, ec = Events(a), Events(b), Events(c)
        for e in (eb, ec):
            await e.until(lambda s: any(isinstance(x, StreamRead) for x in s))
        assert a.publish(Batch("a", 0, (record(1, 7),)))
        for e in (eb, ec):
            await e.until(lambda s: len([x for x in s if isinstance(x, Streamed)]) == 1)
        assert eb.streamed()[0].message.records[0].value == (7).to_bytes(8, "little")
        await asyncio.sleep(0.3)
        assert not ea.streamed()  # its own batches are not handed back
        assert a.stats["published"] == 1
        for x in (a, b, c):
            await x.close()

    run(body, timeout=60)


def test_a_restarted_node_reads_what_it_missed_and_nothing_it_handled(
    nats_server: NatsServer,
) -> None:
    async def body() -> None:
        a, b = bus(nats_server, "a"), bus(nats_server, "b")
        await both(a.start(), b.start())
        eb = Events(b)
        await eb.until(lambda s: any(isinstance(x, StreamRead) for x in s))
        a.publish(Batch("a", 0, (record(1, 1),)))
        await eb.until(lambda s: len([x for x in s if isinstance(x, Streamed)]) == 1)
        await asyncio.sleep(0.3)  # b asked for its next event: the first is acknowledged
        await b.close()
        a.publish(Batch("a", 0, (record(2, 2),)))
        await asyncio.sleep(0.5)
        again = bus(nats_server, "b", incarnation=2)
        await again.start()
        e2 = Events(again)
        await e2.until(lambda s: any(isinstance(x, StreamRead) for x in s))
        keys = [r.key for ev in e2.streamed() for r in ev.message.records]
        assert keys == [(2).to_bytes(4, "little")]  # only what it missed
        await a.close()
        await again.close()

    run(body, timeout=60)


def test_a_restart_reads_first_what_its_last_run_was_given_and_never_handled(
    nats_server: NatsServer,
) -> None:
    """b's last run fetched three messages its agent never handled (never acknowledged):
    the next run has them before it says the stream is read, not after their ack wait."""
    async def body() -> None:
        a, b = bus(nats_server, "a"), bus(nats_server, "b")
        await both(a.start(), b.start())  # b's events are never read: nothing is handled
        for k in range(3):
            a.publish(Batch("a", 0, (record(k, k),)))
        deadline = time.monotonic() + 10
        while b.stats.get("streamed", 0) < 3:
            assert time.monotonic() < deadline, b.stats
            await asyncio.sleep(0.05)
        await b.close()
        again = bus(nats_server, "b", incarnation=2)
        await again.start()
        e2 = Events(again)
        await e2.until(lambda s: any(isinstance(x, StreamRead) for x in s), 10)
        read_at = next(i for i, x in enumerate(e2.seen) if isinstance(x, StreamRead))
        before = [r.key for ev in e2.seen[:read_at] if isinstance(ev, Streamed)
                  for r in ev.message.records]
        assert sorted(before) == [k.to_bytes(4, "little") for k in range(3)], e2.seen
        await a.close()
        await again.close()

    run(body, timeout=60)


def test_a_node_without_state_reads_the_snapshots_before_the_stream(
    nats_server: NatsServer,
) -> None:
    async def body() -> None:
        a = bus(nats_server, "a")
        await a.start()
        recs = [record(k, k) for k in range(5)]
        keys = [r.key for r in recs]
        packs = [pack(r.stamp, r.value) for r in recs]
        assert a.put_snapshot("m", 3, seal(records_layout(keys, packs, 4), 0))
        await asyncio.sleep(0.5)
        assert a.stats["snapshots_stored"] == 1
        new = bus(nats_server, "c", fresh=True)
        await new.start()
        ec = Events(new)
        await ec.until(lambda s: any(isinstance(x, StreamRead) for x in s))
        (snap,) = [ev for ev in ec.streamed() if ev.peer == SNAPSHOT]
        assert sorted(r.key for r in snap.message.records) == sorted(keys)
        # StreamRead comes after the snapshots
        assert ec.seen.index(snap) < next(i for i, x in enumerate(ec.seen)
                                          if isinstance(x, StreamRead))  # fmt: skip
        await a.close()
        await new.close()

    run(body, timeout=60)


@pytest.mark.parametrize("complete", [True, False])
def test_a_fresh_node_skips_the_stream_every_snapshot_holds(
    nats_server: NatsServer, complete: bool,
) -> None:
    """Snapshots carry the stream sequence their writer had handled: a node without state
    starts its consumer after the lowest, when every digest bucket has a snapshot; with one
    missing it reads the whole stream."""
    async def body() -> None:
        a, b = bus(nats_server, "a", buckets=2), bus(nats_server, "b", buckets=2)
        await both(a.start(), b.start())
        eb = Events(b)
        await eb.until(lambda s: any(isinstance(x, StreamRead) for x in s))
        for k in range(3):
            assert a.publish(Batch("a", 0, (record(k, k),)))
        await eb.until(lambda _: eb.records() == 3)
        await asyncio.sleep(0.3)  # b asked for its next event: all three are handled
        held = [record(k, k) for k in range(3)]
        blob = seal(records_layout([r.key for r in held],
                                   [pack(r.stamp, r.value) for r in held], 4), 0)
        for bucket in (0, 1) if complete else (0,):
            assert b.put_snapshot("m", bucket, blob)
        assert a.publish(Batch("a", 0, (record(9, 9),)))  # after the snapshots
        await eb.until(lambda _: eb.records() == 4)
        await asyncio.sleep(0.3)
        new = bus(nats_server, "c", fresh=True, buckets=2)
        await new.start()
        ec = Events(new)
        await ec.until(lambda s: any(isinstance(x, StreamRead) for x in s))
        streamed = [r.key for ev in ec.streamed() if ev.peer != SNAPSHOT
                    for r in ev.message.records]
        if complete:
            assert new.stats["stream_skipped_to"] == 3, new.stats
            assert streamed == [(9).to_bytes(4, "little")]  # only what the snapshots lack
        else:
            assert "stream_skipped_to" not in new.stats
            assert len(streamed) == 4
        for x in (a, b, new):
            await x.close()

    run(body, timeout=60)


def test_it_refuses_batches_of_non_members_and_on_other_nodes_subjects(
    nats_server: NatsServer,
) -> None:
    async def body() -> None:
        b = bus(nats_server, "b")
        await b.start()
        eb = Events(b)
        await eb.until(lambda s: any(isinstance(x, StreamRead) for x in s))
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.publish("t.changes.mallory", codec.encode(Batch("mallory", 0, (record(1, 1),))))
        await js.publish("t.changes.c", codec.encode(Batch("a", 0, (record(2, 2),))))
        await js.publish("t.changes.a", b"not a frame")
        await nc.publish("t.hello.mallory", codec.encode(Hello("mallory", 9, MAPS)))
        await nc.publish("t.hello.c", codec.encode(Hello("a", 9, MAPS)))  # on c's subject
        # a message to b on a's subject, for a that is not up, and one naming no sender
        await nc.publish(f"t.to.{b'b'.hex()}.{b'a'.hex()}", b"x",
                         headers={"Bpfsync-Incarnation": "9"})
        await nc.publish(f"t.to.{b'b'.hex()}.zz", b"x", headers={"Bpfsync-Incarnation": "9"})
        await nc.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            b.stats.get("rejected_not_member", 0) >= 2 and b.stats.get("rejected_spoofed", 0) >= 2
            and b.stats.get("frames_malformed") and b.stats.get("rejected_no_hello", 0) >= 2
        ):
            await asyncio.sleep(0.05)
        assert b.stats["rejected_not_member"] >= 2, b.stats  # the batch and the Hello
        # the batch on c's subject and a's Hello on c's
        assert b.stats["rejected_spoofed"] == 2 and b.stats["frames_malformed"] == 1, b.stats
        assert b.stats["rejected_no_hello"] == 2, b.stats
        assert not eb.streamed() and not any(isinstance(x, PeerUp) for x in eb.seen)
        await b.close()

    run(body, timeout=60)


def test_a_message_over_the_servers_max_payload_is_refused_when_sent(
    nats_server: NatsServer,
) -> None:
    async def body() -> None:
        a = bus(nats_server, "a")
        await a.start()
        big = Batch("a", 0, tuple(record(k, k) for k in range(40_000)))  # > 1 MB encoded
        with pytest.raises(OversizedMessageError, match="max_payload"):
            a.publish(big)
        await a.close()

    run(body, timeout=60)


def test_a_slow_reader_holds_a_bounded_backlog_and_gets_everything_later(
    nats_server: NatsServer,
) -> None:
    """b's agent reads nothing for a while: b fetches no more than its inbox takes (the rest
    waits in the stream, not in b's memory), and reads all once its agent does."""

    async def body() -> None:
        a = bus(nats_server, "a")
        slow = NatsBus(Hello("b", 1, MAPS), NatsOptions(
            servers=(nats_server.url,), cluster="t", max_pending_messages=16),
            Membership("b", MEMBERS))  # fmt: skip
        await both(a.start(), slow.start())
        for k in range(2000):
            assert a.publish(Batch("a", 0, (record(k, k),)))
        deadline = time.monotonic() + 20
        while a.publish_backlog() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        # the inbox's bound (16 events of one fetch each), plus the fetch that waits to put
        # its messages in
        assert slow.stats["streamed"] <= (16 + 1) * 64, slow.stats
        es = Events(slow)
        await es.until(lambda _: es.records() == 2000, 30)
        await a.close()
        await slow.close()

    run(body, timeout=90)
