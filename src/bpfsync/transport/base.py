"""The interface every transport implements, and the values it hands to the agent.

A transport moves protocol messages (bpfsync.core.messages) between this node and its peers and
manages the connections. It does not merge, number, acknowledge or resend: the core does. What it
promises is per-link order and honesty about links:

- ``send``/``broadcast`` never block. A message is queued on a link that is up, or refused (False)
  when the link is down, and written in order. Messages still queued when a link goes down are
  dropped and counted, never carried over to the next connection: after ``PeerUp`` the core resends
  whatever the peer has not acknowledged, and anything else is repaired by Digest/Pull.
- ``events()`` yields, in order of arrival: ``PeerUp`` when a link to a peer is established (the
  peer's Hello included: a new incarnation means it restarted), ``Received`` for each message a peer
  sent, ``PeerDown`` when a link is lost (with the reason). Each inbound link's first message is
  the peer's Hello. Connection events are never dropped; message delivery waits while too many are
  pending, which slows the sending peer rather than growing memory without bound.
- A peer is named by its node id (from its Hello); addresses only appear in ``peers()``. Only
  members of the cluster (core/membership.py) get that far: a transport refuses any other node
  at its Hello, before it keeps anything for it, so no event ever names a non-member.
- ``disconnect`` ends a member's links and refuses it for a while (penalty.py): the agent's
  answer to input it refused as the peer's fault. Without authentication (plaintext) it ends
  only the streams that sent the input.

Implementations: GrpcMesh (grpc_mesh.py), NatsBus (natsbus.py: also ``Streamed`` batches, which
every node reads from a stream) and MemoryNetwork/MemoryTransport (memory.py, for tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from bpfsync.core.messages import Batch, Hello, Message
from bpfsync.errors import BpfsyncError, OversizedMessageError

__all__ = [
    "Event",
    "OversizedMessageError",
    "PeerDown",
    "PeerState",
    "PeerUp",
    "Publisher",
    "Received",
    "StreamRead",
    "Streamed",
    "Transport",
]


@dataclass(frozen=True, slots=True)
class PeerUp:
    """A link to ``peer`` is up: ``send`` to it now queues. ``hello`` is what the peer announced."""

    peer: str
    hello: Hello


@dataclass(frozen=True, slots=True)
class PeerDown:
    """The link to ``peer`` is lost; messages queued for it were dropped. ``error`` says why."""

    peer: str
    error: BpfsyncError | None  # None when this node closed the link itself


@dataclass(frozen=True, slots=True)
class Received:
    """``peer`` (authenticated by its Hello on this link) sent ``message``. ``incarnation``
    is the one that Hello announced: a peer's numbering of batches is per incarnation."""

    peer: str
    message: Message
    incarnation: int = 0


@dataclass(frozen=True, slots=True)
class Streamed:
    """A batch of changes ``peer`` published once for every node, read from a stream (the
    NATS bus, natsbus.py): not bound to a link, numbered or acknowledged by the core."""

    peer: str
    message: Batch


@dataclass(frozen=True, slots=True)
class StreamRead:
    """Everything the stream held when this node first read it has been delivered (once)."""


Event = PeerUp | PeerDown | Received | Streamed | StreamRead


@dataclass(frozen=True, slots=True)
class PeerState:
    """A snapshot of one peer for status pages and metrics (see ``Transport.peers``)."""

    address: str | None  # where this node dials it; None for a peer that only dials this node
    node: str | None  # its node id once a Hello was seen, else None
    connected: bool  # the outbound link is up: send() to it queues
    inbound: bool  # it has a link open to this node
    incarnation: int | None  # from its latest Hello
    last_error: str | None  # the latest failure on either link, kept after recovery
    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    reconnects: int = 0  # outbound links established after the first
    queued_bytes: int = 0  # encoded messages waiting to be written
    dropped: int = 0  # messages queued for it but lost (link went down, queue full)
    last_error_at: float | None = None  # time.time() of last_error
    connected_since: float | None = None  # time.time() the outbound link came up; None if down


@runtime_checkable
class Transport(Protocol):
    """What the agent drives; see the module docstring for the delivery rules."""

    async def start(self) -> None:
        """Start accepting peers and dialing them. Returns once this node can be dialed."""
        ...

    def send(self, peer: str, message: Message) -> bool:
        """Queue ``message`` for ``peer``; False if its link is down or its queue is full.

        Raises OversizedMessageError if the encoded message exceeds the frame limit.
        """
        ...

    def broadcast(self, message: Message, to: Iterable[str] | None = None) -> list[str]:
        """Send one message to each peer in ``to`` (default: every peer whose link is up).

        Encodes once. Returns the peers it was queued for.
        """
        ...

    def backlog(self, peer: str) -> int | None:
        """Encoded bytes queued for ``peer`` and not yet written; None while its link is down.

        Bulk senders (repair answers) pace themselves on it instead of filling the queue."""
        ...

    def events(self) -> AsyncIterator[Event]:
        """The single stream of connection events and received messages; ends at ``close``."""
        ...

    def peers(self) -> list[PeerState]:
        """A snapshot of every known peer."""
        ...

    def disconnect(self, peer: str, error: BpfsyncError, incarnation: int | None = None) -> float:
        """End the links with ``peer`` and refuse it for a while, because of ``error`` (its
        fault), that came on a stream of ``incarnation``; returns for how many seconds (0: only
        that incarnation's streams were ended, as a transport that cannot authenticate node ids
        must do: a penalty by id would let anyone claiming it cut off the real node). The
        other peers are not affected."""
        ...

    @property
    def stats(self) -> Mapping[str, int]:
        """Transport-wide counters (rejected streams, malformed frames, ...), monotonic."""
        ...

    async def close(self) -> None:
        """Close every link and stop accepting; ``events()`` ends. Idempotent."""
        ...


@runtime_checkable
class Publisher(Protocol):
    """A transport whose nodes all read one stream (NatsBus): a batch of this node's changes
    is published once for every node, instead of sent to each peer."""

    def publish(self, batch: Batch, done: Callable[[bool], None] | None = None) -> bool:
        """Queue ``batch`` for the stream; False when the queue is full. ``done(True)`` once
        the stream has stored it."""
        ...

    def publish_backlog(self) -> int:
        """Encoded bytes of batches queued and not yet stored by the stream."""
        ...

    def put_snapshot(self, map: str, bucket: int, blob: bytes) -> bool:
        """Queue the sealed registers of one digest bucket as its stored snapshot; False when
        the queue is full."""
        ...

    @property
    def max_message_bytes(self) -> int:
        """The largest message the stream takes."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the stream can be reached now."""
        ...

    def describe(self) -> Mapping[str, object]:
        """For /status: where the stream is, whether it is reached, what waits for it."""
        ...
