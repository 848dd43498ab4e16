"""A bucket of lww registers at rest, as one bytes object, and the numpy row helpers that
build and merge such buckets (core/lww_table.py freezes and fills them).

Why one object: a frozen bucket must not leave small objects behind, or they pin the
allocator's arenas that held the registers it replaced (CPython frees only empty arenas), and
the memory never comes back. Why numpy: a catch-up fills whole buckets, and rows of one size
move as opaque items ('V') in C, not one by one.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections.abc import Iterator, Sequence

import numpy as np
from xxhash import xxh3_64_intdigest

__all__ = [
    "FrozenRegs", "Rows", "check_records", "joined_rows", "listed_rows", "live_rows", "live_values",
    "record_hashes", "rows_of", "seal", "take_rows", "unseal", "value_forms",
]

_HEAD = struct.Struct("=III")  # a frozen bucket's register count, key size, record size or 0
_ENDS = struct.Struct("=II")  # one record's start and end, when their sizes differ
_SEAL = struct.Struct("<QI")  # a sealed blob's digest sum and CRC-32


class FrozenRegs(bytes):
    """A bucket's registers at rest, read-only, as one bytes object: the register count, key
    size and record size, the keys in sorted order (numpy searches them), the packed records in
    key order, and their end offsets if they differ in size (records of other nodes' ids, or
    tombstones). ~47 bytes a register where a dict of bytes objects costs ~150; a lookup takes
    ~1 us instead of ~0.03. A write thaws the bucket (``LwwTable._thaw``).

    One allocation, above the small-object allocator's size: a frozen bucket must not leave
    small objects behind, or they pin the allocator's arenas that held the registers it
    replaced (1 MiB each; CPython frees only empty ones), and the memory never comes back.
    Rows of one size are moved by numpy as opaque items ('V'), not one by one.
    """

    __slots__ = ()

    @classmethod
    def of(cls, regs: dict[bytes, bytes], key_size: int) -> FrozenRegs:
        joined = b"".join(regs)
        if len(joined) != key_size * len(regs):
            raise ValueError(f"registers with keys of other sizes than {key_size} bytes")
        # 'S' items compare as the keys' bytes do (all of one size; trailing zeros are kept)
        keys = np.frombuffer(joined, f"S{key_size}")
        records = rows_of(list(regs.values()))
        if (keys[1:] > keys[:-1]).all():  # sorted already: a bucket thawed for a few writes
            return cls.of_sorted(keys, records)
        order = keys.argsort()
        return cls.of_sorted(keys[order], take_rows(records, order))

    @classmethod
    def of_sorted(cls, keys: np.ndarray, records: Rows) -> FrozenRegs:
        """From keys in sorted order ('S' items) and their records in that order."""
        n, key_size = len(keys), keys.dtype.itemsize
        if isinstance(records, np.ndarray):
            head = _HEAD.pack(n, key_size, records.dtype.itemsize)
            return cls(b"".join([head, keys.tobytes(), records.tobytes()]))
        ends = np.zeros(n + 1, np.uint32)
        np.cumsum(np.fromiter(map(len, records), np.uint32, n), out=ends[1:])
        return cls(b"".join([_HEAD.pack(n, key_size, 0), keys.tobytes(), ends.tobytes(),
                             *records]))

    @classmethod
    def checked(cls, data: bytes, key_size: int) -> FrozenRegs:
        """``data`` as FrozenRegs, after checking that its layout holds together (the
        header's sizes, the offsets); ValueError says what does not."""
        if len(data) < _HEAD.size:
            raise ValueError(f"{len(data)} bytes: shorter than a bucket's header")
        n, ks, width = _HEAD.unpack_from(data)
        if ks != key_size:
            raise ValueError(f"keys of {ks} bytes, the map's are {key_size}")
        packs_at = _HEAD.size + n * ks + (0 if width else 4 * (n + 1))
        if width:
            if len(data) != packs_at + n * width:
                raise ValueError(f"{len(data)} bytes for {n} records of {width} bytes")
        else:
            if len(data) < packs_at:
                raise ValueError(f"{len(data)} bytes: too short for {n} record offsets")
            ends = np.frombuffer(data, np.uint32, n + 1, _HEAD.size + n * ks)
            if ends[0] != 0 or (np.diff(ends.astype(np.int64)) < 0).any() or (
                packs_at + int(ends[-1]) != len(data)
            ):
                raise ValueError("record offsets that do not fit the bytes")
        return cls(data)

    def columns(self) -> tuple[np.ndarray, Rows]:
        """The keys ('S' items, sorted) and their records."""
        n, ks, width, _, packs_at = self._layout()
        keys = np.frombuffer(self, f"S{ks}", n, _HEAD.size)
        return keys, np.frombuffer(self, f"V{width}", n, packs_at) if width else self.values()

    def _layout(self) -> tuple[int, int, int, int, int]:
        """(registers, key size, record size or 0, where the offsets start, where the records
        start)"""
        n, ks, width = _HEAD.unpack_from(self)
        ends_at = _HEAD.size + n * ks
        return n, ks, width, ends_at, ends_at + (0 if width else 4 * (n + 1))

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        n, ks, width, ends_at, packs_at = self._layout()
        i = int(np.frombuffer(self, f"S{ks}", n, _HEAD.size).searchsorted(key))
        at = _HEAD.size + i * ks
        if i == n or self[at : at + ks] != key:  # absent, or a key of another size
            return default
        if width:
            return self[packs_at + i * width : packs_at + (i + 1) * width]
        start, end = _ENDS.unpack_from(self, ends_at + 4 * i)
        return self[packs_at + start : packs_at + end]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.get(key) is not None

    def __len__(self) -> int:
        return int(_HEAD.unpack_from(self)[0])

    def __iter__(self) -> Iterator[bytes]:  # type: ignore[override]
        return iter(self.keys())

    def keys(self) -> list[bytes]:
        n, ks, *_ = self._layout()
        return np.frombuffer(self, f"V{ks}", n, _HEAD.size).tolist()  # type: ignore[no-any-return]

    def values(self) -> list[bytes]:
        n, _, width, ends_at, packs_at = self._layout()
        if width:
            rows = np.frombuffer(self, f"V{width}", n, packs_at)
            return rows.tolist()  # type: ignore[no-any-return]
        ends = array("I", self[ends_at:packs_at])
        return [self[packs_at + ends[i] : packs_at + ends[i + 1]] for i in range(n)]

    def thaw(self) -> dict[bytes, bytes]:
        return dict(zip(self.keys(), self.values(), strict=True))


# packed records: 'V' items when they are all of one size (numpy moves those as opaque rows),
# else bytes objects
Rows = np.ndarray | list[bytes]


def rows_of(records: list[bytes]) -> Rows:
    sizes = set(map(len, records))
    if len(sizes) != 1:
        return records
    return np.frombuffer(b"".join(records), f"V{sizes.pop()}")


def take_rows(records: Rows, order: np.ndarray) -> Rows:
    if isinstance(records, np.ndarray):
        taken: np.ndarray = records[order]
        return taken
    return [records[i] for i in order.tolist()]


def joined_rows(a: Rows, b: Rows) -> Rows:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype:
        return np.concatenate([a, b])
    return rows_of([*listed_rows(a), *listed_rows(b)])


def listed_rows(records: Rows) -> list[bytes]:
    if isinstance(records, np.ndarray):
        listed: list[bytes] = records.tolist()
        return listed
    return records


def seal(regs: bytes, digest_sum: int) -> bytes:
    """A FrozenRegs layout (a bucket, or a batch of records) as stored on disk: with the
    bucket's digest sum and a CRC-32 of both, so a blob damaged on disk is refused instead of
    taken in (SQLite checks its pages' structure, not their content)."""
    head = struct.pack("<Q", digest_sum)
    return b"".join([head, regs, struct.pack("<I", zlib.crc32(regs, zlib.crc32(head)))])


def unseal(blob: bytes, key_size: int) -> tuple[FrozenRegs, int]:
    """(the registers, the digest sum) of a ``seal``ed blob; ValueError if it is damaged."""
    if not isinstance(blob, bytes):
        raise ValueError(f"a stored blob that is {type(blob).__name__}, not bytes")
    if len(blob) < _SEAL.size:
        raise ValueError(f"a stored blob of {len(blob)} bytes: too short")
    regs = blob[8:-4]
    (digest_sum,) = struct.unpack_from("<Q", blob)
    (crc,) = struct.unpack_from("<I", blob, len(blob) - 4)
    if zlib.crc32(regs, zlib.crc32(blob[:8])) != crc:
        raise ValueError("a stored blob whose checksum does not match: damaged on disk")
    return FrozenRegs.checked(regs, key_size), digest_sum


def _by_size(records: Rows) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indexes, their records as rows of bytes) per record size."""
    n = len(records)
    if isinstance(records, np.ndarray):
        if n:
            yield np.arange(n), records.view(np.uint8).reshape(n, records.dtype.itemsize)
        return
    sizes = np.fromiter(map(len, records), np.intp, n)
    for size in np.unique(sizes).tolist():
        at = np.flatnonzero(sizes == size)
        joined = b"".join([records[i] for i in at.tolist()])
        yield at, np.frombuffer(joined, np.uint8).reshape(len(at), size)


def _forms(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each row's node id ends (its NUL; 16 if there is none) and its kind byte."""
    width = rows.shape[1]
    if width < 18:
        return np.full(len(rows), 16), np.full(len(rows), 255)
    zero = rows[:, 16 : min(width, 16 + 255 + 1)] == 0
    end = zero.argmax(axis=1) + 16
    end[~zero.any(axis=1)] = 16
    kind = rows[np.arange(len(rows)), np.minimum(end + 1, width - 1)]
    return end, kind


