"""The trace watcher on a real kernel that allows fexit (runs inside the VM only).

Writes come from three places: a forked child process (user space that is not the agent), this
process (the agent: its bpf(2) map writes are its own and must not be reported), and BPF programs
driven by BPF_PROG_TEST_RUN or by packets on the loopback device (softirq). Every test drains the
watcher after each step and compares the exact event list, so an extra event fails as surely as
a missing one.
"""

from __future__ import annotations

import os
import socket
import struct
import traceback
from collections.abc import Callable, Iterator

import pytest

from bpfsync.demo.cluster import wait_for
from bpfsync.errors import InvalidError, MapFullError
from bpfsync.kernel.info import UpdateFlags
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject
from bpfsync.model import Change, Overflow, Seen, WatchEvent
from bpfsync.watch.auto import AutoWatcher
from bpfsync.watch.trace import Hooks, TraceWatcher
from bpfsync.watch.trace_abi import F_INTERRUPT, REQUIRED_FUNCTIONS, OwnMode

RING = 16 * 4096  # 122 records: small enough for a test to overflow
KINDS = ["hash", "lru_hash", "percpu_hash", "lru_percpu_hash", "array", "percpu_array"]
MAP_INDEX = {kind: i for i, kind in enumerate(KINDS)}  # the `map` field of `apply`'s command
UPDATE, DELETE = 1, 2
EEXIST, ENOENT = 17, 2


def key(n: int) -> bytes:
    return struct.pack("<I", n)


def val(a: int, b: int) -> bytes:
    return struct.pack("<QQ", a, b)


def full_value(m: Map, a: int) -> bytes:
    """A value for ``m`` from user space: per-CPU maps get a different value on every CPU."""
    if not m.percpu:
        return val(a, ~a & 0xFFFF)
    return b"".join(val(a + cpu, cpu) for cpu in range(m.ncpus))


def deletable(kind: str) -> bool:
    return "array" not in kind


