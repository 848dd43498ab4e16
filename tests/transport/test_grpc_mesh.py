"""GrpcMesh end to end on 127.0.0.1: links come up, messages arrive in order, links recover."""

from __future__ import annotations

import asyncio
import time

import grpc.aio
import pytest
from aio import eventually, run
from transport_harness import FAST, Node, batch, closing, free_port, mesh

from bpfsync.core.messages import Ack, Digest, Hello, Message, Pull
from bpfsync.errors import TransportError
from bpfsync.transport import GrpcMesh, MeshOptions, OversizedMessageError, PeerUp, Transport
from bpfsync.transport.grpc_mesh import resolve


def test_two_nodes_exchange_every_message_kind() -> None:
    async def go() -> None:
        a, b = await mesh(["a", "b"])
        try:
            assert isinstance(a.mesh, Transport)
            up = await a.up("b")
            assert up.hello.node == "b" and up.hello.maps == b.mesh.hello.maps

            sent: list[Message] = [
                batch("a", 1), Digest("m", (1, 2**64 - 1)), Pull("m", (0, 7)), batch("a", 2)]
            for msg in sent:
                assert a.mesh.send("b", msg)
            assert b.mesh.send("a", Ack(2))

            got = await b.received("a", 1 + len(sent))
            assert isinstance(got[0], Hello) and got[0] == a.mesh.hello  # Hello comes first
            assert got[1:] == sent  # in order, equal after the round trip
            acks = await a.received("b", 2)
            assert acks[1] == Ack(2)

            sa, sb = a.state("b"), b.state("a")
            assert sa.connected and sa.inbound and sa.address == b.address
            assert sa.messages_sent == len(sent) and sa.bytes_sent > 0
            assert sb.messages_received == len(sent)  # Hello not counted: it is the handshake
            assert sa.reconnects == 0 and sa.last_error is None and sa.queued_bytes == 0
            assert a.mesh.stats["streams_accepted"] == 1
        finally:
            await closing(a, b)

    run(go)


def test_three_nodes_broadcast() -> None:
    async def go() -> None:
        nodes = await mesh(["a", "b", "c"])
        try:
            for n in nodes:
                me = n.mesh.node
                assert sorted(n.mesh.broadcast(batch(me, 1))) == sorted({"a", "b", "c"} - {me})
                assert n.mesh.broadcast(Ack(5), to=["nobody"]) == []
            for n in nodes:
                for other in {"a", "b", "c"} - {n.mesh.node}:
                    got = await n.received(other, 2)
                    assert got[1] == batch(other, 1)
            for n in nodes:
                assert {p.node for p in n.mesh.peers() if p.connected} == (
                    {"a", "b", "c"} - {n.mesh.node})
        finally:
            await closing(*nodes)

    run(go)


def test_reconnect_after_peer_restart() -> None:
    async def go() -> None:
        a, b = await mesh(["a", "b"])
        b_port, first_incarnation = b.mesh.port, b.mesh.hello.incarnation
        try:
            assert a.mesh.send("b", batch("a", 1))
            await b.received("a", 2)

            mark = len(a.events)
            await b.close()
            down = await a.down("b", start=mark)
            assert isinstance(down.error, TransportError)
            assert isinstance(down.error.__cause__, grpc.aio.AioRpcError)  # the cause is kept
            assert not a.mesh.send("b", batch("a", 2))  # link down: refused, not buffered
            await eventually(lambda: a.state("b").last_error, "last_error on a's link to b")

            mark = len(a.events)
            b = await Node.start("b", [a.address], port=b_port)  # same address, new incarnation
            up = await a.up("b", start=mark)
            assert up.hello.incarnation != first_incarnation
            assert a.mesh.send("b", batch("a", 3))
            got = await b.received("a", 2)
            assert got[1] == batch("a", 3)  # nothing from before the restart is replayed

            st = a.state("b")
            assert st.connected and st.reconnects == 1 and st.last_error
            assert st.dropped == 0
            assert a.mesh.stats["send_refused"] == 1
        finally:
            await closing(a, b)

    run(go)


def test_peer_that_is_down_at_start_is_reached_later() -> None:
    async def go() -> None:
        port = free_port()
        a = await Node.start("a", [f"127.0.0.1:{port}"])
        try:
            await eventually(lambda: a.mesh.peers()[0].last_error, "a failed dial")
            assert not a.mesh.peers()[0].connected
            b = await Node.start("b", [a.address], port=port)
            try:
                await a.up("b")
                await b.up("a")
            finally:
                await b.close()
        finally:
            await a.close()

    run(go)


