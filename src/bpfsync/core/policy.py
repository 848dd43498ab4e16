"""Merge policies: how the records of one key become the value the kernel map holds.

Replicated state is always a set of last-writer-wins *registers*, each holding one Record, and
merging keeps per register the record that ranks highest (``newer``). That alone makes every
policy commutative, associative and idempotent, whatever order or how often records arrive.
Policies differ only in

* register granularity: one register per key (``lww``), or one per key *and origin node*
  (``per_origin``: ``counter``, ``max``, ``min``, per-field rules), where every node's latest
  contribution is kept;
* ``combine``: the registers of one key -> the value the kernel map should hold;
* ``own_part``: a value the local data plane wrote -> this node's own contribution.

Rank: the higher Stamp wins (wall, logical, node). Equal stamps with different contents happen
only for the tombstones replica.py makes for stale records, or with a misbehaving node; then a
tombstone beats a value, and a value beats a smaller value, so the outcome is still the same on
every node.

G-counter slots are LWW registers rather than max-registers: an origin may lower its own slot
(a window reset) and its latest report wins. Each origin writes only its own slot, so for slots
that only grow "latest" and "largest" are the same thing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from bpfsync.core.messages import MapSchema, Record
from bpfsync.errors import ConfigError
from bpfsync.layout import Field, Kind, Layout


def newer(a: Record, b: Record) -> bool:
    """True if ``a`` ranks strictly above ``b`` (so ``a`` replaces ``b`` in a register)."""
    if a.stamp != b.stamp:
        return a.stamp > b.stamp
    if a.value is None or b.value is None:
        return a.value is None and b.value is not None
    return a.value > b.value


def pick(a: Record, b: Record) -> Record:
    """The record a register keeps when it holds one of ``a``, ``b`` and is offered the other."""
    return b if newer(b, a) else a


class Policy(ABC):
    """How one map's registers combine into kernel values."""

    name: str
    per_origin: ClassVar[bool]  # one register per (key, origin) instead of per key
    # whether a seeded kernel value may be taken as this node's own contribution: false for
    # counters, whose kernel value already includes the other nodes' slots
    seed_as_own: bool = True

    @abstractmethod
    def combine(self, contributions: Sequence[Record]) -> bytes | None:
        """The kernel value from one key's registers; None (absent) when none is live."""

    @abstractmethod
    def own_part(self, observed: bytes, others: Sequence[Record]) -> bytes:
        """This node's contribution, given the kernel value and the other origins' registers.

        Defined so that ``combine(others + [own])`` gives back ``observed`` when the data plane
        is consistent with the others (same window epoch).
        """


class LastWriterWins(Policy):
    """The default: the highest-ranked record's value; a tombstone means absent."""

    name = "lww"
    per_origin = False

    def combine(self, contributions: Sequence[Record]) -> bytes | None:
        best = None
        for rec in contributions:
            best = rec if best is None else pick(best, rec)
        return None if best is None else best.value

    def own_part(self, observed: bytes, others: Sequence[Record]) -> bytes:
        return observed


LWW = LastWriterWins()

OPS = frozenset({"counter", "max", "min", "lww", "epoch", "local"})


@dataclass(frozen=True, slots=True)
class FieldRule:
    """How one little-endian unsigned field of a value, or a range of its bits, merges.

    The field is the ``size``-byte integer at ``offset``; a rule with ``bits`` covers only bits
    ``shift`` to ``shift + bits - 1`` of it (bit 0 the least significant), so flag bits and a
    counter sharing one u64 merge each by their own op.

    ``counter`` sums the origins' slots (mod 2**width, as the kernel's integers wrap: a counter
    in the high bits of a u64 wraps out of the top, never into its neighbours); ``max``/``min``
    take the extreme; ``lww`` takes the latest origin's bits; ``epoch`` marks a window number:
    only the origins at the highest epoch count, so a new window resets the rest. ``local``
    bits belong to each node alone: the agent zeroes them before values reach the core and
    keeps the kernel's own when it writes (agent/synced.py), so here they are always zero.
    """

    offset: int
    size: int
    op: str
    shift: int = 0
    bits: int = 0  # 0: the whole field

    @property
    def width(self) -> int:
        return self.bits or 8 * self.size

    @property
    def bit_range(self) -> tuple[int, int]:
        """[start, stop) in bits from the start of the value."""
        start = 8 * self.offset + self.shift
        return start, start + self.width

    @property
    def spec(self) -> str:
        """``op@offset+size``, with ``[lo:hi]`` for a bit range (the policy's name uses it)."""
        bits = f"[{self.shift}:{self.shift + self.bits}]" if self.bits else ""
        return f"{self.op}@{self.offset}+{self.size}{bits}"

    def get(self, value: bytes | bytearray) -> int:
        n = int.from_bytes(value[self.offset : self.offset + self.size], "little")
        return (n >> self.shift) & ((1 << self.width) - 1) if self.bits else n

    def put(self, buf: bytearray, n: int) -> None:
        """Write ``n`` (mod 2**width) into these bits of ``buf``; the field's other bits stay."""
        lo, hi = self.offset, self.offset + self.size
        mask = (1 << self.width) - 1
        if self.bits:
            word = int.from_bytes(buf[lo:hi], "little") & ~(mask << self.shift)
            n = word | ((n & mask) << self.shift)
        buf[lo:hi] = (n & ((1 << (8 * self.size)) - 1)).to_bytes(self.size, "little")

    def mask(self, size: int) -> int:
        """These bits as an integer mask over a ``size``-byte little-endian value."""
        start, stop = self.bit_range
        return ((1 << (stop - start)) - 1) << start if stop <= 8 * size else 0


