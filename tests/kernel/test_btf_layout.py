"""BTF of real maps turned into Layouts, values decoded through them; Layout on its own."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from bpfsync.errors import NotFoundError
from bpfsync.kernel.btf import map_layouts, map_layouts_or_raw
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject
from bpfsync.layout import Field, Kind, Layout, prefix_bytes, prefix_text

STATS_FIELDS = [
    ("packets", 0, 8, Kind.UINT, 0),
    ("bytes", 8, 8, Kind.UINT, 0),
    ("delta", 16, 4, Kind.INT, 0),
    ("ports", 20, 6, Kind.UINT, 3),
    ("label", 26, 6, Kind.CHARS, 0),
    ("mac", 32, 6, Kind.BYTES, 0),
    ("verdict", 40, 4, Kind.INT, 0),  # enum with a negative value
    ("window.lo", 48, 4, Kind.UINT, 0),
    ("window.hi", 56, 8, Kind.INT, 0),
    ("tag", 64, 4, Kind.BYTES, 0),  # a union: opaque
    ("flag_a", 68, 1, Kind.UINT, 0),
    ("flag_b", 68, 1, Kind.UINT, 0),
    ("seen", 69, 1, Kind.BOOL, 0),
]

SAMPLE = {
    "packets": 12,
    "bytes": 3400,
    "delta": -5,
    "ports": [80, 443, 8080],
    "label": "edge1",
    "mac": "020000c0ffee",
    "verdict": -2,
    "window.lo": 7,
    "window.hi": -(2**40),
    "tag": "deadbeef",
    "flag_a": 1,
    "flag_b": 5,
    "seen": True,
}


def test_struct_value_and_key_layouts_from_btf(all_maps: BpfObject) -> None:
    with all_maps.map("t_hash") as m:
        key, value = map_layouts(m.info)
    assert key.name == "struct flow_key" and key.size == 16
    assert key.names == ["saddr", "daddr", "sport", "dport", "proto", "pad"]
    assert value.name == "stats_t" and value.size == 72
    assert [(f.name, f.offset, f.size, f.kind, f.count) for f in value.fields] == STATS_FIELDS
    flag_a, flag_b = value.field("flag_a"), value.field("flag_b")
    assert (flag_a.bit_offset, flag_a.bits, flag_b.bit_offset, flag_b.bits) == (0, 1, 1, 3)


def test_value_written_to_kernel_decodes_back(all_maps: BpfObject) -> None:
    with all_maps.map("t_lru_hash") as m:
        key_layout, value_layout = map_layouts(m.info)
        key = key_layout.encode({"saddr": 0x010012C6, "dport": 53, "proto": 17})
        m.update(key, value_layout.encode(SAMPLE))
        raw = m.lookup(key)
    assert raw is not None
    assert value_layout.decode(raw) == SAMPLE
    decoded_key = key_layout.decode(key)
    assert decoded_key["dport"] == 53 and decoded_key["pad"] == "000000"


def test_scalar_key_and_per_cpu_value_layouts(all_maps: BpfObject) -> None:
    with all_maps.map("t_pcpu_array") as m:
        key, value = map_layouts(m.info)
        assert key.fields == (Field("", 0, 4, Kind.UINT),)
        assert key.decode(struct.pack("<I", 9)) == {"": 9}
        # one CPU's value; the map's raw per-CPU stride is value.size padded times CPUs
        assert value.size == m.value_size == 72
        assert m.value_stride == 72 * m.ncpus


def test_map_without_btf_falls_back_to_raw(make_map: Callable[..., Map]) -> None:
    m = make_map("hash", 6, 3, 4)
    with pytest.raises(NotFoundError, match="without BTF"):
        map_layouts(m.info)
    key, value = map_layouts_or_raw(m.info)
    assert key == Layout.raw(6) and value.is_raw
    assert value.decode(b"\x01\x02\xff") == {"": "0102ff"}


@pytest.mark.parametrize(("name", "c_name", "size", "text", "length"), [
    ("t_lpm", "struct lpm_v4", 8, "198.51.100.0/24", 24),
    ("t_lpm6", "struct lpm_v6", 20, "2001:db8::/32", 32),
])  # fmt: skip
def test_lpm_trie_keys_of_prefix_shape_are_prefixes(
    all_maps: BpfObject, name: str, c_name: str, size: int, text: str, length: int
) -> None:
    with all_maps.map(name) as m:
        key, value = map_layouts(m.info)
        # the BTF's fields, here the ones a prefix has by default, for filters to name
        assert key == Layout.prefix(size, c_name) and key.names == ["prefixlen", "addr"]
        assert value.name == "stats_t"  # values keep their BTF
        m.update(prefix_bytes(text, size), value.encode(SAMPLE))
        ((found, _),) = m.items()
    assert prefix_text(found) == text and key.decode(found)["prefixlen"] == length


def test_an_lpm_key_with_an_integer_address_is_a_prefix_too(
    load_object: Callable[..., BpfObject],
) -> None:
    with load_object("trace_writer").map("w_lpm") as m:  # {__u32 prefixlen; __u32 addr}
        key, _ = map_layouts(m.info)
    assert key.is_prefix and key.name == "struct lpm_key"
    assert key.fields == (Field("prefixlen", 0, 4, Kind.UINT), Field("addr", 4, 4, Kind.UINT))


def test_lpm_trie_keys_with_more_fields_keep_them(all_maps: BpfObject) -> None:
    with all_maps.map("t_lpm_dev") as m:
        key, _ = map_layouts(m.info)
    assert key.names == ["prefixlen", "ifindex", "addr"] and not key.is_prefix


@pytest.mark.parametrize(("key_size", "text"), [
    (8, "198.51.100.0/24"), (20, "2001:db8::/32"), (7, "0a0b00/16"),
])  # fmt: skip
def test_lpm_trie_without_btf_has_prefix_keys(
    make_map: Callable[..., Map], key_size: int, text: str
) -> None:
    m = make_map("lpm_trie", key_size, 8, 16)
    key, value = map_layouts_or_raw(m.info)
    assert key == Layout.prefix(key_size) and value == Layout.raw(8)
    m.update(prefix_bytes(text, key_size), bytes(8))
    assert [prefix_text(k) for k, _ in m.items()] == [text]


def test_layout_rules() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        Layout(8, (Field("a", 0, 8, Kind.UINT), Field("b", 4, 4, Kind.UINT)))
    with pytest.raises(ValueError, match="overlaps"):
        Layout(
            4,
            (
                Field("a", 0, 1, Kind.UINT, bit_offset=0, bits=3),
                Field("b", 0, 1, Kind.UINT, bit_offset=2, bits=2),
            ),
        )
    with pytest.raises(ValueError, match="overflows"):
        Layout(4, (Field("a", 2, 4, Kind.UINT),))
    with pytest.raises(ValueError, match="duplicate"):
        Layout(8, (Field("a", 0, 4, Kind.UINT), Field("a", 4, 4, Kind.UINT)))
    with pytest.raises(ValueError, match="do not fit"):
        Field("a", 0, 7, Kind.UINT, count=2)


def test_layout_decode_encode_kinds() -> None:
    layout = Layout(
        24,
        (
            Field("i", 0, 2, Kind.INT),
            Field("f", 4, 4, Kind.FLOAT),
            Field("d", 8, 8, Kind.FLOAT),
            Field("name", 16, 4, Kind.CHARS),
            Field("s", 20, 1, Kind.INT, bit_offset=1, bits=4),
            Field("b", 21, 1, Kind.BOOL),
            Field("arr", 22, 2, Kind.INT, count=2),
        ),
    )
    values = {"i": -2, "f": 1.5, "d": -0.25, "name": "ab", "s": -3, "b": True, "arr": [-1, 5]}
    raw = layout.encode(values)
    assert raw[:2] == b"\xfe\xff" and raw[16:20] == b"ab\0\0"
    assert layout.decode(raw) == values
    # encoding over a base keeps the bytes no field covers
    base = bytes(range(24))
    assert layout.encode({"i": 1}, base)[2:] == base[2:]
    with pytest.raises(ValueError, match="longer"):
        layout.encode({"name": "toolong"})
    with pytest.raises(KeyError):
        layout.encode({"nope": 1})
    with pytest.raises(ValueError, match="24 bytes"):
        layout.decode(b"\0" * 23)
