"""One record packed into a single bytes object, and batches of records in that form.

    wall     8 bytes, big-endian
    logical  8 bytes, big-endian
    node     the origin node's id, UTF-8 (1-255 bytes, no NUL)
    0x00     end of the node id
    kind     0x00: a value follows; 0x01: a tombstone (nothing follows)
    value    the rest

Why this form: a million-key map costs an agent ~80 bytes per register this way against ~230
as a Record with its Stamp, value and integers; batches travel, merge and hash without building
a Python object per record; and ranking is one bytes comparison in C. For two records of one
key, ``newer(a, b)`` (policy.py) holds exactly when ``pack(a) > pack(b)``: big-endian clocks
compare as numbers, the NUL ends the shorter of two node ids first (so ids compare as strings;
UTF-8 keeps code point order), and on equal stamps a tombstone's kind byte beats a value's,
then the larger value wins.

The layout is part of the protocol: batches carry it on the wire, and a record's digest hash is
the hash of its key followed by it (digest.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

import numpy as np

from bpfsync.core.messages import Record, Stamp, new_record, new_stamp

_CLOCK = struct.Struct(">QQ")
_unpack_clock = _CLOCK.unpack_from
_VALUE = b"\x00\x00"  # end of node id, kind "value"
_TOMBSTONE = b"\x00\x01"
MIN_SIZE = 16 + 1 + 2  # clock, a one-byte node id, end and kind
MAX_NODE_BYTES = 255
MAX_OVERHEAD = 16 + MAX_NODE_BYTES + 2  # a packed record's bytes besides its value, at most

# node id <-> the bytes it packs to; node ids are few (one per cluster member)
_CACHED_NODES = 4096
_encoded: dict[str, bytes] = {}
_decoded: dict[bytes, str] = {}


def pack(stamp: Stamp, value: bytes | None) -> bytes:
    """The packed form of ``value`` (None: a tombstone) stamped ``stamp``."""
    node = _encoded.get(stamp.node)
    if node is None:
        node = _encode_node(stamp.node)
    try:
        clock = _CLOCK.pack(stamp.wall, stamp.logical)
    except struct.error as err:
        raise ValueError(f"stamp {stamp!r} cannot be packed: {err}") from None
    if value is None:
        return b"".join((clock, node, _TOMBSTONE))
    return b"".join((clock, node, _VALUE, value))


pack_clock = _CLOCK.pack  # (wall, logical) -> a packed record's first 16 bytes


def own_tails(node: str) -> tuple[bytes, bytes]:
    """What follows the clock in ``node``'s packed records: (before a value, a tombstone)."""
    data = _encoded.get(node) or _encode_node(node)
    return data + _VALUE, data + _TOMBSTONE


def _encode_node(node: str) -> bytes:
    data = node.encode()
    if not 0 < len(data) <= MAX_NODE_BYTES or b"\x00" in data:
        raise ValueError(f"node id {node!r} cannot be packed (1-{MAX_NODE_BYTES} bytes, no NUL)")
    if len(_encoded) < _CACHED_NODES:
        _encoded[node] = data
    return data


def value_of(packed: bytes) -> bytes | None:
    end = packed.find(0, 16)
    return None if packed[end + 1] else packed[end + 2 :]


def node_of(packed: bytes) -> str:
    data = packed[16 : packed.find(0, 16)]
    return _decoded.get(data) or _decode_node(data)


def stamp_of(packed: bytes) -> Stamp:
    end = packed.find(0, 16)
    data = packed[16:end]
    wall, logical = _unpack_clock(packed)
    return new_stamp((wall, logical, _decoded.get(data) or _decode_node(data)))


def unpack(map: str, key: bytes, packed: bytes) -> Record:
    """The Record of ``key`` in ``map`` that ``packed`` holds."""
    end = packed.find(0, 16)
    data = packed[16:end]
    wall, logical = _unpack_clock(packed)
    stamp = new_stamp((wall, logical, _decoded.get(data) or _decode_node(data)))
    return new_record((map, key, None if packed[end + 1] else packed[end + 2 :], stamp))


def _decode_node(data: bytes) -> str:
    node = _decoded.get(data)
    if node is None:
        node = data.decode()
        if len(_decoded) < _CACHED_NODES:  # peers choose what they send: bounded
            _decoded[data] = node
    return node


_BULK_CHECK = 64  # batches of this many records, all of one size, are checked by numpy
# the upper half of the logical part must be zero: no clock issues more (hlc.MAX_LOGICAL)
_LOGICAL_HIGH = slice(8, 12)


def check(records: Sequence[bytes]) -> str:
    """Why one of ``records`` (packed, from a peer) is not well-formed; empty if all are. Value
    sizes are the receiving map's to check."""
    return scan(records)[0]


def scan(records: Sequence[bytes]) -> tuple[str, frozenset[str]]:
    """``check(records)``, and the origins (node ids) of every record when all are well-formed:
    what membership is checked against (replica.py R1), found here at little extra cost."""
    if len(records) >= _BULK_CHECK:
        origins = _all_well_formed(records)
        if origins is not None:
            return "", origins
    return _check_each(records)


