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
Hello, checked against the membership (core/membership.py) and, with mTLS, against its
certificate (tls.py); a peer address may name the node it must reach (``ID@HOST:PORT``). Frame
limits and rejections are described in server.py (accepting) and peer.py (dialing). A member the
agent disconnects for bad input is refused for a while (penalty.py).

Certificate rotation: the TLS files are re-read every ``options.tls_refresh`` seconds and on
``reload_tls()`` (the agent calls it on SIGHUP). A new set that passes its checks re-establishes
every connection: each link dials again on a new channel, and the server is restarted on its
port, so inbound connections handshake again too (gRPC cannot close one connection of a
running server); peers redial within their backoff.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterable, Mapping

from bpfsync.core.membership import Membership
from bpfsync.core.messages import Hello, Message
from bpfsync.errors import BpfsyncError, NotMemberError, TransportError
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
from bpfsync.transport.penalty import Penalties
from bpfsync.transport.server import StreamServer
from bpfsync.transport.tls import TlsMaterial, TlsStore

__all__ = ["GrpcMesh"]

log = logging.getLogger(__name__)

COUNTERS = (
    "streams_opened",  # streams peers dialed to this node, before any check
    "streams_accepted",  # ... that passed the Hello check
    "rejected_no_hello",  # first frame missing, late, or not a Hello
    "rejected_unauthenticated",  # id not in its certificate, spoofed sender, own id from elsewhere
    "rejected_not_member",  # a node id outside the cluster (before any state for it)
    "rejected_backed_off",  # a member still refused after the agent disconnected it
    "rejected_too_many_streams",  # a member already holding max_streams_per_peer streams
    "rejected_protocol",  # a Hello of another protocol version
    "frames_malformed",  # undecodable or invalid frames (the stream was ended)
    "frames_oversized",  # frames over max_message_bytes (the stream was ended)
    "dialed_self",  # streams that turned out to come from this node itself
    "send_refused",  # send() to a peer whose link was down or whose queue was full
    "send_oversized",  # send() of a message over max_message_bytes (OversizedMessageError)
    "dns_failures",  # failed resolutions of peers_dns
    "disconnected",  # members disconnected by the agent for bad input (``disconnect``)
    "tls_reloads",  # certificate sets taken while running
    "tls_reload_failures",  # changed certificate files refused by a check (the old set stays)
)

_STRANGER_REDIAL_S = 1.0  # a refused unknown id makes links that are down redial, this often


