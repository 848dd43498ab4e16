"""What replicas say to each other: the unit of replication and the peer protocol's messages.

These are plain values. The core produces and consumes them; a transport only encodes them
(gRPC/protobuf, NATS) and moves them. Nothing here does I/O.

Protocol between two nodes, over one ordered, bidirectional link:

    both sides      Hello        who I am (node id, incarnation), which maps I sync, with sizes,
                                 and the protocol version (``PROTOCOL``)
    sender          Batch        records, numbered per sender: seq 1, 2, 3, ... per incarnation
    receiver        Ack          highest seq received and applied without a gap
    either side     Digest       per-bucket hashes of one map's state, and the sender's links
    either side     Pull         "send me every record in these buckets" (answered with a Batch)
    either side     Answered     "you now have every record I held in the buckets your Digest
                                 differed in": ends the answer to a Digest

A Digest is answered with a Pull first, then the answerer's records in the differing buckets,
then Answered. The Pull goes first so that it is answered from the asker's state before our
records reach it: the other order had a fresh node send a whole catch-up back to its source.

A reconnecting sender resends batches above the last Ack; a gap it cannot fill (its outbox
was bounded, or the peer restarted) is repaired by Digest/Pull. Records are state, not operations:
applying one twice, or out of order, gives the same result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, cast

# Stamp and Record are named tuples, not dataclasses: a million of them are built per catch-up
# and a stamp is compared for every record merged; tuples do both in C (2x and 4x faster).


# The version of this protocol. 1: per-field batch columns, a digest answered by records then a
# Pull; 2: packed records (register.py), a digest answered by a Pull, records, then Answered.
# A Hello without one is from version 1.
PROTOCOL = 2


# Node ids: what a node calls itself in its config, its certificate and every record it stamps.
# The same rule on every side (config, codec), so a peer cannot name a node no config could.
NODE_ID_RULE = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def is_node_id(name: str) -> bool:
    """Whether ``name`` follows ``NODE_ID_RULE``."""
    return _NODE_ID.fullmatch(name) is not None


class Stamp(NamedTuple):
    """A hybrid logical clock timestamp with the node that made it: a total order over writes."""

    wall: int  # physical time, ns since the epoch (never behind any stamp this node has seen)
    logical: int  # counter that orders stamps sharing ``wall``
    node: str  # the origin node; breaks ties, so no two nodes' stamps are ever equal


class Record(NamedTuple):
    """One key's state as its origin last wrote it. ``value`` None is a tombstone (a delete)."""

    map: str
    key: bytes
    value: bytes | None
    stamp: Stamp


# Built without NamedTuple's Python-level __new__ (half the cost), where millions are built:
# new_stamp((wall, logical, node)), new_record((map, key, value, stamp)).
new_stamp = cast(Callable[[tuple[int, int, str]], Stamp], partial(tuple.__new__, Stamp))
new_record = cast(
    Callable[[tuple[str, bytes, bytes | None, Stamp]], Record], partial(tuple.__new__, Record)
)


@dataclass(frozen=True, slots=True)
class MapSchema:
    """What both ends must agree on for a map to be synced between them."""

    name: str
    key_size: int
    value_size: int  # one value as the program sees it (one CPU's share for per-CPU maps)
    policy: str = "lww"


@dataclass(frozen=True, slots=True)
class Hello:
    node: str
    incarnation: int  # changes at every start; a new incarnation restarts seq numbering
    maps: tuple[MapSchema, ...]
    protocol: int = PROTOCOL  # peers of different protocols refuse each other at the Hello


@dataclass(frozen=True, slots=True)
class Batch:
    sender: str  # the node that sent this batch (may relay records of other origins)
    seq: int  # 1, 2, 3, ... per sender incarnation; 0 for repair batches that are never acked
    records: Sequence[Record]  # a tuple, or register.Packed (columns) as decoded


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Digest:
    map: str
    buckets: tuple[int, ...]  # one 64-bit hash per bucket; equal states give equal digests
    linked: tuple[str, ...] = ()  # nodes the sender has links up to: peers relay around cuts
    urgent: bool = False  # catch-up or gap repair: to be answered even while the peer is busy


@dataclass(frozen=True, slots=True)
class Pull:
    map: str
    buckets: tuple[int, ...]  # indexes into Digest.buckets


@dataclass(frozen=True, slots=True)
class Answered:
    map: str
    differing: int  # how many buckets differed (and were sent), for logs


Message = Hello | Batch | Ack | Digest | Pull | Answered
