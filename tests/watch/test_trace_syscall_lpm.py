"""LPM tries under the trace watcher's bpf(2) hooks on this host (which refuses fexit): a user
space write to a trie, single or batched (the kernel's generic batch code), is reported with its
exact key bytes within the read that follows it, like a hash map's; failed commands are not, the
watcher's own are suppressed, and the auto watcher traces a trie (its poll is for programs).

The fexit side (trie_update_elem / trie_delete_elem, BPF programs' writes) runs in the kernel VM:
tests/vm/guest/test_trace_lpm.py.
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
from test_trace_syscall import changes

from bpfsync.errors import InvalidError
from bpfsync.kernel import _libbpf
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject
from bpfsync.layout import prefix_bytes
from bpfsync.model import Change, Seen
from bpfsync.watch.auto import AutoWatcher
from bpfsync.watch.trace import Hooks, TraceWatcher

MakeMap = Callable[..., Map]
Watch = Callable[..., tuple[Map, TraceWatcher]]


def p4(text: str) -> bytes:
    return prefix_bytes(text, 8)


def v(n: int) -> bytes:
    return struct.pack("<Q", n)


@pytest.fixture
def watch(make_map: MakeMap) -> Iterator[Watch]:
    made: list[TraceWatcher] = []

    def start(key_size: int = 8, agent_tgid: int = 0) -> tuple[Map, TraceWatcher]:
        m = make_map("lpm_trie", key_size, 8, 8192)
        w = TraceWatcher({"lpm": m}, agent_tgid=agent_tgid, hooks=Hooks.SYSCALL)
        made.append(w)
        w.start()
        return m, w

    yield start
    for w in made:
        w.close()


def test_single_updates_and_deletes_are_reported_with_their_bytes(watch: Watch) -> None:
    m, w = watch()
    start = time.monotonic()
    m.update(p4("198.51.100.0/24"), v(1))
    got = changes(w, 1)
    took = time.monotonic() - start
    assert got == [Change("lpm", p4("198.51.100.0/24"), v(1), Seen.TRACE)]
    print(f"reported {took * 1e3:.2f} ms after the write (the read included)")
    m.update(p4("198.51.100.0/24"), v(2))
    m.update(p4("198.51.0.0/16"), v(3))  # a shorter prefix holding it: another key
    m.update(p4("198.51.100.7/24"), v(4))  # the kernel's same entry: it stores these bytes
    assert m.delete(p4("198.51.0.0/16"))
    assert changes(w, 4) == [
        Change("lpm", p4("198.51.100.0/24"), v(2), Seen.TRACE),
        Change("lpm", p4("198.51.0.0/16"), v(3), Seen.TRACE),
        Change("lpm", p4("198.51.100.7/24"), v(4), Seen.TRACE),
        Change("lpm", p4("198.51.0.0/16"), None, Seen.TRACE),
    ]
    assert [k for k, _ in m.items()] == [p4("198.51.100.7/24")]


def test_ipv6_prefixes_are_reported(watch: Watch) -> None:
    m, w = watch(key_size=20)
    key = prefix_bytes("2001:db8::/32", 20)
    m.update(key, v(6))
    assert m.delete(key)
    assert changes(w, 2) == [Change("lpm", key, v(6), Seen.TRACE),
                             Change("lpm", key, None, Seen.TRACE)]  # fmt: skip


def test_batches_are_reported_element_by_element(watch: Watch) -> None:
    """The kernel runs a trie's batch commands element by element (its generic batch code);
    the hooks read the batch from the caller's buffers, 32 elements of 8 + 8 bytes a record."""
    m, w = watch()
    keys = [p4(f"10.{i >> 8}.{i & 255}.0/24") for i in range(1000)]
    m.update_batch(keys, [v(i) for i in range(1000)])
    assert changes(w, 1000) == [Change("lpm", k, v(i), Seen.TRACE) for i, k in enumerate(keys)]
    assert m.delete_batch(keys[:100]) == 100
    assert changes(w, 100) == [Change("lpm", k, None, Seen.TRACE) for k in keys[:100]]
    assert w.stats().submitted == 32 + 4 and w.stats().dropped == 0  # 32 elements a record


