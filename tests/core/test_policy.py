from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfsync.core.messages import MapSchema, Record, Stamp
from bpfsync.core.policy import (
    LWW,
    FieldPolicy,
    FieldRule,
    LastWriterWins,
    newer,
    pick,
    policy_for,
)
from bpfsync.errors import ConfigError
from bpfsync.layout import Field, Kind, Layout

stamps = st.builds(
    Stamp,
    wall=st.integers(0, 3),
    logical=st.integers(0, 2),
    node=st.sampled_from(["a", "b", "c"]),
)
values = st.none() | st.sampled_from([b"\x01\0\0\0", b"\x02\0\0\0", b"\xff\0\0\0"])
# one register: same map and key; stamps collide on purpose (ties must still be deterministic)
records = st.builds(Record, map=st.just("m"), key=st.just(b"k"), value=values, stamp=stamps)


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def rec(value: bytes | None, wall: int, node: str, logical: int = 0) -> Record:
    return Record("m", b"k", value, Stamp(wall, logical, node))


@given(records, records)
def test_pick_is_commutative(a: Record, b: Record) -> None:
    assert pick(a, b) == pick(b, a)


@given(records, records, records)
def test_pick_is_associative(a: Record, b: Record, c: Record) -> None:
    assert pick(pick(a, b), c) == pick(a, pick(b, c))


@given(records)
def test_pick_is_idempotent(a: Record) -> None:
    assert pick(a, a) == a
    assert not newer(a, a)


@given(records, records)
def test_newer_is_a_strict_total_order_on_distinct_records(a: Record, b: Record) -> None:
    if a == b:
        assert not newer(a, b) and not newer(b, a)
    else:
        assert newer(a, b) != newer(b, a)


def test_rank_is_stamp_first_then_tombstone_then_bytes() -> None:
    assert newer(rec(b"a", 2, "a"), rec(b"z", 1, "z"))
    assert newer(rec(b"a", 1, "b"), rec(b"z", 1, "a"))  # node id breaks wall/logical ties
    assert newer(rec(None, 1, "a"), rec(b"z", 1, "a"))  # equal stamps: the tombstone wins
    assert newer(rec(b"z", 1, "a"), rec(b"a", 1, "a"))


def test_lww_combine_takes_the_highest_record() -> None:
    assert LWW.combine([rec(u32(1), 1, "a"), rec(u32(2), 3, "b"), rec(u32(3), 2, "c")]) == u32(2)
    assert LWW.combine([rec(u32(1), 1, "a"), rec(None, 2, "b")]) is None
    assert LWW.combine([]) is None
    assert LWW.own_part(u32(7), []) == u32(7)


contribs = st.lists(
    st.builds(
        lambda v, node, wall: rec(u32(v), wall, node),
        st.integers(0, 2**32 - 1),
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(1, 5),
    ),
    max_size=4,
    unique_by=lambda r: r.stamp.node,
)


@pytest.mark.parametrize("name", ["counter", "max", "min"])
@settings(max_examples=50)
@given(regs=contribs)
def test_whole_value_policies_ignore_order(name: str, regs: list[Record]) -> None:
    policy = policy_for(MapSchema("m", 4, 4, name))
    results = {policy.combine(list(p)) for p in itertools.permutations(regs)}
    assert len(results) == 1
    nums = [int.from_bytes(r.value or b"", "little") for r in regs]
    want = {"counter": sum(nums) % 2**32, "max": max(nums, default=0), "min": min(nums, default=0)}
    assert results == {u32(want[name]) if regs else None}


@settings(max_examples=50)
@given(regs=contribs, observed=st.integers(0, 2**32 - 1))
def test_counter_own_part_gives_back_the_kernel_value(regs: list[Record], observed: int) -> None:
    policy = policy_for(MapSchema("m", 4, 4, "counter"))
    others = [r for r in regs if r.stamp.node != "me"]
    own = policy.own_part(u32(observed), others)
    assert policy.combine([*others, rec(own, 9, "me")]) == u32(observed)


