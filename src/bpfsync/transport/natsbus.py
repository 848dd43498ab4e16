"""The NATS transport: the cluster's changes published once into a JetStream stream, which the
servers fan out to every node, and a node's own messages to one peer over core NATS.

Subjects, under the cluster's prefix ``P`` (``nats.cluster``):

    P.changes.<node>   Batches of changes <node> made, published once into the stream
                       ``P-changes`` (limits-based retention: ``stream_max_age_s`` and
                       ``stream_max_bytes``). Every node reads the whole stream with a durable
                       pull consumer of its own, so a node that restarts goes on where it
                       stopped, and one that joins reads everything the stream still holds.
    P.hello.<node>     <node>'s Hello, every ``hello_interval`` seconds: who is up.
    P.to.<to>.<from>   Messages to one node (digests, pulls, repair answers, acks), both ids
                       in hex (one subject token each, whatever '.' an id holds), the
                       sender's incarnation in a header.

Every subject a node publishes on names it, so the servers' permissions can bind each node's
NATS user to its own id (``NatsOptions.permissions``); a message whose subject and content
name different nodes is refused and counted (``rejected_spoofed``).

The key-value bucket ``P-snapshots`` holds a snapshot of every digest bucket of every map
(key ``<map name in hex>.<bucket>``, value the bucket's registers as core/frozen.py seals
them), written by whichever node the agent makes responsible (agent/peering.py). Any node's
snapshot is valid, as the merge is state-based. A node without state of its own reads them
all before the stream: that catches it up when every other agent is stopped and the stream
no longer holds what happened before its retention. Each snapshot also says up to which
stream sequence its writer had handled the stream; when every bucket's does, the new node's
consumer starts after the lowest, instead of reading again what the snapshots hold.

The rules it keeps, beyond base.py's (which it keeps for the messages to one node):

- A peer is up while its Hellos arrive (within ``peer_timeout``). Its first Hello of an
  incarnation is delivered as ``Received`` before its ``PeerUp``; a new incarnation is a
  ``PeerDown`` first. Only members (core/membership.py) get that far: a Hello or message of
  any other node is dropped and counted, before anything is kept for it.
- A batch read from the stream is delivered as ``Streamed`` only when its subject names its
  sender (the NATS account's publish permissions can then bind a node to its own subject) and
  the sender is a member; others are counted and acknowledged unread. A stream message is
  acknowledged once the agent has handled it (when it asks for the next event), so a crash
  in between reads it again at the next start; the merge is idempotent.
- ``StreamRead`` tells, once, that everything the stream held when this node first read it
  (and, for a node without state, every snapshot before it) was delivered: a node catching
  up is caught up then. A snapshot is delivered as a ``Streamed`` batch of ``SNAPSHOT``.
  It comes no sooner than ``hello_interval`` after this node's first Hello, and a node
  answers a peer's first Hello of an incarnation with its own at once: the peers up are
  then ``PeerUp`` before ``StreamRead``, so the agent can ask one of them for what the stream
  no longer holds (agent/peering.py) instead of reporting ready without it.
- ``publish`` never blocks: a batch is queued for the stream, or refused (False) when the
  queue is full; queued batches are published in order and retried while NATS is away, so
  none is lost while the process lives. ``send`` to a peer is best effort, as on the mesh:
  what is lost is repaired by digest.
- NATS cannot tell which node a client is unless the servers' permissions say so: like the
  plaintext mesh, ``disconnect`` only refuses that incarnation for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.kv import KeyValue

from bpfsync.core.frozen import unseal
from bpfsync.core.membership import Membership
from bpfsync.core.messages import Batch, Hello, Message
from bpfsync.core.register import Packed
from bpfsync.errors import BpfsyncError, ConfigError, OversizedMessageError, TransportError
from bpfsync.transport import codec
from bpfsync.transport.base import (
    Event,
    PeerDown,
    PeerState,
    PeerUp,
    Received,
    Streamed,
    StreamRead,
)
from bpfsync.transport.inbox import Inbox

__all__ = ["SNAPSHOT", "NatsBus", "NatsOptions"]

log = logging.getLogger("bpfsync.transport")

_INCARNATION = "Bpfsync-Incarnation"
_FETCH = 64  # stream messages asked for at once: few enough to bound what waits unacked
_FETCH_WAIT_S = 1.0
_JOINED_RECORDS = 1 << 19  # records one Streamed event joins at most (_deliver)
_CLOSE_S = 2.0
_SNAPSHOT_WAIT_S = 5.0  # the longest a snapshot read waits for its next value before retrying
# the sender named in the batches that snapshots are delivered as: no node id can be it
SNAPSHOT = "(snapshot)"
# a snapshot's value: this magic, the stream sequence up to which the node that stored it
# had handled the stream (8 bytes, big-endian), then the bucket's sealed registers
_SEQ_MAGIC = b"BSQ1"
# what JetStream answers while it cannot yet: asked again (NatsBus._until_answered)
_UNANSWERED = (nats.errors.TimeoutError, nats.errors.NoRespondersError,
               nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
               nats.js.errors.ServiceUnavailableError, nats.js.errors.ServerError)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """How the bus connects and what it accepts (agent/config.py's ``nats`` section)."""

    servers: tuple[str, ...]
    cluster: str = "bpfsync"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: Path | None = None
    nkey_seed: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    stream_max_age_s: float = 3600.0
    stream_max_bytes: int = 1 << 30
    replicas: int = 1
    connect_timeout_s: float = 5.0
    # a peer is down when no Hello of it came for peer_timeout seconds
    hello_interval: float = 1.0
    peer_timeout: float = 3.5
    # encoded bytes waiting to be sent to peers, and batches waiting for the stream: past
    # either a send or publish is refused
    max_queue_bytes: int = 64 << 20
    # received messages waiting for the agent before the bus stops reading (inbox.py)
    max_pending_messages: int = 1024
    max_pending_bytes: int = 64 << 20
    # an incarnation that sent input refused as its fault is ignored this long
    penalty_s: float = 1.0
    # buckets per map (sync.digest_buckets): a fresh node skips the stream the snapshots of
    # all of them hold
    digest_buckets: int = 1024
    limits: codec.Limits = field(default_factory=codec.Limits)

    @property
    def stream(self) -> str:
        return f"{self.cluster}-changes"

    @property
    def snapshots(self) -> str:
        return f"{self.cluster}-snapshots"

    @property
    def changes_prefix(self) -> str:
        """Each node's changes are on this prefix, then its id (the stream captures them)."""
        return f"{self.cluster}.changes."

    def changes(self, node: str) -> str:
        return self.changes_prefix + node

    @property
    def hellos_prefix(self) -> str:
        return f"{self.cluster}.hello."

    def hello_subject(self, node: str) -> str:
        return self.hellos_prefix + node

    def direct(self, to: str, sender: str) -> str:
        return f"{self.cluster}.to.{_token(to)}.{_token(sender)}"

    def inbox(self, node: str) -> str:
        """What ``node`` subscribes to for the messages sent to it."""
        return f"{self.cluster}.to.{_token(node)}.*"

    def permissions(self, node: str) -> dict[str, list[str]]:
        """The subjects ``node``'s NATS user needs, and no other node's: publish on its own
        subjects, run its own consumer, keep the shared stream and snapshot bucket, and read
        the Hellos and its messages. Granting only these binds the user to the node: the
        stream's batches, Hellos and messages it sends all name it (module docstring)."""
        stream, kv, durable = self.stream, f"KV_{self.snapshots}", durable_name(node)
        api = "$JS.API"
        return {
            "publish": [
                self.changes(node), self.hello_subject(node),
                f"{self.cluster}.to.*.{_token(node)}",
                f"{api}.INFO",
                # the stream and the bucket: made by the first node, retention set by each
                f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.CREATE.{stream}",
                f"{api}.STREAM.UPDATE.{stream}",
                f"{api}.STREAM.INFO.{kv}", f"{api}.STREAM.CREATE.{kv}",
                # this node's durable consumer only: no other node's position can be moved
                f"{api}.CONSUMER.*.{stream}.{durable}", f"{api}.CONSUMER.*.{stream}.{durable}.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                f"{api}.CONSUMER.MSG.NEXT.{stream}.{durable}",
                f"$JS.ACK.{stream}.{durable}.>",
                # the snapshots: any node may store any bucket (the merge is state-based); a
                # watch reads them with an ephemeral consumer
                f"$KV.{self.snapshots}.>", f"{api}.CONSUMER.CREATE.{kv}",
                f"{api}.CONSUMER.CREATE.{kv}.>", f"{api}.CONSUMER.DELETE.{kv}.*",
                f"{api}.CONSUMER.INFO.{kv}.*", "$JS.FC.>",
            ],
            "subscribe": [
                self.hellos_prefix + ">", self.inbox(node), "_INBOX.>",
            ],
        }


def durable_name(node: str) -> str:
    """``node``'s durable consumer of the stream (consumer names take no '.')."""
    return "n" + _token(node)


def _token(node: str) -> str:
    """``node`` as one subject token: an id may hold '.', which separates tokens."""
    return node.encode().hex()


def _sender(direct: str) -> str:
    """The sender a ``NatsOptions.direct`` subject names; ValueError when it names none."""
    return bytes.fromhex(direct.rpartition(".")[2]).decode()  # UnicodeDecodeError: a ValueError


@dataclass(slots=True)
class _Peer:
    incarnation: int | None = None
    hello: Hello | None = None
    last_hello: float = 0.0
    up: bool = False
    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    reconnects: int = 0
    dropped: int = 0
    queued_bytes: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    connected_since: float | None = None


class NatsBus:
    """One node's link to the cluster through NATS; implements transport/base.py's Transport
    for its messages to one peer, and ``publish`` for the stream."""

    def __init__(self, hello: Hello, options: NatsOptions, members: Membership,
                 *, fresh: bool = False) -> None:
        """``fresh``: this node holds no state of its own (no state file, or none usable):
        its stream consumer then starts again from the first message the stream holds."""
        self.hello = hello
        self.node = hello.node
        self.options = options
        self.members = members
        self.fresh = fresh
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._inbox = Inbox(options.max_pending_messages, options.max_pending_bytes)
        self._peers: dict[str, _Peer] = {}
        self._refused: dict[tuple[str, int], float] = {}  # (node, incarnation) -> until
        self._out: deque[tuple[str, bytes, dict[str, str], str | None]] = deque()
        self._out_bytes = 0
        self._out_ready = asyncio.Event()
        self._publish: deque[tuple[bytes, Callable[[bool], None] | None]] = deque()
        self._publish_bytes = 0
        self._publish_ready = asyncio.Event()
        # per Streamed event delivered and not yet handled, in stream order: its messages and
        # the sequence handled once it is; no messages for a fetch with none to deliver
        self._to_ack: deque[tuple[list[Msg], int]] = deque()
        # every stream message up to this sequence is in this node's state: the snapshots it
        # stores say so, and a fresh node's consumer starts after the lowest of them
        self._handled = 0
        self._kv: KeyValue | None = None
        self._snap: deque[tuple[str, bytes]] = deque()
        self._snap_bytes = 0
        self._snap_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._stats: Counter[str] = Counter()
        self.stream_read = False  # StreamRead was delivered
        self._hello_at = 0.0  # when this node's first Hello was published
        self._denied: set[str] = set()  # permission refusals logged
        self.last_error: str | None = None
        self.hello_frame = codec.encode(hello)
        self._hello_subject = options.hello_subject(self.node)

    # --- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, make the stream and this node's consumer if they are not there, and start
        the loops. Raises ConfigError when no server accepts the connection (wrong address or
        credentials), saying what the servers answered."""
        self._nc = await self._connect()
        self._js = self._nc.jetstream()
        await self._until_answered("the stream", self._ensure_stream)
        self._kv = await self._until_answered("the snapshot bucket", self._ensure_snapshots)
        await self._nc.subscribe(self.options.hellos_prefix + ">", cb=self._on_hello)
        await self._nc.subscribe(self.options.inbox(self.node), cb=self._on_direct)
        # a node with state resumes its consumer; one without reads the snapshots first, and
        # its consumer starts after the stream position they all hold (_read_loop)
        sub = await self._until_answered("this node's consumer", self._resume)
        loops: list[tuple[str, Any]] = [
            ("nats-send", self._send_loop()), ("nats-publish", self._publish_loop()),
            ("nats-hello", self._hello_loop()), ("nats-read", self._read_loop(sub)),
            ("nats-snapshot", self._snapshot_loop()),
        ]
        self._hello_at = time.monotonic()
        await self._nc.publish(self._hello_subject, self.hello_frame)
        self._tasks = [asyncio.create_task(coro, name=name) for name, coro in loops]

    async def _connect(self) -> Client:
        o = self.options
        errors: list[str] = []

        refused = asyncio.Event()

        async def on_error(err: Exception) -> None:
            errors.append(str(err) or type(err).__name__)
            self.last_error = errors[-1]
            self._stats["errors"] += 1
            said = errors[-1].lower()
            if "authorization violation" in said:
                refused.set()
            elif "permissions violation" in said:
                # this node's NATS user lacks a subject it needs: said once per subject, as
                # it repeats (a Hello every second)
                self._stats["permission_denied"] += 1
                if said not in self._denied and len(self._denied) < 64:
                    self._denied.add(said)
                    log.warning("the NATS servers refused this node: %s. Check its NATS "
                                "user's permissions (bpfsync nats-users)", errors[-1])

        async def on_disconnected() -> None:
            self._stats["disconnects"] += 1
            if self._closed:
                return  # this node is stopping: no loss to report
            log.warning("NATS connection lost; reconnecting", extra={"error": self.last_error})

        async def on_reconnected() -> None:
            url = self._nc.connected_url.netloc if self._nc and self._nc.connected_url else None
            log.info("NATS connection back", extra={"server": url})

        kwargs: dict[str, Any] = {
            "servers": list(o.servers), "name": f"bpfsync {self.node}",
            "connect_timeout": o.connect_timeout_s, "allow_reconnect": True,
            "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5,
            "error_cb": on_error, "disconnected_cb": on_disconnected,
            "reconnected_cb": on_reconnected,
        }
        if o.user is not None:
            kwargs.update(user=o.user, password=o.password)
        if o.token is not None:
            kwargs["token"] = o.token
        if o.creds is not None:
            kwargs["user_credentials"] = str(o.creds)
        if o.nkey_seed is not None:
            kwargs["nkeys_seed"] = str(o.nkey_seed)
        if o.tls_ca is not None:
            ctx = ssl.create_default_context(cafile=str(o.tls_ca))
            if o.tls_cert is not None and o.tls_key is not None:
                ctx.load_cert_chain(str(o.tls_cert), str(o.tls_key))
            kwargs["tls"] = ctx
        # nats-py retries a refused login like a lost connection, for ever with the reconnect
        # settings a running node needs: the first refusal ends the start instead
        connecting = asyncio.ensure_future(nats.connect(**kwargs))
        refusal = asyncio.ensure_future(refused.wait())
        try:
            await asyncio.wait([connecting, refusal], return_when=asyncio.FIRST_COMPLETED,
                               timeout=o.connect_timeout_s * (len(o.servers) + 1))
        finally:
            refusal.cancel()
        if connecting.done() and connecting.exception() is None:
            nc: Client = connecting.result()
            return nc
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        err = connecting.exception() if connecting.done() and not connecting.cancelled() else None
        # a refused login is the cause, even when a reset of that connection came after it
        refusals = [e for e in errors if "authorization violation" in e.lower()]
        why = (refusals or errors or [str(err) if err else "no server answered in time"])[-1]
        raise ConfigError(
            f"cannot connect to the NATS servers {', '.join(o.servers)}: {why}. Check "
            "nats.servers and the credentials (nats.user/password, token, creds or "
            "nkey_seed)")

    async def _until_answered(self, what: str, step: Callable[[], Awaitable[_T]]) -> _T:
        """``step()``, again while JetStream does not answer: a cluster that is forming, or
        electing a leader for what many nodes create at once, times out or answers 503 for a
        while. A refusal (the servers' settings forbid it) is a ConfigError saying so."""
        wait, said = 0.25, False
        while True:
            try:
                return await step()
            except _UNANSWERED as err:
                self.last_error = f"{what}: {str(err) or type(err).__name__}"
                self._stats["setup_retries"] += 1
                if not said:
                    said = True
                    log.warning("JetStream does not answer for %s yet; asking again", what,
                                extra={"error": self.last_error})
            except nats.js.errors.APIError as err:
                raise ConfigError(
                    f"the NATS servers refused {what}: {err.description or err}. Check "
                    "nats.replicas (at most the number of JetStream servers), nats.cluster and"
                    " the account's JetStream limits") from err
            await asyncio.sleep(wait)
            wait = min(2 * wait, 2.0)

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        o = self.options
        config = StreamConfig(
            name=o.stream, subjects=[o.changes_prefix + ">"],
            max_age=o.stream_max_age_s, max_bytes=o.stream_max_bytes,
            num_replicas=o.replicas,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # it exists with other settings (another node's config, or an older one): this
            # node's retention applies from now on
            await self._js.update_stream(config)

    async def _ensure_snapshots(self) -> KeyValue:
        assert self._js is not None
        name = self.options.snapshots
        try:
            return await self._js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await self._js.create_key_value(
                bucket=name, history=1, replicas=self.options.replicas,
                description="bpfsync: a snapshot of every digest bucket of every map")

    @property
    def _durable(self) -> str:
        return durable_name(self.node)

    async def _resume(self) -> JetStreamContext.PullSubscription | None:
        """This node's consumer where it stopped; None when there is none to resume (a fresh
        node, or one the servers forgot), which is then made fresh: its old consumer gone."""
        assert self._js is not None
        if not self.fresh:
            try:
                info = await self._js.consumer_info(self.options.stream, self._durable)
                if not info.num_ack_pending:
                    return await self._consumer(0)
                # the last run was given messages it never handled: the servers would give
                # them again only after their ack wait (30 s), after this node said it is
                # ready; a consumer made anew from its ack floor has them first
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                await self._js.delete_consumer(self.options.stream, self._durable)
                return await self._consumer(floor)
            except nats.js.errors.NotFoundError:
                # the servers forgot where this node stopped (it was away past the consumer's
                # inactive threshold, or the stream is new): what it missed may be in the
                # snapshots alone
                self.fresh = True
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(self.options.stream, self._durable)
        return None

    async def _consumer(self, after: int) -> JetStreamContext.PullSubscription:
        """This node's durable consumer (made if the servers have none): from the stream's
        first message, or after sequence ``after`` when that is > 0."""
        assert self._js is not None
        start = ({"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": after + 1}
                 if after > 0 else {"deliver_policy": DeliverPolicy.ALL})
        config = ConsumerConfig(
            durable_name=self._durable, ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=4 * _FETCH,
            # a node away this long is forgotten by the servers: it reads from the start then
            inactive_threshold=max(3600.0, 2 * self.options.stream_max_age_s),
            **start,
        )
        return await self._js.pull_subscribe(
            self.options.changes_prefix + ">", durable=self._durable, stream=self.options.stream,
            config=config, pending_bytes_limit=self.options.max_pending_bytes)

    async def close(self) -> None:
        """Publish what is queued while NATS answers (for at most ``_CLOSE_S``: a batch not
        stored by then is this node's state, which its peers' digests repair), then close."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + _CLOSE_S
        while (self._publish or self._snap) and self.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()  # no drain: it waits for the pending pull of the stream
        self._inbox.close()

    # --- what the agent calls -----------------------------------------------------------------

    def send(self, peer: str, message: Message) -> bool:
        frame = self._frame(message)
        return self._queue(peer, frame)

    def broadcast(self, message: Message, to: Iterable[str] | None = None) -> list[str]:
        frame = self._frame(message)
        targets = [p for p, s in self._peers.items() if s.up] if to is None else list(to)
        return [p for p in targets if self._queue(p, frame)]

    def publish(self, batch: Batch, done: Callable[[bool], None] | None = None) -> bool:
        """Queue ``batch`` (this node's changes) for the stream; False when the queue is full.
        ``done(True)`` once the stream has stored it."""
        frame = self._frame(batch)
        if self._publish and self._publish_bytes + len(frame) > self.options.max_queue_bytes:
            self._stats["publish_refused"] += 1
            return False
        self._publish.append((frame, done))
        self._publish_bytes += len(frame)
        self._publish_ready.set()
        return True

    def put_snapshot(self, map: str, bucket: int, blob: bytes) -> bool:
        """Queue the sealed registers of ``map``'s digest bucket ``bucket`` for the snapshot
        bucket, replacing the one stored; False when the queue is full."""
        if self._snap and self._snap_bytes + len(blob) > self.options.max_queue_bytes:
            self._stats["snapshot_refused"] += 1
            return False
        value = _SEQ_MAGIC + self._handled.to_bytes(8, "big") + blob
        self._snap.append((f"{map.encode().hex()}.{bucket}", value))
        self._snap_bytes += len(value)
        self._snap_ready.set()
        return True

    def publish_backlog(self) -> int:
        """Encoded bytes of batches not yet stored by the stream."""
        return self._publish_bytes

    @property
    def max_message_bytes(self) -> int:
        """The largest message the servers take (their max_payload)."""
        return self._nc.max_payload if self._nc is not None else 1 << 20

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def describe(self) -> Mapping[str, object]:
        url = self._nc.connected_url if self._nc is not None else None
        return {
            "kind": "nats", "servers": list(self.options.servers),
            "connected": self.connected, "server": url.netloc if url and self.connected else None,
            "stream": self.options.stream, "stream_read": self.stream_read,
            "published": self._stats["published"], "publish_backlog_bytes": self._publish_bytes,
            "last_error": self.last_error,
        }

    def backlog(self, peer: str) -> int | None:
        s = self._peers.get(peer)
        return s.queued_bytes if s is not None and s.up else None

    async def events(self) -> AsyncIterator[Event]:
        async for ev in self._inbox:
            yield ev
            # handled: the stream may forget it (a snapshot is no stream message)
            if isinstance(ev, Streamed) and ev.peer != SNAPSHOT and self._to_ack:
                msgs, handled = self._to_ack.popleft()
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.ack()
                self._handled = max(self._handled, handled)
                while self._to_ack and not self._to_ack[0][0]:  # none delivered after it
                    self._handled = max(self._handled, self._to_ack.popleft()[1])

    def peers(self) -> list[PeerState]:
        return [
            PeerState(
                address=None, node=node, connected=s.up, inbound=s.up,
                incarnation=s.incarnation, last_error=s.last_error,
                messages_sent=s.messages_sent, bytes_sent=s.bytes_sent,
                messages_received=s.messages_received, bytes_received=s.bytes_received,
                reconnects=s.reconnects, queued_bytes=s.queued_bytes, dropped=s.dropped,
                last_error_at=s.last_error_at, connected_since=s.connected_since,
            )
            for node, s in sorted(self._peers.items())
        ]

    def disconnect(self, peer: str, error: BpfsyncError, incarnation: int | None = None) -> float:
        s = self._peers.get(peer)
        inc = incarnation if incarnation is not None else (s.incarnation if s else None)
        if inc is not None:
            self._refused[(peer, inc)] = time.monotonic() + self.options.penalty_s
        self._stats["disconnected"] += 1
        if s is not None and s.up and s.incarnation == inc:
            self._down(peer, s, error)
        return 0.0

    @property
    def stats(self) -> Mapping[str, int]:
        return dict(self._stats)

    # --- sending ------------------------------------------------------------------------------

    def _frame(self, message: Message) -> bytes:
        frame = codec.encode(message)
        limit = self.max_message_bytes
        if len(frame) > limit:
            self._stats["send_oversized"] += 1
            raise OversizedMessageError(
                f"a {type(message).__name__} of {len(frame)} bytes exceeds the NATS servers'"
                f" max_payload of {limit} bytes")
        return frame

    def _queue(self, peer: str, frame: bytes) -> bool:
        s = self._peers.get(peer)
        if s is None or not s.up or self._out_bytes + len(frame) > self.options.max_queue_bytes:
            self._stats["send_refused"] += 1
            if s is not None:
                s.dropped += 1
            return False
        headers = {_INCARNATION: str(self.hello.incarnation)}
        self._out.append((self.options.direct(peer, self.node), frame, headers, peer))
        self._out_bytes += len(frame)
        s.queued_bytes += len(frame)
        self._out_ready.set()
        return True

    async def _send_loop(self) -> None:
        while True:
            await self._out_ready.wait()
            while self._out:
                subject, frame, headers, peer = self._out.popleft()
                self._out_bytes -= len(frame)
                s = self._peers.get(peer) if peer is not None else None
                if s is not None:
                    s.queued_bytes -= len(frame)
                try:
                    assert self._nc is not None
                    await self._nc.publish(subject, frame, headers=headers)
                except Exception as err:  # NATS away: the core repairs by digest
                    self._stats["send_failed"] += 1
                    if s is not None:
                        s.dropped += 1
                        self._error(s, f"send: {str(err) or type(err).__name__}")
                    continue
                if s is not None:
                    s.messages_sent += 1
                    s.bytes_sent += len(frame)
            self._out_ready.clear()

    async def _publish_loop(self) -> None:
        assert self._js is not None
        subject = self.options.changes(self.node)
        number = 0
        while True:
            await self._publish_ready.wait()
            while self._publish:
                frame, done = self._publish[0]
                # a retry after a lost acknowledgement (a server that died with it) carries
                # the same id, which the stream drops as a duplicate
                msg_id = f"{self.node}/{self.hello.incarnation}/{number}"
                try:
                    await self._js.publish(subject, frame, timeout=5.0, stream=self.options.stream,
                                           headers={"Nats-Msg-Id": msg_id})
                except Exception as err:  # kept, in order, until the stream takes it
                    self._stats["publish_retries"] += 1
                    self.last_error = f"publish: {str(err) or type(err).__name__}"
                    await asyncio.sleep(0.25)
                    continue
                self._publish.popleft()
                number += 1
                self._publish_bytes -= len(frame)
                self._stats["published"] += 1
                self._stats["published_bytes"] += len(frame)
                if done is not None:
                    done(True)
            self._publish_ready.clear()

    async def _snapshot_loop(self) -> None:
        while True:
            await self._snap_ready.wait()
            while self._snap:
                key, blob = self._snap[0]
                try:
                    assert self._kv is not None
                    await self._kv.put(key, blob)
                except Exception as err:  # kept until the bucket takes it
                    self._stats["snapshot_retries"] += 1
                    self.last_error = f"snapshot: {str(err) or type(err).__name__}"
                    await asyncio.sleep(0.25)
                    continue
                self._snap.popleft()
                self._snap_bytes -= len(blob)
                self._stats["snapshots_stored"] += 1
            self._snap_ready.clear()

    # --- receiving ----------------------------------------------------------------------------

    async def _read_snapshots(self) -> int:
        """Every stored snapshot of a map this node syncs, as ``Streamed`` batches (a damaged
        or foreign one is counted and skipped: the stream and digests make up for it). Returns
        the stream sequence every map's state is complete up to: the lowest of the snapshots'
        when every digest bucket of every map has one that says it, else 0 (the whole
        stream is read then)."""
        assert self._kv is not None
        sizes = {m.name.encode().hex(): (m.name, m.key_size) for m in self.hello.maps}
        # (map in hex, bucket as its key spells it) -> the sequence its snapshot holds the
        # stream up to; the keys are compared as written, never parsed (a peer wrote them)
        held: dict[tuple[str, str], int] = {}
        # one watch delivers every key's latest value in a single flow (a get per key would
        # wait a round trip each: 1,024 buckets cost a second); it ends with None
        watcher = await self._kv.watchall(ignore_deletes=True)
        try:
            while (entry := await watcher.updates(timeout=_SNAPSHOT_WAIT_S)) is not None:
                hexname, _, bucket = entry.key.partition(".")
                if hexname not in sizes:
                    continue
                seq = await self._read_snapshot(entry.key, entry.value or b"", *sizes[hexname])
                if seq > 0:
                    held[hexname, bucket] = seq
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        wanted = [(h, str(b)) for h in sizes for b in range(self.options.digest_buckets)]
        if not wanted or any(w not in held for w in wanted):
            return 0
        after = min(held[w] for w in wanted)
        self._stats["stream_skipped_to"] = after
        return after

    async def _read_snapshot(self, key: str, value: bytes, name: str, key_size: int) -> int:
        """One stored snapshot delivered as a ``Streamed`` batch; returns the stream sequence
        it holds the stream up to (0: none said, or refused)."""
        if value.startswith(_SEQ_MAGIC) and len(value) >= len(_SEQ_MAGIC) + 8:
            at = len(_SEQ_MAGIC)
            seq, sealed = int.from_bytes(value[at:at + 8], "big"), value[at + 8:]
        else:
            seq, sealed = 0, value  # stored without its sequence: it says nothing of the stream
        try:
            regs, _ = unseal(sealed, key_size)
        except ValueError as err:
            self._stats["snapshots_damaged"] += 1
            log.warning("snapshot %s of map %s refused: %s", key, name, err)
            return 0
        keys, packs = regs.keys(), regs.values()
        if keys:
            batch = Batch(SNAPSHOT, 0, Packed([name] * len(keys), keys, packs))
            self._stats["snapshots_read"] += 1
            await self._inbox.put_message(Streamed(SNAPSHOT, batch), len(value))
        return seq

    async def _hello_loop(self) -> None:
        assert self._nc is not None
        while True:
            await asyncio.sleep(self.options.hello_interval)
            with contextlib.suppress(Exception):
                await self._nc.publish(self._hello_subject, self.hello_frame)
            now = time.monotonic()
            for node, s in list(self._peers.items()):
                if s.up and now - s.last_hello > self.options.peer_timeout:
                    self._down(node, s, TransportError(
                        f"no Hello from {node} for {self.options.peer_timeout:.1f} s"))
            for key, until in list(self._refused.items()):
                if until <= now:
                    del self._refused[key]

    async def _on_hello(self, msg: Msg) -> None:
        try:
            hello = codec.decode(msg.data, self.options.limits)
        except BpfsyncError:
            self._stats["frames_malformed"] += 1
            return
        if not isinstance(hello, Hello):
            self._stats["frames_malformed"] += 1
            return
        node = hello.node
        if msg.subject != self.options.hello_subject(node):
            self._stats["rejected_spoofed"] += 1  # another node's Hello, or on its subject
            return
        if node == self.node:
            if hello.incarnation != self.hello.incarnation:
                self._stats["dialed_self"] += 1  # another process claims this node's id
            return
        if not self.members.admits(node):
            self._stats["rejected_not_member"] += 1
            return
        if (node, hello.incarnation) in self._refused:
            self._stats["rejected_backed_off"] += 1
            return
        s = self._peers.setdefault(node, _Peer())
        s.last_hello = time.monotonic()
        if s.up and s.incarnation == hello.incarnation:
            return
        if s.up:  # a new incarnation: the peer restarted
            self._down(node, s, TransportError(f"{node} restarted"))
        if s.connected_since is not None:
            s.reconnects += 1
        s.incarnation, s.hello, s.up = hello.incarnation, hello, True
        s.connected_since = time.time()
        self._inbox.put_event(Received(node, hello, hello.incarnation))
        self._inbox.put_event(PeerUp(node, hello))
        # a node that just started learns now, not within hello_interval, that we are up
        assert self._nc is not None
        with contextlib.suppress(Exception):
            await self._nc.publish(self._hello_subject, self.hello_frame)

    def _down(self, node: str, s: _Peer, error: BpfsyncError | None) -> None:
        s.up = False
        s.connected_since = None
        if error is not None:
            self._error(s, str(error))
        self._inbox.put_event(PeerDown(node, error))

    async def _on_direct(self, msg: Msg) -> None:
        try:
            node = _sender(msg.subject)
            incarnation = int((msg.headers or {}).get(_INCARNATION, ""))
        except ValueError:
            self._stats["rejected_no_hello"] += 1
            return
        s = self._peers.get(node)
        if s is None or not s.up or s.incarnation != incarnation:
            self._stats["rejected_no_hello"] += 1  # not a member, or not up: nothing is kept
            return
        try:
            message = codec.decode(msg.data, self.options.limits, node)
        except BpfsyncError as err:
            self._stats["frames_malformed"] += 1
            self._error(s, f"malformed message: {err}")
            return
        s.messages_received += 1
        s.bytes_received += len(msg.data)
        await self._inbox.put_message(Received(node, message, incarnation), len(msg.data))

    async def _read_loop(self, sub: JetStreamContext.PullSubscription | None) -> None:
        while sub is None:
            try:
                after = await self._read_snapshots()
                sub = await self._consumer(after)
            except Exception as err:  # NATS away: read them once it is back
                self.last_error = f"snapshots: {str(err) or type(err).__name__}"
                await asyncio.sleep(0.25)
        # a consumer with nothing pending has read the stream: say so now, not after a fetch
        # that waits out its timeout
        with contextlib.suppress(Exception):
            if not self.stream_read and (await sub.consumer_info()).num_pending == 0:
                await self._stream_read()
        while True:
            try:
                msgs = await sub.fetch(_FETCH, timeout=_FETCH_WAIT_S)
            except nats.errors.TimeoutError:
                msgs = []
            except Exception as err:  # NATS away: read again once it is back
                self.last_error = f"read: {str(err) or type(err).__name__}"
                await asyncio.sleep(0.25)
                continue
            await self._deliver(msgs)
            pending = msgs[-1].metadata.num_pending if msgs else None
            if not self.stream_read and (not msgs or pending == 0):
                await self._stream_read()

    async def _stream_read(self) -> None:
        # the peers up have answered our first Hello by now (module docstring)
        await asyncio.sleep(self._hello_at + self.options.hello_interval - time.monotonic())
        self.stream_read = True
        self._inbox.put_event(StreamRead())

    async def _deliver(self, msgs: list[Msg]) -> None:
        """One fetch's stream messages as one ``Streamed`` per sender, its batches joined (up
        to ``_JOINED_RECORDS``): the merge of a big batch fills each digest bucket at once,
        where 64 batches spread over 1,024 buckets would go record by record (a catch-up
        replaying the stream ran at a third of the speed). The merge is state-based, so the
        order across senders does not matter; the fetch counts as handled once all are."""
        joined: dict[str, tuple[list[Msg], Packed]] = {}
        out: list[tuple[str, list[Msg], Packed]] = []
        last, changes = self._handled, self.options.changes_prefix
        for m in msgs:
            last = m.metadata.sequence.stream
            sender = m.subject.removeprefix(changes)
            batch = self._stream_batch(sender, m.data)
            if batch is None:
                with contextlib.suppress(Exception):
                    await m.ack()
                continue
            self._stats["streamed"] += 1
            records = Packed.of(batch.records)
            if sender in joined and len(joined[sender][1]) + len(records) <= _JOINED_RECORDS:
                joined[sender][0].append(m)
                joined[sender][1].extend(records)
            else:
                if sender in joined:
                    out.append((sender, *joined[sender]))
                joined[sender] = ([m], records)
        out += [(sender, ms, records) for sender, (ms, records) in joined.items()]
        if not out:  # nothing to wait for before these count as handled
            if self._to_ack:
                self._to_ack.append(([], last))
            else:
                self._handled = last
            return
        for i, (sender, ms, records) in enumerate(out):
            # handled up to the fetch's last message once its last event is
            self._to_ack.append((ms, last if i == len(out) - 1 else self._handled))
            await self._inbox.put_message(Streamed(sender, Batch(sender, 0, records)),
                                          sum(len(m.data) for m in ms))

    def _stream_batch(self, sender: str, data: bytes) -> Batch | None:
        """The batch a stream message holds, when it is one to deliver (module docstring)."""
        if sender == self.node:
            return None  # our own
        if not self.members.admits(sender):
            self._stats["rejected_not_member"] += 1
            log.warning("a batch on the change stream from %s, who is no member, was refused",
                        sender)
            return None
        try:
            batch = codec.decode(data, self.options.limits, sender)
        except BpfsyncError as err:
            self._stats["frames_malformed"] += 1
            log.warning("a malformed batch on the change stream from %s was refused: %s",
                        sender, err)
            return None
        if not isinstance(batch, Batch) or batch.sender != sender:
            self._stats["rejected_spoofed"] += 1
            log.warning("a message on %s's subject of the change stream that is not %s's batch"
                        " was refused", sender, sender)
            return None
        return batch

    def _error(self, s: _Peer, why: str) -> None:
        s.last_error, s.last_error_at = why, time.time()
