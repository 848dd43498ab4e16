"""GrpcEventLoop against the real grpcio: a busy loop keeps grpcio's wake-up socket drained.

Two GrpcMesh nodes on 127.0.0.1 exchange batches while a task keeps their loop busy in 5 ms
turns, as an agent's slices of local changes do. The control runs the same traffic with
grpcio's own reader: the bytes in its wake-up socket grow turn by turn (at ~280 the socket is
full, grpcio's poller thread blocks and every stream stalls). Should a grpcio release stop
leaking wake-ups, the control fails, and transport/eventloop.py can go.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from transport_harness import batch, closing, mesh

from bpfsync.transport import eventloop
from bpfsync.transport.eventloop import DrainingReader, GrpcEventLoop

BATCHES = 600


class Recording(DrainingReader):
    """The reader, noting how many bytes wait in the socket at each call."""

    drain = True
    seen: list[int] = []

    def __call__(self, *args: object) -> None:
        Recording.seen.append(self.pending())
        if self.drain:
            super().__call__(*args)
        else:  # grpcio's own behaviour: one byte a call
            self._read_one(*args)


class NotDraining(Recording):
    drain = False


async def busy_exchange() -> None:
    """a sends BATCHES batches to b while the loop is busy in 5 ms turns."""
    a, b = await mesh(["a", "b"])
    done = asyncio.Event()

    async def hog() -> None:
        while not done.is_set():
            end = time.perf_counter() + 0.005
            while time.perf_counter() < end:
                pass
            await asyncio.sleep(0)

    hogging = asyncio.create_task(hog())
    try:
        for seq in range(1, BATCHES + 1):
            assert a.mesh.send("b", batch("a", seq, n=50))
        got = await b.received("a", 1 + BATCHES)
        assert [m.seq for m in got[1:]] == list(range(1, BATCHES + 1))
    finally:
        done.set()
        await hogging
        await closing(a, b)


@pytest.mark.parametrize("reader", [Recording, NotDraining])
def test_a_busy_loop_keeps_grpc_wakeups_drained(
    reader: type[Recording], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eventloop, "DrainingReader", reader)
    monkeypatch.setattr(Recording, "seen", [])
    loops: list[GrpcEventLoop] = []

    def new_loop() -> GrpcEventLoop:
        loops.append(GrpcEventLoop())
        return loops[-1]

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(asyncio.wait_for(busy_exchange(), 120))
    wakeups: Any = loops[0].grpc_wakeups
    assert isinstance(wakeups, reader), "grpcio did not bind its wake-up reader to the loop"
    most = max(Recording.seen)
    if reader.drain:  # a few events a turn (every stream operation waits for the previous one)
        assert most < 32 and wakeups.dropped > 0, (most, wakeups.dropped)
    else:  # a byte or so more each turn: 129-160 in 400 turns here (full at ~280, then stalls)
        assert most >= 64, (most, len(Recording.seen))
