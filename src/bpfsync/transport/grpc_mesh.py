"""GrpcMesh: the embedded transport, a full mesh of gRPC streams between the nodes (DESIGN §4).

Stream rule: each node dials every peer address and sends its messages only on the stream it
dialed; it receives on the streams the others dialed to it. Two nodes therefore share two streams,
one per direction of data, and on each the accepting side only answers the Hello. Why this rule:

- nothing to negotiate: no tie-break on who owns a link when both dial at once, no handover;
- one direction's order is one stream's order, and everything about sending to a peer (queue,
  backoff, PeerUp/PeerDown) lives in one place, the PeerLink;
- an Ack or Pull for a peer travels on this node's own link to it, like any other message.

The cost: two connections per pair (fine to ~32 nodes), and a node sends only to peers it dials,
so every node must list every other (a static list, or a DNS name that resolves to all of them:
this node's own address in that list is found by the Hello exchange and skipped).

Identity: the first frame in each direction is a Hello. A peer is known by the node id in its
Hello, checked against the allow-list (and with mTLS, optionally, against its certificate). Frame
limits and rejections are described in server.py (accepting) and peer.py (dialing).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterable, Mapping

from bpfsync.core.messages import Hello, Message
from bpfsync.errors import BpfsyncError, TransportError
from bpfsync.transport import codec
from bpfsync.transport.base import (
    Event,
    OversizedMessageError,
    PeerDown,
    PeerState,
    PeerUp,
)
from bpfsync.transport.inbox import Inbox
from bpfsync.transport.options import MeshOptions
from bpfsync.transport.peer import PeerLink
from bpfsync.transport.server import StreamServer

__all__ = ["GrpcMesh"]

log = logging.getLogger(__name__)

COUNTERS = (
    "streams_opened",  # streams peers dialed to this node, before any check
    "streams_accepted",  # ... that passed the Hello check
    "rejected_no_hello",  # first frame missing, late, or not a Hello
    "rejected_unauthenticated",  # node not allowed, spoofed sender, own id from elsewhere
    "rejected_protocol",  # a Hello of another protocol version
    "frames_malformed",  # undecodable or invalid frames (the stream was ended)
    "frames_oversized",  # frames over max_message_bytes (the stream was ended)
    "dialed_self",  # streams that turned out to come from this node itself
    "send_refused",  # send() to a peer whose link was down or whose queue was full
    "send_oversized",  # send() of a message over max_message_bytes (OversizedMessageError)
    "dns_failures",  # failed resolutions of peers_dns
)


class GrpcMesh:
    """The gRPC full mesh; implements bpfsync.transport.base.Transport.

    ``hello`` is this node's (node id, incarnation, maps). ``listen`` is HOST:PORT (port 0 picks
    one: see ``port``). ``peers`` are HOST:PORT addresses dialed as given; ``peers_dns`` is a
    HOST:PORT whose name resolves to several peers, each dialed, re-resolved every
    ``options.dns_refresh`` seconds.
    """

    def __init__(
        self,
        hello: Hello,
        listen: str,
        peers: Iterable[str] = (),
        *,
        peers_dns: str | None = None,
        options: MeshOptions | None = None,
    ) -> None:
        self.hello = hello
        self.listen = listen
        self.options = options or MeshOptions()
        self.port = 0
        self._static = tuple(dict.fromkeys(peers))
        self._dns = peers_dns
        self._stats = dict.fromkeys(COUNTERS, 0)
        self._inbox = Inbox(self.options.max_pending_messages)
        self._server = StreamServer(hello, self.options, self._inbox, self._stats,
                                    on_accepted=self._peer_appeared)
        self._links: dict[str, PeerLink] = {}  # by address
        self._by_node: dict[str, PeerLink] = {}  # links that are up, by the node they reach
        self._dns_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def node(self) -> str:
        return self.hello.node

    # --- Transport ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.port or self._closed:
            raise RuntimeError("a GrpcMesh starts once")
        try:
            self.port = await self._server.start(self.listen)
        except OSError as err:
            raise TransportError(str(err)) from err
        self._reconcile(self._static)
        if self._dns is not None:
            self._dns_task = asyncio.create_task(self._dns_loop(self._dns), name="bpfsync-dns")

    def send(self, peer: str, message: Message) -> bool:
        frame = self._encode(message)
        link = self._by_node.get(peer)
        if link is None or not link.enqueue(frame):
            self._stats["send_refused"] += 1
            return False
        return True

    def backlog(self, peer: str) -> int | None:
        link = self._by_node.get(peer)
        return None if link is None else link.queued_bytes

    def broadcast(self, message: Message, to: Iterable[str] | None = None) -> list[str]:
        frame = self._encode(message)
        targets = list(self._by_node) if to is None else to
        sent = []
        for peer in targets:
            link = self._by_node.get(peer)
            if link is not None and link.enqueue(frame):
                sent.append(peer)
            else:
                self._stats["send_refused"] += 1
        return sent

    def events(self) -> AsyncIterator[Event]:
        return aiter(self._inbox)

    def peers(self) -> list[PeerState]:
        # Builds from copies of the tables, so a status thread may call it between loop steps.
        inbound = dict(self._server.inbound)
        out = []
        for link in list(self._links.values()):
            if link.is_self:
                continue
            inb = inbound.pop(link.node, None) if link.node else None
            out.append(PeerState(
                address=link.address,
                node=link.node,
                connected=link.up,
                inbound=bool(inb and inb.streams),
                incarnation=link.incarnation if inb is None else inb.incarnation,
                last_error=link.last_error or (inb.last_error if inb else None),
                messages_sent=link.messages_sent,
                bytes_sent=link.bytes_sent,
                messages_received=inb.messages_received if inb else 0,
                bytes_received=inb.bytes_received if inb else 0,
                reconnects=link.reconnects,
                queued_bytes=link.queued_bytes,
                dropped=link.dropped,
            ))
        for inb in inbound.values():  # nodes that dial this node but that it does not dial
            if inb.node == self.node:
                continue
            out.append(PeerState(
                address=None, node=inb.node, connected=False, inbound=inb.streams > 0,
                incarnation=inb.incarnation, last_error=inb.last_error,
                messages_received=inb.messages_received, bytes_received=inb.bytes_received,
            ))
        return out

    @property
    def stats(self) -> Mapping[str, int]:
        return dict(self._stats)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._dns_task is not None:
            self._dns_task.cancel()
            await asyncio.gather(self._dns_task, return_exceptions=True)
        await asyncio.gather(*(link.stop() for link in self._links.values()))
        await self._server.stop(grace=0)
        self._inbox.close()

    def _peer_appeared(self, node: str) -> None:
        """A peer dialed us: our own links to it (or not yet to anyone) dial now."""
        for link in self._links.values():
            if link.node is None or link.node == node:
                link.redial()

    # --- hooks called by PeerLink ------------------------------------------------------------

    def link_up(self, link: PeerLink, hello: Hello) -> None:
        other = self._by_node.get(hello.node)
        if other is not None and other is not link:
            raise TransportError(
                f"{link.address}: node {hello.node!r} is already linked via {other.address}"
            )
        self._by_node[hello.node] = link
        self._inbox.put_event(PeerUp(hello.node, hello))

    def link_down(self, link: PeerLink, error: BpfsyncError | None) -> None:
        if link.node is not None and self._by_node.get(link.node) is link:
            del self._by_node[link.node]
            self._inbox.put_event(PeerDown(link.node, error))

    # --- internals ---------------------------------------------------------------------------

    def _encode(self, message: Message) -> bytes:
        frame = codec.encode(message)
        if len(frame) > self.options.max_message_bytes:
            self._stats["send_oversized"] += 1
            raise OversizedMessageError(
                f"{type(message).__name__} encodes to {len(frame)} bytes, over the limit of "
                f"{self.options.max_message_bytes}: send it in smaller parts"
            )
        return frame

    def _reconcile(self, addresses: Iterable[str]) -> list[PeerLink]:
        """Dial each new address; return the links (other than static ones) no longer wanted."""
        wanted = set(self._static) | set(addresses)
        for address in wanted - self._links.keys():
            link = self._links[address] = PeerLink(address, self.hello, self.options, self)
            link.start()
        return [self._links.pop(a) for a in list(self._links) if a not in wanted]

    async def _dns_loop(self, name: str) -> None:
        while True:
            try:
                addresses = await resolve(name)
            except OSError as err:
                self._stats["dns_failures"] += 1
                log.warning("cannot resolve peers_dns %s: %s; keeping the current peers", name, err)
            else:
                for gone in self._reconcile(addresses):
                    await gone.stop()
            await asyncio.sleep(self.options.dns_refresh)


async def resolve(hostport: str) -> list[str]:
    """Every TCP address HOST resolves to, as HOST:PORT strings (IPv6 in brackets)."""
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, int(port), type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    addresses = (
        f"[{sockaddr[0]!s}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]!s}:{port}"
        for family, _type, _proto, _canon, sockaddr in infos
    )
    return list(dict.fromkeys(addresses))  # once each, in the resolver's order
