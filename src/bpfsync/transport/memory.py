"""An in-process network of transports, for testing the layers above without sockets.

Same contract as GrpcMesh (see base.py): PeerUp with the peer's Hello on each side, the peer's
Hello as the first Received, in-order delivery per link, sends refused while a link is down and
never replayed. Every message goes through the codec, so a value the real transport would refuse
is refused here too. Links can be cut and healed to test what the core does on reconnect:

    net = MemoryNetwork()
    a, b = net.transport(hello_a), net.transport(hello_b)
    await a.start(); await b.start()     # a and b see PeerUp for each other
    net.cut("a", "b")                     # both see PeerDown; send() returns False
    net.heal("a", "b")                    # both see PeerUp again (and each other's Hello)
    net.hold("a", "b")                    # what a sends b waits on the (still up) link ...
    net.release("a", "b")                 # ... and arrives now, in order

Delivery is immediate and unbounded: there is no network to push back on a slow consumer.
Held frames are dropped when their link is cut or either end leaves, like a real link's queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

from bpfsync.core.messages import Hello, Message
from bpfsync.errors import BpfsyncError, TransportError
from bpfsync.transport import codec
from bpfsync.transport.base import (
    Event,
    OversizedMessageError,
    PeerDown,
    PeerState,
    PeerUp,
    Received,
)
from bpfsync.transport.inbox import Inbox
from bpfsync.transport.penalty import Penalties

__all__ = ["MemoryNetwork", "MemoryTransport"]


class MemoryNetwork:
    def __init__(self, max_message_bytes: int = 16 << 20) -> None:
        self.max_message_bytes = max_message_bytes
        self._members: dict[str, MemoryTransport] = {}
        self._cut: set[frozenset[str]] = set()
        self._suspended: set[frozenset[str]] = set()  # cut by a disconnect's penalty (below)
        self._held: dict[tuple[str, str], list[bytes]] = {}  # (from, to) -> frames not delivered

    def transport(self, hello: Hello) -> MemoryTransport:
        return MemoryTransport(self, hello)

    def linked(self, a: str, b: str) -> bool:
        pair = frozenset((a, b))
        return (a in self._members and b in self._members and pair not in self._cut
                and pair not in self._suspended)

    def suspend(self, a: str, b: str, seconds: float) -> None:
        """Cut ``a``-``b`` for ``seconds`` (a penalty), apart from ``cut``: when the penalty
        ends the link comes back only if no test has cut it meanwhile."""
        pair = frozenset((a, b))
        if self.linked(a, b):
            err = TransportError(f"link {a}-{b} suspended for {seconds:.1f} s")
            self._members[a]._inbox.put_event(PeerDown(b, err))
            self._members[b]._inbox.put_event(PeerDown(a, err))
        self._suspended.add(pair)

        def resume() -> None:
            self._suspended.discard(pair)
            if self.linked(a, b):
                self._members[a]._connect(self._members[b])

        asyncio.get_running_loop().call_later(seconds, resume)

    def cut(self, a: str, b: str) -> None:
        """Break the links between ``a`` and ``b`` (both directions) until ``heal``, also while
        either is off the network: a node that joins later does not reach the other."""
        was_linked = self.linked(a, b)
        self._cut.add(frozenset((a, b)))
        self._drop_held(lambda pair: set(pair) == {a, b})
        if was_linked:
            err = TransportError(f"link {a}-{b} cut")
            self._members[a]._inbox.put_event(PeerDown(b, err))
            self._members[b]._inbox.put_event(PeerDown(a, err))

    def heal(self, a: str, b: str) -> None:
        self._cut.discard(frozenset((a, b)))
        if self.linked(a, b):
            self._members[a]._connect(self._members[b])

    def hold(self, a: str, b: str) -> None:
        """Keep what ``a`` sends ``b`` from arriving until ``release`` (one direction; the
        link stays up): a slow link, to order one peer's messages after another's."""
        self._held.setdefault((a, b), [])

    def release(self, a: str, b: str) -> None:
        """Deliver, in order, what ``hold(a, b)`` kept, and stop holding."""
        frames = self._held.pop((a, b), [])
        if frames and self.linked(a, b):
            sender, receiver = self._members[a], self._members[b]
            for frame in frames:
                receiver._deliver(sender, frame)

    def _drop_held(self, which: Callable[[tuple[str, str]], bool]) -> None:
        for pair, frames in self._held.items():
            if which(pair):
                frames.clear()

    def _join(self, t: MemoryTransport) -> None:
        if t.node in self._members:
            raise TransportError(f"node {t.node!r} is already on this network")
        self._members[t.node] = t
        for other in list(self._members.values()):
            if other is not t and self.linked(t.node, other.node):
                t._connect(other)

    def _leave(self, t: MemoryTransport) -> None:
        if self._members.get(t.node) is not t:
            return
        del self._members[t.node]
        self._drop_held(lambda pair: t.node in pair)
        for other in self._members.values():
            if frozenset((t.node, other.node)) not in self._cut:
                other._inbox.put_event(PeerDown(t.node, TransportError(f"{t.node} closed")))


class MemoryTransport:
    """One node on a MemoryNetwork; implements bpfsync.transport.base.Transport."""

    def __init__(self, network: MemoryNetwork, hello: Hello) -> None:
        self.hello = hello
        self._net = network
        self._inbox = Inbox()
        self._sent: dict[str, list[int]] = {}  # peer -> [messages, bytes]
        self._received: dict[str, list[int]] = {}
        self._stats = {"send_refused": 0, "send_oversized": 0, "disconnected": 0}
        self._penalties = Penalties()
        self._started = self._closed = False

    @property
    def node(self) -> str:
        return self.hello.node

    async def start(self) -> None:
        if not self._started:
            self._started = True
            self._net._join(self)

    def send(self, peer: str, message: Message) -> bool:
        return bool(self.broadcast(message, [peer]))

    def backlog(self, peer: str) -> int | None:
        # delivery is immediate: only a held link has frames waiting; a cut one has no backlog
        if not self._net.linked(self.node, peer):
            return None
        return sum(map(len, self._net._held.get((self.node, peer), ())))

    def broadcast(self, message: Message, to: Iterable[str] | None = None) -> list[str]:
        frame = codec.encode(message)
        if len(frame) > self._net.max_message_bytes:
            self._stats["send_oversized"] += 1
            raise OversizedMessageError(f"{len(frame)} bytes, over {self._net.max_message_bytes}")
        members = self._net._members
        targets = [n for n in members if n != self.node] if to is None else list(to)
        sent = []
        for peer in targets:
            if not self._started or self._closed or not self._net.linked(self.node, peer):
                self._stats["send_refused"] += 1
                continue
            held = self._net._held.get((self.node, peer))
            if held is None:
                members[peer]._deliver(self, frame)
            else:
                held.append(frame)
            counts = self._sent.setdefault(peer, [0, 0])
            counts[0] += 1
            counts[1] += len(frame)
            sent.append(peer)
        return sent

    def events(self) -> AsyncIterator[Event]:
        return aiter(self._inbox)

    def peers(self) -> list[PeerState]:
        out = []
        for peer in sorted((self._net._members.keys() | self._sent.keys()) - {self.node}):
            up = self._net.linked(self.node, peer)
            other = self._net._members.get(peer)
            sent, received = self._sent.get(peer, [0, 0]), self._received.get(peer, [0, 0])
            out.append(PeerState(
                address=None, node=peer, connected=up, inbound=up,
                incarnation=other.hello.incarnation if other else None, last_error=None,
                messages_sent=sent[0], bytes_sent=sent[1],
                messages_received=received[0], bytes_received=received[1],
            ))
        return out

    @property
    def stats(self) -> Mapping[str, int]:
        return dict(self._stats)

    def disconnect(self, peer: str, error: BpfsyncError, incarnation: int | None = None) -> float:
        """Suspend the link with ``peer`` until its penalty ends."""
        hold = self._penalties.punish(peer)
        self._stats["disconnected"] += 1
        self._net.suspend(self.node, peer, hold)
        return hold

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._net._leave(self)
            self._inbox.close()

    def _connect(self, other: MemoryTransport) -> None:
        for x, y in ((self, other), (other, self)):
            x._inbox.put_event(PeerUp(y.node, y.hello))
            x._inbox.put_event(Received(y.node, y.hello, y.hello.incarnation))

    def _deliver(self, sender: MemoryTransport, frame: bytes) -> None:
        counts = self._received.setdefault(sender.node, [0, 0])
        counts[0] += 1
        counts[1] += len(frame)
        message = codec.decode(frame, peer=sender.node)
        self._inbox.put_event(Received(sender.node, message, sender.hello.incarnation))
