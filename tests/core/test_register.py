"""The packed form of records: lossless, ranked as merge.newer ranks, and checked."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpfsync.core.messages import Record, Stamp
from bpfsync.core.outbox import split
from bpfsync.core.policy import newer
from bpfsync.core.register import Packed, check, pack, stamp_of, unpack, value_of

node_ids = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                   max_size=20)
# small ranges, so that equal walls, logicals and node ids (the tie-breaks) come up often
stamps = st.builds(Stamp, wall=st.integers(0, 3) | st.integers(0, 2**64 - 1),
                   logical=st.integers(0, 3) | st.integers(0, 2**64 - 1),
                   node=st.sampled_from(["a", "ab", "b", "é"]) | node_ids)
values = st.none() | st.binary(min_size=4, max_size=4)
records = st.builds(Record, map=st.just("m"), key=st.just(b"k"), value=values, stamp=stamps)


@given(records)
def test_pack_is_lossless(rec: Record) -> None:
    packed = pack(rec.stamp, rec.value)
    assert unpack("m", b"k", packed) == rec
    assert value_of(packed) == rec.value and stamp_of(packed) == rec.stamp
    # peers refuse a logical part no clock issues (hlc.MAX_LOGICAL): the packed form holds it
    assert check([packed]) == ("" if rec.stamp.logical < 2**32 else
                               "packed record whose logical clock is beyond 2^32 - 1")


@given(records, records)
def test_bytes_order_is_the_merge_order(a: Record, b: Record) -> None:
    assert newer(a, b) == (pack(a.stamp, a.value) > pack(b.stamp, b.value))


@pytest.mark.parametrize(("packed", "why"), [
    (b"short", "at least"),
    (bytes(16) + b"\x00\x00", "at least"),
    (bytes(16) + b"node", "node id"),  # never ended
    (bytes(16) + b"\x00\x00abc", "node id"),  # empty
    (bytes(16) + b"n" * 256 + b"\x00\x00", "node id"),  # too long
    (bytes(16) + b"n\x00\x02", "unknown kind"),
    (bytes(16) + b"n\x00\x01v", "tombstone with a value"),
    (bytes(16) + b"\xc3\x28\x00\x00v", "UTF-8"),
    (bytes(8) + (1 << 32).to_bytes(8, "big") + b"n\x00\x00v", "logical clock"),
    (bytes(8) + (2**64 - 1).to_bytes(8, "big") + b"n\x00\x00v", "logical clock"),
])
def test_malformed_packed_records_are_named(packed: bytes, why: str) -> None:
    assert why in check([pack(Stamp(1, 0, "a"), b"ok"), packed])


def test_packed_columns_read_as_records() -> None:
    recs = [Record("m", bytes([i]), None if i % 3 == 0 else bytes([i]) * 4, Stamp(i, 0, n))
            for i, n in zip(range(10), "abcabcabca", strict=True)]  # fmt: skip
    packed = Packed.of(recs)
    assert packed == recs and list(packed[2:5]) == recs[2:5] and packed[7] == recs[7]
    assert packed.origins() == {"a", "b", "c"}
    assert Packed.of(packed) is packed


def test_packed_splits_within_both_limits() -> None:
    recs = Packed.of(Record("m", i.to_bytes(4, "little"), bytes(16), Stamp(i, 0, "a"))
                     for i in range(100))  # fmt: skip
    for max_records, max_bytes in ((30, 1 << 20), (1000, 500), (7, 200)):
        pieces = list(split(recs, max_records, max_bytes))
        assert [r for p in pieces for r in p] == list(recs)
        for p in pieces:
            assert isinstance(p, Packed) and 1 <= len(p) <= max_records
            size = sum(8 + len(k) + len(v) for k, v in zip(p.keys, p.packed, strict=True))
            assert size <= max_bytes or len(p) == 1


def _record(node: bytes, kind: int, value: bytes) -> bytes:
    return b"\x00" * 7 + b"\x05" + b"\x00" * 8 + node + b"\x00" + bytes([kind]) + value


flaws = st.sampled_from([
    b"",  # well-formed
    b"\x00" * 16 + b"\x00\x00",  # empty node id
    b"\x00" * 16 + b"ab\x00\x02",  # unknown kind
    b"\x00" * 16 + b"ab\x00\x01",  # a tombstone with a value (the padding)
    b"\x00" * 16 + b"\xff\xfe\x00\x00",  # node id not UTF-8
    b"\x00" * 16 + b"abcd",  # no end of the node id
    b"\x00" * 11 + b"\x01" + b"\x00" * 4 + b"ab\x00\x00",  # logical part beyond 2^32 - 1
])  # fmt: skip


@given(
    nodes=st.lists(st.sampled_from([b"a", b"b", b"node-7", "n\u00e9".encode()]), min_size=64,
                   max_size=200),
    flaw=flaws,
    at=st.integers(0, 199),
)  # fmt: skip
def test_a_batch_of_one_size_is_checked_in_bulk_as_one_by_one(
    nodes: list[bytes], flaw: bytes, at: int
) -> None:
    """check() takes batches of records of one size as arrays; it must name the same flaw as
    the record-by-record check, including when records differ only in size."""
    from bpfsync.core.register import _check_each, scan

    width = 16 + 7 + 2 + 4  # the longest id here, padded by the value: all of one size
    records = [_record(n, 0, b"v" * (width - 16 - len(n) - 2)) for n in nodes]
    if flaw:
        records[at % len(records)] = flaw + b"x" * (width - len(flaw))
    assert scan(records) == _check_each(records)
    assert bool(check(records)) == bool(flaw)
    if not flaw:  # the origins come along, from either path
        assert scan(records)[1] == {n.decode() for n in nodes}
    records[at % len(records)] += b"x"  # one size no more: the record-by-record path decides
    assert scan(records) == _check_each(records)
