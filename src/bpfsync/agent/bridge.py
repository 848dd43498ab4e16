"""Carries a blocking watcher's events into the agent's asyncio loop.

The watcher runs in its own thread (ring-buffer reads and batch scans block) and is read in
batches. Each batch is appended to a list under a lock and the loop is woken once per burst, not
once per event, so a burst of a million changes costs one wake-up and one list swap.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING

from bpfsync.model import WatchEvent

if TYPE_CHECKING:
    from bpfsync.agent.watchers import BatchWatcher

log = logging.getLogger(__name__)


class WatchBridge:
    def __init__(self, watcher: BatchWatcher, loop: asyncio.AbstractEventLoop) -> None:
        self._watcher = watcher
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[WatchEvent] = []
        self._ready = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="bpfsync-watch", daemon=True)
        self.error: BaseException | None = None
        self._closed = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                batch = self._watcher.read(0.5)
                if not batch:
                    continue
                with self._lock:
                    wake = not self._pending
                    self._pending += batch
                if wake:
                    self._loop.call_soon_threadsafe(self._ready.set)
        except BaseException as err:  # surfaced to the loop: the agent cannot run blind
            if self._closed.is_set():
                return  # closing the watcher under a read may fail that read
            log.exception("watcher failed")
            self.error = err
            self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self) -> list[WatchEvent]:
        """Wait for events and return every one pending (raises if the watcher died)."""
        await self._ready.wait()
        with self._lock:
            events, self._pending = self._pending, []
            self._ready.clear()
        if self.error is not None:
            raise self.error
        return events

    def close(self) -> None:
        self._closed.set()
        self._watcher.close()
        self._thread.join(timeout=5)