def mask_bytes(rules: Iterable[FieldRule], size: int) -> bytes:
    """The bits of ``rules``, as a ``size``-byte little-endian mask."""
    m = 0
    for rule in rules:
        m |= rule.mask(size)
    return m.to_bytes(size, "little")


class FieldPolicy(Policy):
    """Per-field merge over a fixed-size value; bytes no rule covers follow the latest origin.

    A whole-value ``counter``/``max``/``min`` is one rule covering the value. ``name`` defaults
    to a canonical spelling of the rules (``fields:counter@0+8,max@8+8``): put it in the map's
    MapSchema.policy so that peers with different rules show up in their Hellos.
    """

    per_origin = True

    def __init__(
        self, value_size: int, rules: Iterable[FieldRule], name: str | None = None
    ) -> None:
        self.value_size = value_size
        self.rules = tuple(sorted(rules, key=lambda r: r.bit_range))
        spec = ",".join(r.spec for r in self.rules)
        self.name = name or f"fields:{spec}"
        end = 0
        for rule in self.rules:
            if rule.op not in OPS:
                raise ConfigError(f"unknown merge op {rule.op!r}; choose one of {sorted(OPS)}")
            start, stop = rule.bit_range
            if rule.size <= 0 or start < end or rule.offset + rule.size > value_size or (
                rule.bits < 0 or rule.shift < 0 or rule.shift + rule.bits > 8 * rule.size
            ):
                raise ConfigError(
                    f"field at offset {rule.offset} size {rule.size} (bits {start}-{stop - 1} of"
                    f" the value) overlaps another field or runs past the {value_size}-byte value"
                )
            end = stop
        if self.rules and all(r.op == "local" for r in self.rules) and (
            sum(r.width for r in self.rules) == 8 * value_size
        ):
            raise ConfigError("every bit of the value is local: nothing of it would sync")
        epochs = [r for r in self.rules if r.op == "epoch"]
        if len(epochs) > 1:
            raise ConfigError("a value can have at most one epoch field")
        self._epoch = epochs[0] if epochs else None
        self.seed_as_own = all(r.op != "counter" for r in self.rules)

    @classmethod
    def from_layout(
        cls, layout: Layout, ops: Mapping[str, str], bit_ranges: Mapping[str, Mapping[str, str]]
        | None = None,
    ) -> FieldPolicy:
        """Rules from a value's layout and ``{field name: op}``; other fields follow lww.

        ``bit_ranges`` splits fields by bits: ``{field name: {"LO:HI": op}}`` (bits LO to HI-1,
        bit 0 the least significant of the little-endian integer), covering every bit of the
        field exactly once. Numeric ops (and bit ranges) need a plain unsigned integer field
        (not signed, float or array); a C bitfield is its bits of the integer holding it.
        """
        rules = []
        for name, op in ops.items():
            f = _field(layout, name)
            if op not in ("lww", "local"):
                _check_unsigned(f, f"merge rule {name}: {op}")
            rules.append(_whole_rule(f, op))
        for name, ranges in (bit_ranges or {}).items():
            f = _field(layout, name)
            if name in ops:
                raise ConfigError(f"merge rule {name!r} gives both an op and bit ranges")
            _check_unsigned(f, f"bit ranges of {name or 'the value'}")
            rules += _bit_rules(f, name, ranges)
        return cls(layout.size, rules)

    def _epoch_of(self, value: bytes) -> int:
        rule = self._epoch
        assert rule is not None
        return rule.get(value)

    def _current(self, values: list[Record]) -> list[Record]:
        """The live contributions of the newest window (all of them without an epoch field)."""
        live = [r for r in values if r.value is not None]
        if self._epoch is None or not live:
            return live
        top = max(self._epoch_of(r.value) for r in live if r.value is not None)
        return [r for r in live if r.value is not None and self._epoch_of(r.value) == top]

    def combine(self, contributions: Sequence[Record]) -> bytes | None:
        live = self._current(list(contributions))
        if not live:
            return None
        latest = live[0]
        for rec in live[1:]:
            latest = pick(latest, rec)
        assert latest.value is not None
        return combine_fields(latest.value, [r.value for r in live if r.value is not None],
                              self.rules)

    def own_part(self, observed: bytes, others: Sequence[Record]) -> bytes:
        counters = [r for r in self.rules if r.op == "counter"]
        if not counters:
            return observed  # max/min/lww fields: what the data plane wrote is our contribution
        live = [r.value for r in others if r.value is not None]
        if self._epoch is not None:
            epoch = self._epoch_of(observed)
            live = [v for v in live if self._epoch_of(v) == epoch]
        out = bytearray(observed)
        for rule in counters:
            rule.put(out, rule.get(observed) - sum(rule.get(v) for v in live))
        return bytes(out)


