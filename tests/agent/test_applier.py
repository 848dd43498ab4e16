"""The applier on real kernel maps: writes in the background while catching up land in order,
and a batch the kernel refuses is redone key by key with the values the replica wants then."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from bpfsync.agent.applier import Applier, ApplyStats
from bpfsync.core.messages import MapSchema, Record, Stamp
from bpfsync.core.replica import Replica
from bpfsync.kernel.maps import Map

SCHEMA = MapSchema("m", 4, 8)
T = 1_700_000_000 * 10**9


def k(i: int) -> bytes:
    return i.to_bytes(4, "little")


def v(i: int) -> bytes:
    return i.to_bytes(8, "little")


def setup(
    make_map: Callable[..., Map], entries: int, buckets: int = 1024
) -> tuple[Map, Replica, Applier]:
    m = make_map("hash", 4, 8, entries)
    replica = Replica("a", [SCHEMA], 3600 * 10**9, digest_buckets=buckets)
    synced: Any = {"m": SimpleNamespace(map=m, companion=None, rewrites=False,
                                         fold=lambda v: v)}
    return m, replica, Applier(synced, replica)


def receive(
    replica: Replica, applier: Applier, items: dict[int, int | None], wall: int
) -> ApplyStats:
    recs = [Record("m", k(i), None if x is None else v(x), Stamp(wall, 0, "b"))
            for i, x in items.items()]  # fmt: skip
    res = replica.receive(recs, T, "b")
    return applier.apply(res.writes, res.fills)


def content(m: Map) -> dict[bytes, bytes]:
    return m.dump().to_dict()


def test_background_writes_land_in_order(make_map: Callable[..., Map]) -> None:
    m, replica, applier = setup(make_map, 64)
    applier.start_background()
    receive(replica, applier, {1: 1, 2: 2}, T - 3)
    receive(replica, applier, {1: None, 3: 3}, T - 2)  # a delete after an update of k1
    receive(replica, applier, {1: 7}, T - 1)  # ... and an update after it
    stats = applier.finish_background()
    assert stats.failed == 0 and not stats.written
    assert content(m) == {k(1): v(7), k(2): v(2), k(3): v(3)}
    receive(replica, applier, {2: None}, T)  # synchronous again
    assert content(m) == {k(1): v(7), k(3): v(3)}


def test_a_refused_batch_is_redone_key_by_key_with_the_values_wanted_now(
    make_map: Callable[..., Map],
) -> None:
    m, replica, applier = setup(make_map, 4)  # room for four keys
    applier.start_background()
    receive(replica, applier, {i: i for i in range(6)}, T - 2)  # too many: the batch fails
    receive(replica, applier, {0: 100}, T - 1)  # a later batch changes key 0
    stats = applier.finish_background()
    assert stats.failed == 2  # the map is full: two keys do not fit, one by one either
    held = content(m)
    assert len(held) == 4 and held[k(0)] == v(100)
    assert all(held[key] == v(i) for i in range(1, 6) if (key := k(i)) in held)
    for i in range(6):  # the replica knows what the kernel holds, written or not
        assert replica.kernel_view("m", k(i)) == held.get(k(i))
    assert stats.written["m"] == [(k(i), v(100) if i == 0 else v(i)) for i in range(6)]


def test_a_refused_batch_is_redone_key_by_key_at_once_when_ready(
    make_map: Callable[..., Map],
) -> None:
    m, replica, applier = setup(make_map, 4)
    receive(replica, applier, {i: i for i in range(6)}, T - 1)  # no background: at once
    held = content(m)
    assert len(held) == 4 and all(held[key] == v(i) for i in range(6) if (key := k(i)) in held)
    for i in range(6):
        assert replica.kernel_view("m", k(i)) == held.get(k(i))


def test_filled_buckets_are_written_as_columns_at_once_and_in_the_background(
    make_map: Callable[..., Map],
) -> None:
    """A catch-up fills whole buckets (Replica gives them as Fill columns): one batch write,
    noted as columns for the watcher; later per-key writes land after it."""
    for background in (False, True):
        m, replica, applier = setup(make_map, 1024, buckets=2)
        if background:
            applier.start_background()
        first = receive(replica, applier, {i: i for i in range(300)}, T - 2)
        assert not first.written and [f.entries for f in first.filled] == [300]
        assert first.asked == {"m": (300, 0)} and first.updated == 300
        receive(replica, applier, {5: None, 6: 66}, T - 1)  # per key, after the fill
        if background:
            assert applier.finish_background().failed == 0
        want = {k(i): v(i) for i in range(300) if i != 5} | {k(6): v(66)}
        assert content(m) == want


def test_a_refused_fill_is_redone_key_by_key_with_the_values_wanted_now(
    make_map: Callable[..., Map],
) -> None:
    m, replica, applier = setup(make_map, 250, buckets=2)  # room for 250 of 300 keys
    applier.start_background()
    assert receive(replica, applier, {i: i for i in range(300)}, T - 2).filled
    receive(replica, applier, {0: 100}, T - 1)
    stats = applier.finish_background()
    assert stats.failed == 50
    held = content(m)
    assert len(held) == 250 and held[k(0)] == v(100)
    assert all(held[key] == v(i) for i in range(1, 300) if (key := k(i)) in held)
    for i in range(300):
        assert replica.kernel_view("m", k(i)) == held.get(k(i))
    assert sorted(stats.written["m"]) == sorted((k(i), v(100) if i == 0 else v(i))
                                                for i in range(300))  # fmt: skip
