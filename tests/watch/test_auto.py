"""The auto watcher on real maps: fallback to polling with one log line, and the repair logic
driven by a scripted tracer (the host refuses the real one; the VM tests run the real one).

The repair rule under test: after an ``Overflow`` the map is rescanned at once and compared with
what the consumer was *told* (the last scan plus every traced change since), so a dropped event
is repaired even when the map is back to its last scanned value, and nothing the tracer already
reported is repeated.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Mapping

import pytest

from bpfsync.demo.cluster import wait_for
from bpfsync.errors import PermissionDeniedError
from bpfsync.kernel.dump import DEFAULT_CHUNK, MapDump
from bpfsync.kernel.features import tracing_supported
from bpfsync.kernel.maps import Map
from bpfsync.model import Change, Overflow, Seen, WatchEvent
from bpfsync.watch import auto as auto_module
from bpfsync.watch.auto import AutoWatcher, Tracer
from bpfsync.watch.base import Watcher

MakeMap = Callable[..., Map]


def read_until(auto: AutoWatcher, n: int, timeout: float = 5.0) -> list[WatchEvent]:
    """Read until ``n`` events came (scan results arrive from the scanner thread, later)."""
    out: list[WatchEvent] = []

    def enough() -> bool:
        if len(out) < n:
            out.extend(auto.read(timeout=0.1))
        return len(out) >= n

    wait_for(enough, timeout, every=0)  # the read itself waits
    return out


def k(n: int) -> bytes:
    return struct.pack("<I", n)


def v(n: int) -> bytes:
    return struct.pack("<Q", n)


class ScriptedTracer:
    """Returns the batches pushed into it, one per ``read()``."""

    def __init__(self, maps: Mapping[str, Map], refuse: Exception | None = None) -> None:
        self.maps = dict(maps)
        self.refuse = refuse
        self.attached: list[str] = []
        self.sees_programs = True
        self.refused = ""
        self.batches: list[list[WatchEvent]] = []
        self.closed = False

    def start(self) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.attached = ["htab_map_update_elem"]

    def push(self, *events: WatchEvent) -> None:
        self.batches.append(list(events))

    def read(self, timeout: float | None = 0.0) -> list[WatchEvent]:
        if self.batches:
            return self.batches.pop(0)
        if timeout:
            time.sleep(min(timeout, 0.01))
        return []

    def close(self) -> None:
        self.closed = True


def scripted(
    refuse: Exception | None = None,
) -> tuple[list[ScriptedTracer], Callable[[Mapping[str, Map]], Tracer]]:
    made: list[ScriptedTracer] = []

    def factory(maps: Mapping[str, Map]) -> Tracer:
        made.append(ScriptedTracer(maps, refuse))
        return made[-1]

    return made, factory


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_polls_alone_with_one_log_line_when_tracing_is_refused(
    make_map: MakeMap, caplog: pytest.LogCaptureFixture
) -> None:
    m = make_map("hash", 4, 8, 16)
    _, factory = scripted(refuse=PermissionDeniedError("fexit refused by policy", 1))
    auto = AutoWatcher({"m": m}, poll_interval=0.05, tracer_factory=factory)
    with caplog.at_level(logging.INFO, logger="bpfsync.watch"):
        auto.start()
        assert auto.mode == "poll"
        m.update(k(1), v(10))
        assert auto.read(timeout=5) == [Change("m", k(1), v(10), Seen.POLL)]
        m.delete(k(1))
        assert auto.read(timeout=5) == [Change("m", k(1), None, Seen.POLL)]
    auto.close()
    (line,) = warnings(caplog)
    assert "fexit refused by policy" in line and "polling every 0.05 s" in line
    assert isinstance(auto, Watcher)


def test_uses_the_real_tracer_where_the_kernel_allows_it(
    make_map: MakeMap, caplog: pytest.LogCaptureFixture
) -> None:
    m = make_map("hash", 4, 8, 16)
    ok, _ = tracing_supported()
    with caplog.at_level(logging.WARNING, logger="bpfsync.watch"), AutoWatcher({"m": m}) as auto:
        # where fexit is refused (this host), the bpf(2) syscall hooks trace user-space writes
        assert auto.mode == ("trace+poll" if ok else "syscall+poll")
    assert len(warnings(caplog)) == (0 if ok else 1)


def test_untraceable_maps_are_polled_and_named_once(
    make_map: MakeMap, caplog: pytest.LogCaptureFixture
) -> None:
    small, big = make_map("hash", 4, 8, 16), make_map("hash", 4, 512, 16)
    made, factory = scripted()
    with caplog.at_level(logging.WARNING, logger="bpfsync.watch"):
        auto = AutoWatcher({"small": small, "big": big}, poll_interval=0.05,
                           repair_interval=60, tracer_factory=factory)  # fmt: skip
        auto.start()
    assert auto.mode == "trace+poll" and auto.traced == {"small"}
    assert set(made[0].maps) == {"small"}
    (line,) = warnings(caplog)
    assert "big" in line and "TRACE_VALUE_MAX" in line
    big.update(k(1), bytes(512))
    assert auto.read(timeout=5) == [Change("big", k(1), bytes(512), Seen.POLL)]
    auto.close()
    assert made[0].closed


def test_an_overflow_rescans_against_what_was_reported(make_map: MakeMap) -> None:
    m = make_map("hash", 4, 8, 16)
    m.update(k(1), v(1))
    made, factory = scripted()
    auto = AutoWatcher({"m": m}, repair_interval=60, tracer_factory=factory)
    auto.start()  # baseline: k1 = 1
    tracer = made[0]

    m.update(k(1), v(2))
    tracer.push(Change("m", k(1), v(2), Seen.TRACE))
    assert auto.read(timeout=1) == [Change("m", k(1), v(2), Seen.TRACE)]

    # k1 goes back to 1 and k2 appears, but the ring dropped both events
    m.update(k(1), v(1))
    m.update(k(2), v(5))
    tracer.push(Overflow("m", 2))
    events = read_until(auto, 3)
    assert events[0] == Overflow("m", 2)
    assert sorted(events[1:], key=lambda c: c.key if isinstance(c, Change) else b"") == [
        Change("m", k(1), v(1), Seen.POLL),
        Change("m", k(2), v(5), Seen.POLL),
    ]
    assert auto.read(timeout=0.3) == []
    auto.close()


def test_a_repair_poll_does_not_repeat_traced_changes(make_map: MakeMap) -> None:
    m = make_map("hash", 4, 8, 16)
    made, factory = scripted()
    auto = AutoWatcher({"m": m}, repair_interval=0.2, tracer_factory=factory)
    auto.start()
    m.update(k(1), v(1))  # seen by the tracer
    made[0].push(Change("m", k(1), v(1), Seen.TRACE))
    m.update(k(2), v(2))  # an in-place write: only a scan sees it
    events = auto.read(timeout=1)
    while not any(e.seen == Seen.POLL for e in events if isinstance(e, Change)):
        events += auto.read(timeout=1)
    assert events == [Change("m", k(1), v(1), Seen.TRACE), Change("m", k(2), v(2), Seen.POLL)]
    auto.close()


def test_an_overflow_without_a_map_rescans_every_traced_map(make_map: MakeMap) -> None:
    a, b = make_map("hash", 4, 8, 16), make_map("array", 4, 8, 4)
    made, factory = scripted()
    auto = AutoWatcher({"a": a, "b": b}, repair_interval=60, tracer_factory=factory)
    auto.start()
    a.update(k(1), v(1))
    b.update(k(3), v(3))
    made[0].push(Overflow(None, 1))
    events = read_until(auto, 3)
    assert events[0] == Overflow(None, 1)
    expected = {Change("a", k(1), v(1), Seen.POLL), Change("b", k(3), v(3), Seen.POLL)}
    assert set(events[1:]) == expected
    auto.close()


def test_emit_initial_reports_the_first_scan(make_map: MakeMap) -> None:
    m = make_map("hash", 4, 8, 16)
    m.update(k(7), v(7))
    _, factory = scripted()
    with AutoWatcher({"m": m}, emit_initial=True, tracer_factory=factory) as auto:
        assert auto.read(0) == [Change("m", k(7), v(7), Seen.POLL)]
        assert auto.read(0) == []


def test_close_from_another_thread_ends_a_blocking_read_and_events(make_map: MakeMap) -> None:
    m = make_map("hash", 4, 8, 16)
    _, factory = scripted(refuse=PermissionDeniedError("no", 1))
    auto = AutoWatcher({"m": m}, poll_interval=30, tracer_factory=factory)
    auto.start()
    threading.Timer(0.1, auto.close).start()
    start = time.monotonic()
    assert auto.read(timeout=None) == []
    assert list(auto.events()) == []
    assert time.monotonic() - start < 5


def test_a_scan_never_undoes_what_was_reported_after_its_dump(
    make_map: MakeMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scanner dumps k = 1; before its result is handed over, the tracer reports k = 2. The
    scan's older value must not follow the report (the consumer would end up believing 1)."""
    m = make_map("hash", 4, 8, 16)
    made, factory = scripted()
    auto = AutoWatcher({"m": m}, repair_interval=60, tracer_factory=factory)
    auto.start()
    dumped, release = threading.Event(), threading.Event()
    real_diff = auto_module.diff

    def slow_diff(*args, **kw):  # type: ignore[no-untyped-def]
        dumped.set()  # dumped, and what was reported during the dump is looked at already
        release.wait(5)
        return real_diff(*args, **kw)

    monkeypatch.setattr(auto_module, "diff", slow_diff)
    m.update(k(1), v(1))  # not traced: only the scan can see it
    made[0].push(Overflow("m", 1))  # makes the scanner rescan now
    assert auto.read(timeout=1) == [Overflow("m", 1)]
    assert dumped.wait(5)
    m.update(k(1), v(2))
    made[0].push(Change("m", k(1), v(2), Seen.TRACE))
    assert auto.read(timeout=1) == [Change("m", k(1), v(2), Seen.TRACE)]
    release.set()
    later = auto.read(timeout=0.5) + auto.read(timeout=0.5)
    assert Change("m", k(1), v(1), Seen.POLL) not in later
    auto.close()


