"""The trace watcher's bpf(2) syscall hooks, on this host's real kernel (which refuses fexit but
runs BTF tracepoints): every write made from user space is reported with its exact bytes, the
watcher's own process is suppressed, failed commands are not reported, and what the hooks cannot
see (BPF programs' writes, oversized batches) is left to the poll or turned into ``Overflow``.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from bpfsync.demo.cluster import wait_for
from bpfsync.errors import KernelError
from bpfsync.kernel import _libbpf
from bpfsync.kernel.maps import Map, UpdateFlags
from bpfsync.kernel.objects import BpfObject
from bpfsync.model import Change, Overflow, Seen, WatchEvent
from bpfsync.watch.auto import AutoWatcher
from bpfsync.watch.trace import Hooks, TraceWatcher
from bpfsync.watch.trace_abi import BATCH_MAX

MakeMap = Callable[..., Map]
Watch = Callable[..., tuple[Map, TraceWatcher]]


def k(n: int) -> bytes:
    return struct.pack("<I", n)


def v(n: int) -> bytes:
    return struct.pack("<Q", n)


def changes(w: TraceWatcher | AutoWatcher, want: int, timeout: float = 5.0) -> list[WatchEvent]:
    out: list[WatchEvent] = []

    def enough() -> bool:
        out.extend(w.read(timeout / 50))
        return len(out) >= want

    wait_for(enough, timeout, every=0)  # the read itself waits
    return out


@pytest.fixture
def watch(make_map: MakeMap) -> Iterator[Watch]:
    made: list[TraceWatcher] = []

    def start(kind: str = "hash", value: int = 8, agent_tgid: int = 0) -> tuple[Map, TraceWatcher]:
        m = make_map(kind, 4, value, 1 << 17)
        w = TraceWatcher({"m": m}, agent_tgid=agent_tgid, hooks=Hooks.SYSCALL)
        made.append(w)
        w.start()
        return m, w

    yield start
    for w in made:
        w.close()


def test_auto_falls_back_to_the_syscall_hooks_where_fexit_is_refused(make_map: MakeMap) -> None:
    with TraceWatcher({"m": make_map("hash", 4, 8, 16)}, agent_tgid=0) as w:
        if w.hooks is Hooks.FEXIT:
            pytest.fail("this host allows fexit: the fallback is not exercised here")
        assert w.hooks is Hooks.SYSCALL and not w.sees_programs
        assert "fexit" in w.refused and "EPERM" in w.refused
        assert w.attached == ["sys_enter", "sys_exit"]


def test_single_updates_and_deletes_are_reported_with_their_bytes(watch: Watch) -> None:
    m, w = watch()
    m.update(k(1), v(10))
    m.update(k(1), v(11))
    m.delete(k(1))
    m.update(k(2), v(20))
    assert changes(w, 4) == [
        Change("m", k(1), v(10), Seen.TRACE),
        Change("m", k(1), v(11), Seen.TRACE),
        Change("m", k(1), None, Seen.TRACE),
        Change("m", k(2), v(20), Seen.TRACE),
    ]
    # lookup-and-delete removes the key too (no Map method: libbpf directly)
    value = ctypes.create_string_buffer(8)
    ret = _libbpf.lib().bpf_map_lookup_and_delete_elem(m.fd, k(2), value)
    assert ret == 0 and value.raw == v(20)
    assert changes(w, 1) == [Change("m", k(2), None, Seen.TRACE)]


def test_failed_commands_are_not_reported(watch: Watch) -> None:
    m, w = watch()
    m.update(k(1), v(1))
    assert changes(w, 1) == [Change("m", k(1), v(1), Seen.TRACE)]
    with pytest.raises(KernelError):
        m.update(k(1), v(2), UpdateFlags.NOEXIST)  # EEXIST
    assert not m.delete(k(99))  # ENOENT
    m.update(k(3), v(3))  # a marker: everything before it has been read by then
    assert changes(w, 1) == [Change("m", k(3), v(3), Seen.TRACE)]


def test_batches_are_reported_element_by_element(watch: Watch) -> None:
    m, w = watch()
    keys = np.arange(5000, dtype=np.uint32)
    m.update_batch(keys, keys.astype(np.uint64) * 7)
    got = changes(w, 5000)
    assert got == [Change("m", k(i), v(7 * i), Seen.TRACE) for i in range(5000)]
    m.delete_batch(keys[:100].tobytes(), 100)
    assert changes(w, 100) == [Change("m", k(i), None, Seen.TRACE) for i in range(100)]
    # packed: 32 updates of a 4-byte key and an 8-byte value per record, 64 deletes
    assert w.stats().submitted == 157 + 2 and w.stats().dropped == 0


def test_batch_records_pack_sizes_that_do_not_divide_the_record(watch: Watch) -> None:
    """24-byte values: 10 to a record (256 // 24), the last record of a batch part-filled;
    a single update between two batches is a record of its own, in its place."""
    m, w = watch(value=24)

    def val(i: int) -> bytes:
        return struct.pack("<QQQ", i, ~i & 0xFFFF_FFFF_FFFF_FFFF, 3 * i)

    keys = np.arange(1001, dtype=np.uint32)
    m.update_batch(keys, b"".join(val(i) for i in range(1001)))
    m.update(k(5000), val(5000))
    m.update_batch(keys[:3], b"".join(val(i + 7) for i in range(3)))
    m.delete_batch(keys[:130].tobytes(), 130)
    want = [Change("m", k(i), val(i), Seen.TRACE) for i in range(1001)]
    want += [Change("m", k(5000), val(5000), Seen.TRACE)]
    want += [Change("m", k(i), val(i + 7), Seen.TRACE) for i in range(3)]
    want += [Change("m", k(i), None, Seen.TRACE) for i in range(130)]
    assert changes(w, len(want)) == want
    assert w.stats().submitted == 101 + 1 + 1 + 3  # 130 deletes: 64 keys to a record


def test_records_of_two_maps_keep_the_order_of_the_writes(make_map: MakeMap) -> None:
    """Packed records of two maps of different sizes, read in one batch: each map's elements
    are unpacked with its own sizes and the changes come out in the order they were made."""
    small, big = make_map("hash", 4, 8, 1024), make_map("hash", 16, 100, 1024)
    with TraceWatcher({"s": small, "b": big}, agent_tgid=0, hooks=Hooks.SYSCALL) as w:
        want: list[WatchEvent] = []
        for round_ in range(3):
            keys = np.arange(70, dtype=np.uint32) + 100 * round_
            small.update_batch(keys, keys.astype(np.uint64))
            want += [Change("s", k(i), v(i), Seen.TRACE) for i in keys.tolist()]
            bkeys = [bytes([round_, i]) * 8 for i in range(5)]
            bvals = [bytes([i + 1]) * 100 for i in range(5)]
            big.update_batch(b"".join(bkeys), b"".join(bvals))
            want += [Change("b", kk, vv, Seen.TRACE) for kk, vv in zip(bkeys, bvals, strict=True)]
        time.sleep(0.1)  # everything in the ring before the first read: one mixed batch
        assert changes(w, len(want)) == want
        assert w.stats().submitted == 3 * (3 + 3)  # 32 and 2 elements to a record


def test_a_batch_beyond_the_limit_is_an_overflow(watch: Watch) -> None:
    m, w = watch()
    n = BATCH_MAX + 1
    keys = np.arange(n, dtype=np.uint32)
    m.update_batch(keys, keys.astype(np.uint64))
    got = changes(w, 1)
    assert got == [Overflow("m", 1)]  # the consumer must rescan (AutoWatcher does)


def test_the_agents_own_writes_are_suppressed_and_another_process_is_reported(
    watch: Watch, pin_dir: str
) -> None:
    m, w = watch(agent_tgid=os.getpid())
    m.update(k(1), v(1))
    m.update_batch(np.array([2, 3], np.uint32), np.array([2, 3], np.uint64))
    path = os.path.join(pin_dir, os.listdir(pin_dir)[0])
    key, value = k(4).hex(" ").split(), v(42).hex(" ").split()
    subprocess.run(["bpftool", "map", "update", "pinned", path, "key", "hex", *key,
                    "value", "hex", *value], check=True)  # fmt: skip
    assert changes(w, 1) == [Change("m", k(4), v(42), Seen.TRACE)]
    assert w.stats().suppressed == 2  # one per bpf(2) command


def test_per_cpu_values_are_read_back_from_the_map(watch: Watch) -> None:
    m, w = watch("percpu_hash")
    every_cpu = b"".join(v(i + 1) for i in range(m.value_stride // 8))
    m.update(k(5), every_cpu)
    assert changes(w, 1) == [Change("m", k(5), every_cpu, Seen.TRACE)]


def test_a_per_cpu_batch_packs_its_keys_and_the_values_are_read_back(watch: Watch) -> None:
    """A per-CPU batch's values are not captured: 64 of its 4-byte keys go to a record."""
    m, w = watch("percpu_hash")
    keys = np.arange(100, dtype=np.uint32)
    per_key = [b"".join(v(1000 * i + c) for c in range(m.value_stride // 8)) for i in range(100)]
    m.update_batch(keys, b"".join(per_key))
    assert changes(w, 100) == [Change("m", k(i), per_key[i], Seen.TRACE) for i in range(100)]
    assert w.stats().submitted == 2


def test_bpf_programs_writes_are_not_seen_by_the_hooks_but_by_the_poll(
    load_object: Callable[..., BpfObject],
) -> None:
    """A BPF program's write never enters bpf(2): the auto watcher polls such maps at the full
    poll rate (not the slow repair rate it uses under fexit)."""
    obj = load_object("map_ops")
    with obj.map("bpf_written") as m:
        auto = AutoWatcher({"m": m}, poll_interval=0.05, repair_interval=60, agent_tgid=0)
        with auto:
            assert auto.mode == "syscall+poll"
            m.update(k(1), v(1))  # from user space: traced
            assert changes(auto, 1) == [Change("m", k(1), v(1), Seen.TRACE)]
            # struct map_op {u32 op; u32 key; u64 value}: the program updates key 2 to 9
            assert obj.program("apply_op").test_run(struct.pack("<IIQ", 1, 2, 9)).retval == 2
            assert changes(auto, 1) == [Change("m", k(2), v(9), Seen.POLL)]


def test_a_batch_larger_than_the_ring_is_recovered_by_the_rescan(make_map: MakeMap) -> None:
    """A 6000-element batch into a 124-record ring (32 elements to a record): the records
    that fit are reported, the rest are counted as dropped, and the auto watcher's rescan
    reports every missing key."""
    m = make_map("hash", 4, 8, 8192)
    with AutoWatcher({"m": m}, poll_interval=60, repair_interval=60, agent_tgid=0,
                     ring_size=16 * 4096) as auto:  # fmt: skip
        assert auto.mode == "syscall+poll"
        keys = np.arange(6000, dtype=np.uint32)
        m.update_batch(keys, keys.astype(np.uint64) + 1000)
        events = changes(auto, 6001)
        overflows = [e for e in events if isinstance(e, Overflow)]
        assert overflows and overflows[0].map == "m"
        seen = {e.key: e.value for e in events if isinstance(e, Change)}
        assert seen == {k(i): v(i + 1000) for i in range(6000)}
        traced = [e for e in events if isinstance(e, Change) and e.seen is Seen.TRACE]
        assert 0 < len(traced) < 6000  # some fitted in the ring, the rest came from the rescan
