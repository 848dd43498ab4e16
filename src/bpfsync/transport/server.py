"""The accepting side: streams that peers dial to this node, read and handed to the agent.

Each stream is checked before anything it carries reaches the agent:

    first frame within handshake_timeout? no ───────────► DEADLINE_EXCEEDED
        │ undecodable ───────────────────────────────────► INVALID_ARGUMENT
        │ over max_message_bytes ────────────────────────► RESOURCE_EXHAUSTED
        │ not a Hello ───────────────────────────────────► UNAUTHENTICATED
        │ node not allowed, not in its certificate, or
        │ this node's own id from another process ───────► PERMISSION_DENIED
        │ another protocol version (after our Hello, so
        │ that the dialer can say which) ────────────────► FAILED_PRECONDITION
        ▼
    reply with our Hello, deliver the peer's Hello, then every further frame, in order:
        undecodable, or a second Hello ──────────────────► INVALID_ARGUMENT
        over max_message_bytes ──────────────────────────► RESOURCE_EXHAUSTED
        a Batch whose sender is not the stream's node ───► PERMISSION_DENIED

Each rejection is counted in ``stats`` and logged; the stream ends, the server and every other
stream carry on. A peer may hold several streams (a reconnect racing a half-dead one): all are
read; the dead one ends when keepalive notices.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import grpc.aio

from bpfsync.core.messages import Batch, Hello, Message
from bpfsync.core.session import incompatible
from bpfsync.errors import MalformedMessageError, PeerError, UnauthenticatedPeerError
from bpfsync.transport import codec
from bpfsync.transport.base import Received
from bpfsync.transport.inbox import Inbox
from bpfsync.transport.options import MeshOptions
from bpfsync.transport.rpc import METHOD_NAME, SERVICE

__all__ = ["InboundPeer", "StreamServer"]

log = logging.getLogger(__name__)

# Without an allow-list any node id may say Hello; forget idle ones past this many, so a peer
# cycling through made-up ids cannot grow the table without bound.
MAX_REMEMBERED_PEERS = 1024


@dataclass(slots=True)
class InboundPeer:
    """What this node knows of one node that dials it; kept across its streams."""

    node: str
    incarnation: int
    streams: int = 0  # open streams from it
    messages_received: int = 0
    bytes_received: int = 0
    last_error: str | None = None


class _Reject(Exception):
    """Internal: end this stream with ``code``; ``error`` is what is logged and counted."""

    def __init__(self, code: grpc.StatusCode, error: PeerError, counter: str) -> None:
        super().__init__(str(error))
        self.code, self.error, self.counter = code, error, counter


class StreamServer:
    def __init__(
        self, own: Hello, options: MeshOptions, inbox: Inbox, stats: dict[str, int],
        on_accepted: Callable[[str], None] = lambda node: None,
    ) -> None:
        self.inbound: dict[str, InboundPeer] = {}
        self._on_accepted = on_accepted  # told the node id of every stream accepted
        self._stopping = False
        self._own = own
        self._hello_frame = codec.encode(own)
        self._opt = options
        self._inbox = inbox
        self._stats = stats
        self._server: grpc.aio.Server | None = None

    async def start(self, listen: str) -> int:
        """Bind ``listen`` (HOST:PORT, port 0 for any) and serve; returns the bound port."""
        server = grpc.aio.server(options=self._opt.server_options())
        handler = grpc.stream_stream_rpc_method_handler(self._stream)  # raw bytes both ways
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {METHOD_NAME: handler}),)
        )
        try:
            if self._opt.tls is None:
                port = server.add_insecure_port(listen)
            else:
                port = server.add_secure_port(listen, self._opt.tls.server_credentials())
        except RuntimeError as err:  # gRPC's way of saying the bind failed
            raise OSError(f"cannot listen on {listen}: {err}") from err
        await server.start()
        self._server = server
        return int(port)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        if self._server is not None:
            await self._server.stop(grace)

    async def _stream(
        self, requests: object, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        self._stats["streams_opened"] += 1
        try:
            hello = await self._handshake(context)
            if hello is None:
                return
            await self._serve(hello, context)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # the server is stopping: end quietly, or grpc logs each stream's cancellation
        except _Reject as rej:
            self._stats[rej.counter] += 1
            log.warning("rejected a stream from %s: %s", context.peer(), rej.error)
            peer = self.inbound.get(rej.error.peer)
            if peer is not None:
                peer.last_error = str(rej.error)
            await context.abort(rej.code, str(rej.error))

    async def _handshake(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> Hello | None:
        try:
            async with asyncio.timeout(self._opt.handshake_timeout):
                first = await context.read()
        except TimeoutError:
            raise _Reject(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                UnauthenticatedPeerError(f"no Hello within {self._opt.handshake_timeout} s"),
                "rejected_no_hello",
            ) from None
        if first is grpc.aio.EOF:
            return None  # dialed and left without a word
        msg = self._decode(first, peer="")
        if not isinstance(msg, Hello):
            raise _Reject(
                grpc.StatusCode.UNAUTHENTICATED,
                UnauthenticatedPeerError(f"first frame must be Hello, got {type(msg).__name__}"),
                "rejected_no_hello",
            )
        self._authorize(msg, context)
        await context.write(self._hello_frame)
        if msg.protocol != self._own.protocol:
            raise _Reject(grpc.StatusCode.FAILED_PRECONDITION,
                          incompatible(msg, self._own.protocol), "rejected_protocol")
        if msg.node == self._own.node:
            # It is this very process (same incarnation: _authorize refused any other). Our
            # Hello tells its link so; end the stream quietly.
            self._stats["dialed_self"] += 1
            return None
        self._stats["streams_accepted"] += 1
        return msg

    def _authorize(self, hello: Hello, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        def deny(why: str) -> _Reject:
            return _Reject(grpc.StatusCode.PERMISSION_DENIED,
                           UnauthenticatedPeerError(why, hello.node), "rejected_unauthenticated")

        if hello.node == self._own.node and hello.incarnation != self._own.incarnation:
            raise deny("it announces this node's own id")
        allowed = self._opt.allowed_nodes
        if allowed is not None and hello.node not in allowed and hello.node != self._own.node:
            raise deny("node is not on the allow-list")
        if self._opt.tls is not None and self._opt.tls.node_in_cert:
            auth = context.auth_context()
            names = set(auth.get("x509_subject_alternative_name", ()))
            names.update(auth.get("x509_common_name", ()))
            if hello.node.encode() not in names:
                raise deny("node id is not a name in its TLS certificate")

    async def _serve(self, hello: Hello, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        node = hello.node
        peer = self.inbound.get(node)
        if peer is None:
            if len(self.inbound) >= MAX_REMEMBERED_PEERS:
                for idle in [n for n, p in self.inbound.items() if not p.streams]:
                    del self.inbound[idle]
            peer = self.inbound[node] = InboundPeer(node, hello.incarnation)
        peer.incarnation = hello.incarnation
        peer.streams += 1
        log.info("stream from %s (%s) accepted", node, context.peer())
        self._on_accepted(node)
        try:
            await self._inbox.put_message(Received(node, hello))
            while (frame := await context.read()) is not grpc.aio.EOF:
                assert isinstance(frame, bytes)
                peer.messages_received += 1
                peer.bytes_received += len(frame)
                msg = self._decode(frame, peer=node)
                if isinstance(msg, Hello):
                    raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                                  MalformedMessageError("Hello after the first frame", node),
                                  "frames_malformed")
                if isinstance(msg, Batch) and msg.sender != node:
                    raise _Reject(
                        grpc.StatusCode.PERMISSION_DENIED,
                        UnauthenticatedPeerError(f"Batch from sender {msg.sender!r}", node),
                        "rejected_unauthenticated",
                    )
                await self._inbox.put_message(Received(node, msg))
        finally:
            peer.streams -= 1

    def _decode(self, frame: object, peer: str) -> Message:
        assert isinstance(frame, bytes)  # no deserializer registered: gRPC hands us bytes
        if len(frame) > self._opt.max_message_bytes:
            raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, MalformedMessageError(
                f"frame of {len(frame)} bytes exceeds the limit of "
                f"{self._opt.max_message_bytes}", peer), "frames_oversized")
        try:
            return codec.decode(frame, self._opt.limits, peer=peer)
        except MalformedMessageError as err:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, err, "frames_malformed") from err
