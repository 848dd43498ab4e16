"""What a GrpcMesh refuses, and that refusing one stream never disturbs the others.

The misbehaving peers here are raw gRPC clients and servers that speak the method's framing but
not the protocol.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import grpc.aio
import pytest
from aio import eventually, run
from transport_harness import FAST, Node, batch, closing, hello, mesh

from bpfsync.core.membership import Membership
from bpfsync.core.messages import PROTOCOL, Ack
from bpfsync.errors import MalformedMessageError, TransportError
from bpfsync.transport import GrpcMesh, MeshOptions, PeerDown, PeerUp, encode
from bpfsync.transport.penalty import Penalties
from bpfsync.transport.rpc import METHOD, METHOD_NAME, SERVICE


@asynccontextmanager
async def raw_call(address: str) -> AsyncIterator[grpc.aio.StreamStreamCall]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(METHOD)()
        try:
            yield call
        finally:
            call.cancel()


async def refused(call: grpc.aio.StreamStreamCall, *frames: bytes) -> tuple[grpc.StatusCode, str]:
    """Write ``frames`` and read until the server ends the stream; its status and details."""
    try:
        for f in frames:
            await call.write(f)
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError:
        pass
    return await call.code(), await call.details()


async def still_serving(a: Node, b: Node, seq: int) -> None:
    """b's link to a still carries messages."""
    assert b.mesh.send("a", batch("b", seq))
    await a.wait_event(lambda e: getattr(e, "message", None) == batch("b", seq), f"batch {seq}")


def test_garbage_bytes_are_rejected_and_others_keep_flowing() -> None:
    async def go() -> None:
        a, b = await mesh(["a", "b"])
        try:
            async with raw_call(a.address) as call:
                code, details = await refused(call, b"\xff\x00 this is not a frame")
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "undecodable" in details
            assert a.mesh.stats["frames_malformed"] == 1
            await still_serving(a, b, 1)
        finally:
            await closing(a, b)

    run(go)


