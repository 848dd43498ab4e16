"""LPM trie keys as prefixes (layout.py, no kernel): ``198.51.100.0/24``, ``2001:db8::/32``,
``<hex>/<len>`` for other address sizes, and back to the same bytes; a prefix layout keeps its
fields (``prefixlen``, ``addr``) for whatever reads them by name."""

from __future__ import annotations

import ipaddress
import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpfsync.layout import Field, Kind, Layout, canonical_prefix, prefix_bytes, prefix_text


def key(length: int, addr: bytes) -> bytes:
    return struct.pack("<I", length) + addr


V4 = key(24, bytes([198, 51, 100, 0]))
V6 = key(32, ipaddress.IPv6Address("2001:db8::").packed)


@pytest.mark.parametrize(("raw", "text"), [
    (V4, "198.51.100.0/24"),
    (key(32, bytes([203, 0, 113, 7])), "203.0.113.7/32"),
    (key(0, bytes(4)), "0.0.0.0/0"),
    (V6, "2001:db8::/32"),
    (key(128, ipaddress.IPv6Address("2001:db8:0:1::7").packed), "2001:db8:0:1::7/128"),
    (key(12, bytes([0xAB, 0xC0])), "abc0/12"),  # neither IPv4 nor IPv6: hex
    (key(20, bytes([1, 2, 3, 4, 5, 6])), "010203040506/20"),
])  # fmt: skip
def test_keys_read_as_prefixes_and_encode_back(raw: bytes, text: str) -> None:
    assert prefix_text(raw) == text
    assert prefix_bytes(text, len(raw)) == raw


def test_a_prefix_layout_keeps_the_length_and_the_address_as_fields() -> None:
    layout = Layout.prefix(8)
    assert layout.is_prefix and not layout.is_raw
    assert layout.names == ["prefixlen", "addr"]
    assert layout.decode(V4) == {"prefixlen": 24, "addr": "c6336400"}
    assert layout.encode({"prefixlen": 24, "addr": "c6336400"}) == V4
    assert Layout.prefix(20).field("addr") == Field("addr", 4, 16, Kind.BYTES)


def test_host_bits_are_shown_as_stored_so_the_text_is_the_key() -> None:
    """The kernel keeps the bytes it was given, bits past the prefix length included; hiding
    them (198.51.100.0/24) would name another key."""
    raw = key(24, bytes([198, 51, 100, 7]))
    assert prefix_text(raw) == "198.51.100.7/24"
    assert prefix_bytes("198.51.100.7/24", 8) == raw != prefix_bytes("198.51.100.0/24", 8)


def test_an_address_without_a_length_is_the_whole_address() -> None:
    assert prefix_bytes("198.51.100.1", 8) == key(32, bytes([198, 51, 100, 1]))
    assert prefix_bytes("2001:db8::1", 20) == key(128, ipaddress.IPv6Address("2001:db8::1").packed)
    assert prefix_bytes(" abcd ", 6) == key(16, bytes([0xAB, 0xCD]))


@pytest.mark.parametrize(("text", "size", "why"), [
    ("198.51.100.0/33", 8, "prefix length must be 0 to 32"),
    ("198.51.100.0/-1", 8, "prefix length must be 0 to 32"),
    ("198.51.100.0/x", 8, "prefix length must be 0 to 32"),
    ("198.51.100.0/²", 8, "prefix length must be 0 to 32"),
    ("2001:db8::/32", 8, "IPv4 prefix such as 198.51.100.0/24"),
    ("198.51.100.0/24", 20, "IPv6 prefix such as 2001:db8::/32"),
    ("198.51.100/24", 8, "IPv4 prefix"),
    ("abcd/8", 7, "3 address bytes as hex"),
    ("zz/8", 5, "1 address bytes as hex"),
    ("abcd/17", 6, "prefix length must be 0 to 16"),
    ("1.2.3.4/8", 4, "more than 4 bytes"),
])  # fmt: skip
def test_bad_prefixes_are_refused_saying_what_to_give(text: str, size: int, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        prefix_bytes(text, size)


def test_a_prefix_needs_room_for_an_address() -> None:
    with pytest.raises(ValueError, match="u32 length and address"):
        Layout(4, (Field("prefixlen", 0, 4, Kind.UINT),), is_prefix=True)
    with pytest.raises(ValueError, match="an LPM trie key has more than 4 bytes"):
        prefix_text(b"\x18\0\0\0")


def test_the_prefix_layout_keeps_its_c_name() -> None:
    layout = Layout.prefix(8, "struct lpm_v4_key")
    assert layout.name == "struct lpm_v4_key" and layout.is_prefix
    assert layout != Layout(8, layout.fields, layout.name)  # the same fields, no prefix
    assert not Layout.raw(8).is_prefix


@given(st.integers(0, 32), st.binary(min_size=4, max_size=4))
def test_ipv4_keys_round_trip(length: int, addr: bytes) -> None:
    raw = key(length, addr)
    assert prefix_bytes(prefix_text(raw), 8) == raw


@given(st.integers(0, 128), st.binary(min_size=16, max_size=16))
def test_ipv6_keys_round_trip(length: int, addr: bytes) -> None:
    raw = key(length, addr)
    assert prefix_bytes(prefix_text(raw), 20) == raw


@given(st.binary(min_size=1, max_size=40).filter(lambda b: len(b) not in (4, 16)), st.data())
def test_other_address_sizes_round_trip_as_hex(addr: bytes, data: st.DataObject) -> None:
    raw = key(data.draw(st.integers(0, 8 * len(addr))), addr)
    text = prefix_text(raw)
    assert text == f"{addr.hex()}/{struct.unpack('<I', raw[:4])[0]}"
    assert prefix_bytes(text, len(raw)) == raw


def test_canonical_prefixes_zero_the_bits_past_the_length() -> None:
    assert canonical_prefix(prefix_bytes("198.51.100.7/24", 8)) == prefix_bytes(
        "198.51.100.0/24", 8)
    assert canonical_prefix(prefix_bytes("198.51.100.7/32", 8)) == prefix_bytes(
        "198.51.100.7/32", 8)
    assert canonical_prefix(prefix_bytes("198.51.255.255/17", 8)) == prefix_bytes(
        "198.51.128.0/17", 8)
    assert canonical_prefix(prefix_bytes("2001:db8::1/32", 20)) == prefix_bytes(
        "2001:db8::/32", 20)
    assert canonical_prefix(prefix_bytes("10.1.2.3/0", 8)) == prefix_bytes("0.0.0.0/0", 8)
