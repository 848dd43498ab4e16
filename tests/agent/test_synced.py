"""Folding per-CPU values into one node slot (pure logic: no kernel needed)."""

from __future__ import annotations

import struct

from bpfsync.agent.synced import fold_percpu
from bpfsync.core.merge import FieldRule

# struct { __u64 window; __u64 count; __u64 last_seen; } per CPU, each padded to 8 (already is)
V = struct.Struct("<QQQ")
RULES = (FieldRule(0, 8, "epoch"), FieldRule(8, 8, "counter"), FieldRule(16, 8, "max"))


def _raw(*cpus: tuple[int, int, int]) -> bytes:
    return b"".join(V.pack(*c) for c in cpus)


def test_counts_summed_and_max_taken_over_cpus() -> None:
    raw = _raw((5, 10, 100), (5, 3, 300), (5, 0, 0), (5, 7, 200))
    assert V.unpack(fold_percpu(raw, V.size, 4, RULES)) == (5, 20, 300)


def test_cpus_still_in_an_old_window_do_not_count() -> None:
    raw = _raw((6, 2, 900), (5, 50, 950), (6, 1, 800), (0, 0, 0))
    assert V.unpack(fold_percpu(raw, V.size, 4, RULES)) == (6, 3, 900)


def test_padding_between_cpu_values_is_skipped() -> None:
    small = struct.Struct("<I")  # a 4-byte counter: each CPU's value is padded to 8 bytes
    raw = b"".join(small.pack(n) + b"\xff" * 4 for n in (1, 2, 3))
    assert fold_percpu(raw, 4, 3, (FieldRule(0, 4, "counter"),)) == small.pack(6)