def check_records(records: Rows, vsize: int) -> str:
    """Why one of the packed records (read back from disk) is not well-formed for a map of
    ``vsize``-byte values; empty if all are (register.check's rules, as array operations)."""
    for _, rows in _by_size(records):
        width = rows.shape[1]
        end, kind = _forms(rows)
        if (end == 16).any() or (end + 2 > width).any():
            return "a stored record without a well-formed node id"
        if rows[:, 8:12].any():
            return "a stored record whose logical clock is beyond 2^32 - 1"
        if ((kind == 1) & (end + 2 != width)).any() or (kind > 1).any():
            return "a stored record of an unknown kind, or a tombstone with a value"
        if ((kind == 0) & (end + 2 + vsize != width)).any():
            return f"a stored record whose value is not {vsize} bytes"
    return ""


def live_rows(records: Rows) -> np.ndarray:
    """For well-formed packed records: which are live (not tombstones)."""
    live = np.zeros(len(records), bool)
    for at, rows in _by_size(records):
        live[at] = _forms(rows)[1] == 0
    return live


def live_values(records: Rows, vsize: int) -> tuple[np.ndarray, np.ndarray]:
    """For well-formed packed records: which are live, and each live one's value as a row of
    ``vsize`` bytes (zeros for tombstones), as array operations per record size."""
    n = len(records)
    live = np.zeros(n, bool)
    values = np.zeros((n, vsize), np.uint8)
    for at, rows in _by_size(records):
        width = rows.shape[1]
        _, kind = _forms(rows)
        alive = kind == 0
        live[at] = alive
        if width >= vsize:
            values[at[alive]] = rows[alive, width - vsize :]
    return live, values


