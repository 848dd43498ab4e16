"""A synced map as the agent holds it: the kernel map(s), the merge policy and the value codec.

Policies come from the config by BTF field name (``{packets: counter, last_seen: max}``), by bit
range of an integer field (``{"flags[0:8]": lww, "flags[8:64]": counter}``; ``[0:8]`` alone for
a value that is one integer) or as a word for the whole value. Counters have two layouts:

- in-place: the agent writes the merged counts into the map itself. Before each such write it
  re-reads the key, and the write adds the merge's difference on top of the counts read: the
  data plane's increments since the agent last looked stay in the map (counted as ``raced``)
  for the next scan to take into this node's slot, so only those landing between that read and
  the write can be overwritten.
- exact: the data plane's map holds only this node's counts and is never written by the agent;
  the other nodes' merged value goes into a companion map that the program adds
  (``bpfsync_counter_total`` in bpfsync.h).

The core sees one value per key, the kernel may hold another (``fold_value`` one way,
``kernel_value`` the other):

- Per-CPU values are folded into one before they reach the core (DESIGN §3: a node's slot is the
  sum over its CPUs; never ship per-CPU slots): counters summed, max/min/epoch fields by their
  op, over the CPUs at the newest epoch when the value has an epoch field; lww bits from the CPU
  whose lww bits are largest (user space writes the same into every CPU's slot). A merged value
  is written into every CPU's slot, as user-space tools do, except counters: every CPU keeps
  its own count and CPU 0's slot takes the difference to the merged total, so the fold gives the
  total back. The race with in-place increments is the in-place one above, per CPU.
- ``local`` bits are zeroed by the fold, so they are never sent, never in a digest, and a change
  to them alone is no change; a kernel write keeps the kernel's own local bits, per CPU.

Maps whose kernel bytes are the core's (no per-CPU slots, no local bits) skip both. Keys are
the kernel's, except an LPM trie's: ``canon_key`` zeroes the bits past the prefix length, since
the kernel takes both spellings for one entry. ``passes`` is the map's filter (replica.py
F1-F4), read on the kernel's entry as it is (per-CPU values folded, local bits kept).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from bpfsync.agent.config import MapConfig
from bpfsync.core.filter import Filter
from bpfsync.core.messages import MapSchema
from bpfsync.core.policy import (
    Companion,
    FieldPolicy,
    FieldRule,
    Policy,
    combine_fields,
    mask_bytes,
    policy_for,
)
from bpfsync.errors import ConfigError, NotFoundError
from bpfsync.kernel.btf import map_layouts, map_layouts_or_raw
from bpfsync.kernel.info import MapInfo, MapType
from bpfsync.kernel.maps import Map
from bpfsync.layout import Field, Kind, Layout, canonical_prefix

_WHOLE_SIZES = (1, 2, 4, 8)


@dataclass
class SyncedMap:
    name: str
    path: str
    map: Map
    policy: Policy
    schema: MapSchema
    layout: Layout  # one value (one CPU's share for per-CPU maps)
    key_layout: Layout
    companion: Map | None = None
    rules: tuple[FieldRule, ...] = ()
    filter: Filter | None = None  # which entries sync (core/filter.py; replica.py F1-F4)
    in_place_counters: bool = field(init=False)  # peers' counts folded into the map itself
    lpm: bool = field(init=False)  # an LPM trie: keys are prefixes (canon_key)
    folds: bool = field(init=False)  # the kernel's bytes differ from the core's (see above)
    rewrites: bool = field(init=False)  # ... and the agent writes the map: it reads it first
    _local: int = field(init=False)  # the local bits, as a mask over one value
    _counters: list[FieldRule] = field(init=False)
    _counted: int = field(init=False)  # the counters' bits, as a mask over one value

    @property
    def percpu(self) -> bool:
        return self.map.percpu

    def __post_init__(self) -> None:
        # asked once per received record: computed once
        self._counters = [r for r in self.rules if r.op == "counter"]
        self.in_place_counters = self.companion is None and bool(self._counters)
        local = [r for r in self.rules if r.op == "local"]
        self._local = int.from_bytes(mask_bytes(local, self.map.value_size), "little")
        self._counted = int.from_bytes(mask_bytes(self._counters, self.map.value_size), "little")
        self.lpm = self.map.info.type is MapType.LPM_TRIE
        self.folds = self.map.percpu or bool(self._local)
        self.rewrites = (self.folds or self.filter is not None) and self.companion is None

    def counts_only(self, value: bytes, other: bytes) -> bool:
        """Whether two folded values differ in counters' bits alone."""
        a, b = int.from_bytes(value, "little"), int.from_bytes(other, "little")
        return (a ^ b) & ~self._counted == 0

    def canon_key(self, key: bytes) -> bytes:
        """The key as the core knows it: an LPM trie's with the bits past its prefix length
        zeroed (the kernel takes both spellings for one entry)."""
        return canonical_prefix(key) if self.lpm else key

    def passes(self, key: bytes, raw: bytes) -> bool:
        """Whether the kernel's entry syncs (no filter: all do), read as it is now."""
        if self.filter is None:
            return True
        value = raw
        if self.map.percpu:
            value = fold_percpu(raw, self.map.value_size, self.map.ncpus, self.rules)
        return self.filter.passes(key, value, time.clock_gettime_ns(time.CLOCK_TAI))

    def fold(self, raw: bytes | None) -> bytes | None:
        """The kernel's value as the core sees it: per-CPU values folded into one, local bits
        zeroed."""
        return None if raw is None else self.fold_value(raw)

    def fold_value(self, raw: bytes) -> bytes:
        if not self.folds:
            return raw
        size = self.map.value_size
        value = fold_percpu(raw, size, self.map.ncpus, self.rules) if self.map.percpu else raw
        if not self._local:
            return value
        return (int.from_bytes(value, "little") & ~self._local).to_bytes(size, "little")

    def kernel_value(
        self, value: bytes, current: bytes | None, believed: bytes | None = None
    ) -> bytes:
        """The bytes to write for the core's ``value``, the kernel holding ``current`` (raw,
        None if absent): every CPU's slot, each keeping its local bits (and counts).

        ``believed``: the folded value the core's merge started from, for in-place counters.
        The counters then take the merge's difference on top of the counts read now (CPU 0's
        slot, per CPU), so increments the data plane made since are kept, for the next scan to
        take into this node's slot; without it they are set to the merged total."""
        if not self.folds and (believed is None or current is None or not self._counted):
            return value
        size = self.map.value_size
        if not self.map.percpu:
            out = bytearray(value)
            if believed is not None and current is not None and same_window(
                self.rules, believed, value
            ):
                for rule in self._counters:
                    rule.put(out, rule.get(current) + rule.get(value) - rule.get(believed))
            if not self._local:
                return bytes(out)
            own = 0 if current is None else int.from_bytes(current, "little") & self._local
            return ((int.from_bytes(out, "little") & ~self._local) | own).to_bytes(size, "little")
        return expand_percpu(value, current, size, self.map.ncpus, self.rules, self._local,
                             believed)

    def close(self) -> None:
        self.map.close()
        if self.companion is not None:
            self.companion.close()


