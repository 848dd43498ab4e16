"""The lww table: one register per key, each packed in one bytes object (register.py), in
buckets that freeze when quiet (frozen.py) and fill in bulk when a batch brings many keys.

The hot paths: ``offer_packed`` (one record), ``offer_all`` (a received batch, with the bulk
fill of empty or frozen buckets), ``offer_own`` (this node's own writes, stamped in turn).
No policy decisions beyond "keep the higher-ranked record": replica.py owns the rules.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from xxhash import xxh3_64_intdigest

from bpfsync.core.digest import MASK, packed_hash
from bpfsync.core.frozen import (
    FrozenRegs,
    Rows,
    joined_rows,
    listed_rows,
    live_rows,
    record_hashes,
    rows_of,
    seal,
    take_rows,
    value_forms,
)
from bpfsync.core.messages import MapSchema, Record
from bpfsync.core.policy import Policy
from bpfsync.core.register import own_tails, pack, pack_clock, unpack, value_of
from bpfsync.core.table import QUIET_CALLS, MapTable

__all__ = ["LwwOffers", "LwwTable"]

# A batch that adds this many registers to a bucket freezes it at once: a catch-up fills whole
# buckets, and its million dict entries would otherwise be made only to be frozen later,
# leaving the allocator's arenas pinned (see FrozenRegs). Live traffic adds a few at a time.
_REFILL = 64


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

    def bucket_blob(self, b: int) -> bytes:
        regs = self._regs[b]
        frozen = regs if isinstance(regs, FrozenRegs) else FrozenRegs.of(regs, self.schema.key_size)
        return seal(frozen, self.sums[b])

    def bucket_columns(self) -> Iterator[tuple[np.ndarray, Rows]]:
        """Each bucket's keys ('S' items) and records, as FrozenRegs.columns gives them."""
        ks = self.schema.key_size
        for regs in self._regs:
            if isinstance(regs, FrozenRegs):
                yield regs.columns()
            elif regs:
                yield np.frombuffer(b"".join(regs), f"S{ks}"), rows_of(list(regs.values()))

    def install(self, b: int, regs: FrozenRegs, digest_sum: int) -> None:
        """Bucket ``b``, empty, takes ``regs`` (checked, read back from the state store) and
        their digest sum as they are: a restart on a million registers takes them in without
        a Python object per register. Their tombstones are queued for expiry."""
        if self._regs[b]:
            raise ValueError(f"bucket {b} of {self.name!r} is not empty")
        self._regs[b] = regs
        self.sums[b] = digest_sum & MASK
        self._sums_then[b] = self.sums[b]
        self._count += len(regs)
        keys, records = regs.columns()
        live = live_rows(records)
        if not live.all():
            ks = self.schema.key_size
            raw = keys.view(f"V{ks}")
            for i in np.flatnonzero(~live).tolist():
                self._queue_tombstone(unpack(self.name, raw[i].tobytes(), _record(records, i)))

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
        rows, live = value_forms(packs, vsize)
        if live is None:
            return range(n)  # values of another size: _offer_each sorts them out
        ks = self.schema.key_size
        key_items = np.frombuffer(b"".join(keys), f"S{ks}")
        records: Rows = list(packs)
        hashes = None  # each record's digest hash
        if rows is not None:
            records = rows.view(f"V{rows.shape[1]}").ravel()
            hashes = record_hashes(key_items, records)
        order = np.argsort(buckets, kind="stable")
        starts = np.searchsorted(buckets[order], np.array(groups, np.uint64)).tolist()
        done = np.zeros(n, bool)
        for b, start in zip(groups, starts, strict=True):
            idx = order[start : start + counts[b]]
            if not self._fill_bucket(b, key_items[idx], take_rows(records, idx)):
                done[idx] = self._merge_frozen(b, idx, keys, key_items, records, hashes, live, out)
                continue  # if not: a key twice in the batch
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
            records = joined_rows(held_records, records)
        by_key = keys.argsort(kind="stable")
        keys = keys[by_key]
        if (keys[1:] == keys[:-1]).any():
            return False
        self._regs[b] = FrozenRegs.of_sorted(keys, take_rows(records, by_key))
        return True

    def _merge_frozen(
        self, b: int, idx: np.ndarray, keys: Sequence[bytes], key_items: np.ndarray,
        records: Rows, hashes: np.ndarray | None, live: np.ndarray, out: LwwOffers,
    ) -> bool:
        """Merge the records ``idx`` of the batch (keys distinct, some of them held already)
        into frozen bucket ``b`` by array operations, as ``_offer_each`` would: a held key
        keeps the higher-ranked record. A node that restarts on its full map is sent every
        record again (its seed stamps rank lowest), with tombstones and other nodes' ids among
        them: the bucket must come out frozen whatever the records' sizes. False, and nothing
        done, if a key is given twice."""
        held = self._regs[b]
        new_keys = key_items[idx]
        if not isinstance(held, FrozenRegs) or np.unique(new_keys).size != new_keys.size:
            return False
        held_keys, held_records = held.columns()
        new = take_rows(records, idx)
        at = np.searchsorted(held_keys, new_keys)
        found = np.zeros(len(idx), bool)
        inside = at < len(held_keys)
        found[inside] = held_keys[at[inside]] == new_keys[inside]
        old = take_rows(held_records, at[found])
        higher, lower = _ranks(take_rows(new, np.flatnonzero(found)), old)
        stored = ~found
        stored[found] = higher
        replaced = at[found][higher]
        merged = _replaced(held_records, replaced, take_rows(new, np.flatnonzero(found)[higher]))
        fresh = ~found
        all_keys = np.concatenate([held_keys, new_keys[fresh]])
        all_records = joined_rows(merged, take_rows(new, np.flatnonzero(fresh)))
        by_key = all_keys.argsort(kind="stable")
        self._regs[b] = FrozenRegs.of_sorted(all_keys[by_key], take_rows(all_records, by_key))
        if hashes is not None:
            added = int(hashes[idx[stored]].sum())
        else:
            added = _hash_sum(key_items[idx[stored]], take_rows(records, idx[stored]))
        removed = _hash_sum(held_keys[replaced], take_rows(held_records, replaced))
        self.sums[b] = (self.sums[b] + added - removed) & MASK
        self._count += int(fresh.sum())
        out.stored += idx[stored].tolist()
        out.ignored += idx[found][~higher].tolist()
        was = listed_rows(old)
        out.outranked += zip(idx[found][lower].tolist(), [was[i] for i in np.flatnonzero(lower)],
                             strict=True)  # fmt: skip
        self._list_filled(out, key_items, records, idx[fresh & live[idx]])
        changed = out.changed
        for i, j in zip(idx[found][higher].tolist(), np.flatnonzero(higher).tolist(), strict=True):
            changed[keys[i]] = (was[j], _record(records, i))
        for i in idx[stored & ~live[idx]].tolist():
            self._queue_tombstone(unpack(self.name, keys[i], _record(records, i)))
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