def test_failed_commands_are_not_reported(watch: Watch) -> None:
    m, w = watch()
    m.update(p4("198.51.100.0/24"), v(1))
    assert changes(w, 1) == [Change("lpm", p4("198.51.100.0/24"), v(1), Seen.TRACE)]
    assert not m.delete(p4("198.51.0.0/16"))  # ENOENT: no such prefix (only a longer one)
    too_long = struct.pack("<I", 33) + bytes([198, 51, 100, 0])
    with pytest.raises(InvalidError):
        m.update(too_long, v(2))  # EINVAL: longer than the address
    value = ctypes.create_string_buffer(8)  # tries have no lookup-and-delete
    assert _libbpf.lib().bpf_map_lookup_and_delete_elem(m.fd, p4("198.51.100.0/24"), value) < 0
    m.update(p4("203.0.113.0/24"), v(3))  # a marker: everything before it has been read by then
    assert changes(w, 1) == [Change("lpm", p4("203.0.113.0/24"), v(3), Seen.TRACE)]


def test_the_agents_own_writes_are_suppressed_and_another_process_is_reported(
    watch: Watch, pin_dir: str
) -> None:
    m, w = watch(agent_tgid=os.getpid())
    m.update(p4("198.51.100.0/24"), v(1))
    m.update_batch([p4("10.0.0.0/8"), p4("10.1.0.0/16")], [v(2), v(3)])
    assert m.delete(p4("10.0.0.0/8"))
    path = os.path.join(pin_dir, os.listdir(pin_dir)[0])
    key, value = p4("192.0.2.0/24").hex(" ").split(), v(42).hex(" ").split()
    subprocess.run(["bpftool", "map", "update", "pinned", path, "key", "hex", *key,
                    "value", "hex", *value], check=True)  # fmt: skip
    assert changes(w, 1) == [Change("lpm", p4("192.0.2.0/24"), v(42), Seen.TRACE)]
    assert w.stats().suppressed == 3  # one per bpf(2) command


def test_the_auto_watcher_traces_a_trie_and_polls_for_programs_writes(
    make_map: MakeMap, load_object: Callable[..., BpfObject],
) -> None:
    """A trie is traced like a hash map, not polled alone: user-space writes come from the
    hooks, a BPF program's write from the poll (no syscall carries it)."""
    obj = load_object("trace_writer")
    with obj.map("w_lpm") as m:
        auto = AutoWatcher({"lpm": m}, poll_interval=0.05, repair_interval=60, agent_tgid=0)
        with auto:
            assert auto.mode == "syscall+poll" and auto.traced == {"lpm"}
            key = struct.pack("<I", 24) + bytes([198, 51, 100, 0])
            val = struct.pack("<QQ", 1, 2)
            m.update(key, val)
            assert changes(auto, 1) == [Change("lpm", key, val, Seen.TRACE)]
            # struct cmd {u8 map; u8 op; u16 prefixlen; u32 key; u64 flags; struct val}: map 6
            # is w_lpm; the program adds 203.0.113.0/24 -> {9, ~9 & 0xffff}
            addr = int.from_bytes(bytes([203, 0, 113, 0]), "little")
            cmd = struct.pack("<BBHIQQQ", 6, 1, 24, addr, 0, 9, ~9 & 0xFFFF)
            assert obj.program("apply").test_run(cmd + bytes(64 - len(cmd))).retval == 0
            written = struct.pack("<I", 24) + bytes([203, 0, 113, 0])
            assert changes(auto, 1) == [
                Change("lpm", written, struct.pack("<QQ", 9, ~9 & 0xFFFF), Seen.POLL)
            ]


def test_a_trie_batch_is_packed_like_a_hash_maps(watch: Watch) -> None:
    """5000 prefixes in one command: 157 records of 32 elements, none dropped."""
    m, w = watch()
    addrs = np.arange(5000, dtype=np.uint32)
    keys = b"".join(struct.pack("<I", 32) + int(a).to_bytes(4, "big") for a in addrs.tolist())
    m.update_batch(keys, (addrs.astype(np.uint64) * 3).tobytes())
    got = changes(w, 5000)
    assert len(got) == 5000 and all(isinstance(c, Change) and c.seen is Seen.TRACE for c in got)
    assert [c.value for c in got if isinstance(c, Change)] == [v(3 * i) for i in range(5000)]
    assert w.stats().submitted == 157 and w.stats().dropped == 0
