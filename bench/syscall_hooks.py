"""What the bpf(2) syscall hooks cost everyone else: ns added to every syscall on the machine.

    .venv/bin/python bench/syscall_hooks.py

The sys_enter/sys_exit tracepoints fire for every syscall of every process, and return at
once unless it is bpf(2). This times a tight loop of getppid() (the cheapest syscall) and of
BPF_MAP_UPDATE_ELEM on an unwatched map, without and with a TraceWatcher (SYSCALL hooks) watching
another map; the median of several rounds each. Also prints the hooks' delivery rate for
user-space batch writes of a watched map (elements/s through the ring into numpy, packed
several to a record).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from bpfsync.kernel.info import MapType
from bpfsync.kernel.maps import Map
from bpfsync.watch.trace import Hooks, TraceWatcher

ROUNDS, CALLS = 7, 200_000


def _ns_per_call(fn: object, n: int) -> float:
    call = fn  # type: ignore[assignment]
    t = time.perf_counter_ns()
    for _ in range(n):
        call()  # type: ignore[operator]
    return (time.perf_counter_ns() - t) / n


def _median(fn: object, n: int) -> float:
    return statistics.median(_ns_per_call(fn, n) for _ in range(ROUNDS))


def run() -> dict[str, float]:
    watched = Map.create(MapType.HASH, 4, 16, 1 << 17, name="bench_watched")
    other = Map.create(MapType.HASH, 4, 16, 16, name="bench_other")
    key, value = bytes(4), bytes(16)
    try:
        base_sys = _median(os.getppid, CALLS)
        base_bpf = _median(lambda: other.update(key, value), CALLS // 4)
        with TraceWatcher({"w": watched}, agent_tgid=0, hooks=Hooks.SYSCALL) as w:
            hooked_sys = _median(os.getppid, CALLS)
            hooked_bpf = _median(lambda: other.update(key, value), CALLS // 4)
            keys = np.arange(100_000, dtype=np.uint32)
            vals = np.zeros((100_000, 2), np.uint64)
            got = 0
            t = time.perf_counter()
            for i in range(0, 100_000, 10_000):  # 10k per batch: well inside the 8 MiB ring
                watched.update_batch(keys[i : i + 10_000], vals[i : i + 10_000])
                while got < i + 10_000:
                    got += int(w.read_records(timeout=1.0)["count"].sum())  # packed
            rate = got / (time.perf_counter() - t)
    finally:
        watched.close()
        other.close()
    return {"getppid_ns": base_sys, "getppid_hooked_ns": hooked_sys,
            "bpf_update_ns": base_bpf, "bpf_update_hooked_ns": hooked_bpf,
            "batch_elements_per_s": rate}


if __name__ == "__main__":
    r = run()
    print(f"getppid: {r['getppid_ns']:.0f} ns -> {r['getppid_hooked_ns']:.0f} ns with the hooks;"
          f" bpf(2) update of an unwatched map: {r['bpf_update_ns']:.0f} ns -> "
          f"{r['bpf_update_hooked_ns']:.0f} ns; watched batch writes delivered "
          f"{r['batch_elements_per_s'] / 1e6:.2f} M elements/s")