# The map types whose entries user space reads, writes and deletes by key and whose contents mean
# the same on every node. The others hold kernel objects (programs, sockets, maps, devices,
# CPUs), node-local handles (cgroups, tasks, inodes, sockets' storage) or have no keys to sync
# (ring buffers, queues, stacks, bloom filters): copying their values to another node is
# meaningless or refused by its kernel.
SYNCABLE = frozenset({
    MapType.HASH, MapType.LRU_HASH, MapType.ARRAY, MapType.LPM_TRIE,
    MapType.PERCPU_HASH, MapType.LRU_PERCPU_HASH, MapType.PERCPU_ARRAY,
})  # fmt: skip


def unsyncable(path: str, info: MapInfo) -> str | None:
    """Why the map at ``path`` cannot be synced at all (its type), or None."""
    if info.type in SYNCABLE:
        return None
    kinds = ", ".join(sorted(t.name.lower() for t in SYNCABLE))
    return (f"maps: {path} is {info.describe()}: bpfsync syncs {kinds} maps, whose entries "
            "user space reads and writes by key and mean the same on every node")


def open_synced(mc: MapConfig) -> SyncedMap:
    """Open the map(s) of one config entry and check that its policy fits the map."""
    m = Map.open(mc.path)
    try:
        return _build(mc, m)
    except BaseException:
        m.close()
        raise


def _build(mc: MapConfig, m: Map) -> SyncedMap:
    where = f"maps: {mc.path}"
    why = unsyncable(mc.path, m.info)
    if why is not None:
        raise ConfigError(why)
    name = mc.sync_name
    if isinstance(mc.policy, dict):
        ops, bit_ranges = split_rules(mc.policy)
        try:
            key_layout, layout = map_layouts(m.info)
        except NotFoundError as err:
            if set(ops) | set(bit_ranges) != {""}:
                raise ConfigError(
                    f"{where}: per-field policies name BTF fields, but this map has no BTF; give "
                    "a whole-value policy (lww, counter, max, min), bit ranges of the whole value"
                    " ([0:8]: lww, ...), or create the map with BTF"
                ) from err
            key_layout, layout = map_layouts_or_raw(m.info)
            layout = _as_integer(layout)
        inner: Policy = FieldPolicy.from_layout(layout, ops, bit_ranges)
    else:
        key_layout, layout = map_layouts_or_raw(m.info)
        if mc.policy != "lww" and m.value_size not in _WHOLE_SIZES:
            raise ConfigError(
                f"{where}: policy {mc.policy} treats the whole {m.value_size}-byte value as one "
                "unsigned integer, which needs 1, 2, 4 or 8 bytes; name fields instead"
            )
        inner = policy_for(MapSchema(name, m.key_size, m.value_size, mc.policy))
    rules = inner.rules if isinstance(inner, FieldPolicy) else ()
    companion = None
    policy = inner
    if mc.counters == "exact":
        assert mc.companion is not None
        companion = Map.open(mc.companion)
        if companion.percpu or companion.key_size != m.key_size or (
            companion.value_size != m.value_size
        ):
            companion.close()
            raise ConfigError(
                f"{where}: companion {mc.companion} must be a plain (not per-CPU) map with the "
                f"same key and value sizes ({m.key_size}/{m.value_size} bytes)"
            )
        policy = Companion(inner)
    schema = MapSchema(name, m.key_size, m.value_size, policy.name)
    flt = None
    if mc.filter:
        try:
            flt = Filter.parse(mc.filter, key_layout, layout)
        except ConfigError as err:
            if companion is not None:
                companion.close()
            raise ConfigError(f"{where}: {err}") from err
    return SyncedMap(name, mc.path, m, policy, schema, layout, key_layout, companion, rules, flt)


