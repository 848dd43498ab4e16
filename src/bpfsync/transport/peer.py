"""One outbound link: the stream this node dials to one peer address and writes its messages on.

Life of a link, repeated until it is stopped:

    dial ──► write our Hello ──► read the peer's Hello ──► up: write queued frames in order
      ▲         (both within handshake_timeout)               │ stream ends, fails, or the queue
      └──────────── sleep(backoff with full jitter) ◄─────────┘ overflows: down, queue dropped

On the dialed stream the peer sends nothing after its Hello (see grpc_mesh.py for why); a frame
after it is a protocol error and resets the link. Backoff starts over only after a link stayed up
for ``backoff_cap`` seconds, so a link that breaks right after each handshake does not redial in a
tight loop. A peer that turns out to be this very node (a DNS name listing every node) is
remembered and never dialed again.

Identity: a peer given as ``ID@HOST:PORT`` must answer with that node id in its Hello, and with
TLS its certificate must name that id (the dialed name is the id, not the host: see tls.py);
the owner's ``link_up`` checks membership. A peer the agent disconnected (``hold``) is not
dialed again before its penalty ends; after a certificate rotation (``renew``) the link dials
again at once on a channel with the new credentials.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import grpc
import grpc.aio

from bpfsync.core.messages import Hello
from bpfsync.core.session import incompatible
from bpfsync.errors import BpfsyncError, TransportError, UnauthenticatedPeerError
from bpfsync.transport import codec
from bpfsync.transport.backoff import Backoff
from bpfsync.transport.options import MeshOptions
from bpfsync.transport.rpc import METHOD, as_error
from bpfsync.transport.tls import TlsMaterial

__all__ = ["LinkHooks", "PeerLink"]

log = logging.getLogger(__name__)


class LinkHooks(Protocol):
    """What a link tells its owner. ``link_up`` may refuse the link by raising a BpfsyncError."""

    def link_up(self, link: PeerLink, hello: Hello) -> None: ...

    def answered(self, link: PeerLink, hello: Hello) -> None:
        """The peer at the link's address answered with ``hello`` (it may still refuse us)."""
        ...

    def link_down(self, link: PeerLink, error: BpfsyncError | None) -> None: ...