class Companion(Policy):
    """The exact counter layout: the local map holds only this node's contributions.

    The data plane never sees its counts overwritten: the agent writes the *other* nodes' merged
    value into a companion map (``peers_value``), and the program adds the two
    (``bpfsync_counter_total`` in bpfsync.h). So a value the data plane wrote is exactly this
    node's slot, and seeding from the kernel at start keeps the node's counts across restarts.
    """

    per_origin = True
    seed_as_own = True

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = f"exact:{inner.name}"

    def combine(self, contributions: Sequence[Record]) -> bytes | None:
        return self.inner.combine(contributions)

    def own_part(self, observed: bytes, others: Sequence[Record]) -> bytes:
        return observed


def combine_fields(base: bytes, values: Sequence[bytes], rules: Iterable[FieldRule]) -> bytes:
    """``base`` with each counter/max/min field (or bit range) replaced by the sum/max/min over
    ``values``; lww, epoch and local ones, and bits no rule covers, stay as in ``base``."""
    out = bytearray(base)
    for rule in rules:
        if rule.op in ("lww", "epoch", "local"):
            continue
        nums = [rule.get(v) for v in values]
        # a sum is wrapped by put() like the kernel's integers
        pick_n = sum if rule.op == "counter" else max if rule.op == "max" else min
        rule.put(out, pick_n(nums))
    return bytes(out)


def _field(layout: Layout, name: str) -> Field:
    try:
        return layout.field(name)
    except KeyError as err:
        raise ConfigError(f"merge rule for {name!r}: {err.args[0]}") from err


def _check_unsigned(f: Field, what: str) -> None:
    if f.kind not in (Kind.UINT, Kind.BOOL) or f.count or f.size not in (1, 2, 4, 8):
        raise ConfigError(
            f"{what} needs an unsigned integer field of 1, 2, 4 or 8 bytes;"
            f" {f.name or 'the value'!r} is a {f.size}-byte {f.kind}"
            f"{' array' if f.count else ''}"
        )


def _whole_rule(f: Field, op: str) -> FieldRule:
    if f.bits:  # a C bitfield: its bits of the integer that holds it
        return FieldRule(f.offset, f.size, op, f.bit_offset, f.bits)
    return FieldRule(f.offset, f.size, op)


def _bit_rules(f: Field, name: str, ranges: Mapping[str, str]) -> list[FieldRule]:
    """The rules of ``{"LO:HI": op}`` over field ``f``: in range, disjoint, covering it."""
    what = f"bit ranges of {name!r}" if name else "bit ranges of the value"
    width = f.bits or 8 * f.size
    spans = []
    for text, op in ranges.items():
        lo_s, sep, hi_s = text.partition(":")
        if not sep or not lo_s.isdigit() or not hi_s.isdigit():
            raise ConfigError(f"{what}: {text!r} is not LO:HI (bits LO to HI-1, e.g. 0:8)")
        lo, hi = int(lo_s), int(hi_s)
        if not lo < hi <= width:
            raise ConfigError(f"{what}: bits {lo}-{hi - 1} do not fit the {width}-bit field"
                              " (give LO:HI with LO < HI <= the field's width)")
        spans.append((lo, hi, op))
    spans.sort()
    at = 0
    for lo, hi, _ in spans:
        if lo < at:
            raise ConfigError(f"{what}: bits {lo}-{min(at, hi) - 1} are in two ranges")
        if lo > at:
            raise ConfigError(f"{what}: bits {at}-{lo - 1} are in no range; cover every bit")
        at = hi
    if at < width:
        raise ConfigError(f"{what}: bits {at}-{width - 1} are in no range; cover every bit")
    base = f.bit_offset if f.bits else 0
    return [FieldRule(f.offset, f.size, op, base + lo, hi - lo) for lo, hi, op in spans]


def policy_for(schema: MapSchema) -> Policy:
    """The policy a MapSchema names: ``lww``, or ``counter``/``max``/``min`` over the whole value.

    Per-field policies are built from a layout (``FieldPolicy.from_layout``) and given to
    Replica(policies=...); the schema then carries the policy's name.
    """
    if schema.policy == "lww":
        return LWW
    if schema.policy in ("counter", "max", "min"):
        whole = FieldRule(0, schema.value_size, schema.policy)
        return FieldPolicy(schema.value_size, [whole], name=schema.policy)
    raise ConfigError(
        f"map {schema.name!r}: unknown policy {schema.policy!r}; use lww, counter, max or min"
        " (per-field policies are given as a FieldPolicy)"
    )