def test_counter_slot_is_the_local_increment_over_the_others() -> None:
    policy = policy_for(MapSchema("m", 8, 8, "counter"))
    others = [Record("m", b"k", (40).to_bytes(8, "little"), Stamp(1, 0, "b"))]
    assert policy.own_part((45).to_bytes(8, "little"), others) == (5).to_bytes(8, "little")
    assert not policy.seed_as_own
    assert policy_for(MapSchema("m", 8, 8, "max")).seed_as_own


def test_tombstoned_contributions_do_not_count() -> None:
    policy = policy_for(MapSchema("m", 4, 4, "counter"))
    assert policy.combine([rec(u32(3), 1, "a"), rec(None, 2, "b")]) == u32(3)
    assert policy.combine([rec(None, 2, "b")]) is None


# struct stats { u32 epoch; u32 packets; u64 last_seen; u32 low; u32 tag; }  -- 24 bytes
STATS = [
    FieldRule(0, 4, "epoch"),
    FieldRule(4, 4, "counter"),
    FieldRule(8, 8, "max"),
    FieldRule(16, 4, "min"),
]


def stats(epoch: int, packets: int, last_seen: int, low: int, tag: int) -> bytes:
    return b"".join([u32(epoch), u32(packets), last_seen.to_bytes(8, "little"), u32(low), u32(tag)])


def test_per_field_merge_with_an_epoch_window() -> None:
    policy = FieldPolicy(24, STATS)
    a = rec(stats(1, 10, 100, 7, 0xA), 1, "a")
    b = rec(stats(1, 5, 300, 9, 0xB), 2, "b")
    # same window: packets add, last_seen max, low min, untouched bytes from the latest origin
    assert policy.combine([a, b]) == stats(1, 15, 300, 7, 0xB)
    # c started window 2: the window-1 slots no longer count
    c = rec(stats(2, 1, 50, 8, 0xC), 3, "c")
    assert policy.combine([a, b, c]) == stats(2, 1, 50, 8, 0xC)
    # own part: only the counter field is relative, and only to slots of the same window
    assert policy.own_part(stats(1, 18, 400, 1, 0xD), [a, b, c]) == stats(1, 3, 400, 1, 0xD)
    assert not policy.seed_as_own


def test_field_policy_from_a_layout_and_its_validation() -> None:
    layout = Layout(
        32,
        (
            Field("packets", 0, 8, Kind.UINT),
            Field("last_seen", 8, 8, Kind.UINT),
            Field("delta", 16, 8, Kind.INT),
            Field("name", 24, 8, Kind.CHARS),
        ),
        "struct stats",
    )
    policy = FieldPolicy.from_layout(layout, {"packets": "counter", "last_seen": "max"})
    assert [r.op for r in policy.rules] == ["counter", "max"]
    assert policy.value_size == 32
    assert FieldPolicy.from_layout(layout, {"name": "lww"}).rules == (FieldRule(24, 8, "lww"),)
    with pytest.raises(ConfigError, match="no field 'bytes'"):
        FieldPolicy.from_layout(layout, {"bytes": "counter"})
    with pytest.raises(ConfigError, match="unsigned"):
        FieldPolicy.from_layout(layout, {"delta": "max"})
    with pytest.raises(ConfigError, match="unknown merge op"):
        FieldPolicy(8, [FieldRule(0, 8, "avg")])
    with pytest.raises(ConfigError, match="overlaps"):
        FieldPolicy(8, [FieldRule(0, 8, "max"), FieldRule(4, 4, "min")])
    with pytest.raises(ConfigError, match="runs past"):
        FieldPolicy(8, [FieldRule(4, 8, "max")])
    with pytest.raises(ConfigError, match="one epoch"):
        FieldPolicy(8, [FieldRule(0, 4, "epoch"), FieldRule(4, 4, "epoch")])