def _all_well_formed(records: Sequence[bytes]) -> frozenset[str] | None:
    """The origins of ``records`` if they are all of one size and well-formed, as array
    operations (a catch-up checks a million: 0.15 s one by one); None otherwise, also when
    the sizes differ: ``_check_each`` decides."""
    sizes = set(map(len, records))
    size = sizes.pop()
    if sizes or size < MIN_SIZE:
        return None
    n = len(records)
    rows = np.frombuffer(b"".join(records), np.uint8).reshape(n, size)
    if rows[:, _LOGICAL_HIGH].any():
        return None
    zero = rows[:, 16 : min(size, 16 + MAX_NODE_BYTES + 1)] == 0
    end = zero.argmax(axis=1) + 16  # the first NUL after the clock, where there is one
    every = np.arange(n)
    if not zero[every, end - 16].all() or (end == 16).any() or (end + 2 > size).any():
        return None
    kind = rows[every, end + 1]
    if (kind > 1).any() or ((kind == 1) & (end + 2 != size)).any():
        return None
    origins = set()
    for e in np.unique(end).tolist():  # node ids: one per cluster member
        ids = np.ascontiguousarray(rows[end == e, 16:e]).view(f"V{e - 16}")
        for node in np.unique(ids).tolist():
            try:
                origins.add(_decoded.get(node) or _decode_node(node))
            except UnicodeDecodeError:
                return None
    return frozenset(origins)


def _check_each(records: Iterable[bytes]) -> tuple[str, frozenset[str]]:
    known = _decoded
    origins = set()
    for packed in records:
        end = packed.find(0, 16)
        size = len(packed)
        if size < MIN_SIZE:
            return f"packed record of {size} bytes (at least {MIN_SIZE})", frozenset()
        if packed[_LOGICAL_HIGH] != b"\0\0\0\0":
            return "packed record whose logical clock is beyond 2^32 - 1", frozenset()
        if not 16 < end <= 16 + MAX_NODE_BYTES or end + 2 > size:
            return "packed record without a well-formed node id", frozenset()
        kind = packed[end + 1]
        if kind > 1 or (kind == 1 and end + 2 != size):
            return "packed record of an unknown kind, or a tombstone with a value", frozenset()
        node = packed[16:end]
        if node not in known:
            try:
                _decode_node(node)
            except UnicodeDecodeError:
                return "packed record whose node id is not UTF-8", frozenset()
        origins.add(node)
    return "", frozenset(known.get(node) or _decode_node(node) for node in origins)


class Packed(Sequence[Record]):
    """Records as three columns (map, key, packed record): how batches come off the wire and
    out of a table. Indexing or iterating builds Records; the replica, the codec and ``split``
    read the columns instead."""

    __slots__ = ("_origins", "keys", "maps", "packed")

    def __init__(
        self, maps: list[str], keys: list[bytes], packed: list[bytes],
        origins: frozenset[str] | None = None,
    ) -> None:
        """``origins``: the records' node ids, when known (``scan``); trusted, not checked."""
        if not len(maps) == len(keys) == len(packed):
            raise ValueError("Packed columns have different lengths")
        self.maps, self.keys, self.packed = maps, keys, packed
        self._origins = origins

    @classmethod
    def empty(cls) -> Packed:
        return cls([], [], [])

    @classmethod
    def of(cls, records: Iterable[Record]) -> Packed:
        """Pack Records (trusted: this node's own)."""
        if isinstance(records, Packed):
            return records
        out = cls.empty()
        for rec in records:
            out.append(rec.map, rec.key, pack(rec.stamp, rec.value))
        return out

    def append(self, map: str, key: bytes, packed: bytes) -> None:
        self._origins = None
        self.maps.append(map)
        self.keys.append(key)
        self.packed.append(packed)

    def extend(self, other: Packed) -> None:
        self._origins = None
        self.maps += other.maps
        self.keys += other.keys
        self.packed += other.packed

    def origins(self) -> frozenset[str]:
        """The node ids of every record's stamp (as ``scan`` found them, when it did)."""
        if self._origins is not None:
            return self._origins
        distinct = {p[16 : p.find(0, 16)] for p in self.packed}
        return frozenset(_decoded.get(d) or _decode_node(d) for d in distinct)

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, i: int) -> Record: ...

    @overload
    def __getitem__(self, i: slice) -> Packed: ...

    def __getitem__(self, i: int | slice) -> Record | Packed:
        if isinstance(i, slice):
            return Packed(self.maps[i], self.keys[i], self.packed[i])
        return unpack(self.maps[i], self.keys[i], self.packed[i])

    def __iter__(self) -> Iterator[Record]:
        for name, key, packed in zip(self.maps, self.keys, self.packed, strict=True):
            yield unpack(name, key, packed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Packed({list(self)!r})"
