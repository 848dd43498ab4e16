"""The small parts of the transport: backoff, the inbox, the public surface."""

from __future__ import annotations

import asyncio
import random

import pytest
from aio import run

import bpfsync.transport
from bpfsync.core.messages import Ack, Hello
from bpfsync.transport.backoff import Backoff
from bpfsync.transport.base import PeerDown, PeerUp, Received
from bpfsync.transport.inbox import Inbox


def test_public_surface() -> None:
    assert sorted(bpfsync.transport.__all__) == [
        "Event", "GrpcMesh", "Limits", "MeshOptions", "OversizedMessageError", "PeerDown",
        "PeerState", "PeerUp", "Received", "TlsFiles", "Transport", "decode", "encode",
    ]


def test_backoff_full_jitter_doubles_to_the_cap_and_resets() -> None:
    b = Backoff(0.05, 2.0, random.Random(1))
    delays = [b.next() for _ in range(12)]
    ceilings = [min(2.0, 0.05 * 2**i) for i in range(12)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[8:]) > 0.5  # the ceiling did grow
    b.reset()
    assert b.next() <= 0.05
    with pytest.raises(ValueError):
        Backoff(1.0, 0.5)


def test_inbox_bounds_messages_but_never_connection_events() -> None:
    async def go() -> None:
        inbox = Inbox(max_messages=2)
        hello = Hello("a", 1, ())
        await inbox.put_message(Received("a", Ack(1)))
        await inbox.put_message(Received("a", Ack(2)))
        third = asyncio.create_task(inbox.put_message(Received("a", Ack(3))))
        await asyncio.sleep(0)
        assert not third.done()  # full: the producer waits
        inbox.put_event(PeerUp("b", hello))  # ... but connection events never wait
        assert inbox.pending == 3

        first = await inbox.get()
        assert isinstance(first, Received) and first.message == Ack(1)
        await asyncio.wait_for(third, 10)  # room again
        got = [await inbox.get() for _ in range(3)]
        assert got == [Received("a", Ack(2)), PeerUp("b", hello), Received("a", Ack(3))]

    run(go)


def test_inbox_close_wakes_everyone_and_ends_iteration() -> None:
    async def go() -> None:
        inbox = Inbox(max_messages=1)
        await inbox.put_message(Received("a", Ack(1)))
        blocked = asyncio.create_task(inbox.put_message(Received("a", Ack(2))))
        consumer = asyncio.create_task(_drain(inbox))
        await asyncio.sleep(0)
        inbox.close()
        await asyncio.wait_for(blocked, 10)
        await asyncio.wait_for(consumer, 10)
        inbox.put_event(PeerDown("a", None))  # dropped after close
        assert await inbox.get() is None

    run(go)


async def _drain(inbox: Inbox) -> list[object]:
    return [e async for e in inbox]