def test_first_frame_must_be_hello() -> None:
    async def go() -> None:
        a, b = await mesh(["a", "b"])
        try:
            async with raw_call(a.address) as call:
                code, details = await refused(call, encode(batch("x", 1)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "first frame must be Hello, got Batch" in details
            async with raw_call(a.address) as call:  # an empty frame is a Frame with no message
                code, details = await refused(call, b"")
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert a.mesh.stats["rejected_no_hello"] == 1
            assert a.mesh.stats["frames_malformed"] == 1
            await still_serving(a, b, 1)
        finally:
            await closing(a, b)

    run(go)


def test_silent_stream_times_out() -> None:
    async def go() -> None:
        a = await Node.start("a", options=MeshOptions(handshake_timeout=0.3))
        try:
            async with raw_call(a.address) as call:
                code, details = await refused(call)  # opens the stream, says nothing
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no Hello within" in details
            assert a.mesh.stats["rejected_no_hello"] == 1
        finally:
            await a.close()

    run(go)


def test_unknown_node_is_refused_both_ways() -> None:
    async def go() -> None:
        fast = MeshOptions(backoff_base=0.02, backoff_cap=0.25)
        a = await Node.start("a", options=fast, members=Membership("a", ["b"]))
        c = await Node.start("c", [a.address])
        try:
            st = await eventually(lambda: c.mesh.peers()[0].last_error, "c refused by a")
            assert "PERMISSION_DENIED" in st and "not a member" in st
            await eventually(lambda: a.mesh.stats["rejected_not_member"] >= 1, "counted")
            assert "c" not in a.mesh._server.inbound  # no state kept for it

            # a dials c: c answers with its Hello, which a refuses itself
            a2 = await Node.start("a2", [c.address], options=fast,
                                  members=Membership("a2", ["b"]))
            try:
                err = await eventually(lambda: a2.mesh.peers()[0].last_error, "a2 refuses c")
                assert "'c' is not a member" in err
                assert not any(isinstance(e, PeerUp) for e in a2.events + c.events)
            finally:
                await a2.close()
        finally:
            await closing(a, c)

    run(go)


def test_hello_twice_or_spoofed_sender_ends_the_stream() -> None:
    async def go() -> None:
        a, b = await mesh(["a", "b"])
        try:
            x = encode(hello("x"))
            for frames, code, counter in [
                ((x, x), grpc.StatusCode.INVALID_ARGUMENT, "frames_malformed"),
                ((x, encode(batch("b", 1))), grpc.StatusCode.PERMISSION_DENIED,
                 "rejected_unauthenticated"),
            ]:
                before = a.mesh.stats[counter]
                async with raw_call(a.address) as call:
                    assert (await refused(call, *frames))[0] == code
                assert a.mesh.stats[counter] == before + 1
            assert "Batch from sender 'b'" in a.state("x").last_error
            await still_serving(a, b, 1)
        finally:
            await closing(a, b)

    run(go)


def test_oversized_frames_reset_only_their_stream() -> None:
    async def go() -> None:
        small = MeshOptions(max_message_bytes=64 * 1024, backoff_base=0.02, backoff_cap=0.25)
        a, b = await mesh(["a", "b"], options=small)
        try:
            for size in (64 * 1024 + 1, 3 * 64 * 1024):  # read and refused; refused by gRPC
                async with raw_call(a.address) as call:
                    code, _ = await refused(call, encode(hello("x")), b"\x00" * size)
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert a.mesh.stats["frames_oversized"] == 1  # the second never reached Python
            await still_serving(a, b, 1)
        finally:
            await closing(a, b)

    run(go)


def test_sender_with_a_larger_limit_is_reset_then_recovers() -> None:
    async def go() -> None:
        big = MeshOptions(max_message_bytes=1 << 20, backoff_base=0.02, backoff_cap=0.25)
        small = MeshOptions(max_message_bytes=16 * 1024, backoff_base=0.02, backoff_cap=0.25)
        b = await Node.start("b", options=small)
        a = await Node.start("a", [b.address], options=big)
        try:
            await a.up("b")
            mark = len(a.events)
            assert a.mesh.send("b", batch("a", 1, n=500))  # ~18 KiB: fine for a, not for b
            down = await a.down("b", start=mark)
            assert down.error is not None and "RESOURCE_EXHAUSTED" in str(down.error)
            await eventually(lambda: b.mesh.stats["frames_oversized"] == 1, "b counted it")
            await a.up("b", start=mark)
            assert a.mesh.send("b", Ack(1))
            await b.wait_event(lambda e: getattr(e, "message", None) == Ack(1), "small message")
        finally:
            await closing(a, b)

    run(go)


def test_tcp_garbage_does_not_disturb_the_server() -> None:
    async def go() -> None:
        a, b = await mesh(["a", "b"])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", a.mesh.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 64)
            await writer.drain()
            await asyncio.wait_for(reader.read(), 20)  # the server closes the connection
            writer.close()
            await still_serving(a, b, 1)
        finally:
            await closing(a, b)

    run(go)


def test_a_responder_that_does_not_say_hello_is_refused() -> None:
    async def go() -> None:
        async def impostor(requests: object, context: grpc.aio.ServicerContext) -> None:
            await context.read()
            await context.write(encode(Ack(1)))
            await context.read()

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {METHOD_NAME: grpc.stream_stream_rpc_method_handler(impostor)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        a = await Node.start("a", [f"127.0.0.1:{port}"], options=FAST)
        try:
            err = await eventually(lambda: a.mesh.peers()[0].last_error, "a refuses impostor")
            assert "first frame is Ack, not Hello" in err
            assert not any(isinstance(e, (PeerUp, PeerDown)) for e in a.events)
        finally:
            await a.close()
            await server.stop(0)

    run(go)


def test_listen_failure_is_a_transport_error() -> None:
    async def go() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            m = GrpcMesh(hello("a"), f"127.0.0.1:{s.getsockname()[1]}")
            try:
                with pytest.raises(TransportError, match="cannot listen"):
                    await m.start()
            finally:
                await m.close()

    run(go)


def test_a_peer_of_another_protocol_version_is_refused_both_ways_with_the_reason() -> None:
    def said(node: Node) -> str:
        errors = [p.last_error or "" for p in node.mesh.peers()]
        return next((e for e in errors if "protocol" in e), "")

    async def go() -> None:
        a = await Node.start("a", options=FAST)
        old = Node(GrpcMesh(dataclasses.replace(hello("b"), protocol=PROTOCOL - 1),
                            "127.0.0.1:0", [a.address], options=FAST))  # fmt: skip
        await old.mesh.start()
        old._task = asyncio.create_task(old._collect())
        c = await Node.start("c", [old.address], options=FAST)
        try:
            # b dials a: a's server refuses it, and b reads from a's Hello why
            await eventually(lambda: a.mesh.stats["rejected_protocol"] >= 1, "a refuses b")
            theirs = await eventually(lambda: said(old), "b's reason")
            assert f"speaks bpfsync protocol {PROTOCOL}, this node {PROTOCOL - 1}" in theirs
            # c dials b: c reads b's Hello and refuses it
            ours = await eventually(lambda: said(c), "c refuses b")
            assert f"node 'b' speaks bpfsync protocol {PROTOCOL - 1}, this node {PROTOCOL}" in ours
            assert not any(isinstance(e, PeerUp) for e in a.events + old.events + c.events)
        finally:
            await closing(a, old, c)

    run(go)


def test_a_disconnected_peer_is_refused_until_its_penalty_ends() -> None:
    """The agent's answer to a member's bad input: its streams end at once, it is refused
    (counted) while the penalty lasts, and it comes back by itself afterwards."""
    async def go() -> None:
        a, b = await mesh(["a", "b"])
        a.mesh.penalties = a.mesh._server._penalties = Penalties(base=1.0)
        try:
            hold = a.mesh.disconnect("b", MalformedMessageError("garbage", "b"))
            assert hold == 1.0 and a.mesh.stats["disconnected"] == 1
            await b.wait_event(lambda e: isinstance(e, PeerDown) and e.peer == "a", "b cut off")
            await a.wait_event(lambda e: isinstance(e, PeerDown) and e.peer == "b", "a's link")
            await eventually(lambda: a.mesh.stats["rejected_backed_off"] >= 1, "b refused", 5)
            assert not a.mesh.send("b", batch("a", 1))
            await eventually(lambda: a.mesh.send("b", batch("a", 2)), "a's link back", 10)
            await eventually(lambda: b.mesh.send("a", batch("b", 3)), "b's link back", 10)
            await a.wait_event(lambda e: getattr(e, "message", None) == batch("b", 3), "batch 3")
        finally:
            await closing(a, b)

    run(go)
