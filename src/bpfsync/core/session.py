"""The session with one peer: batch numbering, acks, resend after reconnect, when to repair.

Sans-I/O: the agent feeds it the transport's events for one peer and sends what it returns; the
Replica merges the records. One PeerSession per peer for the life of this process: it outlives
connections, which is how a reconnect resumes. It fits a transport with one stream per direction
(GrpcMesh): our stream to the peer carries our Batches, Acks, Digests and Pulls; the peer's
stream to us starts with its Hello and carries its messages.

    transport event                           call                  then send to the peer
    our stream is up (PeerUp)                 link_up(hello)        the batches it returns
    our stream is down (PeerDown)             link_down()
    Received Hello (its stream started)       on_hello(hello)       the Ack it returns
    Received Batch                            on_batch(batch, inc)  if True: receive, ack()
    Received Ack                              on_ack(ack)
    records to send (Replica results)         outbox.add(records)   next_batch(...) while any
    take_repair() is true                                           a Digest of every map

Rules
  P1  Our batches are numbered 1, 2, 3, ... per incarnation of this process (Batch.seq). Seq 0
      marks repair batches (answers to Digest/Pull): applied, never numbered or acked.
  P2  A numbered batch is held until the peer acks its seq. At most ``max_unacked`` are held;
      past that the oldest is dropped (``window_open`` tells the agent to wait instead, also
      once ``max_unacked_records`` records are held). The record limit is small on purpose: a
      few batches keep a peer busy, and what waits beyond them waits in the outbox, where a
      newer change of a key replaces the older one.
  P3  When our stream comes up, every held batch is sent again: the peer skips those it has.
      If we dropped batches it never acked, that gap is repaired by digest instead (P5).
  P4  Receiving: numbering is per peer incarnation, taken from the Hello that opened the stream
      a batch came on, so two streams claiming one node id (a restart racing the old process's
      last frames, or a spoofer on a plaintext link) cannot disturb each other's numbering. The
      first numbered batch of an incarnation sets its baseline (whatever came before is covered
      by the first-contact repair); then seq = last + 1 is applied, seq <= last is a duplicate
      resend and skipped, last + 1 < seq <= last + MAX_SEQ_STEP is a gap: applied anyway
      (records are state), acked up to its seq, and repaired. Beyond MAX_SEQ_STEP is P6: a
      sender holds at most ``max_unacked`` batches, so no honest gap is that wide, and taking
      such a seq would make every real batch after it look like a duplicate. Acks go on our
      stream to the peer, so they report the incarnation that stream reached.
  P5  Repair (a digest exchange; it repairs both directions, so one side starting it suffices):
      on first contact with a peer (catch-up), after a resume or receive gap, and when our outbox
      for the peer overflowed. When the incarnation our stream reaches changes (the peer
      restarted with rebuilt state), it counts as first contact on *its* side, so it starts the
      repair; we only drop the batches held for its previous life. Periodic digests (the
      agent's timer) are the backstop for a repair lost to a broken link.
  P6  The peer's fault (MalformedMessageError, UnauthenticatedPeerError: drop its connection):
      a Hello from another node id, a Batch before any Hello, a Batch naming another sender,
      a negative seq or one more than MAX_SEQ_STEP beyond the last of its incarnation. An Ack
      above our last seq is ignored and counted (a stale ack racing a restart is not an attack).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from bpfsync.core.messages import Ack, Batch, Hello, MapSchema, Record
from bpfsync.core.outbox import Outbox
from bpfsync.core.register import Packed
from bpfsync.errors import IncompatiblePeerError, MalformedMessageError, UnauthenticatedPeerError

# In flight to a peer (P2): numbered batches, however small, and records. Records in flight
# can no longer be replaced by a newer change of their key, so under a flood every one beyond
# what keeps the peer busy is work done twice: a few full batches are enough on a LAN. The
# batch limit stays large so that small batches (a low rate over a long link) are not held
# back by it; the record limit is what binds under load.
MAX_UNACKED = 256
MAX_UNACKED_RECORDS = 4 * 8192
MAX_SEQ_STEP = 4 * MAX_UNACKED  # P4: the widest gap a received seq may jump
_MAX_SEQ = (1 << 63) - 1
_INCARNATIONS = 4  # per peer, the incarnations whose numbering is remembered (P4)


class PeerSession:
    """This node's protocol state with one peer, across reconnects and peer restarts."""

    def __init__(
        self, node: str, peer: str, *, max_unacked: int = MAX_UNACKED,
        max_unacked_records: int = MAX_UNACKED_RECORDS, outbox: Outbox | None = None,
    ) -> None:
        if max_unacked <= 0 or max_unacked_records <= 0:
            raise ValueError(f"max_unacked and max_unacked_records must be > 0, got "
                             f"{max_unacked} and {max_unacked_records}")
        self.node = node
        self.peer = peer
        self.max_unacked = max_unacked
        self.max_unacked_records = max_unacked_records
        self.outbox = outbox if outbox is not None else Outbox()
        self.peer_incarnation: int | None = None
        self.up = False  # our stream to the peer is up: batches go out as they are made
        self.duplicates = 0  # batches skipped as resends
        self.stale_acks = 0  # acks above our last seq, ignored
        self._next_seq = 1
        self._acked = 0
        self._held: deque[Batch] = deque()
        # P4: per incarnation of the peer, the last seq received; absent: no baseline yet
        self._recv: dict[int, int] = {}
        self._heard: int | None = None  # incarnation of the latest Hello on a stream to us
        self._repair = False

    # --- the peer's identity -----------------------------------------------------------------

    def _check_node(self, hello: Hello) -> None:
        if hello.node != self.peer:
            raise UnauthenticatedPeerError(
                f"session with {self.peer!r} got a Hello from {hello.node!r}", self.peer
            )

    def _learn(self, hello: Hello) -> None:
        """The incarnation our stream to the peer reached (P5)."""
        self._check_node(hello)
        if hello.incarnation == self.peer_incarnation:
            return
        if self.peer_incarnation is None:
            self._repair = True  # P5: first contact, catch up
        else:  # P5: it restarted; its own first-contact repair rebuilds it
            self._held.clear()
            self._acked = self._next_seq - 1
        self.peer_incarnation = hello.incarnation

    # --- our stream to the peer ----------------------------------------------------------------

    def link_up(self, hello: Hello) -> list[Batch]:
        """Our stream to the peer is up (``hello`` is its answer): the batches to resend (P3)."""
        self._learn(hello)
        self.up = True
        lowest = self._held[0].seq if self._held else self._next_seq
        if lowest > self._acked + 1:
            self._repair = True  # P3: batches dropped before the peer acked them
        return list(self._held)

    def link_down(self) -> None:
        """Our stream to the peer broke; batches stay held for the next ``link_up``."""
        self.up = False

    def on_ack(self, ack: Ack) -> None:
        """Release the batches the peer has applied (P2)."""
        if ack.seq >= self._next_seq or ack.seq < 0:
            self.stale_acks += 1
            return
        self._acked = max(self._acked, ack.seq)
        held = self._held
        while held and held[0].seq <= ack.seq:
            held.popleft()

    def send(self, records: Sequence[Record]) -> Batch | None:
        """Number a batch and hold it (P1, P2); returns it when the link is up, else None (it
        goes out on the next ``link_up``)."""
        batch = Batch(self.node, self._next_seq,
                      records if isinstance(records, Packed) else tuple(records))
        self._next_seq += 1
        self._held.append(batch)
        if len(self._held) > self.max_unacked:
            self._held.popleft()
        return batch if self.up else None

    def next_batch(self, max_records: int, max_bytes: int) -> Batch | None:
        """The next numbered batch from the outbox, if the link is up and the window open."""
        if not self.up or not self.window_open or not self.outbox:
            return None
        return self.send(self.outbox.take_batch(max_records, max_bytes))

    def repair_batch(self, records: Sequence[Record]) -> Batch:
        """An unnumbered batch answering a Digest or Pull (P1: seq 0)."""
        return Batch(self.node, 0, records if isinstance(records, Packed) else tuple(records))

    @property
    def window_open(self) -> bool:
        """Whether another batch fits without dropping an unacked one, and the records in
        flight leave room (flow control)."""
        return len(self._held) < self.max_unacked and (
            self.unacked_records < self.max_unacked_records
        )

    @property
    def unacked_records(self) -> int:
        """Records in the batches held until the peer acks them (P2: a few batches at most)."""
        return sum(len(b.records) for b in self._held)

    @property
    def unacked(self) -> int:
        return len(self._held)

    # --- the peer's stream to us ---------------------------------------------------------------

    def on_hello(self, hello: Hello) -> Ack:
        """The peer's stream to us started: the Ack to send it (it releases held batches)."""
        self._check_node(hello)
        self._heard = hello.incarnation
        return self.ack()

    def on_batch(self, batch: Batch, incarnation: int) -> bool:
        """Whether to apply this batch, which came on a stream opened by a Hello of
        ``incarnation`` (P4); after applying a numbered one, send ``ack()``."""
        if self._heard is None:
            raise MalformedMessageError("Batch before Hello", self.peer)
        if batch.sender != self.peer:
            raise MalformedMessageError(
                f"Batch names sender {batch.sender!r} in the session with {self.peer!r}", self.peer
            )
        seq = batch.seq
        if seq == 0:
            return True
        recv = self._recv
        last = recv.get(incarnation)
        if seq < 0 or seq > _MAX_SEQ or (last is not None and seq > last + MAX_SEQ_STEP):
            raise MalformedMessageError(
                f"Batch with seq {seq}" + ("" if last is None else
                                           f", more than {MAX_SEQ_STEP} beyond the last, {last}"),
                self.peer,
            )
        if last is None:
            if len(recv) >= _INCARNATIONS:
                del recv[next(iter(recv))]  # the oldest; were it still alive, it re-baselines
        elif seq <= last:
            self.duplicates += 1
            return False
        elif seq > last + 1:
            self._repair = True
        recv[incarnation] = seq
        return True

    def ack(self) -> Ack:
        """Every numbered batch up to this seq, of the incarnation our stream to the peer
        reached (before it is up: of the latest Hello to us), is applied or covered by a repair."""
        incarnation = self.peer_incarnation if self.peer_incarnation is not None else self._heard
        return Ack(self._recv.get(incarnation or 0, 0))

    # --- repair --------------------------------------------------------------------------------

    @property
    def repair_needed(self) -> bool:
        return self._repair or self.outbox.overflowed

    def take_repair(self) -> bool:
        """Whether to start a digest exchange now (P5); clears the flag."""
        flag = self.outbox.take_overflow() or self._repair
        self._repair = False
        return flag


def incompatible(hello: Hello, protocol: int, peer: str = "") -> IncompatiblePeerError:
    """The error that refuses a peer whose Hello is of another protocol version than ours."""
    return IncompatiblePeerError(
        f"node {hello.node!r} speaks bpfsync protocol {hello.protocol}, this node {protocol}:"
        " run one bpfsync version on every node", peer or hello.node,
    )


def map_mismatches(local: Iterable[MapSchema], hello: Hello) -> dict[str, str]:
    """Maps we sync that the peer lacks or describes differently: name -> what differs.

    Records for such maps would be refused on one side; the agent should report them.
    """
    theirs = {m.name: m for m in hello.maps}
    out = {}
    for mine in local:
        other = theirs.get(mine.name)
        if other is None:
            out[mine.name] = f"peer {hello.node!r} does not sync it"
        elif other != mine:
            out[mine.name] = (
                f"here {mine.key_size}/{mine.value_size} bytes {mine.policy},"
                f" on {hello.node!r} {other.key_size}/{other.value_size} bytes {other.policy}"
            )
    return out
