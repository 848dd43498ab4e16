"""Protocol values (bpfsync.core.messages) to protobuf frames and back, validating the peer's side.

``encode`` trusts its input: it comes from this node's core, and a bad value there is a local bug
that surfaces as ValueError (from protobuf, or from the few cheap checks below). ``decode`` trusts
nothing: bytes that do not parse, a frame with no message, an index out of range, a node id that
breaks the node-id rule (messages.NODE_ID_RULE: the Hello's, a Batch's sender and every record's
origin, the nodes a Digest names), duplicate buckets in a Pull, or a size beyond ``Limits`` all
raise MalformedMessageError, the peer's fault. Sizes that depend on
this node's configuration (unknown maps, key/value lengths) are the core's to check.

Batches are the hot path (thousands of records per frame). The wire form is columns of keys and
packed records (core/register.py, and the .proto), so both directions run as C-level ``extend``
and ``list`` calls, plus one pass that checks each packed record's form; a decoded batch holds
the columns (``Packed``), not Record objects. ``bench/codec.py`` measures both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

# no stubs for protobuf in the dev deps (types-protobuf would remove this ignore)
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from bpfsync.core.messages import (
    NODE_ID_RULE,
    Ack,
    Answered,
    Batch,
    Digest,
    Hello,
    MapSchema,
    Message,
    Pull,
    is_node_id,
)
from bpfsync.core.register import MAX_OVERHEAD, Packed, scan
from bpfsync.errors import MalformedMessageError
from bpfsync.transport._proto import bpfsync_pb2 as pb

__all__ = ["Limits", "decode", "encode"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a peer may send, beyond the frame size that the transport enforces.

    They stop a peer from making this node allocate or loop without bound; they are far above
    anything a well-behaved peer sends (node ids and map names are at most 64 characters in the
    agent's config, BPF hash keys at most 512 bytes).
    """

    max_name_bytes: int = 255  # node ids, map names, policy names
    max_maps: int = 4096  # maps in one Hello
    max_records: int = 1 << 20  # records in one Batch
    max_key_bytes: int = 1 << 16
    max_value_bytes: int = 1 << 24
    max_buckets: int = 1 << 20  # buckets in one Digest or Pull


DEFAULT_LIMITS = Limits()


# --- encode --------------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """Serialize one protocol message as a Frame."""
    frame = pb.Frame()
    if isinstance(message, Batch):
        _encode_batch(message, frame.batch)
    elif isinstance(message, Ack):
        frame.ack.seq = message.seq
    elif isinstance(message, Digest):
        _need_name(message.map, "Digest.map")
        frame.digest.map = message.map
        frame.digest.buckets.extend(message.buckets)
        frame.digest.linked.extend(message.linked)
        frame.digest.urgent = message.urgent
    elif isinstance(message, Pull):
        _need_name(message.map, "Pull.map")
        frame.pull.map = message.map
        frame.pull.buckets.extend(message.buckets)
    elif isinstance(message, Answered):
        _need_name(message.map, "Answered.map")
        frame.answered.map = message.map
        frame.answered.differing = message.differing
    elif isinstance(message, Hello):
        _need_name(message.node, "Hello.node")
        h = frame.hello
        h.node = message.node
        h.incarnation = message.incarnation
        h.protocol = message.protocol
        for m in message.maps:
            h.maps.add(name=m.name, key_size=m.key_size, value_size=m.value_size, policy=m.policy)
    else:
        raise TypeError(f"not a protocol message: {type(message).__name__}")
    data: bytes = frame.SerializeToString()
    return data


def _encode_batch(batch: Batch, out: pb.Batch) -> None:
    _need_name(batch.sender, "Batch.sender")
    out.sender = batch.sender
    out.seq = batch.seq
    if not batch.records:
        return
    records = Packed.of(batch.records)
    maps: dict[str, int] = {}
    out.map_index.extend([maps.setdefault(m, len(maps)) for m in records.maps])
    if "" in maps:
        raise ValueError("a record has an empty map name")
    out.maps.extend(maps)
    out.keys.extend(records.keys)
    out.records.extend(records.packed)


def _need_name(name: str, what: str) -> None:
    if not name:
        raise ValueError(f"{what} is empty")


