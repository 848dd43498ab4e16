"""Filters (core/filter.py): the condition grammar, fields by layout, and what passes."""

from __future__ import annotations

import struct

import pytest

from bpfsync.agent.config import MapConfig
from bpfsync.core.filter import Filter
from bpfsync.errors import ConfigError
from bpfsync.layout import Field, Kind, Layout

KEY = Layout(8, (Field("prefixlen", 0, 4, Kind.UINT), Field("addr", 4, 4, Kind.BYTES)))
VALUE = Layout(24, (
    Field("state", 0, 4, Kind.UINT), Field("flags", 4, 4, Kind.UINT),
    Field("created_ns", 8, 8, Kind.UINT), Field("rtt", 16, 8, Kind.FLOAT),
))
NOW = 100 * 10**9


def entry(prefixlen: int, state: int, flags: int, created_s: float) -> tuple[bytes, bytes]:
    return (struct.pack("<I4s", prefixlen, b"\xc6\x33\x64\x00"),
            struct.pack("<IIQd", state, flags, int(created_s * 1e9), 0.5))


def test_every_condition_must_hold() -> None:
    f = Filter.parse(["value.state == 2", "age(value.created_ns) >= 10", "key.prefixlen >= 16",
                      "value.flags[4:8] != 0x3"], KEY, VALUE)
    assert f.has_age
    assert f.passes(*entry(24, 2, 0x10, 80), NOW)
    assert not f.passes(*entry(24, 1, 0x10, 80), NOW)  # not established
    assert not f.passes(*entry(24, 2, 0x10, 95), NOW)  # 5 s old
    assert not f.passes(*entry(8, 2, 0x10, 80), NOW)  # a /8
    assert not f.passes(*entry(24, 2, 0x30, 80), NOW)  # bits 4-7 are 3
    assert Filter.parse(["value.rtt < 1"], KEY, VALUE).passes(*entry(0, 0, 0, 0), NOW)


@pytest.mark.parametrize(("text", "error"), [
    ("value.nope == 1", "has no field 'nope'"),
    ("key.addr == 1", "filters compare numbers"),
    ("value == 1", "name a field"),  # 24 bytes are no integer (an 8-byte key would be)
    ("age(value.state) > 1", "age\\(\\) reads a __u64"),
    ("value.flags[30:40] == 1", "bits 30-39 do not fit"),
    ("value.state == 1.5", "compare fields with integers"),
])
def test_conditions_that_name_what_is_not_there_are_config_errors(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        Filter.parse([text], KEY, VALUE)


@pytest.mark.parametrize("text", ["state == 2", "value.state = 2", "value.state == two",
                                  "age(key.x) > 1", "value.state =="])
def test_the_config_refuses_what_is_not_a_condition(text: str) -> None:
    with pytest.raises(ValueError, match="TERM OP NUMBER"):
        MapConfig(path="/sys/fs/bpf/x", filter=[text])
