"""LPM tries under the trace watcher's fexit programs (trie_update_elem, trie_delete_elem), on a
kernel that allows fexit (inside the VM only): writes from another process, single and batched
(the kernel's generic batch code calls the trie's ops per element), and from a BPF program are
reported with their exact key bytes; failed ones are not; this process's (the agent's) are
suppressed. The bpf(2) hooks on the same kernel report the user-space ones too.

The map is trace_writer.bpf.c's w_lpm: key {__u32 prefixlen; __u32 addr (network order)}, value
struct val {__u64 a, b}. Each test drains the watcher after each step and compares the exact
event list.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from test_trace import drain, in_child

from bpfsync.errors import InvalidError
from bpfsync.kernel.info import MapType
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject
from bpfsync.layout import prefix_bytes
from bpfsync.model import Change, Seen
from bpfsync.watch.auto import AutoWatcher
from bpfsync.watch.trace import Hooks, TraceWatcher
from bpfsync.watch.trace_abi import REQUIRED_FUNCTIONS, OwnMode

RING = 16 * 4096
LPM_INDEX = 6  # w_lpm's `map` in trace_writer.bpf.c's struct cmd
UPDATE, DELETE = 1, 2
ENOENT = 2


def p4(text: str) -> bytes:
    return prefix_bytes(text, 8)


def val(a: int, b: int = 0) -> bytes:
    return struct.pack("<QQ", a, b)


def bpf_apply(writer: BpfObject, op: int, prefix: str, a: int = 0) -> int:
    """Make `apply` (a BPF program, run by this process) update or delete a prefix; its errno."""
    key = p4(prefix)
    length, addr = struct.unpack("<II", key)  # the address's bytes as the u32 the C side copies
    cmd = struct.pack("<BBHIQQQ", LPM_INDEX, op, length, addr, 0, a, 0)
    return writer.program("apply").test_run(cmd + bytes(64 - len(cmd))).retval


@pytest.fixture(scope="module")
def lpm(writer: BpfObject) -> Iterator[Map]:
    with writer.map("w_lpm") as m:
        yield m


@pytest.fixture(scope="module")
def tracer(lpm: Map) -> Iterator[TraceWatcher]:
    w = TraceWatcher({"lpm": lpm}, ring_size=RING, hooks=Hooks.FEXIT)  # the agent: this process
    w.start()
    yield w
    w.close()


@pytest.fixture(autouse=True)
def empty(request: pytest.FixtureRequest, lpm: Map) -> None:
    """Every test starts with an empty trie and an empty ring."""
    keys = [k for k, _ in lpm.items()]
    if keys:
        lpm.delete_batch(keys)  # this process's: suppressed under fexit
    if "tracer" in request.fixturenames:
        drain(request.getfixturevalue("tracer"))


def test_fexit_attaches_to_the_trie_functions(tracer: TraceWatcher) -> None:
    assert tracer.hooks is Hooks.FEXIT and tracer.own_mode == OwnMode.SYSCALL
    assert set(REQUIRED_FUNCTIONS[MapType.LPM_TRIE]) <= set(tracer.attached)


def test_user_space_writes_are_reported(tracer: TraceWatcher, lpm: Map) -> None:
    in_child(lambda: lpm.update(p4("198.51.100.0/24"), val(1)))
    assert drain(tracer) == [Change("lpm", p4("198.51.100.0/24"), val(1), Seen.TRACE)]
    in_child(lambda: lpm.update(p4("198.51.100.0/24"), val(2)))
    in_child(lambda: lpm.update(p4("198.51.0.0/16"), val(3)))
    in_child(lambda: lpm.delete(p4("198.51.100.0/24")) or None)
    assert drain(tracer) == [
        Change("lpm", p4("198.51.100.0/24"), val(2), Seen.TRACE),
        Change("lpm", p4("198.51.0.0/16"), val(3), Seen.TRACE),
        Change("lpm", p4("198.51.100.0/24"), None, Seen.TRACE),
    ]


def test_batches_are_reported_element_by_element(tracer: TraceWatcher, lpm: Map) -> None:
    keys = [p4(f"10.0.{i}.0/24") for i in range(50)]
    in_child(lambda: lpm.update_batch(keys, [val(i) for i in range(50)]))
    assert drain(tracer) == [Change("lpm", k, val(i), Seen.TRACE) for i, k in enumerate(keys)]
    in_child(lambda: lpm.delete_batch(keys[:10]) and None)
    assert drain(tracer) == [Change("lpm", k, None, Seen.TRACE) for k in keys[:10]]


def test_bpf_program_writes_are_reported(tracer: TraceWatcher, writer: BpfObject) -> None:
    assert bpf_apply(writer, UPDATE, "203.0.113.0/24", a=0x5151) == 0
    assert drain(tracer) == [Change("lpm", p4("203.0.113.0/24"), val(0x5151), Seen.TRACE)]
    assert bpf_apply(writer, DELETE, "203.0.113.0/24") == 0
    assert drain(tracer) == [Change("lpm", p4("203.0.113.0/24"), None, Seen.TRACE)]


def test_failed_writes_are_not_reported(
    tracer: TraceWatcher, writer: BpfObject, lpm: Map
) -> None:
    lpm.update(p4("198.51.100.0/24"), val(1))  # own write: sets the stage, not reported

    def fail() -> None:
        assert lpm.delete(p4("198.51.0.0/16")) is False  # ENOENT: only a longer prefix exists
        with pytest.raises(InvalidError):  # EINVAL: longer than the address
            lpm.update(struct.pack("<I", 33) + bytes(4), val(2))

    in_child(fail)
    assert bpf_apply(writer, DELETE, "192.0.2.0/24") == ENOENT
    # then one successful write, so an empty result cannot come from a dead watcher
    in_child(lambda: lpm.update(p4("198.51.100.0/24"), val(4)))
    assert drain(tracer) == [Change("lpm", p4("198.51.100.0/24"), val(4), Seen.TRACE)]


def test_own_writes_are_not_reported(tracer: TraceWatcher, lpm: Map) -> None:
    before = tracer.stats().suppressed
    lpm.update(p4("198.51.100.0/24"), val(1))
    lpm.update_batch([p4("10.0.0.0/8"), p4("10.1.0.0/16")], [val(2), val(3)])
    assert lpm.delete(p4("10.0.0.0/8"))
    assert drain(tracer) == []
    assert tracer.stats().suppressed - before == 4  # per element: the batch ran the op twice


def test_the_auto_watcher_traces_a_trie_by_fexit(writer: BpfObject, lpm: Map) -> None:
    """A trie is traced, not polled alone: a program's write comes from fexit (not the poll,
    which runs once a minute here)."""
    with AutoWatcher({"lpm": lpm}, ring_size=RING, poll_interval=60, repair_interval=60) as auto:
        assert auto.mode == "trace+poll" and auto.traced == {"lpm"}
        drain(auto)
        assert bpf_apply(writer, UPDATE, "192.0.2.0/24", a=7) == 0
        assert drain(auto) == [Change("lpm", p4("192.0.2.0/24"), val(7), Seen.TRACE)]


def test_syscall_hooks_report_user_space_writes_on_this_kernel_too(
    writer: BpfObject, lpm: Map
) -> None:
    with TraceWatcher({"lpm": lpm}, ring_size=RING, hooks=Hooks.SYSCALL) as w:
        assert w.hooks is Hooks.SYSCALL and w.attached == ["sys_enter", "sys_exit"]
        keys = [p4("198.51.100.0/24"), p4("192.0.2.0/24")]
        in_child(lambda: lpm.update_batch(keys, [val(1), val(2)]))
        assert drain(w) == [Change("lpm", keys[0], val(1), Seen.TRACE),
                            Change("lpm", keys[1], val(2), Seen.TRACE)]  # fmt: skip
        lpm.update(keys[0], val(3))  # this process is the agent: suppressed
        assert bpf_apply(writer, UPDATE, "203.0.113.0/24", a=9) == 0  # a program's: no syscall
        in_child(lambda: lpm.delete(keys[1]) or None)
        assert drain(w) == [Change("lpm", keys[1], None, Seen.TRACE)]
        assert w.stats().suppressed == 1
