"""MemoryNetwork keeps the Transport contract, so layers above can be tested without sockets."""

from __future__ import annotations

import asyncio

import pytest
from aio import run
from transport_harness import batch, hello

from bpfsync.core.messages import Ack, Batch, Record, Stamp
from bpfsync.errors import MalformedMessageError
from bpfsync.transport import OversizedMessageError, PeerDown, PeerUp, Received, Transport
from bpfsync.transport.base import Event
from bpfsync.transport.memory import MemoryNetwork, MemoryTransport
from bpfsync.transport.penalty import Penalties


async def take(t: MemoryTransport, n: int) -> list[Event]:
    out: list[Event] = []
    async for ev in t.events():
        out.append(ev)
        if len(out) == n:
            break
    return out


def test_links_messages_cut_and_heal() -> None:
    async def go() -> None:
        net = MemoryNetwork(max_message_bytes=4096)
        ha, hb = hello("a"), hello("b")
        a, b = net.transport(ha), net.transport(hb)
        assert isinstance(a, Transport)
        await a.start()
        await b.start()
        assert await take(a, 2) == [PeerUp("b", hb), Received("b", hb, hb.incarnation)]
        assert await take(b, 2) == [PeerUp("a", ha), Received("a", ha, ha.incarnation)]

        assert a.send("b", batch("a", 1))
        assert b.broadcast(Ack(1)) == ["a"]
        assert await take(b, 1) == [Received("a", batch("a", 1), ha.incarnation)]
        assert await take(a, 1) == [Received("b", Ack(1), hb.incarnation)]
        assert a.peers()[0].messages_sent == 1 and a.peers()[0].messages_received == 1

        net.cut("a", "b")
        assert [type(e) for e in await take(a, 1)] == [PeerDown]
        assert not a.send("b", Ack(2))
        assert not a.peers()[0].connected
        net.heal("a", "b")
        assert await take(a, 2) == [PeerUp("b", hb), Received("b", hb, hb.incarnation)]

        with pytest.raises(OversizedMessageError):
            a.send("b", batch("a", 2, n=500))
        with pytest.raises(ValueError):  # the codec's checks apply: no empty stamp node
            a.send("b", Batch("a", 3, (Record("m", b"", b"", Stamp(0, 0, "")),)))

        await b.close()
        assert [type(e) for e in await take(a, 1)] == [PeerDown]
        assert [e async for e in b.events()] == []
        await a.close()

    run(go)


def test_a_cut_holds_while_a_node_is_off_the_network() -> None:
    """A node that joins (or rejoins, restarted) across a cut does not reach the other side."""

    async def go() -> None:
        net = MemoryNetwork()
        ha, hb = hello("a"), hello("b")
        a = net.transport(ha)
        await a.start()
        net.cut("a", "b")  # b is not on the network yet
        b = net.transport(hb)
        await b.start()
        assert not net.linked("a", "b") and not a.send("b", Ack(1))
        net.heal("a", "b")
        assert await take(a, 2) == [PeerUp("b", hb), Received("b", hb, hb.incarnation)]
        assert await take(b, 2) == [PeerUp("a", ha), Received("a", ha, ha.incarnation)]
        await a.close()
        await b.close()

    run(go)


def test_a_held_link_delivers_in_order_on_release_and_drops_on_cut() -> None:
    async def go() -> None:
        net = MemoryNetwork()
        ha, hb = hello("a"), hello("b")
        a, b = net.transport(ha), net.transport(hb)
        await a.start()
        await b.start()
        assert len(await take(b, 2)) == 2  # PeerUp, Hello
        net.hold("a", "b")
        assert a.send("b", Ack(1)) and a.send("b", Ack(2))  # the link is up: queued
        assert a.backlog("b") and b.send("a", Ack(9))  # the other direction flows
        assert await take(a, 3) == [PeerUp("b", hb), Received("b", hb, hb.incarnation),
                                    Received("b", Ack(9), hb.incarnation)]
        net.release("a", "b")
        assert a.backlog("b") == 0
        assert await take(b, 2) == [Received("a", Ack(1), ha.incarnation),
                                    Received("a", Ack(2), ha.incarnation)]
        net.hold("a", "b")
        assert a.send("b", Ack(3))
        net.cut("a", "b")  # what the link held is lost with it
        net.heal("a", "b")
        net.release("a", "b")
        assert [type(e) for e in await take(b, 3)] == [PeerDown, PeerUp, Received]  # no Ack(3)
        assert a.send("b", Ack(4))
        assert await take(b, 1) == [Received("a", Ack(4), ha.incarnation)]
        await a.close()
        await b.close()

    run(go)


def test_a_disconnect_comes_back_after_its_penalty_unless_a_test_cut_the_link() -> None:
    async def go() -> None:
        net = MemoryNetwork()
        a, b, c = (net.transport(hello(n)) for n in "abc")
        for t in (a, b, c):
            await t.start()
        a._penalties = Penalties(base=0.05, cap=0.05)
        assert a.disconnect("b", MalformedMessageError("bad", "b")) == 0.05
        assert a.disconnect("c", MalformedMessageError("bad", "c")) == 0.05
        assert not net.linked("a", "b") and not net.linked("a", "c")
        net.cut("a", "c")  # the test's own partition, during the penalty
        await asyncio.sleep(0.15)
        assert net.linked("a", "b")  # the penalty ended
        assert not net.linked("a", "c")  # the partition did not
        net.heal("a", "c")
        assert net.linked("a", "c")

    run(go)
