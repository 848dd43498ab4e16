"""Carries a blocking watcher's events into the agent's asyncio loop, coalesced per key.

The watcher runs in its own thread (ring-buffer reads and batch scans block) and is read in
batches; the loop takes events in slices. In between they wait here, one per key: a newer
change of a key that is still waiting replaces the older one in place (the key keeps its place
in the queue). Changes are state, like records, so only a key's latest value matters; when the
watcher reports faster than the agent can stamp and send (a burst of a million writes, or a
rescan after a ring overflow), the backlog is bounded by the number of distinct keys and the
newest values go out first-come, instead of the agent working through every stale
intermediate value. ``Overflow`` events (metrics only) pass through in order.

A queue per map, keyed by the key itself (a tuple per change, built and hashed, doubled the
cost of queueing it); the loop takes from the maps in turn.

The loop is woken once per burst, not once per event.

The watcher moves to other map objects on its own thread, between two reads (``reopen``):
what waits of the replaced objects is dropped there, and a ``Reopened`` is handed over before
any change the watcher reports of the new ones, so the loop takes the new objects' content
in before their first change.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, cast

from bpfsync.model import Change, WatchEvent

if TYPE_CHECKING:
    from bpfsync.agent.watchers import BatchWatcher, Items

log = logging.getLogger(__name__)
_KEY = itemgetter(1)  # a Change's key

# moves a watcher to other map objects: the watcher to read from then on, its last events of
# the maps that stay, and each new object's content (agent/watchers.py reopen_watcher)
Reopen = Callable[["BatchWatcher"], tuple["BatchWatcher", list[WatchEvent], dict[str, "Items"]]]


@dataclass(slots=True)
class Reopened:
    """The watcher moved: ``baselines`` holds each new object's content, which every change
    of it taken after this is relative to (changes of those maps taken before were the old
    objects'). ``error``: the move failed and nothing changed."""

    fresh: tuple[str, ...]
    baselines: dict[str, Items] = field(default_factory=dict)
    watcher: BatchWatcher | None = None
    error: Exception | None = None


class WatchBridge:
    def __init__(self, watcher: BatchWatcher, loop: asyncio.AbstractEventLoop) -> None:
        self._watcher = watcher
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: dict[str, dict[bytes, Change]] = {}  # map -> key -> its latest change
        self._other: list[WatchEvent | Reopened] = []
        self._ready = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="bpfsync-watch", daemon=True)
        self.error: BaseException | None = None
        self.coalesced = 0  # changes replaced by a newer change of their key before being taken
        self._closed = threading.Event()
        self._moves: list[tuple[Reopen, tuple[str, ...]]] = []  # reopen()s not run yet

    def start(self) -> None:
        self._thread.start()

    def reopen(self, move: Reopen, fresh: Collection[str]) -> None:
        """Run ``move`` on the watcher's thread after its current read (within ~0.5 s); the
        maps ``fresh`` names are new objects. Its outcome comes out of ``take`` as a
        ``Reopened``."""
        with self._lock:
            self._moves.append((move, tuple(fresh)))

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._move()
                batch = self._watcher.read(0.5)
                if batch:
                    self._put(batch)
        except BaseException as err:  # surfaced to the loop: the agent cannot run blind
            if self._closed.is_set():
                return  # closing the watcher under a read may fail that read
            log.exception("watcher failed")
            self.error = err
            self._loop.call_soon_threadsafe(self._ready.set)

    def _move(self) -> None:
        with self._lock:
            moves, self._moves = self._moves, []
        for move, fresh in moves:
            try:
                watcher, left, baselines = move(self._watcher)
            except Exception as err:  # the agent keeps the old objects and tries again
                log.warning("the watcher could not move to the new maps %s: %s",
                            ", ".join(fresh), err)
                self._hand_over(Reopened(fresh, error=err))
                continue
            self._watcher = watcher
            if left:
                self._put(left)
            with self._lock:
                for name in fresh:  # changes of the replaced objects
                    self._pending.pop(name, None)
            self._hand_over(Reopened(fresh, baselines, watcher))

    def _hand_over(self, event: Reopened) -> None:
        with self._lock:
            wake = not self._pending and not self._other
            self._other.append(event)
        if wake:
            self._loop.call_soon_threadsafe(self._ready.set)

    def _put(self, batch: list[WatchEvent]) -> None:
        changes = cast("list[Change]", batch)
        other: list[WatchEvent] = []
        if not all(type(ev) is Change for ev in batch):  # Overflows: rare, kept in order
            changes = [ev for ev in batch if isinstance(ev, Change)]
            other = [ev for ev in batch if type(ev) is not Change]
        with self._lock:
            pending = self._pending
            wake = not pending and not self._other
            if changes:
                first = changes[0].map
                if all(c.map == first for c in changes):  # a watcher batch is one map's
                    queue = pending.get(first)
                    if queue is None:
                        queue = pending[first] = {}
                    before = len(queue)
                    # merged in one call (a million changes a second): a queued key keeps its
                    # place
                    queue.update(zip(map(_KEY, changes), changes, strict=True))
                    self.coalesced += len(changes) - (len(queue) - before)
                else:
                    for c in changes:
                        queue = pending.setdefault(c.map, {})
                        self.coalesced += c.key in queue
                        queue[c.key] = c
            self._other += other
        if wake:
            self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self, limit: int) -> list[WatchEvent | Reopened]:
        """Wait for events; return the waiting non-change events (``Reopened`` among them) and
        up to ``limit`` changes, oldest-queued first (raises if the watcher died)."""
        await self._ready.wait()
        with self._lock:
            events, self._other = self._other, []
            pending = self._pending
            room = limit
            for name in list(pending):
                if not room:
                    break
                queue = pending[name]
                if len(queue) <= room:
                    events += queue.values()
                    room -= len(queue)
                    del pending[name]
                    continue
                # one pass, then delete: popping the first key repeatedly rescans dead slots
                taken = list(itertools.islice(queue.items(), room))
                for key, _ in taken:
                    del queue[key]
                events += (ev for _, ev in taken)
                pending[name] = pending.pop(name)  # the next slice starts with the next map
                break
            if not pending:
                self._ready.clear()
        if self.error is not None:
            raise self.error
        return events

    def close(self) -> None:
        self._closed.set()
        self._watcher.close()
        if self._thread.ident is not None:  # an agent stopped while starting never ran it
            self._thread.join(timeout=5)