class PeerLink:
    def __init__(
        self, address: str, own: Hello, options: MeshOptions, hooks: LinkHooks,
        *, expected: str | None = None, tls: Callable[[], TlsMaterial | None] = lambda: None,
    ) -> None:
        """``expected``: the node id the peer must be (from ``ID@HOST:PORT``); ``tls``: the
        current credentials, read at each new channel."""
        self.address = address
        self.expected = expected
        self.node: str | None = expected
        self.incarnation: int | None = None
        self.up = False
        self.is_self = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # time.time() of last_error
        self.connected_since: float | None = None  # time.time() the current session came up
        self.messages_sent = 0
        self.bytes_sent = 0
        self.handshakes = 0
        self.dropped = 0
        self.queued_bytes = 0
        self._own = own
        self._hello_frame = codec.encode(own)
        self._opt = options
        self._hooks = hooks
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._redial = asyncio.Event()  # the peer dialed us: end the wait before the next dial
        self.redials = 0
        self._reset = asyncio.Event()  # set to end the current session (queue overflow)
        self._reset_error: BpfsyncError | None = None
        self._up_at: float | None = None  # loop time the current session came up
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._tls = tls
        self._hold_until = 0.0  # loop time before which the peer is not dialed (``hold``)
        self._renew = False  # the next dial takes a new channel (new credentials)

    @property
    def reconnects(self) -> int:
        return max(0, self.handshakes - 1)

    # --- the owner's side ------------------------------------------------------------------------

    def start(self) -> None:
        self._channel = self._new_channel()
        self._task = asyncio.create_task(self._run(), name=f"bpfsync-link-{self.address}")

    def _new_channel(self) -> grpc.aio.Channel:
        opts = self._opt.channel_options(self.expected)
        tls = self._tls()
        if tls is None:
            return grpc.aio.insecure_channel(self.address, options=opts)
        return grpc.aio.secure_channel(self.address, tls.channel_credentials(), options=opts)

    def redial(self) -> None:
        """The peer just dialed us, so it is up: dial it now instead of when the backoff ends
        (a node that starts after its peers would otherwise wait up to ``backoff_cap``)."""
        if not self.up and self._task is not None:
            self._redial.set()

    def hold(self, seconds: float, error: BpfsyncError) -> None:
        """End the session now, and dial the peer again only after ``seconds``."""
        self._hold_until = asyncio.get_running_loop().time() + seconds
        self._end_session(error)

    def renew(self) -> None:
        """The credentials changed: end the session and dial again at once on a new channel."""
        self._renew = True
        self._end_session(TransportError(f"{self.address}: new TLS credentials"))
        self._redial.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    def enqueue(self, frame: bytes) -> bool:
        """Queue an encoded frame; False if the link is down or this frame would overflow it."""
        if not self.up:
            return False
        if self._queue and self.queued_bytes + len(frame) > self._opt.max_queue_bytes:
            # The peer is not keeping up. Dropping one message would leave a gap that only a
            # reconnect makes the core repair, so reset the link now, cleanly.
            self.dropped += 1
            self._end_session(TransportError(
                f"{self.address}: send queue full ({self.queued_bytes} bytes queued); "
                "the peer is not keeping up"
            ))
            return False
        self._queue.append(frame)
        self.queued_bytes += len(frame)
        self._wake.set()
        return True

    def _end_session(self, error: BpfsyncError) -> None:
        if self._reset_error is None:
            self._reset_error = error
        self._reset.set()

    # --- the link's own task ---------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(self._opt.backoff_base, self._opt.backoff_cap)
        while True:
            self._up_at = None
            held = self._hold_until - loop.time()
            if held > 0:  # disconnected as a penalty: no dial, whoever dials us, until it ends
                await asyncio.sleep(held)
                self._redial.clear()
            try:
                error = await self._session()
            except Exception as exc:  # a bug here must not end the link for good
                log.exception("link to %s failed unexpectedly", self.address)
                error = as_error(exc, self.address)
            if self.is_self:
                log.info("%s is this node itself; not dialing it again", self.address)
                return
            if self._up_at is not None and loop.time() - self._up_at >= self._opt.backoff_cap:
                backoff.reset()
            if str(error) != self.last_error:
                log.warning("link down or not up: %s", error)
            self.last_error, self.last_error_at = str(error), time.time()
            try:
                async with asyncio.timeout(backoff.next()):
                    await self._redial.wait()
            except TimeoutError:
                if not self._renew:
                    continue
            self._redial.clear()
            self._renew = False
            self.redials += 1
            backoff.reset()
            # gRPC's channel keeps a reconnect backoff of its own: start from a fresh one
            assert self._channel is not None
            old, self._channel = self._channel, self._new_channel()
            await old.close()

    async def _session(self) -> BpfsyncError:
        """Dial once and run the link until it ends; returns why it ended."""
        assert self._channel is not None
        call = self._channel.stream_stream(METHOD)()
        try:
            try:
                async with asyncio.timeout(self._opt.handshake_timeout):
                    await call.write(self._hello_frame)
                    first = await call.read()
                hello = await self._check_hello(call, first)
                self._hooks.answered(self, hello)
                self._hooks.link_up(self, hello)
            except (grpc.RpcError, TimeoutError, asyncio.InvalidStateError) as exc:
                return as_error(exc, f"{self.address}: handshake")
            except BpfsyncError as exc:
                return exc
            self._mark_up(hello)
            error: BpfsyncError | None = None
            try:
                error = await self._pump(call)
            finally:
                self._mark_down(error)  # error None: the link was stopped by its owner
            return error
        finally:
            call.cancel()

    async def _check_hello(self, call: grpc.aio.StreamStreamCall, first: object) -> Hello:
        if first is grpc.aio.EOF or not isinstance(first, bytes):
            code, details = await call.code(), await call.details()
            raise TransportError(f"{self.address}: stream ended before the peer's Hello: "
                                 f"{code.name}: {details}")
        msg = codec.decode(first, self._opt.limits, peer=self.address)
        if not isinstance(msg, Hello):
            raise UnauthenticatedPeerError(
                f"first frame is {type(msg).__name__}, not Hello", self.address
            )
        if msg.node == self._own.node:
            if msg.incarnation == self._own.incarnation:
                self.is_self = True
            raise UnauthenticatedPeerError(
                f"peer announces this node's own id {msg.node!r}", self.address
            )
        if self.expected is not None and msg.node != self.expected:
            raise UnauthenticatedPeerError(
                f"peer announces node id {msg.node!r}, configured as {self.expected!r}",
                self.address,
            )
        if msg.protocol != self._own.protocol:
            raise incompatible(msg, self._own.protocol, self.address)
        return msg

    def _mark_up(self, hello: Hello) -> None:
        self.node, self.incarnation, self.up = hello.node, hello.incarnation, True
        self.handshakes += 1
        self._up_at = asyncio.get_running_loop().time()
        self.connected_since = time.time()
        self._reset.clear()
        self._reset_error = None
        log.info("link to %s (%s) is up", hello.node, self.address)

    def _mark_down(self, error: BpfsyncError | None) -> None:
        self.up = False
        self.connected_since = None
        self.dropped += len(self._queue)  # never carried over: the core resends after PeerUp
        self._queue.clear()
        self.queued_bytes = 0
        self._hooks.link_down(self, error)

    async def _pump(self, call: grpc.aio.StreamStreamCall) -> BpfsyncError:
        reader = asyncio.create_task(self._read_after_hello(call))
        writer = asyncio.create_task(self._write_queue(call))
        reset = asyncio.create_task(self._reset.wait())
        tasks = {reader, writer, reset}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if reset in done and self._reset_error is not None:
            return self._reset_error
        for t in (reader, writer):
            if t in done and not t.cancelled() and (exc := t.exception()) is not None:
                return as_error(exc, self.address)
        return TransportError(f"{self.address}: stream ended")

    async def _read_after_hello(self, call: grpc.aio.StreamStreamCall) -> None:
        frame = await call.read()
        if frame is grpc.aio.EOF:
            code, details = await call.code(), await call.details()
            raise TransportError(f"{self.address}: peer ended the stream: {code.name}: {details}")
        raise TransportError(f"{self.address}: peer sent a frame after its Hello on a stream "
                             "this node dialed (protocol error)")

    async def _write_queue(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            frame = self._queue.popleft()
            self.queued_bytes -= len(frame)
            try:
                await call.write(frame)  # waits on HTTP/2 flow control: a slow peer fills _queue
            except BaseException:
                self.dropped += 1
                raise
            self.messages_sent += 1
            self.bytes_sent += len(frame)
