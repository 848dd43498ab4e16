"""One synced map's replicated state on this node (the registers of policy.py), kept so that the
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

This module holds what every table shares (``MapTable``) and the per-origin table
(``SlotTable``: counter, max, min); the lww table is lww_table.py, its frozen buckets frozen.py.
No policy decisions here beyond "keep the higher-ranked record": replica.py owns the rules.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Iterator

import numpy as np

from bpfsync.core.digest import MASK, bucket_of, fold, record_hash
from bpfsync.core.frozen import FrozenRegs, rows_of, seal
from bpfsync.core.messages import MapSchema, Record, Stamp
from bpfsync.core.policy import Policy, newer
from bpfsync.core.register import Packed, pack, unpack

__all__ = ["QUIET_CALLS", "MapTable", "SlotTable", "records_layout"]

QUIET_CALLS = 120  # settle() calls without a write before a bucket freezes (by default)


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

    def bucket_blob(self, b: int) -> bytes:
        """Bucket ``b``'s registers and digest sum as the state store keeps them (sealed in
        FrozenRegs' layout, frozen.py); ``Replica.load`` takes them back."""
        keys: list[bytes] = []
        packed: list[bytes] = []
        self._bucket_records(b, keys, packed)
        return seal(records_layout(keys, packed, self.schema.key_size), self.sums[b])

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


def records_layout(keys: list[bytes], packed: list[bytes], key_size: int) -> bytes:
    """Records of one map in FrozenRegs' layout, in the order given (keys may repeat: a
    batch, or a per-origin bucket): how the state store keeps them."""
    items = np.frombuffer(b"".join(keys), f"S{key_size}") if keys else np.empty(0, f"S{key_size}")
    return FrozenRegs.of_sorted(items, rows_of(packed))


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
