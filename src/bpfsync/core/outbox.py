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
_MAP, _KEY = itemgetter(0), itemgetter(1)  # of a register


class Outbox:
    """Pending records for one peer, newest per register, in first-queued order; kept packed
    (register.py), the form they are stored and sent in."""

    __slots__ = ("_pending", "_per_origin", "max_records", "overflowed")

    def __init__(self, *, max_records: int = 1 << 16, per_origin_maps: Collection[str] = ()):
        if max_records <= 0:
            raise ValueError(f"max_records must be > 0, got {max_records}")
        self.max_records = max_records
        self.overflowed = False
        self._per_origin = frozenset(per_origin_maps)
        # (map, key, origin for per-origin maps else "") -> packed record
        self._pending: dict[tuple[str, bytes, str], bytes] = {}

    def add(self, records: Iterable[Record] | Packed, *, newest: bool = False) -> None:
        """Queue records; a newer record of a queued register replaces it in place.
        ``newest``: the records outrank any queued record of their registers (this node's own,
        just stamped: the clock has seen every record it holds, C1), so none is compared."""
        records = Packed.of(records)
        pending, per_origin = self._pending, self._per_origin
        if newest and per_origin.isdisjoint(records.maps):  # in one call: every local change
            regs = zip(records.maps, records.keys, repeat("", len(records)), strict=True)
            pending.update(zip(regs, records.packed, strict=True))
            records = Packed.empty()
        for name, key, packed in zip(records.maps, records.keys, records.packed, strict=True):
            reg = (name, key, node_of(packed) if name in per_origin else "")
            old = pending.get(reg)
            if old is None or packed > old:  # register.py: ranks as newer() does
                pending[reg] = packed
        if len(pending) > self.max_records:
            pending.clear()
            self.overflowed = True

    def take_batch(self, max_records: int, max_bytes: int) -> Packed:
        """Remove and return the oldest-queued records, within both limits (at least one)."""
        pending = self._pending
        # one pass, then delete: popping the first key repeatedly rescans deleted slots
        head = list(islice(pending.items(), max_records))
        regs = list(map(_REG, head))
        queued = Packed(list(map(_MAP, regs)), list(map(_KEY, regs)), list(map(_PACKED, head)))
        batch = next(split(queued, max_records, max_bytes), queued)
        for reg in regs[: len(batch)]:
            del pending[reg]
        return batch

    def take_overflow(self) -> bool:
        """Whether records were dropped since the last call (then the peer needs repair)."""
        flag, self.overflowed = self.overflowed, False
        return flag

    def __len__(self) -> int:
        return len(self._pending)

    def __bool__(self) -> bool:
        return bool(self._pending)
