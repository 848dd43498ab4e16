from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfsync.core.hlc import MAX_LOGICAL, ClockDriftError, HybridClock
from bpfsync.core.messages import Stamp
from bpfsync.core.register import pack
from bpfsync.errors import MalformedMessageError, PeerError

T = 1_700_000_000 * 10**9
SECOND = 10**9

physical = st.integers(min_value=T - 5 * SECOND, max_value=T + 5 * SECOND)
remote = st.builds(
    Stamp,
    wall=st.integers(min_value=T - 5 * SECOND, max_value=T + 5 * SECOND),
    logical=st.integers(min_value=0, max_value=5),
    node=st.sampled_from(["b", "c"]),
)
events = st.lists(st.tuples(physical, st.none() | remote), min_size=1, max_size=40)


@settings(max_examples=150)
@given(events)
def test_stamps_only_grow_and_never_trail_physical_time(
    evs: list[tuple[int, Stamp | None]],
) -> None:
    clock = HybridClock("a", max_drift_ns=10 * SECOND)
    seen: list[Stamp] = []
    issued: list[Stamp] = []
    for pt, msg in evs:
        if msg is None:
            stamp = clock.now(pt)
            # greater than everything issued or observed before: the causality guarantee
            assert all(stamp > s for s in issued + seen)
            assert stamp.wall >= pt and stamp.node == "a"
            issued.append(stamp)
        else:
            event = clock.observe(msg, pt)
            assert event.wall >= max(pt, msg.wall)
            assert (event.wall, event.logical) > (msg.wall, msg.logical)
            seen.append(msg)


def test_logical_counts_while_physical_time_stands_still_and_resets_when_it_moves() -> None:
    clock = HybridClock("a")
    assert clock.now(T) == Stamp(T, 0, "a")
    assert clock.now(T) == Stamp(T, 1, "a")
    assert clock.now(T - SECOND) == Stamp(T, 2, "a")  # physical clock stepped back (NTP)
    assert clock.now(T + 1) == Stamp(T + 1, 0, "a")


def test_a_reserved_run_is_what_now_would_have_issued_one_by_one() -> None:
    one_by_one, reserved = HybridClock("a"), HybridClock("a")
    for clock in (one_by_one, reserved):
        clock.now(T)
    stamps = [one_by_one.now(T - 1) for _ in range(5)]
    assert reserved.peek(T - 1) == (T, 1) and reserved.last == Stamp(T, 0, "a")  # not issued
    wall, logical = reserved.reserve(T - 1, 5)
    assert [Stamp(wall, logical + i, "a") for i in range(5)] == stamps
    assert reserved.last == one_by_one.last
    assert reserved.reserve(T + 9, 1) == (T + 9, 0)
    with pytest.raises(ValueError):
        reserved.reserve(T, 0)


def test_receive_rules_follow_kulkarni() -> None:
    clock = HybridClock("a")
    clock.now(T)  # (T, 0)
    # remote ahead: take its wall, its logical + 1
    assert clock.observe(Stamp(T + 5, 3, "b"), T) == Stamp(T + 5, 4, "a")
    # same wall on both: max of the logicals + 1
    assert clock.observe(Stamp(T + 5, 9, "b"), T) == Stamp(T + 5, 10, "a")
    # remote behind: ours + 1
    assert clock.observe(Stamp(T, 50, "b"), T) == Stamp(T + 5, 11, "a")
    # physical time ahead of both: reset
    assert clock.observe(Stamp(T, 50, "b"), T + 10) == Stamp(T + 10, 0, "a")
    assert clock.now(T + 10) == Stamp(T + 10, 1, "a")


def test_a_stamp_beyond_the_drift_bound_is_the_peers_fault_and_leaves_the_clock_alone() -> None:
    clock = HybridClock("a", max_drift_ns=SECOND)
    before = clock.now(T)
    clock.observe(Stamp(T + SECOND, 0, "b"), T)  # exactly at the bound: accepted
    with pytest.raises(ClockDriftError) as err:
        clock.observe(Stamp(T + SECOND + 1 + 5, 0, "c"), T + 5, peer="b")
    assert isinstance(err.value, PeerError)
    assert err.value.peer == "b"
    assert "'c'" in str(err.value)  # names the origin whose clock is wrong
    assert clock.last == Stamp(T + SECOND, 1, "a")
    assert clock.now(T) > before


def test_clock_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        HybridClock("")
    with pytest.raises(ValueError):
        HybridClock("a", max_drift_ns=-1)


def test_the_logical_part_carries_into_the_wall_instead_of_overflowing() -> None:
    """A peer's stamp at the top of the logical range, once observed, must not leave the clock
    unable to stamp: its next stamps borrow a nanosecond and still pack into 64-bit fields."""
    clock = HybridClock("a")
    top = Stamp(T, MAX_LOGICAL, "b")
    event = clock.observe(top, T)
    assert event == Stamp(T + 1, 0, "a") and event > top
    later = [clock.now(T) for _ in range(3)]
    assert later == [Stamp(T + 1, i, "a") for i in (1, 2, 3)]
    for stamp in later:
        pack(stamp, b"v")  # the crash this guards against was struct.error here
    # a run of stamps that would cross the bound starts on the next nanosecond, in one piece
    clock = HybridClock("a")
    clock.observe(Stamp(T, MAX_LOGICAL - 2, "b"), T)  # clock at (T, MAX - 1)
    first = clock.peek(T, 5)
    assert first == (T + 1, 0) and clock.reserve(T, 5) == first
    assert clock.now(T) == Stamp(T + 1, 5, "a")
    with pytest.raises(ValueError):
        clock.peek(T, MAX_LOGICAL + 2)


def test_a_stamp_whose_logical_part_no_clock_issues_is_malformed() -> None:
    clock = HybridClock("a")
    clock.check(Stamp(T, MAX_LOGICAL, "b"), T)  # the top itself is a legal stamp
    for logical in (MAX_LOGICAL + 1, 2**64 - 1):
        with pytest.raises(MalformedMessageError, match="logical part"):
            clock.observe(Stamp(T, logical, "b"), T, peer="b")
    assert clock.last == Stamp(0, 0, "a")  # refused stamps leave the clock alone