def test_held_scans_start_at_release_and_miss_nothing(make_map: MakeMap) -> None:
    """A catching-up agent holds the scans; the first scan after the release reports what the
    data plane changed meanwhile, and not what the consumer wrote itself."""
    m = make_map("hash", 4, 8, 16)
    _, factory = scripted(refuse=PermissionDeniedError("no tracing here", 1))
    auto = AutoWatcher({"m": m}, poll_interval=0.02, tracer_factory=factory, hold_scans=True)
    auto.start()
    try:
        m.update(k(1), v(10))  # the data plane
        m.update(k(2), v(20))  # the consumer, which says so
        auto.note_written("m", [(k(2), v(20))])
        assert auto.read(timeout=0.3) == []  # 15 poll intervals: no scan while held
        auto.release_scans()
        assert read_until(auto, 1) == [Change("m", k(1), v(10), Seen.POLL)]
        assert auto.read(timeout=0.1) == []
    finally:
        auto.close()


def test_a_flood_of_overflows_stays_within_the_scan_budget(
    make_map: MakeMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rescans after lost events skip the poll interval but not the scan budget: a flood of
    overflows must not have the scanner dump the map back to back."""
    m = make_map("hash", 4, 8, 16)
    made, factory = scripted()
    auto = AutoWatcher({"m": m}, repair_interval=60, tracer_factory=factory)
    auto.start()
    scans = 0
    dump = Map.dump

    def slow_dump(self: Map, chunk: int = DEFAULT_CHUNK) -> MapDump:
        nonlocal scans
        scans += 1
        time.sleep(0.05)  # as if the map were big: the budget allows one scan per 0.2 s
        return dump(self, chunk)

    monkeypatch.setattr(Map, "dump", slow_dump)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        made[0].push(Overflow("m", 1))
        auto.read(timeout=0.01)
    auto.close()
    # back to back would be ~20 scans in the second; the budget allows 1 / 0.2 s
    assert 2 <= scans <= 7


def backed_off(auto: AutoWatcher, name: str, factor: int, timeout: float = 5.0) -> bool:
    """Read (taking scan results) until ``name``'s scans back off by ``factor``."""

    def there() -> bool:
        if auto.backoff(name) == factor:
            return True
        auto.read(timeout=0.02)
        return False

    return wait_for(there, timeout, every=0)  # the read itself waits


def test_an_idle_traced_map_backs_off_until_a_scan_finds_a_write(make_map: MakeMap) -> None:
    """Scans that find nothing the tracer did not report double the wait, up to 4x; the first
    write only the scan can see (a BPF program's) brings the usual period back."""
    m = make_map("hash", 4, 8, 16)
    _, factory = scripted()
    with AutoWatcher({"m": m}, repair_interval=0.02, tracer_factory=factory) as auto:
        assert auto.backoff("m") == 1
        assert backed_off(auto, "m", 2) and backed_off(auto, "m", 4)
        m.update(k(1), v(1))  # not traced: only a scan can see it
        assert read_until(auto, 1) == [Change("m", k(1), v(1), Seen.POLL)]
        assert auto.backoff("m") == 1
        assert backed_off(auto, "m", 4)  # idle again


def test_a_scan_finding_only_what_the_tracer_reports_meanwhile_keeps_backing_off(
    make_map: MakeMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the ring lags: a scan dumps a write the reader has not taken yet. The tracer
    reports it after the dump, so the scan found nothing new, and the map stays backed off."""
    m = make_map("hash", 4, 8, 16)
    made, factory = scripted()
    with AutoWatcher({"m": m}, repair_interval=0.02, tracer_factory=factory) as auto:
        assert backed_off(auto, "m", 4)
        dumped, release, diffed = threading.Event(), threading.Event(), threading.Event()
        real_diff = auto_module.diff

        def slow_diff(name, prev, cur, *args, **kw):  # type: ignore[no-untyped-def]
            if dumped.is_set() or not any(bytes(r) == k(1) for r in cur.dump.key_array):
                return real_diff(name, prev, cur, *args, **kw)
            dumped.set()  # the first scan holding k1
            release.wait(5)
            found = real_diff(name, prev, cur, *args, **kw)
            diffed.set()
            return found

        monkeypatch.setattr(auto_module, "diff", slow_diff)
        m.update(k(1), v(1))  # written; its record still "in the ring"
        assert dumped.wait(5)
        made[0].push(Change("m", k(1), v(1), Seen.TRACE))  # the reader catches up
        assert auto.read(timeout=1) == [Change("m", k(1), v(1), Seen.TRACE)]
        release.set()
        assert diffed.wait(5)
        time.sleep(0.005)  # the scanner hands the result over
        # taken at once: no other scan of m runs while its result waits, so a reset to 1
        # would still show (it takes two idle scans to get back to 4)
        assert auto.read(timeout=0) == []  # the scan's k1 was the traced one: dropped
        assert auto.backoff("m") == 4


def test_maps_polled_alone_or_in_place_never_back_off(make_map: MakeMap) -> None:
    """Without a tracer the scan is the only eye; in_place maps' counters are found only by it."""
    polled, counters = make_map("hash", 4, 8, 16), make_map("hash", 4, 8, 16)
    _, refused = scripted(refuse=PermissionDeniedError("no tracing here", 1))
    _, factory = scripted()
    with AutoWatcher({"p": polled}, poll_interval=0.01, tracer_factory=refused) as alone, \
         AutoWatcher({"c": counters}, poll_interval=0.01, repair_interval=0.01,
                     in_place=["c"], tracer_factory=factory) as in_place:  # fmt: skip
        deadline = time.monotonic() + 0.3  # ~30 scans each
        while time.monotonic() < deadline:
            alone.read(timeout=0.01)
            in_place.read(timeout=0.01)
        assert alone.backoff("p") == 1 and in_place.backoff("c") == 1