def test_the_last_error_says_when_and_the_link_since_when() -> None:
    """PeerState.last_error_at and connected_since (time.time()): what `bpfsync status` needs
    to tell an error of now from one from before the link came up."""

    async def go() -> None:
        port = free_port()
        started = time.time()
        a = await Node.start("a", [f"127.0.0.1:{port}"])
        try:
            await eventually(lambda: a.mesh.peers()[0].last_error, "a failed dial")
            st = a.mesh.peers()[0]
            assert not st.connected and st.connected_since is None
            assert st.last_error_at is not None and started <= st.last_error_at <= time.time()
            b = await Node.start("b", [a.address], port=port)
            try:
                await a.up("b")
                st = a.state("b")
                assert st.connected and st.last_error  # kept after the recovery ...
                assert st.connected_since is not None
                assert st.last_error_at <= st.connected_since <= time.time()  # ... and older
                up_since = st.connected_since
            finally:
                await b.close()
            await a.down("b")
            await eventually(lambda: (a.state("b").last_error_at or 0) > up_since,
                             "a's link to b failing again")
            assert a.state("b").connected_since is None
        finally:
            await a.close()

    run(go)


def test_a_peer_that_dials_us_is_dialed_back_at_once() -> None:
    """a failed to reach b and backs off for a minute; b starts and dials a: a dials b back at
    once (with a fresh channel: gRPC's own reconnect backoff would hold it too)."""

    async def go() -> None:
        slow = MeshOptions(backoff_base=60.0, backoff_cap=60.0, handshake_timeout=5.0)
        port = free_port()
        a = await Node.start("a", [f"127.0.0.1:{port}"], options=slow)
        try:
            await eventually(lambda: a.mesh.peers()[0].last_error, "a failed dial")
            b = await Node.start("b", [a.address], port=port, options=slow)
            try:
                await a.up("b")  # only a redial can bring it up within the 60 s backoff
                assert a.mesh._links[f"127.0.0.1:{port}"].redials == 1
            finally:
                await b.close()
        finally:
            await a.close()

    run(go)


def test_send_refusals() -> None:
    async def go() -> None:
        opts = FAST.__class__(max_message_bytes=64 * 1024, backoff_base=0.02, backoff_cap=0.25)
        a, b = await mesh(["a", "b"], options=opts)
        try:
            assert not a.mesh.send("nobody", Ack(1))
            with pytest.raises(OversizedMessageError):
                a.mesh.send("b", batch("a", 1, n=5000))  # ~90 KiB encoded
            with pytest.raises(OversizedMessageError):
                a.mesh.broadcast(batch("a", 1, n=5000))
            assert a.mesh.stats["send_oversized"] == 2
            assert a.mesh.send("b", Ack(1))  # the link is unaffected
            await b.received("a", 2)
        finally:
            await closing(a, b)

    run(go)


def test_a_node_listed_as_its_own_peer_is_skipped() -> None:
    async def go() -> None:
        port = free_port()
        b = await Node.start("b")
        a = await Node.start("a", [f"127.0.0.1:{port}", b.address], port=port)
        try:
            await a.up("b")
            await eventually(lambda: [p.node for p in a.mesh.peers()] == ["b"], "self skipped")
            assert a.mesh.stats["dialed_self"] == 1
            assert not any(isinstance(e, PeerUp) and e.peer == "a" for e in a.events)
        finally:
            await closing(a, b)

    run(go)


def test_a_peer_that_stops_reading_gets_its_link_reset() -> None:
    async def go() -> None:
        b = await Node.start("b", collect=False, options=MeshOptions(max_pending_messages=1))
        a = await Node.start("a", [b.address], options=MeshOptions(
            max_queue_bytes=256 * 1024, backoff_base=0.02, backoff_cap=0.25))
        try:
            await a.up("b")
            frame = batch("a", 1, n=2000)  # ~40 KiB
            sent = 0
            # b's agent reads nothing: b stops reading its stream, HTTP/2 flow control stops
            # a's writes, a's queue fills, and the next send resets the link
            while a.mesh.send("b", frame):
                sent += 1
                assert sent < 20_000, "the send queue never filled"
                await asyncio.sleep(0.001)
            down = await a.down("b")
            assert down.error is not None and "send queue full" in str(down.error)
            st = await eventually(lambda: a.state("b"), "b's state")
            assert st.dropped >= 1 and "send queue full" in (st.last_error or "")
        finally:
            await closing(a, b)

    run(go)


def test_peers_from_dns() -> None:
    async def go() -> None:
        b = await Node.start("b")
        a = await Node.start("a", peers_dns=f"localhost:{b.mesh.port}")
        try:
            await a.up("b")
            assert b.address in [p.address for p in a.mesh.peers()]
        finally:
            await closing(a, b)

    run(go)


def test_close_ends_events_and_is_idempotent() -> None:
    async def go() -> None:
        mesh_ = GrpcMesh(Hello("solo", 1, ()), "127.0.0.1:0")
        await mesh_.start()
        assert mesh_.port > 0
        await mesh_.close()
        await mesh_.close()
        assert [e async for e in mesh_.events()] == []

    run(go)


def test_resolve_lists_each_address_once() -> None:
    async def go() -> None:
        addrs = await resolve("localhost:7001")
        assert "127.0.0.1:7001" in addrs
        assert len(addrs) == len(set(addrs))
        assert await resolve("127.0.0.1:9") == ["127.0.0.1:9"]

    run(go)
