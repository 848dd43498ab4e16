from __future__ import annotations

import pytest

from bpfsync.core.messages import Record, Stamp
from bpfsync.core.outbox import Outbox, encoded_size, split
from bpfsync.core.register import pack


def rec(key: int, wall: int, node: str = "a", map: str = "m", value: bytes | None = b"v") -> Record:
    return Record(map, bytes([key]), value, Stamp(wall, 0, node))


def test_a_later_record_of_a_queued_key_replaces_it_in_place() -> None:
    box = Outbox()
    box.add([rec(1, 1), rec(2, 1), rec(1, 5, value=None)])
    assert len(box) == 2
    assert box.take_batch(10, 10_000) == [rec(1, 5, value=None), rec(2, 1)]
    assert not box


def test_an_older_record_never_replaces_a_newer_one() -> None:
    box = Outbox()
    box.add([rec(1, 5), rec(1, 3, "z")])
    assert box.take_batch(10, 10_000) == [rec(1, 5)]


def test_per_origin_maps_keep_every_origins_record() -> None:
    box = Outbox(per_origin_maps=["c"])
    box.add([rec(1, 1, "a", "c"), rec(1, 2, "b", "c"), rec(1, 3, "a", "c")])
    box.add([rec(1, 1, "a", "m"), rec(1, 2, "b", "m")])
    assert box.take_batch(10, 10_000) == [
        rec(1, 3, "a", "c"),
        rec(1, 2, "b", "c"),
        rec(1, 2, "b", "m"),
    ]


def test_batches_respect_both_limits_but_always_carry_one_record() -> None:
    box = Outbox()
    box.add([rec(i, 1) for i in range(10)])
    assert len(box.take_batch(3, 10_000)) == 3
    one = encoded_size(bytes([0]), pack(Stamp(1, 0, "a"), b"v"))
    assert len(box.take_batch(100, 2 * one)) == 2
    assert len(box.take_batch(100, 1)) == 1  # larger than the byte limit on its own
    assert len(box.take_batch(100, 10_000)) == 4
    assert box.take_batch(100, 10_000) == []


def test_overflow_empties_the_outbox_and_asks_for_repair() -> None:
    box = Outbox(max_records=3)
    box.add([rec(i, 1) for i in range(3)])
    assert not box.overflowed
    box.add([rec(9, 1)])
    assert not box and box.take_overflow()
    assert not box.take_overflow()
    with pytest.raises(ValueError):
        Outbox(max_records=0)


def test_split_cuts_repair_answers_into_batches() -> None:
    recs = [rec(i, 1) for i in range(10)]
    one = encoded_size(recs[0].key, pack(recs[0].stamp, recs[0].value))
    assert [len(c) for c in split(recs, 4, 10_000)] == [4, 4, 2]
    assert [len(c) for c in split(recs, 100, 3 * one)] == [3, 3, 3, 1]
    assert [len(c) for c in split(recs[:2], 100, 1)] == [1, 1]
    assert list(split([], 4, 100)) == []


def test_this_nodes_own_records_replace_queued_ones_in_place_without_a_comparison() -> None:
    box = Outbox(per_origin_maps=["c"])
    box.add([rec(1, 5), rec(2, 5)])
    box.add([rec(1, 7), rec(3, 7)], newest=True)
    assert box.take_batch(10, 10_000) == [rec(1, 7), rec(2, 5), rec(3, 7)]
    box.add([rec(1, 1, "b", "c")])
    box.add([rec(1, 2, "a", "c"), rec(2, 2, "a")], newest=True)  # a per-origin map among them
    assert box.take_batch(10, 10_000) == [rec(1, 1, "b", "c"), rec(1, 2, "a", "c"), rec(2, 2, "a")]


def test_batches_take_the_maps_in_turn_so_no_backlog_starves_another_map() -> None:
    box = Outbox()
    box.add([rec(i, 1, map="big") for i in range(10)], newest=True)
    box.add([rec(1, 1, map="small")], newest=True)
    assert box.take_batch(3, 10_000) == [rec(i, 1, map="big") for i in range(3)]
    assert box.take_batch(3, 10_000) == [rec(1, 1, map="small"), *(rec(i, 1, map="big")
                                                                    for i in (3, 4))]
    assert len(box) == 5 and box.take_batch(100, 10_000) == [rec(i, 1, map="big")
                                                              for i in range(5, 10)]
    assert not box and box.take_batch(100, 10_000) == []


def test_a_batch_of_several_maps_queues_each_record_in_its_own_map() -> None:
    box = Outbox()
    box.add([rec(1, 5, map="x"), rec(1, 5, map="y"), rec(2, 5, map="x")], newest=True)
    box.add([rec(1, 3, map="y"), rec(1, 9, map="x")])  # older for y: kept out; newer for x
    assert box.take_batch(10, 10_000) == [rec(1, 9, map="x"), rec(2, 5, map="x"),
                                          rec(1, 5, map="y")]


def test_a_batch_that_empties_a_map_leaves_the_next_map_first() -> None:
    box = Outbox()
    for name in ("x", "y", "z"):
        box.add([rec(1, 1, map=name)], newest=True)
    box.add([rec(2, 1, map="x")], newest=True)
    assert box.take_batch(2, 10_000) == [rec(1, 1, map="x"), rec(2, 1, map="x")]
    assert box.take_batch(1, 10_000) == [rec(1, 1, map="y")]
    assert box.take_batch(1, 10_000) == [rec(1, 1, map="z")]
