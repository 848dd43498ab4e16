"""MemoryNetwork keeps the Transport contract, so layers above can be tested without sockets."""

from __future__ import annotations

import pytest
from transport_harness import batch, hello, run

from bpfsync.core.messages import Ack, Batch, Record, Stamp
from bpfsync.transport import OversizedMessageError, PeerDown, PeerUp, Received, Transport
from bpfsync.transport.base import Event
from bpfsync.transport.memory import MemoryNetwork, MemoryTransport


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
