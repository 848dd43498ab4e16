"""The bridge between the watcher thread and the agent's loop: coalescing per key, slices,
pass-through of overflows, a watcher failure surfacing in the loop, and a move of the watcher to
other map objects."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import Any

import pytest

from bpfsync.agent.bridge import Reopened, WatchBridge
from bpfsync.model import Change, Overflow, Seen, WatchEvent


class ScriptedWatcher:
    """Returns the batches it is given, one per read; then blocks until closed."""

    mode = "scripted"

    def __init__(self, batches: list[list[WatchEvent]], fail: BaseException | None = None):
        self.batches = list(batches)
        self.fail = fail
        self.drained = threading.Event()
        self.closed = threading.Event()

    def read(self, timeout: float | None = 0.0) -> list[WatchEvent]:
        if self.batches:
            return self.batches.pop(0)
        self.drained.set()
        if self.fail is not None:
            raise self.fail
        self.closed.wait(0.01)
        return []

    def note_written(self, name: str, writes: Iterable[tuple[bytes, bytes | None]]) -> None:
        pass

    def close(self) -> None:
        self.closed.set()


def ch(key: int, value: int | None) -> Change:
    return Change("m", bytes([key]), None if value is None else bytes([value]), Seen.TRACE)


def run_bridge(watcher: ScriptedWatcher, limits: list[int]) -> tuple[list[list[WatchEvent]], int]:
    async def main() -> tuple[list[list[WatchEvent]], int]:
        bridge = WatchBridge(watcher, asyncio.get_running_loop())
        bridge.start()
        await asyncio.to_thread(watcher.drained.wait, 5)
        try:
            return [await bridge.take(n) for n in limits], bridge.coalesced
        finally:
            await asyncio.to_thread(bridge.close)

    return asyncio.run(main())


def test_a_newer_change_replaces_a_waiting_one_in_its_place() -> None:
    w = ScriptedWatcher([[ch(1, 10), ch(2, 20), Overflow("m", 3)], [ch(1, 11), ch(3, 30)],
                         [ch(2, None)]])  # fmt: skip
    (taken,), coalesced = run_bridge(w, [100])
    assert taken == [Overflow("m", 3), ch(1, 11), ch(2, None), ch(3, 30)]
    assert coalesced == 2


def test_changes_are_taken_in_slices_oldest_first() -> None:
    w = ScriptedWatcher([[ch(k, k) for k in range(10)]])
    slices, _ = run_bridge(w, [4, 4, 4])
    assert slices == [[ch(k, k) for k in range(4)], [ch(k, k) for k in range(4, 8)],
                      [ch(8, 8), ch(9, 9)]]  # fmt: skip


def test_a_failing_watcher_fails_the_loop() -> None:
    w = ScriptedWatcher([[ch(1, 1)]], fail=RuntimeError("ring gone"))
    with pytest.raises(RuntimeError, match="ring gone"):
        run_bridge(w, [10, 10])


def test_a_batch_of_changes_alone_coalesces_within_itself_too() -> None:
    w = ScriptedWatcher([[ch(1, 1), ch(2, 2), ch(1, 3)], [ch(2, 4), ch(3, 5)]])
    (taken,), coalesced = run_bridge(w, [100])
    assert taken == [ch(1, 3), ch(2, 4), ch(3, 5)] and coalesced == 2


def on(map: str, key: int, value: int) -> Change:
    return Change(map, bytes([key]), bytes([value]), Seen.TRACE)


def test_changes_of_several_maps_queue_apart_and_slices_take_the_maps_in_turn() -> None:
    """A map with a backlog does not starve another: each slice starts with the next map. A
    batch mixing maps (a rescan of several) coalesces per map too."""
    w = ScriptedWatcher([[on("big", k, k) for k in range(6)], [on("small", 1, 1)],
                         [on("big", 0, 9), on("small", 1, 2), on("other", 1, 1)]])  # fmt: skip
    slices, coalesced = run_bridge(w, [4, 4])
    assert coalesced == 2
    assert slices == [
        [on("big", 0, 9), *(on("big", k, k) for k in range(1, 4))],
        [on("small", 1, 2), on("other", 1, 1), on("big", 4, 4), on("big", 5, 5)],
    ]


def test_a_slice_that_ends_with_a_map_leaves_the_next_map_first() -> None:
    w = ScriptedWatcher([[on("x", 1, 1), on("x", 2, 2)], [on("y", 1, 1)], [on("z", 1, 1)]])
    slices, _ = run_bridge(w, [2, 1, 1])
    assert slices == [[on("x", 1, 1), on("x", 2, 2)], [on("y", 1, 1)], [on("z", 1, 1)]]


def test_a_move_drops_the_replaced_object_s_waiting_changes_and_comes_first() -> None:
    """``reopen``: what waits of a replaced map goes (its old object's changes); the move's
    last events of the maps that stay are queued as changes; a ``Reopened`` with the new
    object's baseline is taken before any change the new watcher reports."""
    old = ScriptedWatcher([[on("m", 1, 1), on("stays", 1, 1)]])
    new = ScriptedWatcher([[on("m", 2, 2)]])

    def move(w: object) -> tuple[ScriptedWatcher, list[WatchEvent], dict[str, list[Any]]]:
        assert w is old
        return new, [on("stays", 2, 2)], {"m": [(b"\2", b"\2")]}

    async def main() -> list[WatchEvent | Reopened]:
        bridge = WatchBridge(old, asyncio.get_running_loop())
        bridge.start()
        await asyncio.to_thread(old.drained.wait, 5)
        bridge.reopen(move, ["m"])  # type: ignore[arg-type]
        await asyncio.to_thread(new.drained.wait, 5)
        try:
            return await bridge.take(100)
        finally:
            await asyncio.to_thread(bridge.close)

    taken = asyncio.run(main())
    assert isinstance(taken[0], Reopened) and taken[0].watcher is new
    assert taken[0].fresh == ("m",) and taken[0].baselines == {"m": [(b"\2", b"\2")]}
    assert taken[1:] == [on("stays", 1, 1), on("stays", 2, 2), on("m", 2, 2)]
    assert new.closed.is_set()  # the bridge closes the watcher it reads (the move, the old one)
