"""End-to-end rate of the gRPC mesh: records/s from one node to another on 127.0.0.1.

    .venv/bin/python bench/mesh.py [--records 4096] [--seconds 3]

Both nodes run in this one process and event loop, so one core does the sender's encoding and
writing and the receiver's reading and decoding: a pessimistic figure for two real nodes. The
sender paces itself on its link's queued_bytes, as an agent should.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from codec import make_batch  # bench/codec.py, beside this file

from bpfsync.core.messages import Hello
from bpfsync.transport import GrpcMesh, PeerUp, Received


async def main(records: int, seconds: float) -> None:
    b = GrpcMesh(Hello("b", 1, ()), "127.0.0.1:0")
    await b.start()
    a = GrpcMesh(Hello("a", 1, ()), "127.0.0.1:0", [f"127.0.0.1:{b.port}"])
    await a.start()
    async for ev in a.events():
        if isinstance(ev, PeerUp):
            break

    batch = make_batch(records, sender="a")
    received = 0

    async def receive() -> None:
        nonlocal received
        async for ev in b.events():
            if isinstance(ev, Received):
                received += len(getattr(ev.message, "records", ()))

    reader = asyncio.create_task(receive())
    start = time.perf_counter()
    sent = 0
    while time.perf_counter() - start < seconds:
        if a.peers()[0].queued_bytes > 4 << 20:  # pace: keep a few MiB in flight at most
            await asyncio.sleep(0.001)
            continue
        if a.send("b", batch):
            sent += records
        await asyncio.sleep(0)
    while received < sent and time.perf_counter() - start < seconds + 10:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    print(f"batches of {records} records: {received / elapsed:12,.0f} records/s delivered "
          f"({received} of {sent} in {elapsed:.1f} s)")
    reader.cancel()
    await a.close()
    await b.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    asyncio.run(main(args.records, args.seconds))
