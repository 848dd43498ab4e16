"""A synced map as the agent opens it: per-CPU folding (pure logic) and policies checked
against real maps at start-up."""

from __future__ import annotations

import shutil
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bpfsync.agent.config import MapConfig
from bpfsync.agent.synced import fold_percpu, open_synced
from bpfsync.core.policy import FieldRule
from bpfsync.demo.cluster import MAP_NAME, demo_object
from bpfsync.errors import ConfigError
from bpfsync.kernel.info import MapType
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject

# struct { __u64 window; __u64 count; __u64 last_seen; } per CPU, each padded to 8 (already is)
V = struct.Struct("<QQQ")
RULES = (FieldRule(0, 8, "epoch"), FieldRule(8, 8, "counter"), FieldRule(16, 8, "max"))


def _raw(*cpus: tuple[int, int, int]) -> bytes:
    return b"".join(V.pack(*c) for c in cpus)


def test_counts_summed_and_max_taken_over_cpus() -> None:
    raw = _raw((5, 10, 100), (5, 3, 300), (5, 0, 0), (5, 7, 200))
    assert V.unpack(fold_percpu(raw, V.size, 4, RULES)) == (5, 20, 300)


def test_cpus_still_in_an_old_window_do_not_count() -> None:
    raw = _raw((6, 2, 900), (5, 50, 950), (6, 1, 800), (0, 0, 0))
    assert V.unpack(fold_percpu(raw, V.size, 4, RULES)) == (6, 3, 900)


def test_padding_between_cpu_values_is_skipped() -> None:
    small = struct.Struct("<I")  # a 4-byte counter: each CPU's value is padded to 8 bytes
    raw = b"".join(small.pack(n) + b"\xff" * 4 for n in (1, 2, 3))
    assert fold_percpu(raw, 4, 3, (FieldRule(0, 4, "counter"),)) == small.pack(6)


# --- policies that do not fit the map are refused at start-up (real maps) ----------------------

@pytest.fixture
def pins() -> Iterator[Callable[..., str]]:
    """``pins(type, key, value)`` -> the pin path of a new map without BTF; ``pins("btf")`` ->
    the demo object's ``sessions`` map (struct value with BTF)."""
    root = Path(f"/sys/fs/bpf/bpfsync-synced-{uuid.uuid4().hex[:8]}")
    root.mkdir()
    keep: list[Map | BpfObject] = []

    def make(kind: str, key: int = 4, value: int = 8) -> str:
        path = root / str(len(keep))
        if kind == "btf":
            obj = BpfObject.open(demo_object())
            obj.load()
            keep.append(obj)
            m = obj.map(MAP_NAME)
        else:
            m = Map.create(MapType[kind.upper()], key, value, 16)
        m.pin(str(path))
        keep.append(m)
        return str(path)

    try:
        yield make
    finally:
        for k in keep:
            k.close()
        shutil.rmtree(root, ignore_errors=True)


def _refused(cfg: MapConfig, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        open_synced(cfg).close()


def test_policies_that_do_not_fit_are_refused(pins: Callable[..., str]) -> None:
    btf = pins("btf")
    _refused(MapConfig(path=pins("hash"), policy={"count": "counter"}), "has no BTF")
    _refused(MapConfig(path=btf, policy={"packets": "counter"}), "packets")
    _refused(MapConfig(path=pins("hash", value=3), policy="counter"), "1, 2, 4 or 8 bytes")
    _refused(MapConfig(path=pins("percpu_hash"), policy="counter"), "per-CPU")
    _refused(MapConfig(path=pins("hash"), policy="counter", counters="exact",
                       companion=pins("hash", value=4)), "same key and value sizes")
    # a map whose values are kernel objects or node-local handles: refused at start, as by
    # `bpfsync check` (one rule, synced.unsyncable)
    _refused(MapConfig(path=pins("prog_array", value=4)), "bpfsync syncs .* maps")


def test_policies_that_fit_are_taken(pins: Callable[..., str]) -> None:
    sm = open_synced(MapConfig(path=pins("btf"), policy={"bytes": "counter", "port": "max"}))
    try:
        assert sm.in_place_counters and sm.schema.policy.startswith("fields:counter@0+8")
    finally:
        sm.close()
    sm = open_synced(MapConfig(path=pins("percpu_hash"), policy="counter", counters="exact",
                               companion=pins("hash")))
    try:
        assert sm.percpu and not sm.in_place_counters and sm.schema.policy == "exact:counter"
    finally:
        sm.close()