def in_child(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a forked child (another process than the agent) and check it succeeded."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's map operations failed"


def drain(w: TraceWatcher | AutoWatcher) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    while batch := w.read(0):
        out += batch
    return out


def changes(events: list[WatchEvent]) -> list[Change]:
    return [e for e in events if isinstance(e, Change)]


def bpf_apply(writer: BpfObject, kind: str, op: int, n: int, a: int = 0, flags: int = 0) -> int:
    """Make `apply` (a BPF program, run by this process) update or delete a key; its errno."""
    cmd = struct.pack("<BBHIQQQ", MAP_INDEX[kind], op, 0, n, flags, a, ~a & 0xFFFF)
    return writer.program("apply").test_run(cmd + bytes(64 - len(cmd))).retval


@pytest.fixture(scope="module")
def tracer(writer_maps: dict[str, Map]) -> Iterator[TraceWatcher]:
    w = TraceWatcher(writer_maps, ring_size=RING)  # the agent is this process
    w.start()
    yield w
    w.close()


@pytest.fixture(autouse=True)
def quiet(request: pytest.FixtureRequest) -> None:
    """Start every test with an empty ring (events of an earlier test must not leak in)."""
    if "tracer" in request.fixturenames:
        drain(request.getfixturevalue("tracer"))


def test_attaches_every_map_write_function(tracer: TraceWatcher) -> None:
    needed = {fn for fns in REQUIRED_FUNCTIONS.values() for fn in fns}
    assert needed <= set(tracer.attached)
    assert tracer.own_mode == OwnMode.SYSCALL


@pytest.mark.parametrize("kind", KINDS)
def test_user_space_writes_are_reported(
    kind: str, tracer: TraceWatcher, writer_maps: dict[str, Map]
) -> None:
    m = writer_maps[kind]
    k = key(10)
    first, second = full_value(m, 100), full_value(m, 200)

    in_child(lambda: m.update(k, first))
    assert drain(tracer) == [Change(kind, k, first, Seen.TRACE)]

    in_child(lambda: m.update(k, second, UpdateFlags.EXIST))
    assert drain(tracer) == [Change(kind, k, second, Seen.TRACE)]

    if deletable(kind):
        in_child(lambda: m.delete(k) or None)
        assert drain(tracer) == [Change(kind, k, None, Seen.TRACE)]


@pytest.mark.parametrize("kind", KINDS)
def test_bpf_program_writes_are_reported(
    kind: str, tracer: TraceWatcher, writer: BpfObject, writer_maps: dict[str, Map]
) -> None:
    m = writer_maps[kind]
    k = key(20)
    assert bpf_apply(writer, kind, UPDATE, 20, a=0x5151) == 0
    events = drain(tracer)
    written = val(0x5151, ~0x5151 & 0xFFFF)
    if m.percpu:
        # the program wrote its CPU's share; the watcher reports the whole value, re-read
        now = m.lookup(k)
        assert now is not None and written in now
        assert events == [Change(kind, k, now, Seen.TRACE)]
    else:
        assert events == [Change(kind, k, written, Seen.TRACE)]

    if deletable(kind):
        assert bpf_apply(writer, kind, DELETE, 20) == 0
        assert drain(tracer) == [Change(kind, k, None, Seen.TRACE)]


@pytest.mark.parametrize("kind", KINDS)
def test_failed_writes_are_not_reported(
    kind: str, tracer: TraceWatcher, writer: BpfObject, writer_maps: dict[str, Map]
) -> None:
    m = writer_maps[kind]
    k, missing = key(30), key(31)
    m.update(k, full_value(m, 1))  # own write: sets the stage, not reported
    if deletable(kind):
        m.delete(missing)

    def fail() -> None:
        with pytest.raises(InvalidError):
            m.update(k, full_value(m, 2), UpdateFlags.NOEXIST)  # EEXIST
        if deletable(kind):
            assert m.delete(missing) is False  # ENOENT
        else:
            with pytest.raises(MapFullError):
                m.update(key(m.max_entries), full_value(m, 3))  # E2BIG: index past the end

    in_child(fail)
    assert bpf_apply(writer, kind, UPDATE, 30, a=9, flags=UpdateFlags.NOEXIST) == EEXIST
    if deletable(kind):
        assert bpf_apply(writer, kind, DELETE, 31) == ENOENT
    # then one successful write, so an empty result cannot come from a dead watcher
    in_child(lambda: m.update(k, full_value(m, 4)))
    assert drain(tracer) == [Change(kind, k, full_value(m, 4), Seen.TRACE)]


def test_own_writes_are_not_reported(tracer: TraceWatcher, writer_maps: dict[str, Map]) -> None:
    before = tracer.stats().suppressed
    for kind in ("hash", "percpu_hash", "array"):
        m = writer_maps[kind]
        m.update(key(40), full_value(m, 1))
        m.update_batch([key(41), key(42)], [full_value(m, 2), full_value(m, 3)])
        if deletable(kind):
            m.delete(key(40))
    assert drain(tracer) == []
    assert tracer.stats().suppressed - before == 3 * 3 + 2
    # the same write from another process is reported
    m = writer_maps["hash"]
    in_child(lambda: m.update(key(40), full_value(m, 5)))
    assert drain(tracer) == [Change("hash", key(40), full_value(m, 5), Seen.TRACE)]


def test_unwatched_maps_are_not_reported(tracer: TraceWatcher, writer: BpfObject) -> None:
    with writer.map("w_burst") as other:
        in_child(lambda: other.update(key(1), val(1, 1)))
    assert drain(tracer) == []


def test_softirq_write_while_the_agent_runs_is_reported(
    tracer: TraceWatcher, writer: BpfObject, writer_maps: dict[str, Map]
) -> None:
    """The pitfall: an XDP program runs in softirq on behalf of the interrupted task, here the
    agent itself (it sends the packets). Its writes carry the agent's tgid but are not the
    agent's own, and must be reported."""
    hash_id = writer_maps["hash"].info.id
    link = writer.program("on_lo").attach_xdp(socket.if_nametoindex("lo"))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(20):
                s.sendto(b"x", ("127.0.0.1", 9))
            records = tracer.read_records()
            records = records[records["map_id"] == hash_id]
            assert len(records) == 20
            assert (records["flags"] & F_INTERRUPT).all()
            assert (records["tgid"] == os.getpid()).any(), "no softirq ran in the agent's context"

            for _ in range(10):
                s.sendto(b"x", ("127.0.0.1", 9))
            events = drain(tracer)
    finally:
        link.destroy()
    assert len(events) == 10
    for e in events:
        assert isinstance(e, Change) and e.map == "hash" and e.value is not None
        n = struct.unpack("<I", e.key)[0]
        assert e.value == val(0x10, n)


def test_ring_overflow_is_reported_and_repaired_by_the_auto_watcher(writer: BpfObject) -> None:
    burst = writer.map("w_burst")
    keys = [k for k, _ in burst.items()]
    if keys:
        burst.delete_batch(keys)
    auto = AutoWatcher({"burst": burst}, ring_size=RING, poll_interval=60, repair_interval=60)
    try:
        auto.start()
        assert auto.mode == "trace+poll"
        writer.program("burst").test_run(bytes(64), repeat=1000)  # 1000 new keys, 122 fit
        events: list[WatchEvent] = []

        def all_in() -> bool:
            if len(changes(events)) < 1000:
                events.extend(auto.read(timeout=1))
            return len(changes(events)) >= 1000

        wait_for(all_in, 60, every=0)  # the rescan's results come from the scanner thread
        events += auto.read(timeout=1)  # nothing more may come
    finally:
        auto.close()
        burst.close()

    overflows = [e for e in events if isinstance(e, Overflow)]
    traced = [e for e in events if isinstance(e, Change) and e.seen == Seen.TRACE]
    polled = [e for e in events if isinstance(e, Change) and e.seen == Seen.POLL]
    assert overflows and overflows[0].map == "burst"
    assert sum(o.dropped for o in overflows) == 1000 - len(traced)
    assert 0 < len(traced) < 1000
    # the rescan reports exactly the keys the ring dropped: every key once, with its value
    got = {e.key: e.value for e in traced + polled}
    twice = [(e.seen, e.key.hex(), e.value) for e in polled if e.key in {t.key for t in traced}]
    assert len(traced) + len(polled) == len(got) == 1000, f"reported twice: {twice}"
    for k, v in got.items():
        n = struct.unpack("<I", k)[0]
        assert v == val(n, ~n & 0xFFFFFFFFFFFFFFFF)


@pytest.mark.parametrize("kind", KINDS)
def test_syscall_hooks_report_user_space_writes_on_this_kernel_too(
    kind: str, writer: BpfObject, writer_maps: dict[str, Map]
) -> None:
    """The bpf(2) hooks (the fallback where fexit is refused) on 6.1: a child's single and
    batched writes are reported with their bytes, this process's are suppressed, and a BPF
    program's write is not seen (no syscall carries it; the auto watcher's poll does)."""
    m = writer_maps[kind]
    with TraceWatcher({kind: m}, ring_size=RING, hooks=Hooks.SYSCALL) as w:
        assert w.hooks is Hooks.SYSCALL and w.attached == ["sys_enter", "sys_exit"]
        k1, k2 = key(50), key(51)
        v1, v2 = full_value(m, 7), full_value(m, 8)
        in_child(lambda: m.update_batch([k1, k2], [v1, v2]))
        assert drain(w) == [Change(kind, k1, v1, Seen.TRACE), Change(kind, k2, v2, Seen.TRACE)]
        m.update(k1, v2)  # this process is the agent: suppressed
        assert bpf_apply(writer, kind, UPDATE, 52, 9) == 0  # a program's write: not a syscall
        if deletable(kind):
            in_child(lambda: m.delete(k2) or None)
        assert drain(w) == ([Change(kind, k2, None, Seen.TRACE)] if deletable(kind) else [])
        assert w.stats().suppressed == 1
