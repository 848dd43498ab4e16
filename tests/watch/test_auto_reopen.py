"""AutoWatcher.reopen on real maps with a scripted tracer: the watcher moves to a new map object
(a data plane recreated its map) or takes a map in, and no write to a map that stays is lost."""

from __future__ import annotations

from test_auto import MakeMap, k, read_until, scripted, v

from bpfsync.model import Change, Overflow, Seen
from bpfsync.watch.auto import AutoWatcher


def test_a_replaced_map_is_watched_from_its_baseline_and_the_old_object_is_dropped(
    make_map: MakeMap,
) -> None:
    stays, old = make_map("hash", 4, 8, 16), make_map("hash", 4, 8, 16)
    made, factory = scripted()
    auto = AutoWatcher({"stays": stays, "m": old}, repair_interval=60, tracer_factory=factory)
    auto.start()
    first = made[0]
    # still in the old ring: a write to the map that stays is passed on, one to the old
    # object is not (it is synced no more). The write is made for real, so the rescan each
    # staying map gets after the move finds the map as reported.
    stays.update(k(1), v(1))
    first.push(Change("stays", k(1), v(1), Seen.TRACE), Change("m", k(9), v(9), Seen.TRACE),
               Overflow("m", 1))  # fmt: skip
    new = make_map("hash", 4, 8, 16)
    new.update(k(2), v(2))  # written before the watcher looks
    left, baselines = auto.reopen({"stays": stays, "m": new})
    assert left == [Change("stays", k(1), v(1), Seen.TRACE)]
    assert baselines["m"].to_dict() == {k(2): v(2)}
    assert first.closed and len(made) == 2 and set(made[1].maps) == {"stays", "m"}
    assert auto.maps["m"] is new and auto.baseline("m").to_dict() == {k(2): v(2)}

    new.update(k(3), v(3))  # reported by the new tracer, against the new baseline
    made[1].push(Change("m", k(3), v(3), Seen.TRACE))
    assert auto.read(timeout=1) == [Change("m", k(3), v(3), Seen.TRACE)]
    auto.close()
    assert made[1].closed


def test_what_the_old_ring_did_not_hand_over_is_found_by_a_rescan(make_map: MakeMap) -> None:
    """A write to a map that stays, made before the move but lost with the old ring, is found
    by the rescan each staying traced map gets after the move."""
    stays, old = make_map("hash", 4, 8, 16), make_map("hash", 4, 8, 16)
    _, factory = scripted()
    auto = AutoWatcher({"stays": stays, "m": old}, repair_interval=60, tracer_factory=factory)
    auto.start()
    stays.update(k(5), v(5))  # the scripted ring never reports it
    auto.reopen({"stays": stays, "m": make_map("hash", 4, 8, 16)})
    assert read_until(auto, 1) == [Change("stays", k(5), v(5), Seen.POLL)]
    auto.close()


def test_a_watcher_of_no_map_takes_one_in(make_map: MakeMap) -> None:
    """An agent none of whose pins held a map at start watches nothing until one appears."""
    _, factory = scripted()
    auto = AutoWatcher({}, poll_interval=0.05, tracer_factory=factory)
    auto.start()
    assert auto.mode == "poll" and auto.read(timeout=0.2) == []
    m = make_map("hash", 4, 8, 16)
    m.update(k(1), v(1))
    left, baselines = auto.reopen({"m": m}, in_place=["m"])
    assert left == [] and baselines["m"].to_dict() == {k(1): v(1)}
    assert auto.mode == "trace+poll" and auto.traced == {"m"}
    m.update(k(1), v(2))  # in place: polled at poll_interval although traced
    assert read_until(auto, 1) == [Change("m", k(1), v(2), Seen.POLL)]
    auto.close()
