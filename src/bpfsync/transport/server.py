"""The accepting side: streams that peers dial to this node, read and handed to the agent.

Each stream is checked before anything it carries reaches the agent, and before any state is
kept for the node it claims to be:

    first frame within handshake_timeout? no ───────────► DEADLINE_EXCEEDED
        │ undecodable ───────────────────────────────────► INVALID_ARGUMENT
        │ over max_message_bytes ────────────────────────► RESOURCE_EXHAUSTED
        │ not a Hello ───────────────────────────────────► UNAUTHENTICATED
        │ node id not a name in its TLS certificate, or
        │ this node's own id from another process ───────► PERMISSION_DENIED (a)
        │ not a member (core/membership.py) ─────────────► PERMISSION_DENIED (b)
        │ backed off after misbehaving (penalty.py) ─────► PERMISSION_DENIED (c)
        │ already max_streams_per_peer streams open ─────► RESOURCE_EXHAUSTED (d)
        │ another protocol version (after our Hello, so
        │ that the dialer can say which) ────────────────► FAILED_PRECONDITION
        ▼
    reply with our Hello, deliver the peer's Hello, then every further frame, in order:
        undecodable, or a second Hello ──────────────────► INVALID_ARGUMENT
        over max_message_bytes ──────────────────────────► RESOURCE_EXHAUSTED
        a Batch whose sender is not the stream's node ───► PERMISSION_DENIED (a)
        the agent disconnects the peer (``kick``) ───────► PERMISSION_DENIED

    counted as (a) rejected_unauthenticated, (b) rejected_not_member, (c) rejected_backed_off,
    (d) rejected_too_many_streams. With learned membership (plaintext, no member list), (b) and
    (c) come after our Hello, and an unknown id first waits a moment for our own dial to learn
    it (``_learn_first``): two nodes that do not know each other yet would otherwise refuse
    each other's dials for ever, while our Hello lets the dialer learn us (membership.py M3).

Each rejection is counted in ``stats`` and logged (at most once per reason every
``_LOG_EVERY_S``, with how many were not: a flood of refused streams must not flood the log);
the stream ends, the server and every other stream carry on. A peer may hold several streams (a
reconnect racing a half-dead one): all are read, up to ``max_streams_per_peer``; the dead one
ends when keepalive notices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio

from bpfsync.core.membership import MAX_MEMBERS, Membership
from bpfsync.core.messages import Batch, Hello, Message
from bpfsync.core.session import incompatible
from bpfsync.errors import (
    MalformedMessageError,
    NotMemberError,
    PeerError,
    UnauthenticatedPeerError,
)
from bpfsync.transport import codec
from bpfsync.transport.base import Received
from bpfsync.transport.inbox import Inbox
from bpfsync.transport.options import MeshOptions
from bpfsync.transport.penalty import Penalties
from bpfsync.transport.rpc import METHOD_NAME, SERVICE
from bpfsync.transport.tls import TlsMaterial

__all__ = ["InboundPeer", "StreamServer"]

log = logging.getLogger(__name__)

_LOG_EVERY_S = 10.0  # refused streams: one log line per reason this often, at most
_LEARN_WAIT_S = 2.0  # learned membership: how long an unknown id waits for our dial to learn it
_MAX_LEARNING = 16  # ... and how many may wait at once


@dataclass(slots=True)
class InboundPeer:
    """What this node knows of one member that dials it; kept across its streams."""

    node: str
    incarnation: int
    streams: int = 0  # open streams from it
    messages_received: int = 0
    bytes_received: int = 0
    last_error: str | None = None
    last_error_at: float = 0.0  # time.time() of last_error
    # its streams' handlers, with the incarnation each one's Hello announced
    tasks: dict[asyncio.Task[None], int] = field(default_factory=dict)


class _Reject(Exception):
    """Internal: end this stream with ``code``; ``error`` is what is logged and counted."""

    def __init__(self, code: grpc.StatusCode, error: PeerError, counter: str) -> None:
        super().__init__(str(error))
        self.code, self.error, self.counter = code, error, counter


class StreamServer:
    def __init__(
        self, own: Hello, options: MeshOptions, inbox: Inbox, stats: dict[str, int],
        members: Membership, penalties: Penalties,
        on_accepted: Callable[[str], None] = lambda node: None,
        on_stranger: Callable[[], None] = lambda: None,
    ) -> None:
        self.inbound: dict[str, InboundPeer] = {}  # members only: see _serve
        self._on_accepted = on_accepted  # told the node id of every stream accepted
        self._on_stranger = on_stranger  # told of every node refused as not (yet) a member
        self._stopping = False
        self._own = own
        self._hello_frame = codec.encode(own)
        self._opt = options
        self._inbox = inbox
        self._stats = stats
        self._members = members
        self._penalties = penalties
        self._server: grpc.aio.Server | None = None
        self._kicked: dict[asyncio.Task[None], str] = {}  # handler task -> why it was ended
        self._learning = 0  # streams waiting in _learn_first
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged, suppressed)

    async def start(self, listen: str, tls: TlsMaterial | None) -> int:
        """Bind ``listen`` (HOST:PORT, port 0 for any) and serve; returns the bound port."""
        server = grpc.aio.server(options=self._opt.server_options())
        handler = grpc.stream_stream_rpc_method_handler(self._stream)  # raw bytes both ways
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {METHOD_NAME: handler}),)
        )
        try:
            if tls is None:
                port = server.add_insecure_port(listen)
            else:
                port = server.add_secure_port(listen, tls.server_credentials())
        except RuntimeError as err:  # gRPC's way of saying the bind failed
            raise OSError(f"cannot listen on {listen}: {err}") from err
        await server.start()
        self._server = server
        self._stopping = False
        return int(port)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        if self._server is not None:
            await self._server.stop(grace)

    def kick(self, node: str, why: str, incarnation: int | None = None) -> int:
        """End every stream ``node`` holds open to us (of ``incarnation`` only, if given);
        returns how many."""
        peer = self.inbound.get(node)
        if peer is None:
            return 0
        ended = [t for t, inc in peer.tasks.items() if incarnation in (None, inc)]
        for task in ended:
            self._kicked[task] = why
            task.cancel()
        return len(ended)

    async def _stream(
        self, requests: object, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        self._stats["streams_opened"] += 1
        task = asyncio.current_task()
        assert task is not None
        try:
            hello = await self._handshake(context)
            if hello is None:
                return
            await self._serve(hello, context, task)
        except asyncio.CancelledError:
            why = self._kicked.pop(task, None)
            if why is None:
                if not self._stopping:
                    raise
                return  # the server is stopping: end quietly, or grpc logs each cancellation
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        except _Reject as rej:
            self._stats[rej.counter] += 1
            self._log_refusal(rej, context.peer())
            peer = self.inbound.get(rej.error.peer)
            if peer is not None:
                peer.last_error, peer.last_error_at = str(rej.error), time.time()
            await context.abort(rej.code, str(rej.error))
        finally:
            self._kicked.pop(task, None)

    def _log_refusal(self, rej: _Reject, where: str) -> None:
        now = time.monotonic()
        last, suppressed = self._logged.get(rej.counter, (-_LOG_EVERY_S, 0))
        if now - last < _LOG_EVERY_S:
            self._logged[rej.counter] = (last, suppressed + 1)
            return
        more = f" (and {suppressed} more refused so since the last such line)" if suppressed else ""
        log.warning("rejected a stream from %s: %s%s", where, rej.error, more)
        self._logged[rej.counter] = (now, 0)

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
        if self._members.mode == "learned":
            await self._learn_first(msg.node)
            self._admit(msg.node)
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
        node = hello.node

        def deny(error: PeerError, counter: str) -> _Reject:
            return _Reject(grpc.StatusCode.PERMISSION_DENIED, error, counter)

        if node == self._own.node:
            if hello.incarnation != self._own.incarnation:
                raise deny(UnauthenticatedPeerError("it announces this node's own id", node),
                           "rejected_unauthenticated")
            return
        tls = self._opt.tls
        if tls is not None and tls.node_in_cert:
            auth = context.auth_context()
            names = set(auth.get("x509_subject_alternative_name", ()))
            names.update(auth.get("x509_common_name", ()))
            if node.encode() not in names:
                raise deny(UnauthenticatedPeerError(
                    "node id is not a name in its TLS certificate", node),
                    "rejected_unauthenticated")
        if self._members.mode != "learned":
            self._admit(node)

    async def _learn_first(self, node: str) -> None:
        """Learned membership (M3): a node we do not know yet may be a peer our own dial has
        not reached. Our Hello went first, so its dial of us learns who we are and its server
        admits ours; we redial now and wait a moment for our dial to learn it, rather than
        refuse it and have it redial (a link that comes up and goes down, and on a fresh node
        a catch-up sent twice). Few wait at a time: made-up ids are refused at once beyond."""
        if self._members.admits(node) or self._learning >= _MAX_LEARNING:
            return
        self._learning += 1
        self._on_stranger()
        try:
            async with asyncio.timeout(_LEARN_WAIT_S):
                while not self._members.admits(node):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass
        finally:
            self._learning -= 1

    def _admit(self, node: str) -> None:
        """Membership and penalties, at the Hello (see the module docstring)."""
        def deny(error: PeerError, counter: str) -> _Reject:
            return _Reject(grpc.StatusCode.PERMISSION_DENIED, error, counter)

        if not self._members.admits(node):
            self._on_stranger()
            raise deny(NotMemberError("node is not a member of this cluster", node),
                       "rejected_not_member")
        left = self._penalties.left(node)
        if left > 0:
            raise deny(UnauthenticatedPeerError(
                f"backed off for {left:.1f} s more after misbehaving", node),
                "rejected_backed_off")

    async def _serve(
        self, hello: Hello, context: grpc.aio.ServicerContext[bytes, bytes],
        task: asyncio.Task[None],
    ) -> None:
        node = hello.node
        peer = self.inbound.get(node)
        if peer is not None and peer.streams >= self._opt.max_streams_per_peer:
            raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, UnauthenticatedPeerError(
                f"already {peer.streams} streams open from it", node), "rejected_too_many_streams")
        if peer is None:
            if len(self.inbound) >= MAX_MEMBERS:  # membership bounds it; "open" does not
                for idle in [n for n, p in self.inbound.items() if not p.streams]:
                    del self.inbound[idle]
            peer = self.inbound[node] = InboundPeer(node, hello.incarnation)
        peer.incarnation = hello.incarnation
        peer.streams += 1
        peer.tasks[task] = hello.incarnation
        log.info("stream from %s (%s) accepted", node, context.peer())
        self._on_accepted(node)
        incarnation = hello.incarnation
        try:
            await self._inbox.put_message(Received(node, hello, incarnation))
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
                await self._inbox.put_message(Received(node, msg, incarnation), len(frame))
        finally:
            peer.streams -= 1
            del peer.tasks[task]

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