# --- decode --------------------------------------------------------------------------------------


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS, peer: str = "") -> Message:
    """Parse and validate one Frame from a peer; MalformedMessageError names ``peer`` if given."""
    try:
        frame = pb.Frame.FromString(data)
        kind = frame.WhichOneof("msg")
        if kind == "batch":
            return _decode_batch(frame.batch, limits)
        if kind == "ack":
            return Ack(seq=frame.ack.seq)
        if kind == "digest":
            d = frame.digest
            _check_count(len(d.buckets), limits.max_buckets, "Digest buckets")
            _check_count(len(d.linked), limits.max_maps, "Digest linked nodes")
            return Digest(
                map=_name(d.map, limits, "Digest.map"),
                buckets=tuple(d.buckets),
                linked=tuple(_node(n, "Digest.linked") for n in d.linked),
                urgent=d.urgent,
            )
        if kind == "pull":
            p = frame.pull
            _check_count(len(p.buckets), limits.max_buckets, "Pull buckets")
            buckets = tuple(p.buckets)
            if buckets and max(buckets) >= limits.max_buckets:
                raise _Bad(f"Pull bucket index {max(buckets)} is beyond {limits.max_buckets}")
            if len(set(buckets)) != len(buckets):  # each would be answered again: amplification
                raise _Bad("Pull names a bucket more than once")
            return Pull(map=_name(p.map, limits, "Pull.map"), buckets=buckets)
        if kind == "answered":
            a = frame.answered
            if a.differing > limits.max_buckets:
                raise _Bad(f"Answered says {a.differing} buckets differed (limit "
                           f"{limits.max_buckets})")
            return Answered(map=_name(a.map, limits, "Answered.map"), differing=a.differing)
        if kind == "hello":
            return _decode_hello(frame.hello, limits)
        raise _Bad("frame carries no message (unknown or missing kind)")
    except DecodeError as err:
        raise MalformedMessageError(f"undecodable frame of {len(data)} bytes: {err}", peer) from err
    except _Bad as err:
        raise MalformedMessageError(str(err), peer) from None


class _Bad(Exception):
    """Internal: a validation failure, turned into MalformedMessageError with the peer's name."""


def _name(value: str, limits: Limits, what: str) -> str:
    if not value:
        raise _Bad(f"{what} is empty")
    if len(value) > limits.max_name_bytes:
        raise _Bad(f"{what} is {len(value)} characters long (limit {limits.max_name_bytes})")
    return value


def _node(value: str, what: str) -> str:
    if not is_node_id(value):
        raise _Bad(f"{what} {value[:80]!r} is not a node id ({NODE_ID_RULE})")
    return value


def _check_count(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise _Bad(f"{n} {what} (limit {limit})")


def _decode_hello(h: pb.Hello, limits: Limits) -> Hello:
    _check_count(len(h.maps), limits.max_maps, "maps in Hello")
    maps = []
    for m in h.maps:
        if m.key_size > limits.max_key_bytes or m.value_size > limits.max_value_bytes:
            raise _Bad(f"map {m.name!r} has key/value size {m.key_size}/{m.value_size}")
        maps.append(
            MapSchema(
                name=_name(m.name, limits, "map name"),
                key_size=m.key_size,
                value_size=m.value_size,
                policy=_name(m.policy, limits, "map policy"),
            )
        )
    if not 0 < h.incarnation < 1 << 63:
        raise _Bad(f"Hello.incarnation {h.incarnation} is outside 1..2^63-1")
    return Hello(
        node=_node(h.node, "Hello.node"), incarnation=h.incarnation, maps=tuple(maps),
        protocol=h.protocol or 1,  # a version-1 node sends none
    )


def _decode_batch(b: pb.Batch, limits: Limits) -> Batch:
    sender = _node(b.sender, "Batch.sender")
    n = len(b.keys)
    _check_count(n, limits.max_records, "records in Batch")
    if len(b.records) != n or len(b.map_index) != n:
        raise _Bad("Batch columns have different lengths")
    if not n:
        return Batch(sender=sender, seq=b.seq, records=())
    maps = [_name(m, limits, "Batch map name") for m in b.maps]
    try:
        map_col = [maps[i] for i in b.map_index]
    except IndexError:
        raise _Bad("Batch record names a map index beyond its table") from None
    keys = list(b.keys)
    packed = list(b.records)
    if max(map(len, keys)) > limits.max_key_bytes:
        raise _Bad(f"a key is longer than {limits.max_key_bytes} bytes")
    if max(map(len, packed)) > limits.max_value_bytes + MAX_OVERHEAD:
        raise _Bad(f"a value is longer than {limits.max_value_bytes} bytes")
    why, origins = scan(packed)
    if why:
        raise _Bad(why)
    for origin in origins:
        _node(origin, "a record's origin")
    return Batch(sender=sender, seq=b.seq, records=Packed(map_col, keys, packed, origins))
