"""One synced map's replicated state on this node (the registers of merge.py), kept so that the
hot paths stay cheap at a million keys:

* registers live in ``nbuckets`` dicts split by the key's digest bucket, so answering a Pull for
  a few buckets touches only those keys;
* one-register-per-key tables (lww) hold each register packed in one bytes object
  (register.py), a third of the memory of a Record, merged by comparing bytes; Records are built
  only when asked for;
* each bucket's digest hash is a running sum, updated as records replace each other;
* tombstones are also queued by age, so purging them never scans the map;
* an lww bucket left unwritten for a while is frozen (``settle``): its registers become one
  bytes object with a sorted key index, ~47 bytes a register instead of ~150 as a dict of
  bytes objects. A write thaws the bucket back into a dict. A map at rest costs a third of the
  memory; under writes spread over every bucket nothing freezes. Buckets a batch fills in bulk
  (a catch-up) are frozen at once.
* ``horizon`` is the highest stamp of any tombstone purged from this map (see replica.py, T3).

No policy decisions here beyond "keep the higher-ranked record": replica.py owns the rules.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from xxhash import xxh3_64_intdigest

from bpfsync.core.digest import MASK, bucket_of, fold, packed_hash, record_hash
from bpfsync.core.merge import Policy, newer
from bpfsync.core.messages import MapSchema, Record, Stamp
from bpfsync.core.register import Packed, own_tails, pack, pack_clock, unpack, value_of

QUIET_CALLS = 120  # settle() calls without a write before a bucket freezes (by default)
# A batch that adds this many registers to a bucket freezes it at once: a catch-up fills whole
# buckets, and its million dict entries would otherwise be made only to be frozen later,
# leaving the allocator's arenas pinned (see FrozenRegs). Live traffic adds a few at a time.
_REFILL = 64


class MapTable(ABC):
    """Registers of one map, bucketed, with digest sums, tombstone ages and purge horizon."""

    def __init__(self, schema: MapSchema, policy: Policy, nbuckets: int) -> None:
        if nbuckets <= 0:
            raise ValueError(f"nbuckets must be > 0, got {nbuckets}")
        self.schema = schema
        self.policy = policy
        self.nbuckets = nbuckets
        # an array, not a list of ints: those would be small objects born as records change,
        # scattered over the allocator's arenas and pinning them (see FrozenRegs)
        self.sums = array("Q", bytes(8 * nbuckets))
        self.horizon: Stamp | None = None
        self._tombstones: list[tuple[int, int, Record]] = []  # heap of (wall, tiebreak, record)
        self._tick = itertools.count()

    @property
    def name(self) -> str:
        return self.schema.name

    def bucket(self, key: bytes) -> int:
        return bucket_of(key, self.nbuckets)

    def digest_buckets(self, nbuckets: int | None = None) -> tuple[int, ...]:
        """The per-bucket hashes at ``nbuckets`` (a divisor of ours; default: ours)."""
        if nbuckets is None or nbuckets == self.nbuckets:
            return tuple(self.sums)
        return fold(self.sums, nbuckets)

    def records_in(self, buckets: Iterable[int], nbuckets: int | None = None) -> Packed:
        """Every register's record in the given buckets (counted at ``nbuckets``, a divisor)."""
        n = self.nbuckets if nbuckets is None else nbuckets
        if n <= 0 or self.nbuckets % n:
            raise ValueError(f"{n} buckets do not divide this table's {self.nbuckets}")
        keys: list[bytes] = []
        packed: list[bytes] = []
        for coarse in buckets:
            if not 0 <= coarse < n:
                raise ValueError(f"bucket {coarse} out of range 0..{n - 1}")
            for fine in range(coarse, self.nbuckets, n):
                self._bucket_records(fine, keys, packed)
        return Packed([self.name] * len(keys), keys, packed)

    def _account(self, b: int, delta: int, tombstone: Record | None = None) -> None:
        """Keep the digest sum (``delta``: new hash minus old) and the tombstone queue in step
        with a register change."""
        if tombstone is not None:
            self._queue_tombstone(tombstone)
        self.sums[b] = (self.sums[b] + delta) & MASK

    def _queue_tombstone(self, rec: Record) -> None:
        heapq.heappush(self._tombstones, (rec.stamp.wall, next(self._tick), rec))

    def expire(self, deadline_wall: int) -> int:
        """Purge tombstones whose stamp's wall is <= ``deadline_wall``; raise the horizon."""
        purged = 0
        heap = self._tombstones
        while heap and heap[0][0] <= deadline_wall:
            _, _, rec = heapq.heappop(heap)
            if self._remove_if_held(rec):  # else a newer record replaced it already
                purged += 1
                if self.horizon is None or rec.stamp > self.horizon:
                    self.horizon = rec.stamp
        return purged

    def offer(self, rec: Record, b: int | None = None) -> Record | None:
        """Merge ``rec``: None if it was stored, else the record the register keeps."""
        kept = self.offer_packed(rec.key, pack(rec.stamp, rec.value), b)
        return None if kept is None else unpack(self.name, rec.key, kept)

    # ``b`` is the key's bucket when the caller already has it: hashing the key is the
    # costliest step on the receive path, so it is done once per record.

    @abstractmethod
    def offer_packed(self, key: bytes, packed: bytes, b: int | None = None) -> bytes | None:
        """Merge a packed record of ``key``: None if it was stored, else the (packed) record
        the register keeps."""

    @abstractmethod
    def holds(self, key: bytes, node: str, b: int | None = None) -> bool:
        """Whether there is a register for ``key`` (lww) or for ``key`` and origin ``node``."""

    @abstractmethod
    def held(self, rec: Record, b: int | None = None) -> Record | None:
        """The record in the register ``rec`` belongs to, if any."""

    @abstractmethod
    def kernel_value(self, key: bytes, b: int | None = None) -> bytes | None:
        """The value the kernel map should hold for ``key`` according to the registers."""

    @abstractmethod
    def all_keys(self) -> Iterator[bytes]:
        """Every key with at least one register (live or tombstone)."""

    @abstractmethod
    def _bucket_records(self, b: int, keys: list[bytes], packed: list[bytes]) -> None: ...

    @abstractmethod
    def _remove_if_held(self, rec: Record) -> bool: ...

    @abstractmethod
    def __len__(self) -> int:
        """Number of registers."""

    def settle(self, most: int, quiet: int = QUIET_CALLS) -> int:
        """Let at most ``most`` buckets unwritten over the last ``quiet`` calls take less
        memory; returns how many did. Meant to be called at a steady pace."""
        return 0

    def at_rest(self) -> int:
        """How many buckets ``settle`` has frozen and no write has thawed since."""
        return 0


