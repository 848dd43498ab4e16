"""Single-element operations, finding maps, and typed errors, on every synced map type."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from collections.abc import Callable

import pytest

from bpfsync.errors import (
    ConfigError,
    InvalidError,
    KeyNotFoundError,
    MapFullError,
    NotFoundError,
    NotSupportedError,
)
from bpfsync.kernel.info import MapFlags, MapType, UpdateFlags, parse_cpu_list, possible_cpus
from bpfsync.kernel.maps import Map, map_ids, unpin
from bpfsync.kernel.objects import BpfObject
from bpfsync.layout import prefix_bytes

VALUE_SIZE = 72  # sizeof(struct stats) in tests/bpf/all_maps.bpf.c
HASH_MAPS = {
    "t_hash": MapType.HASH,
    "t_lru_hash": MapType.LRU_HASH,
    "t_pcpu_hash": MapType.PERCPU_HASH,
    "t_lru_pcpu": MapType.LRU_PERCPU_HASH,
}
ARRAY_MAPS = {"t_array": MapType.ARRAY, "t_pcpu_array": MapType.PERCPU_ARRAY}


def flow_key(i: int) -> bytes:
    return struct.pack("<IIHHB3x", 0xC6120000 + i, 0xC6120001, 1000 + i % 7, 80, 17)


def value_for(m: Map, seed: int) -> bytes:
    """A distinct value for every CPU slot of per-CPU maps: ``seed * 100 + cpu``."""
    one = VALUE_SIZE
    if not m.percpu:
        return struct.pack("<QQ", seed, seed * 2).ljust(one, b"\x01")
    padded = (one + 7) // 8 * 8
    return b"".join(
        struct.pack("<QQ", seed * 100 + cpu, cpu).ljust(padded, b"\x02") for cpu in range(m.ncpus)
    )


@pytest.mark.parametrize(("name", "kind"), sorted(HASH_MAPS.items()))
def test_hash_maps_update_lookup_delete(all_maps: BpfObject, name: str, kind: MapType) -> None:
    with all_maps.map(name) as m:
        assert m.info.type is kind
        assert m.percpu == kind.percpu
        assert (m.key_size, m.value_size) == (16, VALUE_SIZE)
        assert m.lookup(flow_key(1)) is None
        m.update(flow_key(1), value_for(m, 1))
        m.update(flow_key(2), value_for(m, 2))
        assert m.lookup(flow_key(1)) == value_for(m, 1)
        m.update(flow_key(1), value_for(m, 3))  # replace
        assert m.lookup(flow_key(1)) == value_for(m, 3)
        assert m.delete(flow_key(1)) is True
        assert m.delete(flow_key(1)) is False
        assert m.lookup(flow_key(1)) is None
        assert m.dump().to_dict() == {flow_key(2): value_for(m, 2)}


@pytest.mark.parametrize(("name", "kind"), sorted(ARRAY_MAPS.items()))
def test_array_maps_update_lookup_and_refuse_delete(
    all_maps: BpfObject, name: str, kind: MapType
) -> None:
    with all_maps.map(name) as m:
        assert m.info.type is kind
        zero = bytes(m.value_stride)
        idx = struct.pack("<I", 3)
        assert m.lookup(idx) == zero  # array elements always exist
        assert m.lookup(struct.pack("<I", m.max_entries)) is None  # out of range
        m.update(idx, value_for(m, 7))
        assert m.lookup(idx) == value_for(m, 7)
        with pytest.raises(NotSupportedError, match="cannot be deleted"):
            m.delete(idx)
        with pytest.raises(NotSupportedError):
            m.delete_batch([idx])
        dump = m.dump()
        assert dump.count == m.max_entries
        assert dump.to_dict()[idx] == value_for(m, 7)
        assert [k for k, _ in dump][:4] == [struct.pack("<I", i) for i in range(4)]


def test_percpu_layout_is_padded_value_times_possible_cpus(all_maps: BpfObject) -> None:
    with open("/sys/devices/system/cpu/possible") as f:
        expected_cpus = parse_cpu_list(f.read())
    assert possible_cpus() == expected_cpus
    with all_maps.map("t_pcpu_hash") as m, all_maps.map("t_hash") as plain:
        assert m.ncpus == expected_cpus
        assert m.value_stride == 72 * expected_cpus  # 72 is already a multiple of 8
        assert plain.value_stride == 72
        m.update(flow_key(5), value_for(m, 5))
        raw = m.lookup(flow_key(5))
        assert raw is not None
        slots = [raw[i * 72 : (i + 1) * 72] for i in range(m.ncpus)]
        assert [struct.unpack_from("<Q", s)[0] for s in slots] == [
            500 + cpu for cpu in range(m.ncpus)
        ]


def test_cpu_list_parsing() -> None:
    assert parse_cpu_list("0\n") == 1
    assert parse_cpu_list("0-3,8-9\n") == 6
    assert parse_cpu_list("0,2,4-5") == 4


def test_update_flags_and_typed_errors(make_map: Callable[..., Map]) -> None:
    m = make_map("hash", 4, 8, 2)
    k1, k2, k3 = (struct.pack("<I", i) for i in (1, 2, 3))
    v = struct.pack("<Q", 9)
    m.update(k1, v, UpdateFlags.NOEXIST)
    with pytest.raises(InvalidError) as exc:
        m.update(k1, v, UpdateFlags.NOEXIST)
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(KeyNotFoundError):
        m.update(k2, v, UpdateFlags.EXIST)
    m.update(k2, v)
    with pytest.raises(MapFullError) as full:
        m.update(k3, v)
    assert full.value.errno == errno.E2BIG
    assert "bst_map" in str(full.value)
    with pytest.raises(ValueError, match="key is 3 bytes"):
        m.lookup(b"abc")
    with pytest.raises(ValueError, match="needs a 8-byte value"):
        m.update(k1, b"\0" * 7)


def test_next_key_walks_every_key(make_map: Callable[..., Map]) -> None:
    m = make_map("hash", 4, 4, 64)
    m.update_batch([struct.pack("<I", i) for i in range(20)], [b"vvvv"] * 20)
    seen, key = [], m.next_key(None)
    while key is not None:
        seen.append(key)
        key = m.next_key(key)
    assert sorted(seen) == sorted(struct.pack("<I", i) for i in range(20))


def test_open_by_pin_path_name_and_id(make_map: Callable[..., Map], pin_dir: str) -> None:
    name = f"bst{os.getpid() % 100000}"
    m = make_map("hash", 4, 4, 8, name=name)
    m.update(b"abcd", b"1234")
    pin = os.path.join(pin_dir, "again")
    m.pin(pin)
    for spec in (pin, f"name:{name}", f"id:{m.info.id}"):
        with Map.open(spec) as other:
            assert other.info.id == m.info.id
            assert other.lookup(b"abcd") == b"1234"
    assert m.info.id in set(map_ids())
    unpin(pin)
    assert not os.path.exists(pin)
    with pytest.raises(NotFoundError):
        unpin(pin)


def test_open_errors(
    make_map: Callable[..., Map], load_object: Callable[..., BpfObject], pin_dir: str
) -> None:
    with pytest.raises(NotFoundError):
        Map.open(os.path.join(pin_dir, "nothing-here"))
    with pytest.raises(NotFoundError, match="no map named"):
        Map.open("name:bst_absent_x")
    with pytest.raises(ConfigError):
        Map.open("relative/path")
    with pytest.raises(ConfigError):
        Map.open("id:seven")
    make_map("hash", 4, 4, 8, name="bst_twice")
    make_map("hash", 4, 4, 8, name="bst_twice")
    with pytest.raises(ConfigError, match="2 maps are named 'bst_twice'"):
        Map.open_by_name("bst_twice")
    obj = load_object("bad_verifier", load=False)
    obj.program("unchecked_read").set_autoload(False)
    obj.load()
    link_pin = os.path.join(pin_dir, "prog")
    prog_id = obj.program("pass_all").info().id
    subprocess.run(["bpftool", "prog", "pin", "id", str(prog_id), link_pin], check=True)
    with pytest.raises(InvalidError, match="not a map"):
        Map.open_pinned(link_pin)


def test_info_of_btf_and_plain_maps(all_maps: BpfObject, make_map: Callable[..., Map]) -> None:
    with all_maps.map("t_hash") as m:
        info = m.info
        assert (info.name, info.key_size, info.value_size, info.max_entries) == (
            "t_hash",
            16,
            72,
            200000,
        )
        assert info.btf_id and info.btf_key_type_id and info.btf_value_type_id
    plain = make_map("lru_hash", 8, 16, 128)
    assert plain.info.type is MapType.LRU_HASH
    assert plain.info.btf_id == 0


def test_closed_map_refuses_use(make_map: Callable[..., Map]) -> None:
    m = make_map("hash", 4, 4, 8)
    m.close()
    m.close()  # idempotent
    assert m.closed
    with pytest.raises(ValueError, match="closed"):
        m.lookup(b"abcd")


@pytest.mark.parametrize(
    "kind",
    [MapType.HASH, MapType.LRU_HASH, MapType.PERCPU_HASH, MapType.LRU_PERCPU_HASH,
     MapType.ARRAY, MapType.PERCPU_ARRAY],
)
def test_create_makes_a_working_map(kind: MapType) -> None:
    with Map.create(kind, 4, 12, 64, name="bst_create") as m:
        assert (m.info.type, m.key_size, m.value_size, m.max_entries, m.name) == (
            kind, 4, 12, 64, "bst_create"
        )
        key = (3).to_bytes(4, "little")
        value = bytes(i % 256 for i in range(m.value_stride))
        m.update(key, value)
        assert m.lookup(key) == value


def test_create_refuses_what_the_kernel_refuses() -> None:
    with pytest.raises(InvalidError):
        Map.create(MapType.HASH, 0, 8, 16)
    with pytest.raises(ValueError, match="15 characters"):
        Map.create(MapType.HASH, 4, 8, 16, name="a-name-that-is-too-long")


def test_an_lpm_trie_needs_no_prealloc_and_takes_prefixes() -> None:
    with pytest.raises(InvalidError):  # the kernel refuses a preallocated trie
        Map.create(MapType.LPM_TRIE, 8, 8, 16)
    with Map.create(MapType.LPM_TRIE, 8, 8, 16, flags=MapFlags.NO_PREALLOC) as m:
        assert m.info.flags == MapFlags.NO_PREALLOC
        m.update(prefix_bytes("198.51.100.0/24", 8), struct.pack("<Q", 1))
        assert m.lookup(prefix_bytes("198.51.100.0/24", 8)) == struct.pack("<Q", 1)


def test_an_lpm_tries_lookup_answers_for_the_key_itself_and_match_as_programs_do() -> None:
    """The kernel's lookup of a trie is a longest-prefix match: a /16 that is gone would read
    as the /8 holding it. ``lookup`` answers for the key itself, ``match`` as the kernel does."""
    with Map.create(MapType.LPM_TRIE, 8, 8, 16, flags=MapFlags.NO_PREALLOC) as m:
        v8, v16 = struct.pack("<Q", 8), struct.pack("<Q", 16)
        assert m.lookup(prefix_bytes("10.0.0.0/8", 8)) is None  # empty
        m.update(prefix_bytes("10.0.0.0/8", 8), v8)
        m.update(prefix_bytes("10.1.0.0/16", 8), v16)
        m.update(prefix_bytes("10.2.0.0/16", 8), v16)  # 10.0.0.0/14: an intermediate node now
        for text, stored, matched in [
            ("10.0.0.0/8", v8, v8),
            ("10.1.0.0/16", v16, v16),
            ("10.2.0.0/16", v16, v16),  # the last key in the trie's order
            ("10.0.0.0/14", None, v8),  # intermediate: no entry
            ("10.3.0.0/16", None, v8),
            ("10.1.2.0/24", None, v16),
            ("11.0.0.0/8", None, None),
        ]:
            key = prefix_bytes(text, 8)
            assert (m.lookup(key), m.match(key)) == (stored, matched), text
        assert m.delete(prefix_bytes("10.1.0.0/16", 8))
        assert m.lookup(prefix_bytes("10.1.0.0/16", 8)) is None
        assert m.match(prefix_bytes("10.1.0.0/16", 8)) == v8