def _ranks(new: Rows, old: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``new`` outrank the record at the same place in ``old`` (higher), and which
    are outranked (lower): packed bytes rank records (register.py)."""
    if isinstance(new, np.ndarray) and isinstance(old, np.ndarray) and new.dtype == old.dtype:
        # equal-size 'S' items order as their bytes do; 'S' drops trailing NULs, which keeps
        # the order of equal-size items
        rank = f"S{new.dtype.itemsize}"
        return new.view(rank) > old.view(rank), new.view(rank) < old.view(rank)
    pairs = list(zip(listed_rows(new), listed_rows(old), strict=True))
    return (np.fromiter((n > o for n, o in pairs), bool, len(pairs)),
            np.fromiter((n < o for n, o in pairs), bool, len(pairs)))  # fmt: skip


def _replaced(records: Rows, at: np.ndarray, by: Rows) -> Rows:
    """``records`` with those at ``at`` replaced by ``by``, in a new array or list."""
    if isinstance(records, np.ndarray) and isinstance(by, np.ndarray) and by.dtype == records.dtype:
        merged = records.copy()
        merged[at] = by
        return merged
    listed = list(listed_rows(records))
    for i, rec in zip(at.tolist(), listed_rows(by), strict=True):
        listed[i] = rec
    return listed


def _hash_sum(keys: np.ndarray, records: Rows) -> int:
    """The digest hashes of the records (packed_hash) summed, wrapping at 2**64 as the
    digest's sums do."""
    if isinstance(records, np.ndarray):
        return int(record_hashes(keys, records).sum())
    # as 'V' items: 'S' items drop the keys' trailing NULs
    keyed = zip(keys.view(f"V{keys.dtype.itemsize}").tolist(), records, strict=True)
    return sum(xxh3_64_intdigest(key + rec) for key, rec in keyed) & MASK


def _record(records: Rows, i: int) -> bytes:
    rec = records[i]
    return rec if isinstance(rec, bytes) else bytes(rec.tobytes())
