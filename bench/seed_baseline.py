"""The seed design, reproduced for comparison: one unary gRPC call per change, over a NEW channel
(new TCP connection + HTTP/2 handshake) per call, to ONE peer, 4-byte key + 4-byte value.

The peer is a separate process (a real grpc.server with a generic handler on raw bytes, applying
each change to a dict), like a real second node. The client measures changes/s and the per-change
latency (call start -> peer has applied it and answered).

    .venv/bin/python bench/seed_baseline.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import struct
import time
from concurrent import futures

import grpc

METHOD = "/seed.Sync/Put"
KV = struct.Struct("<II")


def _serve(port_q: mp.Queue, stop: mp.Event) -> None:  # type: ignore[type-arg]
    table: dict[int, int] = {}

    def put(request: bytes, context: grpc.ServicerContext) -> bytes:
        k, v = KV.unpack(request)
        table[k] = v
        return b"\x01"

    handler = grpc.method_handlers_generic_handler(
        "seed.Sync", {"Put": grpc.unary_unary_rpc_method_handler(put)}
    )  # no (de)serializers: raw bytes in and out
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_q.put(port)
    stop.wait()
    server.stop(0)


def run(seconds: float) -> dict[str, float]:
    """Changes/s and latency percentiles (ms) of the seed design over ``seconds``."""
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(q, stop), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=30)
        target = f"127.0.0.1:{port}"
        lat: list[float] = []
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            with grpc.insecure_channel(target) as ch:  # a NEW connection per change
                ch.unary_unary(METHOD)(KV.pack(n, n * 7), timeout=5)
            lat.append(time.perf_counter() - t0)
            n += 1
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3

    return {"updates": n, "seconds": elapsed, "rate": n / elapsed,
            "p50_ms": pct(50), "p99_ms": pct(99), "p999_ms": pct(99.9)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    r = run(ap.parse_args().seconds)
    print(f"seed: {r['rate']:,.0f} changes/s ({r['updates']} in {r['seconds']:.1f} s); latency "
          f"p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms p99.9 {r['p999_ms']:.2f} ms")
