from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfsync.core.digest import MASK, bucket_of, diff, fold, record_hash
from bpfsync.core.lww_table import LwwTable
from bpfsync.core.messages import Digest, MapSchema, Record, Stamp
from bpfsync.core.policy import LWW, policy_for
from bpfsync.core.table import MapTable, SlotTable

SCHEMA = MapSchema("m", 2, 4)
COUNTER = MapSchema("c", 2, 4, "counter")

ops = st.lists(
    st.tuples(
        st.binary(min_size=2, max_size=2),
        st.none() | st.binary(min_size=4, max_size=4),
        st.integers(1, 20),  # wall
        st.sampled_from(["a", "b", "c"]),
    ),
    max_size=60,
)


def scratch(table: MapTable, n: int) -> tuple[int, ...]:
    """The digest computed from nothing but the records: what the running sums must equal."""
    sums = [0] * n
    for rec in table.records_in(range(table.nbuckets)):
        b = bucket_of(rec.key, n)
        sums[b] = (sums[b] + record_hash(rec)) & MASK
    return tuple(sums)


def fill(table: MapTable, name: str, items: list[tuple[bytes, bytes | None, int, str]]) -> None:
    for key, value, wall, node in items:
        table.offer(Record(name, key, value, Stamp(wall, 0, node)))


@settings(max_examples=60)
@given(items=ops, deadline=st.integers(0, 20))
def test_running_digest_equals_a_digest_from_scratch(
    items: list[tuple[bytes, bytes | None, int, str]], deadline: int
) -> None:
    for table in (LwwTable(SCHEMA, LWW, 16), SlotTable(COUNTER, policy_for(COUNTER), 16)):
        fill(table, table.name, items)
        table.expire(deadline)  # purges change the sums too
        assert table.digest_buckets() == scratch(table, 16)
        assert table.digest_buckets(4) == scratch(table, 4)  # folding = hashing at 4 buckets
        assert sum(1 for _ in table.records_in(range(16))) == len(table)


@settings(max_examples=60)
@given(items=ops)
def test_equal_states_give_equal_digests_in_any_insertion_order(
    items: list[tuple[bytes, bytes | None, int, str]],
) -> None:
    a, b = LwwTable(SCHEMA, LWW, 8), LwwTable(SCHEMA, LWW, 8)
    fill(a, "m", items)
    fill(b, "m", list(reversed(items)))
    assert a.digest_buckets() == b.digest_buckets()


def test_buckets_are_stable_and_in_range() -> None:
    assert bucket_of(b"key", 1024) == bucket_of(b"key", 1024)
    assert bucket_of(b"key", 1024) % 64 == bucket_of(b"key", 64)  # what makes folding work
    assert all(0 <= bucket_of(bytes([i]), 7) < 7 for i in range(256))


def test_record_hash_covers_key_stamp_and_value() -> None:
    base = Record("m", b"k", b"v", Stamp(1, 2, "a"))
    variants = [
        Record("m", b"K", b"v", Stamp(1, 2, "a")),
        Record("m", b"k", b"V", Stamp(1, 2, "a")),
        Record("m", b"k", None, Stamp(1, 2, "a")),
        Record("m", b"k", b"", Stamp(1, 2, "a")),
        Record("m", b"k", b"v", Stamp(2, 2, "a")),
        Record("m", b"k", b"v", Stamp(1, 3, "a")),
        Record("m", b"k", b"v", Stamp(1, 2, "b")),
    ]
    assert len({record_hash(r) for r in [base, *variants]}) == 1 + len(variants)


def test_fold_and_diff() -> None:
    assert fold([1, 2, 3, 4], 2) == (4, 6)
    with pytest.raises(ValueError):
        fold([1, 2, 3], 2)
    assert diff(Digest("m", (1, 2, 3)), Digest("m", (1, 5, 3))) == [1]
    with pytest.raises(ValueError):
        diff(Digest("m", (1, 2)), Digest("m", (1, 2, 3)))
    with pytest.raises(ValueError):
        diff(Digest("m", (1,)), Digest("n", (1,)))


def test_records_in_a_coarse_bucket_are_the_fine_buckets_folded_into_it() -> None:
    table = LwwTable(SCHEMA, LWW, 16)
    fill(table, "m", [(bytes([i, 0]), b"vvvv", 1, "a") for i in range(100)])
    got = {r.key for r in table.records_in([3], 4)}
    assert got == {bytes([i, 0]) for i in range(100) if bucket_of(bytes([i, 0]), 4) == 3}
    with pytest.raises(ValueError):
        list(table.records_in([0], 3))
    with pytest.raises(ValueError):
        list(table.records_in([4], 4))