class GrpcMesh:
    """The gRPC full mesh; implements bpfsync.transport.base.Transport.

    ``hello`` is this node's (node id, incarnation, maps). ``listen`` is HOST:PORT (port 0 picks
    one: see ``port``). ``peers`` are HOST:PORT addresses dialed as given, or ID@HOST:PORT for a
    peer that must be node ID; ``peers_dns`` is a HOST:PORT whose name resolves to several
    peers, each dialed, re-resolved every ``options.dns_refresh`` seconds. ``members`` decides
    who may connect (default: any node; the agent always gives its cluster's).
    """

    def __init__(
        self,
        hello: Hello,
        listen: str,
        peers: Iterable[str] = (),
        *,
        peers_dns: str | None = None,
        options: MeshOptions | None = None,
        members: Membership | None = None,
    ) -> None:
        self.hello = hello
        self.listen = listen
        self.options = options or MeshOptions()
        self.members = members or Membership.open(hello.node)
        self.port = 0
        self._static: dict[str, str | None] = {}  # address -> the node id it must reach
        for peer in peers:
            node, at, address = peer.rpartition("@")
            self._static[address] = node if at else None
        self._dns = peers_dns
        self._stats = dict.fromkeys(COUNTERS, 0)
        self._tls = (TlsStore(self.options.tls, hello.node)
                     if self.options.tls is not None else None)
        self._inbox = Inbox(self.options.max_pending_messages, self.options.max_pending_bytes)
        self.penalties = Penalties(self.options.penalty_base, self.options.penalty_cap)
        self._server = StreamServer(hello, self.options, self._inbox, self._stats,
                                    self.members, self.penalties,
                                    on_accepted=self._peer_appeared,
                                    on_stranger=self._stranger)
        self._links: dict[str, PeerLink] = {}  # by address
        self._by_node: dict[str, PeerLink] = {}  # links that are up, by the node they reach
        self._dns_task: asyncio.Task[None] | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self._stranger_at = -_STRANGER_REDIAL_S
        self._closed = False

    @property
    def node(self) -> str:
        return self.hello.node

    # --- Transport ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.port or self._closed:
            raise RuntimeError("a GrpcMesh starts once")
        try:
            self.port = await self._server.start(self.listen, self.tls)
        except OSError as err:
            raise TransportError(str(err)) from err
        self._reconcile(self._static)
        if self._dns is not None:
            self._dns_task = asyncio.create_task(self._dns_loop(self._dns), name="bpfsync-dns")
        if self._tls is not None:
            self._tls_task = asyncio.create_task(self._tls_loop(), name="bpfsync-tls")

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
            # the latest failure of either link: the inbound one's when it is the more recent
            error, error_at = link.last_error, link.last_error_at
            if inb is not None and inb.last_error and (
                error is None or inb.last_error_at > (error_at or 0.0)
            ):
                error, error_at = inb.last_error, inb.last_error_at
            out.append(PeerState(
                address=link.address,
                node=link.node,
                connected=link.up,
                inbound=bool(inb and inb.streams),
                incarnation=link.incarnation if inb is None else inb.incarnation,
                last_error=error,
                last_error_at=error_at,
                connected_since=link.connected_since,
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
                last_error_at=inb.last_error_at if inb.last_error else None,
                messages_received=inb.messages_received, bytes_received=inb.bytes_received,
            ))
        return out

    @property
    def stats(self) -> Mapping[str, int]:
        return dict(self._stats)

    def disconnect(self, peer: str, error: BpfsyncError, incarnation: int | None = None) -> float:
        self._stats["disconnected"] += 1
        if self._tls is None and incarnation is not None:  # see Transport.disconnect
            log.warning("ending the streams of peer %s (incarnation %d): %s", peer, incarnation,
                        error)
            self._server.kick(peer, f"disconnected: {error}", incarnation)
            return 0.0
        hold = self.penalties.punish(peer)
        log.warning("disconnecting peer %s for %.1f s: %s", peer, hold, error)
        self._server.kick(peer, f"disconnected for {hold:.1f} s: {error}")
        for link in self._links.values():
            if link.node == peer:
                link.hold(hold, error)
        return hold

    @property
    def tls(self) -> TlsMaterial | None:
        """The TLS material in use (None: plaintext)."""
        return None if self._tls is None else self._tls.current

    async def reload_tls(self) -> bool:
        """Re-read the TLS files now; with a new valid set, re-establish every connection with
        it. Returns whether the set changed. A set that fails a check changes nothing."""
        if self._tls is None or self._closed:
            return False
        before = self._tls.failures
        changed = self._tls.refresh()
        self._stats["tls_reload_failures"] += self._tls.failures - before
        if not changed:
            return False
        self._stats["tls_reloads"] += 1
        for link in self._links.values():
            link.renew()
        await self._server.stop(grace=0)
        listen = f"{self.listen.rpartition(':')[0]}:{self.port}"
        for attempt in range(50):  # the port was ours a moment ago; only a race can take it
            try:
                await self._server.start(listen, self.tls)
                return True
            except OSError as err:
                if attempt == 49:
                    raise TransportError(
                        f"cannot listen on {listen} again with the new TLS credentials: {err}"
                    ) from err
                await asyncio.sleep(0.1)
        return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._dns_task, self._tls_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*(link.stop() for link in self._links.values()))
        await self._server.stop(grace=0)
        self._inbox.close()

    def _peer_appeared(self, node: str) -> None:
        """A peer dialed us: our own links to it (or not yet to anyone) dial now."""
        for link in self._links.values():
            if link.node is None or link.node == node:
                link.redial()

    def _stranger(self) -> None:
        """A node we do not know (yet) dialed us and was refused. With learned membership it
        may be a peer our own dial has not reached yet: dial the links that are down now (at
        most every _STRANGER_REDIAL_S, so a flood of made-up ids costs nothing more)."""
        now = asyncio.get_running_loop().time()
        if self.members.mode == "learned" and now - self._stranger_at >= _STRANGER_REDIAL_S:
            self._stranger_at = now
            for link in self._links.values():
                if not link.up:
                    link.redial()

    # --- hooks called by PeerLink ------------------------------------------------------------

    def answered(self, link: PeerLink, hello: Hello) -> None:
        # a configured address answered as hello.node: a member by that (learned membership)
        self.members.learn(hello.node)

    def link_up(self, link: PeerLink, hello: Hello) -> None:
        if not self.members.admits(hello.node):
            raise NotMemberError(f"{link.address}: node {hello.node!r} is not a member of this"
                                 " cluster", hello.node)
        if self.penalties.left(hello.node) > 0:
            raise TransportError(f"{link.address}: node {hello.node!r} is backed off")
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
            link = self._links[address] = PeerLink(
                address, self.hello, self.options, self,
                expected=self._static.get(address), tls=lambda: self.tls,
            )
            link.start()
        return [self._links.pop(a) for a in list(self._links) if a not in wanted]

    async def _tls_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.tls_refresh)
            try:
                await self.reload_tls()
            except TransportError as err:  # not listening any more: the agent must know
                self._inbox.fail(err)
                return

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
