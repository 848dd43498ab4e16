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
from bpfsync.layout import Kind, Layout


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

OPS = frozenset({"counter", "max", "min", "lww", "epoch"})


@dataclass(frozen=True, slots=True)
class FieldRule:
    """How one little-endian unsigned field of a value merges.

    ``counter`` sums the origins' slots (mod 2**bits, as the kernel's u32/u64 would wrap);
    ``max``/``min`` take the extreme; ``lww`` takes the latest origin's bytes; ``epoch`` marks a
    window number: only the origins at the highest epoch count, so a new window resets the rest.
    """

    offset: int
    size: int
    op: str


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
        self.rules = tuple(sorted(rules, key=lambda r: r.offset))
        spec = ",".join(f"{r.op}@{r.offset}+{r.size}" for r in self.rules)
        self.name = name or f"fields:{spec}"
        end = 0
        for rule in self.rules:
            if rule.op not in OPS:
                raise ConfigError(f"unknown merge op {rule.op!r}; choose one of {sorted(OPS)}")
            if rule.size <= 0 or rule.offset < end or rule.offset + rule.size > value_size:
                raise ConfigError(
                    f"field at offset {rule.offset} size {rule.size} overlaps another field or"
                    f" runs past the {value_size}-byte value"
                )
            end = rule.offset + rule.size
        epochs = [r for r in self.rules if r.op == "epoch"]
        if len(epochs) > 1:
            raise ConfigError("a value can have at most one epoch field")
        self._epoch = epochs[0] if epochs else None
        self.seed_as_own = all(r.op != "counter" for r in self.rules)

    @classmethod
    def from_layout(cls, layout: Layout, ops: Mapping[str, str]) -> FieldPolicy:
        """Rules from a value's layout and ``{field name: op}``; other fields follow lww.

        Numeric ops need a plain unsigned integer field (not signed, float, array or bitfield).
        """
        rules = []
        for name, op in ops.items():
            try:
                f = layout.field(name)
            except KeyError as err:
                raise ConfigError(f"merge rule for {name!r}: {err.args[0]}") from err
            if op != "lww" and (f.kind not in (Kind.UINT, Kind.BOOL) or f.count or f.bits):
                raise ConfigError(
                    f"merge rule {name}: {op} needs an unsigned integer field;"
                    f" {name!r} is {f.kind}{' array' if f.count else ''}"
                    f"{' bitfield' if f.bits else ''}"
                )
            rules.append(FieldRule(f.offset, f.size, op))
        return cls(layout.size, rules)

    def _epoch_of(self, value: bytes) -> int:
        rule = self._epoch
        assert rule is not None
        return int.from_bytes(value[rule.offset : rule.offset + rule.size], "little")

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
            lo, hi = rule.offset, rule.offset + rule.size
            rest = sum(int.from_bytes(v[lo:hi], "little") for v in live)
            mine = (int.from_bytes(observed[lo:hi], "little") - rest) % (1 << (8 * rule.size))
            out[lo:hi] = mine.to_bytes(rule.size, "little")
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
    """``base`` with each counter/max/min field replaced by the sum/max/min over ``values``;
    lww and epoch fields, and bytes no rule covers, stay as in ``base``."""
    out = bytearray(base)
    for rule in rules:
        if rule.op in ("lww", "epoch"):
            continue
        lo, hi = rule.offset, rule.offset + rule.size
        nums = [int.from_bytes(v[lo:hi], "little") for v in values]
        if rule.op == "counter":
            n = sum(nums) % (1 << (8 * rule.size))  # wraps like the kernel's u32/u64
        else:
            n = max(nums) if rule.op == "max" else min(nums)
        out[lo:hi] = n.to_bytes(rule.size, "little")
    return bytes(out)


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
