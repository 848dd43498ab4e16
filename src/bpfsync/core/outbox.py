"""Records waiting to go to one peer, coalesced per register.

Records are state, not operations, so only the newest record of each register has to travel:
a key written a thousand times while a batch window is open (or while the peer is unreachable)
is sent once. The register is the key for lww maps, and (key, origin) for maps whose policy keeps
every origin's contribution, so relaying a counter never drops another node's slot.

Bounded: past ``max_records`` registers the outbox empties itself and sets ``overflowed``; the
peer is then brought up to date by digest repair, which costs less than holding the backlog.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from itertools import islice, repeat
from operator import itemgetter

from bpfsync.core.messages import Record
from bpfsync.core.register import Packed, node_of

PACKED_OVERHEAD = 8  # framing of a packed record, its key and its map's index on the wire, roughly


def encoded_size(key: bytes, packed: bytes) -> int:
    """An estimate of a packed record's size on the wire, for batch byte limits."""
    return PACKED_OVERHEAD + len(key) + len(packed)


def split(
    records: Iterable[Record] | Packed, max_records: int, max_bytes: int
) -> Iterator[Packed]:
    """Cut records into batch-sized pieces (within both limits, at least one record each).

    For repair answers, which can be a whole map: they go out as seq-0 batches, not through an
    Outbox, whose bound is meant for live traffic.
    """
    records = Packed.of(records)
    # most repair answers are far below the byte limit per max_records: cut by count, and
    # walk record by record only a piece that is too big
    for start in range(0, len(records), max_records):
        piece = records[start : start + max_records]
        size = sum(map(len, piece.keys)) + sum(map(len, piece.packed))
        if size + PACKED_OVERHEAD * len(piece) <= max_bytes:
            yield piece
            continue
        first = size = 0
        for i, (key, packed) in enumerate(zip(piece.keys, piece.packed, strict=True)):
            n = encoded_size(key, packed)
            if i > first and size + n > max_bytes:
                yield piece[first:i]
                first, size = i, 0
            size += n
        yield piece[first:]


_REG, _PACKED = itemgetter(0), itemgetter(1)  # of a pending item
_KEY = itemgetter(0)  # of a per-origin register (key, origin)

# a register in its map's queue: the key, or (key, origin) in a per-origin map
Register = bytes | tuple[bytes, str]


class Outbox:
    """Pending records for one peer, newest per register; kept packed (register.py), the form
    they are stored and sent in.

    A queue per map, in first-queued order, keyed by the key itself (by (key, origin) in
    per-origin maps): every local change passes here once per peer, and a tuple built and
    hashed per record doubled the cost of queueing it. Batches take from the maps in turn.
    """

    __slots__ = ("_per_origin", "_queues", "max_records", "overflowed")

    def __init__(self, *, max_records: int = 1 << 16, per_origin_maps: Collection[str] = ()):
        if max_records <= 0:
            raise ValueError(f"max_records must be > 0, got {max_records}")
        self.max_records = max_records
        self.overflowed = False
        self._per_origin = frozenset(per_origin_maps)
        self._queues: dict[str, dict[Register, bytes]] = {}  # map -> register -> packed

    def add_per_origin(self, name: str) -> None:
        """Coalesce map ``name``'s records per (key, origin) from now on (a per-origin map
        synced since this outbox was made). Its queued records, keyed by key alone, go: none
        is queued for a map the node did not sync."""
        self._queues.pop(name, None)
        self._per_origin = self._per_origin | {name}

    def add(self, records: Iterable[Record] | Packed, *, newest: bool = False) -> None:
        """Queue records; a newer record of a queued register replaces it in place.
        ``newest``: the records outrank any queued record of their registers (this node's own,
        just stamped: the clock has seen every record it holds, C1), so none is compared."""
        records = Packed.of(records)
        if not records:
            return
        queues, per_origin = self._queues, self._per_origin
        maps = records.maps
        first = maps[0]
        if newest and first not in per_origin and maps.count(first) == len(maps):
            # in one call: every local change (a watcher batch is one map's)
            queue = queues.get(first)
            if queue is None:
                queue = queues[first] = {}
            queue.update(zip(records.keys, records.packed, strict=True))
        else:
            for name, key, packed in zip(maps, records.keys, records.packed, strict=True):
                queue = queues.get(name)
                if queue is None:
                    queue = queues[name] = {}
                reg: Register = (key, node_of(packed)) if name in per_origin else key
                if newest:
                    queue[reg] = packed
                    continue
                old = queue.get(reg)
                if old is None or packed > old:  # register.py: ranks as newer() does
                    queue[reg] = packed
        if len(self) > self.max_records:
            queues.clear()
            self.overflowed = True

    def take_batch(self, max_records: int, max_bytes: int) -> Packed:
        """Remove and return the oldest-queued records of each map, the maps in turn, within
        both limits (at least one)."""
        queues = self._queues
        maps: list[str] = []
        keys: list[bytes] = []
        packs: list[bytes] = []
        heads: list[tuple[dict[Register, bytes], list[Register]]] = []
        for name, queue in queues.items():
            # one pass, then delete: popping the first key repeatedly rescans deleted slots
            head = list(islice(queue.items(), max_records - len(maps)))
            regs = list(map(_REG, head))
            maps += repeat(name, len(head))
            keys += map(_KEY, regs) if name in self._per_origin else regs
            packs += map(_PACKED, head)
            heads.append((queue, regs))
            if len(maps) >= max_records:
                break
        queued = Packed(maps, keys, packs)
        batch = next(split(queued, max_records, max_bytes), queued)
        left = len(batch)
        for queue, regs in heads:
            for reg in regs[:left]:
                del queue[reg]
            left -= len(regs)
            if left <= 0:
                break
        served = next(iter(queues), None)
        for name in [n for n, q in queues.items() if not q]:
            del queues[name]
        if served in queues:  # the next batch starts with the next map
            queues[served] = queues.pop(served)
        return batch

    def take_overflow(self) -> bool:
        """Whether records were dropped since the last call (then the peer needs repair)."""
        flag, self.overflowed = self.overflowed, False
        return flag

    def __len__(self) -> int:
        return sum(map(len, self._queues.values()))

    def __bool__(self) -> bool:
        return bool(self._queues)
