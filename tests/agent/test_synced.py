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
from bpfsync.agent.synced import expand_percpu, fold_percpu, open_synced
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
    # bit ranges: every bit of the field in exactly one range, inside the field
    _refused(MapConfig(path=pins("hash"), policy={"[0:8]": "lww"}), "bits 8-63 are in no range")
    _refused(MapConfig(path=pins("hash"), policy={"[0:8]": "lww", "[4:64]": "counter"}),
             "bits 4-7 are in two ranges")
    _refused(MapConfig(path=pins("hash"), policy={"[0:8]": "lww", "[8:70]": "counter"}),
             "bits 8-69 do not fit the 64-bit field")
    _refused(MapConfig(path=pins("hash", value=3), policy={"[0:24]": "lww"}), "1, 2, 4 or 8")
    _refused(MapConfig(path=btf, policy={"port[0:8]": "lww", "port[8:16]": "counter",
                                         "port": "max"}), "both an op and bit ranges")
    _refused(MapConfig(path=btf, policy={"nope[0:8]": "lww", "nope[8:16]": "counter"}), "nope")
    _refused(MapConfig(path=pins("hash"), policy={"[0:8]": "local", "[8:64]": "local"}),
             "every bit of the value is local")
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


# --- per-CPU maps under every policy, and local bits --------------------------------------------

FLAGS = FieldRule(0, 8, "lww", 0, 8)


def _slots(*cpus: int) -> bytes:
    return b"".join(n.to_bytes(8, "little") for n in cpus)


def _u64(flags: int, hits: int) -> int:
    return flags | hits << 8


def test_a_merged_value_goes_into_every_cpu_keeping_their_counts() -> None:
    rules = (FLAGS, FieldRule(0, 8, "counter", 8, 56))
    current = _slots(_u64(0, 4), _u64(0, 1), _u64(0, 0), _u64(0, 9))
    target = _u64(0x01, 30).to_bytes(8, "little")  # flag set elsewhere, 30 hits cluster-wide
    raw = expand_percpu(target, current, 8, 4, rules, 0)
    cpus = [int.from_bytes(raw[i * 8 : i * 8 + 8], "little") for i in range(4)]
    assert [c & 0xFF for c in cpus] == [0x01] * 4
    assert [c >> 8 for c in cpus] == [30 - 10, 1, 0, 9]  # CPU 0 takes the difference
    assert fold_percpu(raw, 8, 4, rules) == target


def test_local_bits_stay_each_cpus_own_and_never_reach_the_core() -> None:
    rules = (FLAGS, FieldRule(0, 8, "local", 8, 56))
    local = ((1 << 56) - 1) << 8
    current = _slots(_u64(0, 4), _u64(0, 1))
    raw = expand_percpu(_u64(0x02, 0).to_bytes(8, "little"), current, 8, 2, rules, local)
    assert raw == _slots(_u64(0x02, 4), _u64(0x02, 1))
    assert expand_percpu(_u64(0x02, 0).to_bytes(8, "little"), None, 8, 2, rules, local) == (
        _slots(_u64(0x02, 0), _u64(0x02, 0)))


def test_lww_bits_are_read_as_user_space_wrote_them_whatever_the_counts() -> None:
    rules = (FLAGS, FieldRule(0, 8, "counter", 8, 56))
    raw = _slots(_u64(0x01, 900), _u64(0x03, 2), _u64(0x03, 0))
    assert fold_percpu(raw, 8, 3, rules) == _u64(0x03, 902).to_bytes(8, "little")


@pytest.mark.parametrize("policy", ["lww", "max", "min", "counter",
                                    {"[0:8]": "lww", "[8:64]": "local"},
                                    {"[0:8]": "lww", "[8:64]": "counter"}])
@pytest.mark.parametrize("kind", ["percpu_hash", "lru_percpu_hash", "percpu_array"])
def test_per_cpu_maps_take_every_policy(
    pins: Callable[..., str], policy: object, kind: str
) -> None:
    sm = open_synced(MapConfig(path=pins(kind), policy=policy))  # type: ignore[arg-type]
    try:
        ncpus, key = sm.map.ncpus, b"\x01\0\0\0"
        hits = [_u64(0, 3 + i) for i in range(ncpus)]  # the data plane counted on every CPU
        sm.map.update(key, _slots(*hits))
        want = _u64(0x07, 40).to_bytes(8, "little")
        sm.map.update(key, sm.kernel_value(want, sm.map.lookup(key)))
        folded = sm.fold(sm.map.lookup(key))
        if policy == {"[0:8]": "lww", "[8:64]": "local"}:  # hits stay, and are not the core's
            assert folded == _u64(0x07, 0).to_bytes(8, "little")
            got = sm.map.lookup(key) or b""
            assert [int.from_bytes(got[i * 8 : i * 8 + 8], "little") >> 8
                    for i in range(ncpus)] == [3 + i for i in range(ncpus)]
        else:
            assert folded == want
    finally:
        sm.close()


def test_local_bits_of_a_plain_map(pins: Callable[..., str]) -> None:
    sm = open_synced(MapConfig(path=pins("hash"), policy={"[0:8]": "lww", "[8:64]": "local"}))
    try:
        assert sm.rewrites and not sm.in_place_counters
        kernel = _u64(0x01, 77).to_bytes(8, "little")
        assert sm.fold(kernel) == _u64(0x01, 0).to_bytes(8, "little")
        peer = _u64(0x02, 0).to_bytes(8, "little")
        assert sm.kernel_value(peer, kernel) == _u64(0x02, 77).to_bytes(8, "little")
        assert sm.kernel_value(peer, None) == peer
    finally:
        sm.close()
