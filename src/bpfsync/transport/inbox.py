"""The queue between a transport and the agent: one ordered stream of events, one consumer.

Received messages are bounded: a producer awaits ``put_message`` while ``max_messages`` are
pending, so a slow agent stops the transport reading from its peers, and gRPC flow control pushes
that back to the senders. Connection events (PeerUp/PeerDown) are never bounded and never block, so
a link can always report going down, even while the agent is behind.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from bpfsync.transport.base import Event, Received

__all__ = ["Inbox"]


class Inbox:
    def __init__(self, max_messages: int = 1024) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self._max = max_messages
        self._queue: deque[Event] = deque()
        self._messages = 0  # Received events in _queue
        self._nonempty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def put_event(self, event: Event) -> None:
        """Queue an event without waiting, past the bound if need be. Dropped after ``close``.

        For connection events; MemoryTransport also delivers messages this way (it has no
        network to push back on).
        """
        if not self._closed:
            if isinstance(event, Received):
                self._messages += 1
            self._queue.append(event)
            self._nonempty.set()

    async def put_message(self, event: Received) -> None:
        """Queue a received message, waiting while the queue holds ``max_messages`` of them."""
        while self._messages >= self._max and not self._closed:
            self._room.clear()
            await self._room.wait()
        if self._closed:
            return
        self._messages += 1
        self._queue.append(event)
        self._nonempty.set()

    async def get(self) -> Event | None:
        """The next event, or None once the inbox is closed."""
        while not self._queue:
            if self._closed:
                return None
            self._nonempty.clear()
            await self._nonempty.wait()
        event = self._queue.popleft()
        if isinstance(event, Received):
            self._messages -= 1
            self._room.set()
        return event

    def close(self) -> None:
        """Drop what is pending, wake every waiter; ``get`` returns None from now on."""
        self._closed = True
        self._queue.clear()
        self._messages = 0
        self._nonempty.set()
        self._room.set()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.get()) is not None:
            yield event