def test_policy_names() -> None:
    assert isinstance(policy_for(MapSchema("m", 4, 4)), LastWriterWins)
    assert policy_for(MapSchema("m", 4, 8, "counter")).name == "counter"
    with pytest.raises(ConfigError, match="unknown policy"):
        policy_for(MapSchema("m", 4, 4, "avg"))


# --- bit ranges: flags and a counter in one u64 --------------------------------------------------

FLAGS_HITS = FieldPolicy(8, [FieldRule(0, 8, "lww", 0, 8), FieldRule(0, 8, "counter", 8, 56)])


def u64(flags: int, hits: int) -> bytes:
    return (flags | hits << 8).to_bytes(8, "little")


def test_bit_ranges_merge_each_by_its_op() -> None:
    regs = [rec(u64(0x01, 5), 1, "a"), rec(u64(0x03, 7), 2, "b"), rec(u64(0x00, 1), 0, "c")]
    assert FLAGS_HITS.combine(regs) == u64(0x03, 13)  # latest flags, summed hits
    assert FLAGS_HITS.combine(list(reversed(regs))) == u64(0x03, 13)


def test_a_counter_in_high_bits_wraps_out_of_the_top_not_into_the_flags() -> None:
    top = (1 << 56) - 1
    regs = [rec(u64(0x05, top), 1, "a"), rec(u64(0x05, 2), 2, "b")]
    assert FLAGS_HITS.combine(regs) == u64(0x05, 1)


def test_own_part_of_a_bit_range_counter_gives_back_the_kernel_value() -> None:
    others = [rec(u64(0x01, 10), 1, "b"), rec(u64(0x01, 3), 1, "c")]
    observed = u64(0x01, 20)
    own = FLAGS_HITS.own_part(observed, others)
    assert own == u64(0x01, 7)
    assert FLAGS_HITS.combine([*others, rec(own, 2, "a")]) == observed


def test_bit_range_rules_are_checked_and_named() -> None:
    assert FLAGS_HITS.name == "fields:lww@0+8[0:8],counter@0+8[8:64]"
    with pytest.raises(ConfigError, match="overlaps"):
        FieldPolicy(8, [FieldRule(0, 8, "lww", 0, 8), FieldRule(0, 8, "counter", 4, 60)])
    with pytest.raises(ConfigError, match="runs past"):
        FieldPolicy(8, [FieldRule(0, 8, "lww", 60, 8)])
    with pytest.raises(ConfigError, match="every bit of the value is local"):
        FieldPolicy(4, [FieldRule(0, 4, "local")])


def test_bit_ranges_from_a_layout_and_c_bitfields() -> None:
    layout = Layout(12, (
        Field("word", 0, 8, Kind.UINT),
        Field("lo", 8, 4, Kind.UINT, bit_offset=0, bits=4),  # C bitfields in one u32
        Field("hi", 8, 4, Kind.UINT, bit_offset=4, bits=28),
    ))
    policy = FieldPolicy.from_layout(
        layout, {"lo": "local", "hi": "max"}, {"word": {"0:1": "lww", "1:64": "counter"}})
    assert [r.spec for r in policy.rules] == [
        "lww@0+8[0:1]", "counter@0+8[1:64]", "local@8+4[0:4]", "max@8+4[4:32]"]
    # bit ranges of a bitfield are counted from its own bit 0
    split = FieldPolicy.from_layout(layout, {}, {"hi": {"0:8": "lww", "8:28": "counter"}})
    assert [r.spec for r in split.rules] == ["lww@8+4[4:12]", "counter@8+4[12:32]"]
    with pytest.raises(ConfigError, match="bits 8-27 are in no range"):
        FieldPolicy.from_layout(layout, {}, {"hi": {"0:8": "lww"}})
    with pytest.raises(ConfigError, match="unsigned integer field"):
        FieldPolicy.from_layout(Layout(8, (Field("f", 0, 8, Kind.FLOAT),)), {},
                                {"f": {"0:32": "lww", "32:64": "max"}})
