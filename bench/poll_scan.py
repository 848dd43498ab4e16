"""Benchmark the map layer and the poll watcher on a 1M-entry u64 -> u64 hash map (needs root).

Prints: batch update rate, full dump rate, and poll scan + diff time when nothing changed, when 1%
of the values changed (user-space updates: positions shift inside buckets, the sorted path), and
with 1% deletions plus 1% new keys; then the same 1% change on a 1M-entry array (positions stay:
the stable path). Each figure is the best of a few runs.

    .venv/bin/python bench/poll_scan.py [--entries 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from bpfsync.kernel.maps import Map
from bpfsync.watch.poll import MapPoller


@contextmanager
def scratch_map(kind: str, key: int, value: int, entries: int) -> Iterator[Map]:
    pin_dir = tempfile.mkdtemp(prefix="bpfsync-bench-", dir="/sys/fs/bpf")
    try:
        pin = os.path.join(pin_dir, "m")
        subprocess.run(
            [
                "bpftool",
                "map",
                "create",
                pin,
                "type",
                kind,
                "key",
                str(key),
                "value",
                str(value),
                "entries",
                str(entries),
                "name",
                "bench",
            ],
            check=True,
        )
        with Map.open_pinned(pin) as m:
            yield m
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


def best(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def poll_time(poller: MapPoller, mutate: Callable[[], None], repeat: int) -> tuple[float, int]:
    """Best scan+diff time after ``mutate``, and the number of changes reported."""
    results = []
    for _ in range(repeat):
        poller.poll()  # baseline
        mutate()
        start = time.perf_counter()
        changes = poller.poll()
        results.append((time.perf_counter() - start, len(changes)))
    return min(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n, repeat = args.entries, args.repeat
    rng = np.random.default_rng(7)
    keys = rng.choice(np.iinfo(np.int64).max, size=n, replace=False).astype(np.uint64)
    values = np.arange(n, dtype=np.uint64)
    one_pct = max(1, n // 100)

    with scratch_map("hash", 8, 8, n) as m:
        t = best(repeat, lambda: m.update_batch(keys, values))
        print(f"hash  batch update      {n / t / 1e6:6.2f} M entries/s  ({t * 1e3:.0f} ms)")
        t = best(repeat, m.dump)
        assert m.dump().count == n
        print(f"hash  batch dump        {n / t / 1e6:6.2f} M entries/s  ({t * 1e3:.0f} ms)")

        poller = MapPoller("bench", m)
        t, count = poll_time(poller, lambda: None, repeat)
        print(f"hash  poll, no change   {t * 1e3:6.0f} ms  ({count} changes)")

        def change_values() -> None:
            idx = rng.choice(n, size=one_pct, replace=False)
            values[idx] += 1
            m.update_batch(keys[idx], values[idx])

        t, count = poll_time(poller, change_values, repeat)
        print(f"hash  poll, 1% updated  {t * 1e3:6.0f} ms  ({count} changes)")
        print(
            f"      (scan {poller.last_scan_seconds * 1e3:.0f} ms,"
            f" diff {poller.last_diff_seconds * 1e3:.0f} ms)"
        )

        fresh = iter(range(1, 1 << 30))

        def churn() -> None:
            nonlocal keys, values
            idx = rng.choice(n, size=one_pct, replace=False)
            m.delete_batch(keys[idx])
            new = np.fromiter((next(fresh) for _ in range(one_pct)), np.uint64) | np.uint64(1 << 63)
            m.update_batch(new, values[idx])
            keys = keys.copy()
            keys[idx] = new

        t, count = poll_time(poller, churn, repeat)
        print(f"hash  poll, 1% del+new  {t * 1e3:6.0f} ms  ({count} changes)")

    with scratch_map("array", 4, 8, n) as a:
        idx_all = np.arange(n, dtype=np.uint32)
        a.update_batch(idx_all, values)
        poller = MapPoller("bench", a)

        def change_array() -> None:
            idx = rng.choice(n, size=one_pct, replace=False).astype(np.uint32)
            values[idx] += 1
            a.update_batch(idx, values[idx])

        t, count = poll_time(poller, change_array, repeat)
        print(f"array poll, 1% updated  {t * 1e3:6.0f} ms  ({count} changes)")
        print(
            f"      (scan {poller.last_scan_seconds * 1e3:.0f} ms,"
            f" diff {poller.last_diff_seconds * 1e3:.0f} ms)"
        )


if __name__ == "__main__":
    main()
