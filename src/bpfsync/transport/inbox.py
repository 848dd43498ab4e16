"""The queue between a transport and the agent: one ordered stream of events, one consumer.

Received messages are bounded, in number and in frame bytes: a producer awaits ``put_message``
while ``max_messages`` or ``max_bytes`` are pending (one message always fits, however large), so
a slow agent stops the transport reading from its peers, and gRPC flow control pushes that back
to the senders. Without the byte bound, 1024 pending frames of 16 MiB would be 16 GiB.
Connection events (PeerUp/PeerDown) are never bounded and never block, so
a link can always report going down, even while the agent is behind.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from bpfsync.transport.base import Event, Received, Streamed

__all__ = ["Inbox"]


class Inbox:
    def __init__(self, max_messages: int = 1024, max_bytes: int = 64 << 20) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("max_messages and max_bytes must be at least 1")
        self._max = max_messages
        self._max_bytes = max_bytes
        self._queue: deque[tuple[Event, int]] = deque()
        self._messages = 0  # Received events in _queue
        self._bytes = 0  # ... and the sizes their producers gave
        self._nonempty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False
        self._failure: BaseException | None = None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def put_event(self, event: Event) -> None:
        """Queue an event without waiting, past the bound if need be. Dropped after ``close``.

        For connection events; MemoryTransport also delivers messages this way (it has no
        network to push back on).
        """
        if not self._closed:
            if isinstance(event, Received | Streamed):
                self._messages += 1
            self._queue.append((event, 0))
            self._nonempty.set()

    async def put_message(self, event: Received | Streamed, nbytes: int = 0) -> None:
        """Queue a received message of ``nbytes`` (its frame), waiting while the queue holds
        ``max_messages`` of them or ``max_bytes``."""
        while not self._closed and (
            self._messages >= self._max
            or (self._messages and self._bytes + nbytes > self._max_bytes)
        ):
            self._room.clear()
            await self._room.wait()
        if self._closed:
            return
        self._messages += 1
        self._bytes += nbytes
        self._queue.append((event, nbytes))
        self._nonempty.set()

    async def get(self) -> Event | None:
        """The next event, or None once the inbox is closed; raises what ``fail`` was given."""
        while not self._queue:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                return None
            self._nonempty.clear()
            await self._nonempty.wait()
        event, nbytes = self._queue.popleft()
        if isinstance(event, Received | Streamed):
            self._messages -= 1
            self._bytes -= nbytes
            self._room.set()
        return event

    def fail(self, error: BaseException) -> None:
        """The transport cannot go on: the consumer gets ``error`` once what is queued is read."""
        self._failure = error
        self._nonempty.set()

    def close(self) -> None:
        """Drop what is pending, wake every waiter; ``get`` returns None from now on."""
        self._closed = True
        self._queue.clear()
        self._messages = self._bytes = 0
        self._nonempty.set()
        self._room.set()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.get()) is not None:
            yield event
