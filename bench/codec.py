"""Encode and decode rate of the transport codec on realistic batches (records per second).

    .venv/bin/python bench/codec.py [--records 4096] [--seconds 2]

Batches look like a rate-limit map's traffic: 16-byte keys, 24-byte values, one map, stamps from
three origin nodes, one record in ten a delete. The target for the whole agent is 200k records/s;
the codec should take a small share of one core at that rate.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from bpfsync.core.messages import Batch, Record, Stamp
from bpfsync.transport.codec import decode, encode


def make_batch(n: int, sender: str = "node-0") -> Batch:
    base = time.time_ns()
    records = tuple(
        Record(
            map="ratelimit",
            key=os.urandom(16),
            value=None if i % 10 == 0 else os.urandom(24),
            stamp=Stamp(wall=base + i, logical=i % 4, node=f"node-{i % 3}"),
        )
        for i in range(n)
    )
    return Batch(sender=sender, seq=1, records=records)


def rate(fn: Callable[[], object], per_call: int, seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return calls * per_call / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=4096, help="records per batch")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = ap.parse_args()

    batch = make_batch(args.records)
    frame = encode(batch)
    assert decode(frame) == batch
    enc = rate(lambda: encode(batch), args.records, args.seconds)
    dec = rate(lambda: decode(frame), args.records, args.seconds)
    print(f"batch of {args.records} records: {len(frame)} bytes "
          f"({len(frame) / args.records:.1f} bytes/record)")
    print(f"encode: {enc:12,.0f} records/s")
    print(f"decode: {dec:12,.0f} records/s")


if __name__ == "__main__":
    main()