_HEAD = struct.Struct("=III")  # a frozen bucket's register count, key size, record size or 0
_ENDS = struct.Struct("=II")  # one record's start and end, when their sizes differ


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
        records = _rows(list(regs.values()))
        if (keys[1:] > keys[:-1]).all():  # sorted already: a bucket thawed for a few writes
            return cls.of_sorted(keys, records)
        order = keys.argsort()
        return cls.of_sorted(keys[order], _take(records, order))

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


def _rows(records: list[bytes]) -> Rows:
    sizes = set(map(len, records))
    if len(sizes) != 1:
        return records
    return np.frombuffer(b"".join(records), f"V{sizes.pop()}")


def _take(records: Rows, order: np.ndarray) -> Rows:
    if isinstance(records, np.ndarray):
        taken: np.ndarray = records[order]
        return taken
    return [records[i] for i in order.tolist()]


def _joined(a: Rows, b: Rows) -> Rows:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype:
        return np.concatenate([a, b])
    return _rows([*_list(a), *_list(b)])


def _list(records: Rows) -> list[bytes]:
    if isinstance(records, np.ndarray):
        listed: list[bytes] = records.tolist()
        return listed
    return records


def _record_hashes(keys: np.ndarray, records: np.ndarray) -> np.ndarray:
    """Each record's digest hash (digest.py: of its key, then the packed record), for keys
    ('S' items) and records ('V' items of one size)."""
    n, ks, width = len(keys), keys.dtype.itemsize, records.dtype.itemsize
    rows = np.empty((n, ks + width), np.uint8)
    rows[:, :ks] = keys.view(np.uint8).reshape(n, ks)
    rows[:, ks:] = records.view(np.uint8).reshape(n, width)
    items = rows.view(f"V{ks + width}").ravel().tolist()
    return np.fromiter(map(xxh3_64_intdigest, items), np.uint64, n)


