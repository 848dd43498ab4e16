"""Which entries of a map sync: a filter, every one of whose conditions an entry must meet.

A condition is ``TERM OP NUMBER``:

- TERM: ``key`` or ``value`` (the whole key or value, read as one little-endian unsigned
  integer of 1, 2, 4 or 8 bytes), ``key.FIELD`` or ``value.FIELD`` (a numeric field by its BTF
  name, nested fields dotted), either with ``[LO:HI]`` for its bits LO to HI-1 (bit 0 the least
  significant; unsigned integer fields); or ``age(value.FIELD)``: the seconds since the
  CLOCK_TAI nanosecond timestamp the field holds (bpfsync_now_ns() in bpfsync.h writes them).
- OP: ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``.
- NUMBER: an integer (decimal or 0x hex), or for ``age`` seconds, with a fraction if need be.

Examples: ``value.state == 2``, ``age(value.created_ns) >= 10``, ``key.prefixlen >= 16``,
``key.port[0:8] < 128``. What the agent does with entries that pass or not is replica.py's rules
F1-F4. Pure logic: the layouts come from the kernel layer, the time from the caller.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bpfsync.errors import ConfigError
from bpfsync.layout import Field, Kind, Layout

_OPS: dict[str, Callable[[float, float], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}
CONDITION = re.compile(
    r"^\s*(?:(?P<age>age)\(\s*(?P<aterm>value\.[^)\s]+)\s*\)|(?P<term>(?:key|value)(?:\.[^\s<>=!]+)?))"
    r"\s*(?P<op>==|!=|<=|>=|<|>)\s*(?P<number>0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?)\s*$"
)
_BITS = re.compile(r"^(?P<name>.*?)\[(?P<lo>[0-9]+):(?P<hi>[0-9]+)\]$")
_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Condition:
    text: str
    in_key: bool
    field: Field
    shift: int
    bits: int  # 0: the whole field
    age: bool
    compare: Callable[[float, float], bool]
    number: float

    def holds(self, key: bytes, value: bytes, now_ns: int) -> bool:
        data = key if self.in_key else value
        f = self.field
        if f.kind is Kind.FLOAT:
            n: float = float(f.decode(data))  # type: ignore[arg-type]
        else:
            n = int.from_bytes(data[f.offset : f.end], "little", signed=f.signed)
            if f.bits or self.bits:
                n = (n >> (f.bit_offset + self.shift)) & ((1 << (self.bits or f.bits)) - 1)
        if self.age:
            n = (now_ns - n) / _NS
        return self.compare(n, self.number)


class Filter:
    """The conditions of one map's filter, checked against its key and value layouts."""

    def __init__(self, conditions: Sequence[Condition]) -> None:
        self.conditions = tuple(conditions)
        self.has_age = any(c.age for c in self.conditions)
        self.spec = " and ".join(c.text for c in self.conditions)

    @classmethod
    def parse(cls, texts: Sequence[str], key: Layout, value: Layout) -> Filter:
        return cls([_condition(t, key, value) for t in texts])

    def passes(self, key: bytes, value: bytes, now_ns: int) -> bool:
        return all(c.holds(key, value, now_ns) for c in self.conditions)


def check_syntax(text: str) -> str:
    """``text`` if it is a condition's form (its fields are checked when the map is opened)."""
    if CONDITION.match(text) is None:
        raise ValueError(
            f"filter condition {text!r} is not TERM OP NUMBER: TERM is key, value, key.FIELD, "
            "value.FIELD (with [LO:HI] for bits) or age(value.FIELD); OP one of == != < <= > >="
        )
    return text


def _condition(text: str, key: Layout, value: Layout) -> Condition:
    found = CONDITION.match(text)
    if found is None:
        check_syntax(text)
        raise AssertionError("unreachable")
    age = found["age"] is not None
    term = found["aterm"] if age else found["term"]
    side, _, name = term.partition(".")
    layout = key if side == "key" else value
    shift = bits = 0
    bitted = _BITS.match(name)
    if bitted is not None:
        name, shift = bitted["name"], int(bitted["lo"])
        bits = int(bitted["hi"]) - shift
    f = _field(layout, side, name, text)
    if bits and (f.kind not in (Kind.UINT, Kind.BOOL) or bits <= 0 or
                 shift + bits > (f.bits or 8 * f.size)):
        raise ConfigError(f"filter {text!r}: bits {shift}-{shift + bits - 1} do not fit "
                          f"{term.split('[')[0]} (an unsigned integer of {f.bits or 8 * f.size}"
                          " bits)")
    if age and (f.kind is not Kind.UINT or f.size != 8 or f.bits or bits):
        raise ConfigError(f"filter {text!r}: age() reads a __u64 nanosecond timestamp field")
    raw = found["number"]
    number = float(int(raw, 16)) if raw.lower().startswith("0x") else float(raw)
    if not age and "." in raw:
        raise ConfigError(f"filter {text!r}: compare fields with integers")
    return Condition(text.strip(), side == "key", f, shift, bits, age, _OPS[found["op"]], number)


def _field(layout: Layout, side: str, name: str, text: str) -> Field:
    if not name:  # the whole key or value, as one integer
        if layout.size not in (1, 2, 4, 8):
            raise ConfigError(f"filter {text!r}: the {layout.size}-byte {side} is not one "
                              f"integer; name a field ({side}.FIELD)")
        return Field("", 0, layout.size, Kind.UINT)
    try:
        f = layout.field(name)
    except KeyError as err:
        raise ConfigError(f"filter {text!r}: the {side} {err.args[0]}") from err
    if not f.kind.numeric or f.count:
        raise ConfigError(f"filter {text!r}: {side}.{name} is {f.kind}"
                          f"{' array' if f.count else ''}; filters compare numbers")
    return f
