"""A synced map as the agent holds it: the kernel map(s), the merge policy and the value codec.

Policies come from the config by BTF field name (``{packets: counter, last_seen: max}``) or as a
word for the whole value. Counters have two layouts:

- in-place: the agent writes the merged total into the map itself. Before each such write it
  re-reads the key: increments the data plane made since the agent last looked are taken into
  this node's slot first (and counted as ``raced``), so only those landing in the microseconds
  between that read and the write can be overwritten.
- exact: the data plane's map holds only this node's counts and is never written by the agent;
  the other nodes' merged value goes into a companion map that the program adds
  (``bpfsync_counter_total`` in bpfsync.h). Required for per-CPU maps, whose per-CPU slots the
  agent could not write back without racing every CPU.

Per-CPU values are folded into one value before they reach the core (DESIGN §3: a node's slot is
the sum over its CPUs; never ship per-CPU slots): counters summed, max/min/epoch fields by their
op, over the CPUs at the newest epoch when the value has an epoch field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bpfsync.agent.config import MapConfig
from bpfsync.core.messages import MapSchema
from bpfsync.core.policy import (
    Companion,
    FieldPolicy,
    FieldRule,
    Policy,
    combine_fields,
    policy_for,
)
from bpfsync.errors import ConfigError, NotFoundError
from bpfsync.kernel.btf import map_layouts, map_layouts_or_raw
from bpfsync.kernel.info import MapInfo, MapType
from bpfsync.kernel.maps import Map
from bpfsync.layout import Layout

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
    in_place_counters: bool = field(init=False)  # peers' counts folded into the map itself

    @property
    def percpu(self) -> bool:
        return self.map.percpu

    def __post_init__(self) -> None:
        # asked once per received record: computed once
        self.in_place_counters = self.companion is None and any(
            r.op == "counter" for r in self.rules
        )

    def fold(self, raw: bytes | None) -> bytes | None:
        """The kernel's value as the core sees it: per-CPU values folded into one."""
        return None if raw is None else self.fold_value(raw)

    def fold_value(self, raw: bytes) -> bytes:
        if not self.map.percpu:
            return raw
        return fold_percpu(raw, self.map.value_size, self.map.ncpus, self.rules)

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
        try:
            key_layout, layout = map_layouts(m.info)
        except NotFoundError as err:
            raise ConfigError(
                f"{where}: per-field policies name BTF fields, but this map has no BTF; give a "
                "whole-value policy (lww, counter, max, min) or create the map with BTF"
            ) from err
        inner: Policy = FieldPolicy.from_layout(layout, mc.policy)
    else:
        key_layout, layout = map_layouts_or_raw(m.info)
        if mc.policy != "lww" and m.value_size not in _WHOLE_SIZES:
            raise ConfigError(
                f"{where}: policy {mc.policy} treats the whole {m.value_size}-byte value as one "
                "unsigned integer, which needs 1, 2, 4 or 8 bytes; name fields instead"
            )
        inner = policy_for(MapSchema(name, m.key_size, m.value_size, mc.policy))
    rules = inner.rules if isinstance(inner, FieldPolicy) else ()
    if m.percpu and mc.counters != "exact":
        raise ConfigError(
            f"{where} is a per-CPU map: sync it with a counter policy and counters: exact (the "
            "agent cannot write per-CPU slots back without racing the CPUs)"
        )
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
    return SyncedMap(name, mc.path, m, policy, schema, layout, key_layout, companion, rules)


def fold_percpu(raw: bytes, size: int, ncpus: int, rules: tuple[FieldRule, ...]) -> bytes:
    stride = (size + 7) & ~7
    values = [raw[i * stride : i * stride + size] for i in range(ncpus)]
    epoch = next((r for r in rules if r.op == "epoch"), None)
    if epoch is not None:
        lo, hi = epoch.offset, epoch.offset + epoch.size
        top = max(int.from_bytes(v[lo:hi], "little") for v in values)
        values = [v for v in values if int.from_bytes(v[lo:hi], "little") == top]
    # bytes no counter/max/min rule covers: from the CPU with the largest value, a stable pick
    return combine_fields(max(values), values, rules)