def _forms(
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


@dataclass(slots=True)
class LwwOffers:
    """What ``LwwTable.offer_all`` did with each record (indexes into the batch)."""

    stored: list[int]
    ignored: list[int]  # the register holds a record that ranks as high or higher
    outranked: list[tuple[int, bytes]]  # ... strictly higher: (index, the record it held)
    bad: list[int]  # a value of the wrong size: not offered
    # key -> (its packed record before the batch or None, the one stored last), per stored key
    # outside ``filled``
    changed: dict[bytes, tuple[bytes | None, bytes]]
    # registers filled in bulk, each from nothing (stored too): per group, the live records'
    # keys and values, joined, and how many; their tombstones need no write
    filled: list[tuple[bytes, bytes, int]]


class LwwTable(MapTable):
    """One register per key, packed (register.py)."""

    def __init__(self, schema: MapSchema, policy: Policy, nbuckets: int) -> None:
        super().__init__(schema, policy, nbuckets)
        self._regs: list[dict[bytes, bytes] | FrozenRegs] = [{} for _ in range(nbuckets)]
        self._count = 0
        self._vsize = schema.value_size
        self._quiet = [0] * nbuckets  # settle() calls since the bucket's digest sum moved
        self._sums_then = array("Q", self.sums)  # the sums at the last settle()

    def _thaw(self, b: int) -> dict[bytes, bytes]:
        regs = self._regs[b]
        if isinstance(regs, FrozenRegs):
            regs = self._regs[b] = regs.thaw()
        return regs

    def _freeze(self, b: int, regs: dict[bytes, bytes]) -> None:
        self._regs[b] = FrozenRegs.of(regs, self.schema.key_size)

    def settle(self, most: int, quiet: int = QUIET_CALLS) -> int:
        frozen = 0
        quiet_for = self._quiet
        for b, (now, then) in enumerate(zip(self.sums, self._sums_then, strict=True)):
            # written since the last call? (a write always moves the sum: it hashes the stamp)
            quiet_for[b] = 0 if now != then else quiet_for[b] + 1
            regs = self._regs[b]
            if frozen < most and quiet_for[b] >= quiet and regs and isinstance(regs, dict):
                self._freeze(b, regs)
                frozen += 1
        self._sums_then = array("Q", self.sums)
        return frozen

    def at_rest(self) -> int:
        return sum(isinstance(regs, FrozenRegs) for regs in self._regs)

    def offer_packed(self, key: bytes, packed: bytes, b: int | None = None) -> bytes | None:
        if b is None:
            b = self.bucket(key)
        regs = self._regs[b]
        old = regs.get(key)
        if old is not None and packed <= old:  # register.py: ranks as newer() does
            return old
        if type(regs) is not dict:
            regs = self._thaw(b)
        regs[key] = packed
        if old is None:
            self._count += 1
            delta = xxh3_64_intdigest(key + packed)  # packed_hash, inlined: the hot path
        else:
            delta = xxh3_64_intdigest(key + packed) - xxh3_64_intdigest(key + old)
        if packed[packed.find(0, 16) + 1]:  # a tombstone
            self._account(b, delta, unpack(self.name, key, packed))
        else:
            self.sums[b] = (self.sums[b] + delta) & MASK
        return None

    def offer_all(
        self, keys: Sequence[bytes], packs: Sequence[bytes], *, fill: bool = True
    ) -> LwwOffers:
        """``offer_packed`` of each record in turn (the keys are of the right size): one call
        per batch, for the receive path. A live record whose value is not of the map's size is
        left out and listed in ``bad``. With ``fill``, registers that held nothing and receive
        many records at once (a catch-up) are filled by array operations and listed in
        ``filled``, not ``changed``."""
        out = LwwOffers([], [], [], [], {}, [])
        n, nb = len(keys), self.nbuckets
        where: list[int] | None = None
        todo: Sequence[int] = range(n)
        if fill and n >= _REFILL:
            hashes = np.fromiter(map(xxh3_64_intdigest, keys), np.uint64, n)
            buckets = hashes % np.uint64(nb)
            where = buckets.tolist()
            todo = self._fill(keys, packs, buckets, out)
        self._offer_each(keys, packs, todo, where, out)
        if not isinstance(todo, range):  # in batch order, as offer_packed gives them
            out.stored.sort()
            out.ignored.sort()
        return out

    def _fill(
        self, keys: Sequence[bytes], packs: Sequence[bytes], buckets: np.ndarray, out: LwwOffers
    ) -> Sequence[int]:
        """Merge in bulk each group of >= _REFILL records of one bucket that holds nothing or
        is frozen, when the batch's live values are all of the map's size: keys new to the
        bucket are stored as they are (``_fill_bucket``), others by comparing records
        (``_merge_frozen``). Returns the indexes of the records left to ``_offer_each``."""
        n, regs_list, vsize = len(keys), self._regs, self._vsize
        counts = np.bincount(buckets.astype(np.intp), minlength=self.nbuckets)
        # buckets holding nothing, or at rest; one of dict registers is being written to
        groups = [b for b in np.flatnonzero(counts >= _REFILL).tolist()
                  if not regs_list[b] or type(regs_list[b]) is FrozenRegs]  # fmt: skip
        if not groups:
            return range(n)
        rows, live = _forms(packs, vsize)
        if live is None:
            return range(n)  # values of another size: _offer_each sorts them out
        ks = self.schema.key_size
        key_items = np.frombuffer(b"".join(keys), f"S{ks}")
        records: Rows = list(packs)
        hashes = None  # each record's digest hash
        if rows is not None:
            records = rows.view(f"V{rows.shape[1]}").ravel()
            hashes = _record_hashes(key_items, records)
        order = np.argsort(buckets, kind="stable")
        starts = np.searchsorted(buckets[order], np.array(groups, np.uint64)).tolist()
        done = np.zeros(n, bool)
        for b, start in zip(groups, starts, strict=True):
            idx = order[start : start + counts[b]]
            if not self._fill_bucket(b, key_items[idx], _take(records, idx)):
                if hashes is not None and isinstance(records, np.ndarray):
                    done[idx] = self._merge_frozen(b, idx, keys, key_items, records, hashes,
                                                   live, out)  # fmt: skip
                continue  # if not: a key twice in the batch, or records of other sizes
            if hashes is not None:
                total = int(hashes[idx].sum())  # wraps at 2**64, as the digest sums do
            else:
                each = map(xxh3_64_intdigest, [keys[i] + packs[i] for i in idx.tolist()])
                total = int(np.fromiter(each, np.uint64, len(idx)).sum())
            self.sums[b] = (self.sums[b] + total) & MASK
            self._count += len(idx)
            done[idx] = True
            out.stored += idx.tolist()
            self._list_filled(out, key_items, records, idx[live[idx]])
            for i in idx[~live[idx]].tolist():
                self._queue_tombstone(unpack(self.name, keys[i], packs[i]))
        return np.flatnonzero(~done).tolist() if done.any() else range(n)

    def _fill_bucket(self, b: int, keys: np.ndarray, records: Rows) -> bool:
        """Bucket ``b`` takes new registers ('S' keys and their records) and is left frozen;
        False, and nothing done, if one of the keys is held already or given twice."""
        held = self._regs[b]
        if isinstance(held, FrozenRegs) and held:
            held_keys, held_records = held.columns()
            keys = np.concatenate([held_keys, keys])
            records = _joined(held_records, records)
        by_key = keys.argsort(kind="stable")
        keys = keys[by_key]
        if (keys[1:] == keys[:-1]).any():
            return False
        self._regs[b] = FrozenRegs.of_sorted(keys, _take(records, by_key))
        return True

    def _merge_frozen(
        self, b: int, idx: np.ndarray, keys: Sequence[bytes], key_items: np.ndarray,
        records: np.ndarray, hashes: np.ndarray, live: np.ndarray, out: LwwOffers,
    ) -> bool:
        """Merge the records ``idx`` of the batch (keys distinct, records of one size, some of
        them held already) into frozen bucket ``b`` by array operations, as ``_offer_each``
        would: a held key keeps the higher-ranked record. A node that restarts on its full map
        is sent every record again (its seed stamps rank lowest). False, and nothing done, if
        a key is given twice or the bucket's records are of another size."""
        held = self._regs[b]
        new_keys, new = key_items[idx], records[idx]
        if not isinstance(held, FrozenRegs) or np.unique(new_keys).size != new_keys.size:
            return False
        held_keys, held_records = held.columns()
        if not isinstance(held_records, np.ndarray) or held_records.dtype != new.dtype:
            return False
        at = np.searchsorted(held_keys, new_keys)
        found = np.zeros(len(idx), bool)
        inside = at < len(held_keys)
        found[inside] = held_keys[at[inside]] == new_keys[inside]
        # equal-size 'S' items order as their bytes do, and packed bytes rank records
        # (register.py); 'S' drops trailing NULs, which keeps the order of equal-size items
        rank = f"S{new.dtype.itemsize}"
        old = held_records[at[found]]
        higher = new[found].view(rank) > old.view(rank)
        lower = new[found].view(rank) < old.view(rank)
        stored = ~found
        stored[found] = higher
        replaced = at[found][higher]
        merged = held_records.copy()
        merged[replaced] = new[found][higher]
        fresh = ~found
        all_keys = np.concatenate([held_keys, new_keys[fresh]])
        all_records = np.concatenate([merged, new[fresh]])
        by_key = all_keys.argsort(kind="stable")
        self._regs[b] = FrozenRegs.of_sorted(all_keys[by_key], all_records[by_key])
        added = hashes[idx[stored]].sum()
        removed = _record_hashes(held_keys[replaced], held_records[replaced]).sum()
        self.sums[b] = (self.sums[b] + int(added) - int(removed)) & MASK
        self._count += int(fresh.sum())
        out.stored += idx[stored].tolist()
        out.ignored += idx[found][~higher].tolist()
        out.outranked += zip(idx[found][lower].tolist(), old[lower].tolist(), strict=True)
        self._list_filled(out, key_items, records, idx[fresh & live[idx]])
        changed = out.changed
        for i, was in zip(idx[found][higher].tolist(), old[higher].tolist(), strict=True):
            changed[keys[i]] = (was, records[i].tobytes())
        for i in idx[stored & ~live[idx]].tolist():
            self._queue_tombstone(unpack(self.name, keys[i], records[i].tobytes()))
        return True

    def _list_filled(
        self, out: LwwOffers, key_items: np.ndarray, records: Rows, at: np.ndarray
    ) -> None:
        """Add the live records ``at``, stored where no register was, to ``out.filled``: their
        keys and values (a live packed record ends with its value), joined."""
        if not len(at):
            return
        vsize = self._vsize
        if isinstance(records, np.ndarray):
            rows = records[at].view(np.uint8).reshape(len(at), -1)
            values = rows[:, rows.shape[1] - vsize :].tobytes()
        else:
            values = b"".join([records[i][len(records[i]) - vsize :] for i in at.tolist()])
        out.filled.append((key_items[at].tobytes(), values, len(at)))

    def _offer_each(
        self, keys: Sequence[bytes], packs: Sequence[bytes], todo: Iterable[int],
        where: list[int] | None, out: LwwOffers,
    ) -> None:
        """``offer_all``'s record-by-record path, for the records ``todo`` (``where``: each
        record's bucket, if known)."""
        stored, ignored, outranked = out.stored, out.ignored, out.outranked
        bad, changed = out.bad, out.changed
        regs_list, sums, nb, vsize = self._regs, self.sums, self.nbuckets, self._vsize
        tombstones: list[tuple[bytes, bytes]] = []
        grown: dict[int, int] = {}  # bucket -> its registers before the batch's first new key
        added = 0
        for i in todo:
            key, packed = keys[i], packs[i]
            end = packed.find(0, 16)
            dead = packed[end + 1]
            if not dead and len(packed) - end - 2 != vsize:
                bad.append(i)
                continue
            b = xxh3_64_intdigest(key) % nb if where is None else where[i]
            regs = regs_list[b]
            old = regs.get(key)
            if old is not None and packed <= old:  # register.py: ranks as newer() does
                ignored.append(i)
                if packed < old:
                    outranked.append((i, old))
                continue
            if type(regs) is not dict:
                regs = self._thaw(b)
            regs[key] = packed
            stored.append(i)
            first = changed.get(key)
            changed[key] = (old if first is None else first[0], packed)
            if old is None:
                added += 1
                if b not in grown:
                    grown[b] = len(regs) - 1
                delta = xxh3_64_intdigest(key + packed)
            else:
                delta = xxh3_64_intdigest(key + packed) - xxh3_64_intdigest(key + old)
            sums[b] = (sums[b] + delta) & MASK
            if dead:
                tombstones.append((key, packed))
        self._count += added
        for key, packed in tombstones:
            self._queue_tombstone(unpack(self.name, key, packed))
        for b, before in grown.items():
            regs = regs_list[b]
            if isinstance(regs, dict) and len(regs) - before >= _REFILL:
                self._freeze(b, regs)

    def offer_own(
        self, keys: Sequence[bytes], values: Sequence[bytes | None],
        kernel: dict[bytes, bytes | None], stamp: tuple[int, int], node: str,
    ) -> tuple[list[int], list[bytes]]:
        """This node's own writes, of the right sizes, in turn (one call per watcher batch).
        Each value other than the one the kernel is believed to hold (the register's, or
        ``kernel``'s where that differs: the entry leaves it) is packed with the next stamp
        from ``stamp`` (wall, logical) on and stored: it outranks every record held, as the
        clock has observed them all (C1). Returns the indexes stored and their records."""
        live_tail, dead_tail = own_tails(node)
        wall, logical = stamp
        regs_list, sums, nb = self._regs, self.sums, self.nbuckets
        stored: list[int] = []
        packs: list[bytes] = []
        tombstones: list[tuple[bytes, bytes]] = []
        added = 0
        for i, (key, value) in enumerate(zip(keys, values, strict=True)):
            b = xxh3_64_intdigest(key) % nb
            regs = regs_list[b]
            old = regs.get(key)
            if kernel and key in kernel:
                if value == kernel[key]:
                    continue
                del kernel[key]
            elif old is None:
                if value is None:
                    continue
            else:
                end = old.find(0, 16)  # value_of(old), inlined: once per local change
                if value == (None if old[end + 1] else old[end + 2 :]):
                    continue
            packed = pack_clock(wall, logical) + (dead_tail if value is None else live_tail + value)
            logical += 1
            if type(regs) is not dict:
                regs = self._thaw(b)
            regs[key] = packed
            if old is None:
                added += 1
                delta = xxh3_64_intdigest(key + packed)
            else:
                delta = xxh3_64_intdigest(key + packed) - xxh3_64_intdigest(key + old)
            sums[b] = (sums[b] + delta) & MASK
            if value is None:
                tombstones.append((key, packed))
            stored.append(i)
            packs.append(packed)
        self._count += added
        for key, packed in tombstones:
            self._queue_tombstone(unpack(self.name, key, packed))
        return stored, packs

    def packed_of(self, key: bytes) -> bytes | None:
        return self._regs[self.bucket(key)].get(key)

    def holds(self, key: bytes, node: str, b: int | None = None) -> bool:
        return key in self._regs[self.bucket(key) if b is None else b]

    def held(self, rec: Record, b: int | None = None) -> Record | None:
        packed = self._regs[self.bucket(rec.key) if b is None else b].get(rec.key)
        return None if packed is None else unpack(self.name, rec.key, packed)

    def kernel_value(self, key: bytes, b: int | None = None) -> bytes | None:
        packed = self._regs[self.bucket(key) if b is None else b].get(key)
        return None if packed is None else value_of(packed)

    def all_keys(self) -> Iterator[bytes]:
        for regs in self._regs:
            yield from regs

    def _bucket_records(self, b: int, keys: list[bytes], packed: list[bytes]) -> None:
        regs = self._regs[b]
        keys += regs.keys()
        packed += regs.values()

    def _remove_if_held(self, rec: Record) -> bool:
        b = self.bucket(rec.key)
        packed = self._regs[b].get(rec.key)
        if packed is None or packed != pack(rec.stamp, rec.value):
            return False
        del self._thaw(b)[rec.key]
        self._count -= 1
        self._account(b, -packed_hash(rec.key, packed))
        return True

    def __len__(self) -> int:
        return self._count


class SlotTable(MapTable):
    """One register per (key, origin node): every node's latest contribution to each key."""

    def __init__(self, schema: MapSchema, policy: Policy, nbuckets: int) -> None:
        super().__init__(schema, policy, nbuckets)
        self._regs: list[dict[bytes, dict[str, Record]]] = [{} for _ in range(nbuckets)]
        self._count = 0

    def holds(self, key: bytes, node: str, b: int | None = None) -> bool:
        slots = self._regs[self.bucket(key) if b is None else b].get(key)
        return slots is not None and node in slots

    def held(self, rec: Record, b: int | None = None) -> Record | None:
        slots = self._regs[self.bucket(rec.key) if b is None else b].get(rec.key)
        return None if slots is None else slots.get(rec.stamp.node)

    def slots(self, key: bytes) -> dict[str, Record]:
        """Origin node -> that origin's latest record for ``key`` (a copy)."""
        return dict(self._regs[self.bucket(key)].get(key, {}))

    def offer_packed(self, key: bytes, packed: bytes, b: int | None = None) -> bytes | None:
        kept = self._offer(unpack(self.name, key, packed), b)
        return None if kept is None else pack(kept.stamp, kept.value)

    def offer(self, rec: Record, b: int | None = None) -> Record | None:
        return self._offer(rec, b)

    def _offer(self, rec: Record, b: int | None) -> Record | None:
        if b is None:
            b = self.bucket(rec.key)
        slots = self._regs[b].setdefault(rec.key, {})
        origin = rec.stamp.node
        old = slots.get(origin)
        if old is not None and not newer(rec, old):
            return old
        slots[origin] = rec
        if old is None:
            self._count += 1
            delta = record_hash(rec)
        else:
            delta = record_hash(rec) - record_hash(old)
        self._account(b, delta, rec if rec.value is None else None)
        return None

    def kernel_value(self, key: bytes, b: int | None = None) -> bytes | None:
        slots = self._regs[self.bucket(key) if b is None else b].get(key)
        return None if not slots else self.policy.combine(list(slots.values()))

    def others(self, key: bytes, origin: str) -> list[Record]:
        """The registers of ``key`` except ``origin``'s."""
        slots = self._regs[self.bucket(key)].get(key, {})
        return [r for o, r in slots.items() if o != origin]

    def all_keys(self) -> Iterator[bytes]:
        for regs in self._regs:
            yield from regs

    def _bucket_records(self, b: int, keys: list[bytes], packed: list[bytes]) -> None:
        for key, slots in self._regs[b].items():
            for rec in slots.values():
                keys.append(key)
                packed.append(pack(rec.stamp, rec.value))

    def _remove_if_held(self, rec: Record) -> bool:
        b = self.bucket(rec.key)
        slots = self._regs[b].get(rec.key)
        if slots is None or slots.get(rec.stamp.node) is not rec:
            return False
        del slots[rec.stamp.node]
        if not slots:
            del self._regs[b][rec.key]
        self._count -= 1
        self._account(b, -record_hash(rec))
        return True

    def __len__(self) -> int:
        return self._count


def new_table(schema: MapSchema, policy: Policy, nbuckets: int) -> MapTable:
    """The table shape the policy needs."""
    cls = SlotTable if policy.per_origin else LwwTable
    return cls(schema, policy, nbuckets)