def record_hashes(keys: np.ndarray, records: np.ndarray) -> np.ndarray:
    """Each record's digest hash (digest.py: of its key, then the packed record), for keys
    ('S' items) and records ('V' items of one size)."""
    n, ks, width = len(keys), keys.dtype.itemsize, records.dtype.itemsize
    rows = np.empty((n, ks + width), np.uint8)
    rows[:, :ks] = keys.view(np.uint8).reshape(n, ks)
    rows[:, ks:] = records.view(np.uint8).reshape(n, width)
    items = rows.view(f"V{ks + width}").ravel().tolist()
    return np.fromiter(map(xxh3_64_intdigest, items), np.uint64, n)


def value_forms(
    packs: Sequence[bytes], vsize: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Packed records (checked by the codec) as (their bytes as an (n, size) array when they
    are all of one size, which are live); live None if a live value is not ``vsize`` long."""
    n = len(packs)
    sizes = np.fromiter(map(len, packs), np.intp, n)
    rows = None
    if (sizes == sizes[0]).all():
        rows = np.frombuffer(b"".join(packs), np.uint8).reshape(n, int(sizes[0]))
        end = (rows[:, 16:] == 0).argmax(axis=1) + 16  # the node id's NUL
        live = rows[np.arange(n), end + 1] == 0
    else:  # tombstones, or node ids of other lengths, among them
        ends = [p.find(0, 16) for p in packs]
        end = np.array(ends, np.intp)
        live = np.fromiter([not p[e + 1] for p, e in zip(packs, ends, strict=True)], bool, n)
    if (live & (end + 2 + vsize != sizes)).any():
        return rows, None
    return rows, live
