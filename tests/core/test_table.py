"""Frozen buckets (frozen.py): a settled table must answer every question as the dict-backed one
does, and a write must thaw only the bucket it lands in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfsync.core.frozen import FrozenRegs
from bpfsync.core.lww_table import LwwTable
from bpfsync.core.messages import MapSchema, Record, Stamp
from bpfsync.core.policy import LWW
from bpfsync.core.register import pack
from bpfsync.core.table import QUIET_CALLS

SCHEMA = MapSchema("m", 3, 2)


def regs_of(n: int, widths: int) -> dict[bytes, bytes]:
    # keys with trailing zeros and high bytes, unsorted: numpy's 'S' items must lose neither
    keys = [bytes([i % 7, 0, 0]) if i % 2 else bytes([255, i % 256, i // 256]) for i in range(n)]
    return {k: pack(Stamp(i + 1, 0, "n" * (i % widths + 1)), bytes([i % 256, 0])) for i, k in
            enumerate(dict.fromkeys(keys))}  # fmt: skip


@pytest.mark.parametrize("widths", [1, 3])  # records of one size, or of three
@pytest.mark.parametrize("n", [1, 2, 9, 600])
def test_frozen_registers_read_as_the_dict_they_replace(n: int, widths: int) -> None:
    regs = regs_of(n, widths)
    frozen = FrozenRegs.of(regs, 3)
    assert len(frozen) == len(regs)
    assert frozen.thaw() == regs
    assert dict(zip(frozen.keys(), frozen.values(), strict=True)) == regs
    assert set(frozen) == set(regs)
    for key, packed in regs.items():
        assert frozen.get(key) == packed
        assert key in frozen
    absents = (b"\x00\x00\x00", b"\x06\x00\x01", b"\xff\xff\xff", b"\x01\x00", b"\x01\x00\x00\x00")
    for absent in absents:
        if absent not in regs:
            assert frozen.get(absent) is None
            assert absent not in frozen
    assert frozen.get(b"zz", b"default") == b"default"
    again = FrozenRegs.of(frozen.thaw(), 3)  # sorted already: the other path
    assert again == frozen and again.thaw() == regs


def test_keys_of_another_size_cannot_be_frozen() -> None:
    with pytest.raises(ValueError, match="3 bytes"):
        FrozenRegs.of({b"ab": b"x", b"abc": b"y"}, 3)


def table_with(n: int) -> LwwTable:
    table = LwwTable(SCHEMA, LWW, 8)
    for i in range(n):
        table.offer(Record("m", i.to_bytes(3, "big"), bytes([i % 256, 1]), Stamp(10 + i, 0, "a")))
    return table


def test_quiet_buckets_freeze_after_the_quiet_calls_and_at_most_so_many_a_call() -> None:
    table = table_with(200)
    assert table.settle(100) == 0  # just written
    for _ in range(QUIET_CALLS - 1):
        assert table.settle(100) == 0
    assert table.settle(3) == 3
    assert table.settle(100) == 5
    assert table.at_rest() == 8
    assert table.settle(100) == 0  # nothing left to freeze


def test_a_write_thaws_only_its_bucket_and_restarts_its_quiet_time() -> None:
    table = table_with(200)
    table.settle(100, quiet=0)
    assert table.at_rest() == 8
    key = (5).to_bytes(3, "big")
    assert table.offer(Record("m", key, b"\x00\x00", Stamp(1, 0, "a"))) is not None  # older
    assert table.at_rest() == 8  # a refused record reads, it does not thaw
    assert table.offer(Record("m", key, b"\x07\x07", Stamp(999, 0, "b"))) is None
    assert table.at_rest() == 7
    assert table.kernel_value(key) == b"\x07\x07"
    assert table.settle(100, quiet=1) == 0  # written since the last call
    assert table.settle(100, quiet=1) == 1


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["offer", "bulk", "expire", "settle"]),
            st.integers(0, 40),  # key
            st.none() | st.integers(0, 3),  # value (None: a delete)
            st.integers(1, 30),  # wall
            st.sampled_from(["a", "bb", "c"]),
        ),
        max_size=80,
    )
)
def test_a_settled_table_answers_as_one_never_settled(
    ops: list[tuple[str, int, int | None, int, str]],
) -> None:
    settled, plain = LwwTable(SCHEMA, LWW, 4), LwwTable(SCHEMA, LWW, 4)
    for op, k, v, wall, node in ops:
        key = k.to_bytes(3, "big")
        rec = Record("m", key, None if v is None else bytes([v, v]), Stamp(wall, 0, node))
        if op == "settle":
            settled.settle(4, quiet=k % 2)
        elif op == "expire":
            assert settled.expire(wall) == plain.expire(wall)
        elif op == "bulk":
            got = settled.offer_all([key, key], [pack(rec.stamp, rec.value)] * 2)
            want = plain.offer_all([key, key], [pack(rec.stamp, rec.value)] * 2)
            assert (got.stored, got.ignored, got.outranked, got.changed) == (
                want.stored, want.ignored, want.outranked, want.changed)  # fmt: skip
        else:
            assert settled.offer(rec) == plain.offer(rec)
        assert settled.digest_buckets() == plain.digest_buckets()
        assert len(settled) == len(plain)
    assert sorted(settled.records_in(range(4))) == sorted(plain.records_in(range(4)))
    assert sorted(settled.all_keys()) == sorted(plain.all_keys())
    assert settled.horizon == plain.horizon
    for k in range(41):
        key = k.to_bytes(3, "big")
        assert settled.kernel_value(key) == plain.kernel_value(key)
        assert settled.packed_of(key) == plain.packed_of(key)
        assert settled.holds(key, "a") == plain.holds(key, "a")


def test_a_batch_that_fills_empty_or_frozen_buckets_leaves_them_frozen() -> None:
    """A catch-up fills whole buckets: they are frozen at once, not kept as dicts until quiet,
    also those that held a few registers already."""
    bulk, single = LwwTable(SCHEMA, LWW, 8), LwwTable(SCHEMA, LWW, 8)
    early = [Record("m", (9000 + i).to_bytes(3, "big"), b"\x09\x09", Stamp(1, 0, "a"))
             for i in range(20)]  # a live stream's few records may come first  # fmt: skip
    for table in (bulk, single):
        for rec in early:
            table.offer(rec)
    for rounds in (range(0, 800), range(400, 1600)):  # the second half-overwrites the first
        recs = [Record("m", i.to_bytes(3, "big"), bytes([i % 256, 2]),
                       Stamp(100 + len(rounds), 0, "b")) for i in rounds]  # fmt: skip
        got = bulk.offer_all([r.key for r in recs], [pack(r.stamp, r.value) for r in recs])
        assert len(got.stored) == len(recs)
        for rec in recs:
            assert single.offer(rec) is None
        assert bulk.at_rest() == 8  # each bucket took >= 64 new registers
        assert bulk.digest_buckets() == single.digest_buckets()
        assert sorted(bulk.records_in(range(8))) == sorted(single.records_in(range(8)))
    few = [Record("m", (5000 + i).to_bytes(3, "big"), b"\x01\x01", Stamp(999, 0, "c"))
           for i in range(3)]  # fmt: skip
    bulk.offer_all([r.key for r in few], [pack(r.stamp, r.value) for r in few])
    assert 5 <= bulk.at_rest() < 8  # a few writes thaw their buckets and leave them thawed