_RULE_KEY = re.compile(r"^(?P<field>.*?)(?:\[(?P<bits>[0-9]+:[0-9]+)\])?$")


def split_rules(policy: Mapping[str, str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """A config's ``{field: op, "field[LO:HI]": op}`` as ({field: op}, {field: {"LO:HI": op}})
    (``""`` is the whole value)."""
    ops: dict[str, str] = {}
    ranges: dict[str, dict[str, str]] = {}
    for key, op in policy.items():
        found = _RULE_KEY.match(key)
        if found is None:
            raise ConfigError(f"merge rule {key!r}: give FIELD, FIELD[LO:HI] or [LO:HI]")
        if found["bits"] is None:
            ops[found["field"]] = op
        else:
            ranges.setdefault(found["field"], {})[found["bits"]] = op
    return ops, ranges


def _as_integer(layout: Layout) -> Layout:
    """A value without BTF, read as one unsigned integer (for bit ranges of the whole value)."""
    if layout.size not in (1, 2, 4, 8):
        raise ConfigError(f"bit ranges of the value need a 1, 2, 4 or 8-byte value, not "
                          f"{layout.size} bytes; create the map with BTF and name fields")
    return Layout(layout.size, (Field("", 0, layout.size, Kind.UINT),))


def same_window(rules: tuple[FieldRule, ...], a: bytes, b: bytes) -> bool:
    """Whether two values are of one counting window (always, without an epoch field): only
    then is a difference of their counts a count of increments."""
    epoch = next((r for r in rules if r.op == "epoch"), None)
    return epoch is None or epoch.get(a) == epoch.get(b)


def fold_percpu(raw: bytes, size: int, ncpus: int, rules: tuple[FieldRule, ...]) -> bytes:
    stride = (size + 7) & ~7
    values = [raw[i * stride : i * stride + size] for i in range(ncpus)]
    epoch = next((r for r in rules if r.op == "epoch"), None)
    if epoch is not None:
        top = max(epoch.get(v) for v in values)
        values = [v for v in values if epoch.get(v) == top]
    # lww bits and bits no rule covers: from the CPU where they are largest, a stable pick
    # that ignores how far each CPU's counts got
    merged = [r for r in rules if r.op in ("counter", "max", "min", "local")]
    keep = ~int.from_bytes(mask_bytes(merged, size), "little")
    base = max(values, key=lambda v: int.from_bytes(v, "little") & keep)
    return combine_fields(base, values, rules)


def expand_percpu(
    value: bytes, current: bytes | None, size: int, ncpus: int, rules: tuple[FieldRule, ...],
    local: int, believed: bytes | None = None,
) -> bytes:
    """Per-CPU slots for the merged ``value`` (``fold_percpu`` gives it back): ``value`` in every
    CPU's slot with that CPU's own local bits; each CPU keeps its count (none if it is still
    in an older window), and CPU 0's takes the difference to the merged total, or with
    ``believed`` (the folded value the merge started from) the merge's difference on top of
    the counts as they are."""
    stride = (size + 7) & ~7
    blank = bytes(size)
    slots = [current[i * stride : i * stride + size] if current else blank for i in range(ncpus)]
    counters = [r for r in rules if r.op == "counter"]
    epoch = next((r for r in rules if r.op == "epoch"), None)
    target = int.from_bytes(value, "little") & ~local
    out = []
    for slot in slots:
        own = int.from_bytes(slot, "little") & local
        buf = bytearray((target | own).to_bytes(size, "little"))
        stale = epoch is not None and epoch.get(slot) != epoch.get(value)
        for rule in counters:
            rule.put(buf, 0 if stale else rule.get(slot))
        out.append(buf)
    for rule in counters:
        if believed is not None and same_window(rules, believed, value):
            rule.put(out[0], rule.get(out[0]) + rule.get(value) - rule.get(believed))
        else:
            rule.put(out[0], rule.get(value) - sum(rule.get(b) for b in out[1:]))
    pad = bytes(stride - size)
    return b"".join(bytes(b) + pad for b in out)
