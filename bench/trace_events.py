"""Benchmark the trace path into Python: the host ring reader, and the whole tracer in the VM.

Host (fexit is refused here, so an XDP program fills the ring through BPF_PROG_TEST_RUN with the
tracer's 528-byte records; tests/bpf/ringbuf_producer.bpf.c):
  - drain:  a pre-filled ring read to empty by ``RingBuffer.read`` (numpy records);
  - decode: those records turned into ``Change`` objects, as ``TraceWatcher.read`` does;
  - live:   a producer process and the reader running at once: delivered/s and records dropped.
VM (Debian 6.1 under TCG, ~10x slower than the host; tests/vm/runner.py): BPF map updates made
by tests/bpf/trace_writer.bpf.c `burst` (test runs) are reported by the fexit programs and read
with ``TraceWatcher.read`` (Change objects) and ``read_records`` (raw numpy records): live, from a
producer process (its speed under TCG bounds the figure), and from a 100k-record backlog (the
watcher's own ceiling in the VM).

    .venv/bin/python bench/trace_events.py [--seconds 3] [--no-vm]
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np

from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject
from bpfsync.kernel.ringbuf import RingBuffer
from bpfsync.watch.trace import TraceWatcher, _Watched
from bpfsync.watch.trace_abi import RECORD

ROOT = Path(__file__).resolve().parents[1]
PRODUCER = ROOT / "tests" / "bpf" / "ringbuf_producer.bpf.o"
WRITER = ROOT / "tests" / "bpf" / "trace_writer.bpf.o"
GUEST_MARKER = "BENCH-GUEST"


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds / 1e6:6.2f} M/s"


def producer(ring_bytes: int) -> tuple[BpfObject, Map, Map]:
    obj = BpfObject.open(PRODUCER)
    obj.map_spec("ring").set_max_entries(ring_bytes)
    obj.load()
    return obj, obj.map("ring"), obj.map("stats")


def stat(stats: Map, slot: int) -> int:
    raw = stats.lookup(struct.pack("<I", slot))
    return int(np.frombuffer(raw or b"", "<u8").sum())


def host_drain_and_decode(rounds: int = 5) -> None:
    obj, ring, _ = producer(1 << 26)  # 64 MiB: 125k records
    rb = RingBuffer(ring.fd, ring.max_entries, RECORD)
    prog = obj.program("produce")
    cmd = struct.pack("<II", 64, 0) + bytes(56)
    watcher = TraceWatcher.__new__(TraceWatcher)  # decode only: no kernel side
    watcher._watched = {}
    best_drain = best_decode = 0.0
    for _ in range(rounds):
        prog.test_run(cmd, repeat=1900)  # 121,600 records
        start = time.perf_counter()
        batches = []
        while len(batch := rb.read()):
            batches.append(batch)
        drain_s = time.perf_counter() - start
        n = sum(len(b) for b in batches)
        best_drain = max(best_drain, n / drain_s)
        for b in batches:  # every record counts as map 7: 8-byte keys, 8-byte values
            b["map_id"] = 7
        watcher._watched = {7: _Watched("m", None, 8, 8, False)}  # type: ignore[arg-type]
        start = time.perf_counter()
        events = sum(len(watcher._decode(b)) for b in batches)
        best_decode = max(best_decode, events / (time.perf_counter() - start))
    best = f"best of {rounds}"
    print(f"host  ring drain  (numpy records, 528 B): {best_drain / 1e6:6.2f} M/s  {best}")
    print(f"host  decode      (records -> Change):    {best_decode / 1e6:6.2f} M/s  {best}")
    rb.close()
    ring.close()
    obj.close()


def host_live(seconds: float) -> None:
    obj, ring, stats = producer(1 << 24)
    rb = RingBuffer(ring.fd, ring.max_entries, RECORD)
    prog = obj.program("produce")
    cmd = struct.pack("<II", 64, 0) + bytes(56)
    pid = os.fork()
    if pid == 0:  # the producer: a process of its own, so the GIL is not shared
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            prog.test_run(cmd, repeat=200)
        os._exit(0)
    start = time.perf_counter()
    got = 0
    while True:
        got += len(rb.poll(0.05))
        if os.waitpid(pid, os.WNOHANG)[0]:
            while len(batch := rb.read()):
                got += len(batch)
            break
    elapsed = time.perf_counter() - start
    submitted, dropped = stat(stats, 0), stat(stats, 2)
    produced = submitted + dropped
    print(
        f"host  live        (producer process):     {rate(got, elapsed)} delivered, "
        f"{rate(produced, elapsed)} produced, {100 * dropped / max(produced, 1):.1f}% dropped"
    )
    rb.close()
    ring.close()
    stats.close()
    obj.close()


def guest(seconds: float) -> None:
    """Inside the VM: fexit-reported map updates into Python, live and from a backlog."""
    with BpfObject.open(WRITER) as obj:
        obj.load()
        burst = obj.program("burst")
        with obj.map("w_burst") as target:
            for raw in (False, True):
                kind = "records" if raw else "changes"
                w = TraceWatcher({"burst": target}, ring_size=1 << 26)
                w.start()

                def read(timeout: float, w: TraceWatcher = w, raw: bool = raw) -> int:
                    return len(w.read_records(timeout) if raw else w.read(timeout))

                # live: a producer process (not the agent: its writes are reported)
                pid = os.fork()
                if pid == 0:
                    end = time.monotonic() + seconds
                    while time.monotonic() < end:
                        burst.test_run(bytes(64), repeat=2000)
                    os._exit(0)
                start = time.perf_counter()
                got = 0
                while True:
                    got += read(0.05)
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        while n := read(0):
                            got += n
                        break
                elapsed = time.perf_counter() - start
                s = w.stats()
                print(f"{GUEST_MARKER} live-{kind} {got} {elapsed:.3f} dropped={s.dropped}")
                # backlog: 100k records already in the ring, read as fast as the watcher can
                burst.test_run(bytes(64), repeat=100_000)  # test runs are no own writes
                start = time.perf_counter()
                got = 0
                while n := read(0):
                    got += n
                elapsed = time.perf_counter() - start
                print(f"{GUEST_MARKER} backlog-{kind} {got} {elapsed:.3f} dropped={s.dropped}")
                w.close()
            sys.stdout.flush()


def vm(seconds: float) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "vm"))
    from runner import run

    command = f"{ROOT}/.venv/bin/python bench/trace_events.py --guest --seconds {seconds}"
    result = run(command, env={"PYTHONDONTWRITEBYTECODE": "1"}, timeout=900)
    lines = re.findall(rf"{GUEST_MARKER} ([\w-]+) (\d+) ([\d.]+) (.*)", result.output)
    if result.status or len(lines) != 4:
        raise SystemExit(f"the VM benchmark failed (exit {result.status}):\n{result.output}")
    for kind, n, elapsed, extra in lines:
        how, what = kind.split("-")
        path = "TraceWatcher.read -> Change" if what == "changes" else "read_records (numpy)"
        label = "producer process" if how == "live" else "backlog of 100k"
        print(f"vm    fexit, {label:16s} -> {path:28s} {rate(int(n), float(elapsed))}  ({extra})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--no-vm", action="store_true", help="host figures only")
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)  # inside the VM
    args = ap.parse_args()
    if args.guest:
        guest(args.seconds)
        return
    host_drain_and_decode()
    host_live(args.seconds)
    if not args.no_vm:
        vm(args.seconds)


if __name__ == "__main__":
    main()
