"""The auto watcher (the default): trace where the kernel allows it, and poll underneath.

Tracing reports writes within microseconds but cannot see in-place writes through lookup
pointers or LRU evictions, and a full ring buffer drops records. So every map is also polled:
slowly (``repair_interval``) where fexit traces it, at ``poll_interval`` where it is not traced
or traced only at bpf(2) (the tracer's fallback where fexit is refused: user-space writes within
microseconds, BPF programs' writes by the poll), and for ``in_place`` maps. Where the kernel
refuses tracing altogether (no BTF, an old kernel) or a map cannot be traced (type, key or value
too large), those maps are polled alone. One log line says which and why.

A traced map's scans look only for what the tracer cannot see; while they find nothing, they
come up to 4x less often (``_IDLE_BACKOFF``; but at least every 5 s, ``_IDLE_MAX_S``), and the
first one that finds something restores the usual period. Maps polled alone and ``in_place``
maps never back off.

Scans run in a thread of their own: a 1M-entry map takes ~0.3 s to dump, and the ring must be
drained meanwhile (at 250k writes/s it would overflow and force yet another rescan). ``read()``
returns traced events as they come and scan results when they are ready.

Repair after loss: an ``Overflow`` from the tracer makes the scanner rescan the map as soon as
its scan budget allows (``_SCAN_SHARE``: a 1M-entry map at most every ~1.2 s, a small one at
once), so a dropped event delays a change but never loses it. A rescan must compare the map with
what was *reported*, not with the previous scan: a traced change moves the consumer's view away
from the last scan (k: 1 -> 2 reported, 2 -> 1 dropped; the map equals the last scan, yet the
consumer still believes 2). So each map keeps an overlay of the values reported since its last
scan (and of the consumer's own writes, ``note_written``); a scan is diffed against the last
scan with the overlay applied. The overlay is taken *before* the dump: whatever it holds was
written before the dump began, so the dump holds that value or a newer one, and no report is
ever older than what the consumer was told; a value reported during the dump waits in the next
overlay. This also keeps the periodic poll from repeating what the tracer already reported.

Other map objects: ``reopen`` moves the watcher to a new set of maps (a data plane recreated
its map at its pin, or pinned one for the first time) without losing a write to the maps
that stay: see there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from operator import itemgetter
from typing import Protocol, cast

from bpfsync.errors import KernelError, NotSupportedError
from bpfsync.kernel.dump import MapDump
from bpfsync.kernel.maps import Map
from bpfsync.model import Change, Overflow, WatchEvent
from bpfsync.watch.poll import MapPoller
from bpfsync.watch.snapshot import Notes, diff, full
from bpfsync.watch.trace import Hooks, TraceWatcher
from bpfsync.watch.trace_abi import check_traceable

log = logging.getLogger("bpfsync.watch")

# Longest a read() waits on the ring before looking for finished scans.
_RESULT_CHECK = 0.02
# The share of time the scanner may spend dumping one map, rescans included: a big map is then
# scanned every four dump times whatever the poll interval, so scanning never takes more than a
# quarter of a core from the agent. Only the dump is counted, not the diff: when the ring
# overflows, rescans are how the agent keeps up, and the diff of a flood's notes (in an agent
# whose threads share the GIL) would hold them off for as long as the flood lasts.
_SCAN_SHARE = 0.25
# A traced map that is not in_place is polled only for what the tracer cannot see (under bpf(2)
# hooks, BPF programs' writes; under fexit, LRU evictions). While its scans find nothing the
# tracer does not report too, each next scan waits twice as long, up to _IDLE_BACKOFF times its
# usual period but not beyond _IDLE_MAX_S; a scan that finds something brings the period back
# at once. The trade: an idle map costs a quarter of its scan budget, and a BPF program's first
# write after a quiet spell waits up to _IDLE_BACKOFF scan periods to be found.
_IDLE_BACKOFF = 4
_IDLE_MAX_S = 5.0
# a replaced tracer is read at most this many times before it is closed: under a flood its ring
# fills as fast as it is read, with writes the new tracer (or the rescan after a move) reports
DRAIN_READS = 16
_KEY, _VALUE = itemgetter(1), itemgetter(2)  # a Change's key, value


class _Readable(Protocol):
    def read(self, timeout: float) -> list[WatchEvent]: ...


def drain(watcher: _Readable, reads: int = DRAIN_READS) -> list[WatchEvent]:
    """What ``watcher`` holds now, read at most ``reads`` times without waiting."""
    out: list[WatchEvent] = []
    for _ in range(reads):
        batch = watcher.read(0.0)
        if not batch:
            break
        out += batch
    return out


class Tracer(Protocol):
    """What AutoWatcher needs of a tracer (``TraceWatcher``; tests pass a scripted one)."""

    attached: list[str]

    @property
    def sees_programs(self) -> bool: ...

    @property
    def refused(self) -> str: ...

    def start(self) -> None: ...

    def read(self, timeout: float | None = 0.0) -> list[WatchEvent]: ...

    def close(self) -> None: ...


TracerFactory = Callable[[Mapping[str, Map]], Tracer]


class AutoWatcher:
    """Trace + repair poll for ``maps`` (cluster name -> open ``Map``), or poll alone.

    ``start()`` never fails for want of tracing: it falls back and logs why. ``read(timeout)``
    returns what is ready, waiting up to ``timeout`` seconds; ``events()`` yields until
    ``close()``, which any thread may call. An ``Overflow`` is passed through (for metrics) and
    followed, in a later ``read()``, by the rescan's changes.
    """

    def __init__(
        self,
        maps: Mapping[str, Map],
        *,
        poll_interval: float = 1.0,
        repair_interval: float = 10.0,
        tracing: bool = True,
        agent_tgid: int | None = None,
        ring_size: int | None = None,
        emit_initial: bool = False,
        tracer_factory: TracerFactory | None = None,
        in_place: Iterable[str] = (),
        hooks: Hooks = Hooks.AUTO,
        hold_scans: bool = False,
    ) -> None:
        if poll_interval <= 0 or repair_interval <= 0:
            raise ValueError("poll intervals must be positive")
        self.maps = dict(maps)  # none is fine: ``reopen`` may bring some
        self.poll_interval = poll_interval
        self.repair_interval = repair_interval
        self.tracing = tracing
        self.agent_tgid = agent_tgid
        self.ring_size = ring_size
        self.emit_initial = emit_initial
        self.tracer_factory = tracer_factory or self._trace_watcher
        # maps the data plane writes through lookup pointers (counters): tracing cannot see
        # those writes, so they are polled at poll_interval even where they are traced
        self.in_place = frozenset(in_place)
        self.hooks = hooks  # which tracer hooks to try (AUTO: fexit, else bpf(2))
        self.trace: Tracer | None = None
        self.traced: frozenset[str] = frozenset()
        self.why_not_traced = ""  # empty when every map is traced
        self._pollers = {name: MapPoller(name, m) for name, m in self.maps.items()}
        self._interval: dict[str, float] = {}
        self._backoff: dict[str, int] = {}  # maps that back off while idle: their factor now
        self._usual_due: dict[str, float] = {}  # a map's next scan, were it not backing off
        self._due: dict[str, float] = {}
        self._earliest: dict[str, float] = {}  # no scan before: the scan budget
        self._rescan: set[str] = set()
        self._overlay: dict[str, Notes] = {}
        self._overlay_lock = threading.Lock()  # note_written() comes from the consumer's thread
        self._initial: list[WatchEvent] = []  # the first scans' entries, with emit_initial
        # scan results not yet read, with the overlay that began at their dump (under the lock)
        self._scanned: list[tuple[str, Notes, list[Change]]] = []
        self._scanned_ready = threading.Event()
        self._failure: BaseException | None = None  # what killed the scanner, raised by read()
        # held: no periodic scan until release_scans() (a catching-up agent, see there)
        self._scans_held = hold_scans
        self._wake_scanner = threading.Event()
        # held by the scanner while it scans a map, by reopen() while it swaps maps: a scan of
        # an object no longer watched never finishes after the swap (taken before _overlay_lock)
        self._scan_lock = threading.Lock()
        self._scanner = threading.Thread(target=self._scan_loop, name="bpfsync-scan", daemon=True)
        self._stop = threading.Event()
        self._started = False

    @property
    def mode(self) -> str:
        """``trace+poll`` (fexit), ``syscall+poll`` (bpf(2) hooks) or ``poll``."""
        if self.trace is None:
            return "poll"
        return "trace+poll" if self.trace.sees_programs else "syscall+poll"

    # --- lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        """Attach the tracer where possible, then take each map's baseline scan."""
        if self._started:
            raise ValueError("AutoWatcher.start() called twice")
        self._started = True
        self.trace, self.traced, self.why_not_traced = self._attach(self.maps)
        self._schedule(self.maps, time.monotonic())
        for poller in self._pollers.values():
            poller.emit_initial = self.emit_initial
        try:
            self._initial = [c for p in self._pollers.values() for c in p.poll()]
        except BaseException:
            self.close()
            raise
        self._scanner.start()

    def reopen(
        self, maps: Mapping[str, Map], in_place: Iterable[str] | None = None
    ) -> tuple[list[WatchEvent], dict[str, MapDump]]:
        """Watch ``maps`` from now on: names whose ``Map`` is another object than before (the
        data plane recreated its map), names not watched before, and no longer those left
        out. Call it from the thread that calls ``read()``, between two reads.

        A new tracer is attached before the old one is drained and closed, and the maps that
        stay keep their scans' state (baseline, overlay, back-off) and are rescanned once
        (what the old ring still held past the drain is found so): no write to them is lost.
        Each new object is dumped after the attach: its baseline, which every later report
        is relative to. Returns the old tracer's last events of the maps that stay (to pass
        on before anything a later ``read()`` returns) and the new objects' baselines, for
        seeding. What the replaced objects still reported is dropped: they are not watched
        any more. ``in_place``: as for the constructor, when it changes. If a baseline dump
        fails, nothing has changed."""
        if not self._started:
            raise ValueError("AutoWatcher.reopen() before start()")
        maps = dict(maps)
        fresh = [n for n, m in maps.items() if self.maps.get(n) is not m]
        stale = set(fresh) | (set(self.maps) - set(maps))  # names whose old object goes
        if in_place is not None:
            self.in_place = frozenset(in_place)
        tracer, traced, why = self._attach(maps)
        pollers = {n: MapPoller(n, maps[n]) for n in fresh}
        try:
            for poller in pollers.values():
                poller.poll()  # after the attach: no write between the two goes unseen
        except BaseException:
            if tracer is not None:
                tracer.close()
            raise
        old, left = self.trace, []
        if old is not None:
            # bounded: the rescan below finds what is left in the old ring
            left = drain(old)
            old.close()
        left = [e for e in left if e.map not in stale]
        kept_traced = self.traced - stale
        with self._scan_lock, self._overlay_lock:
            self.trace, self.traced, self.why_not_traced = tracer, traced, why
            self.maps = maps
            for name in stale:
                self._pollers.pop(name, None)
                self._overlay.pop(name, None)
                for table in (self._interval, self._backoff, self._usual_due, self._due,
                              self._earliest):  # fmt: skip
                    table.pop(name, None)
            self._rescan -= stale
            self._scanned = [scan for scan in self._scanned if scan[0] not in stale]
            self._pollers.update(pollers)
            self._schedule(maps, None)
            self._schedule(fresh, time.monotonic())
            self._rescan |= kept_traced
            self._note_locked(left)
        self._wake_scanner.set()
        return left, {n: p.baseline.dump for n, p in pollers.items() if p.baseline is not None}

    def _attach(self, maps: Mapping[str, Map]) -> tuple[Tracer | None, frozenset[str], str]:
        """A tracer for those of ``maps`` it can trace, started (None where none starts), the
        maps it traces, and why the others are not traced ("" when all are); logged."""
        traceable, refused = self._split(maps) if self.tracing else ({}, {})
        tracer: Tracer | None = None
        why = ""
        if not self.tracing:
            why = "tracing switched off"
        elif traceable:
            candidate = self.tracer_factory(traceable)
            try:
                candidate.start()
            except KernelError as e:
                why = str(e).splitlines()[0]
            else:
                tracer = candidate
        if refused and not why:
            why = "; ".join(refused.values())
        traced = frozenset(traceable) if tracer is not None else frozenset()
        polled = sorted(set(maps) - traced)
        if why and polled:
            log.warning(
                "trace watcher not used for %s (%s): polling every %g s instead",
                ", ".join(polled), why, self.poll_interval,
            )  # fmt: skip
        elif tracer is not None and not tracer.sees_programs:
            log.warning(
                "fexit refused (%s): writes to %s from user space are traced at bpf(2), writes"
                " by BPF programs are polled every %g s",
                tracer.refused or "not available", ", ".join(sorted(traced)),
                self.poll_interval,
            )  # fmt: skip
        if tracer is not None:
            log.info("watching %s by trace (%s)", ", ".join(sorted(traced)),
                     ", ".join(tracer.attached))  # fmt: skip
        return tracer, traced, why

    def _schedule(self, names: Iterable[str], now: float | None) -> None:
        """Each map's scan period, for the tracer in use; with ``now``, its first scan from
        then (under the lock once the scanner runs)."""
        # the poll is the only eye on BPF programs' writes where the hooks are bpf(2)'s
        seen = self.trace is not None and self.trace.sees_programs
        for name in names:
            slow = name in self.traced and name not in self.in_place and seen
            self._interval[name] = self.repair_interval if slow else self.poll_interval
            if name in self.traced and name not in self.in_place:
                self._backoff.setdefault(name, 1)
            else:
                self._backoff.pop(name, None)
            if now is not None:
                self._due[name] = now + self._interval[name]
                self._earliest[name] = now

    def _trace_watcher(self, maps: Mapping[str, Map]) -> Tracer:
        return TraceWatcher(
            maps, agent_tgid=self.agent_tgid, ring_size=self.ring_size, hooks=self.hooks
        )

    def _split(self, maps: Mapping[str, Map]) -> tuple[dict[str, Map], dict[str, str]]:
        traceable: dict[str, Map] = {}
        refused: dict[str, str] = {}
        for name, m in maps.items():
            try:
                check_traceable(name, m.info)
            except NotSupportedError as e:
                refused[name] = str(e)
            else:
                traceable[name] = m
        return traceable, refused

    def close(self) -> None:
        """Stop ``events()``/``read()`` and detach the tracer. The maps stay the caller's."""
        self._stop.set()
        self._wake_scanner.set()
        self._scanned_ready.set()
        if self._scanner.is_alive() and self._scanner is not threading.current_thread():
            self._scanner.join(timeout=10)
        if self.trace is not None:
            self.trace.close()

    def __enter__(self) -> AutoWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def baseline(self, name: str) -> MapDump:
        """The scan of ``name`` that later reports are relative to (after ``start()``): seed
        consumers from it, so no change falls between their copy and the watcher's."""
        snap = self._pollers[name].baseline
        if snap is None:
            raise ValueError("AutoWatcher.baseline() before start()")
        return snap.dump

    def note_written(self, name: str, writes: Iterable[tuple[bytes, bytes | None]]) -> None:
        """The consumer wrote these values (None: deleted) into map ``name``: compare the next
        scan with them, not with the last scan. Without this, a key the consumer created between
        two scans and something else then deleted would be in neither scan and go unreported.
        Any thread may call it."""
        writes = writes if isinstance(writes, list) else list(writes)
        with self._overlay_lock:
            self._overlay.setdefault(name, Notes()).add(writes)

    def note_filled(self, name: str, keys: bytes, values: bytes, count: int) -> None:
        """``note_written`` of ``count`` updates at once, their keys and values joined (a
        catch-up's)."""
        with self._overlay_lock:
            self._overlay.setdefault(name, Notes()).add_joined(keys, values, count)

    def release_scans(self) -> None:
        """Start the periodic scans (after ``hold_scans=True``).

        A consumer that is not taking changes yet (an agent catching up) holds them: each scan
        of a map it is filling would diff up to every entry against what it wrote, at ~1 µs
        each, and compete with the filling. Nothing is lost meanwhile: the first scan after the
        release compares the map with the baseline and everything the consumer wrote since.
        """
        with self._overlay_lock:
            self._scans_held = False
        self._wake_scanner.set()

    # --- reading -------------------------------------------------------------------------------

    def read(self, timeout: float | None = 0.0) -> list[WatchEvent]:
        """What is ready now (traced changes, scan results); waits up to ``timeout`` seconds
        (None: until something happens) when nothing is."""
        if not self._started:
            raise ValueError("AutoWatcher.read() before start()")
        out: list[WatchEvent] = self._initial
        self._initial = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.is_set():
            out += self._take_scanned()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if out:
                remaining = 0.0
            if self.trace is not None:
                # bounded, so that scan results finished meanwhile are picked up
                step = _RESULT_CHECK if remaining is None else min(remaining, _RESULT_CHECK)
                out += self._note(self.trace.read(step))
            elif remaining is None or remaining > 0:
                self._scanned_ready.wait(remaining)
            out += self._take_scanned()
            if out or (deadline is not None and time.monotonic() >= deadline):
                break
        return out

    def events(self) -> Iterator[WatchEvent]:
        """Yield events until ``close()``."""
        while not self._stop.is_set():
            yield from self.read(timeout=0.5)

    def _take_scanned(self) -> list[WatchEvent]:
        """Finished scans' changes, minus keys reported since their dump began: a scan's value
        is older than such a report, and handed over after it, it would undo it."""
        if not self._scanned_ready.is_set():
            return []
        out: list[WatchEvent] = []
        sooner = False
        with self._overlay_lock:
            if self._failure is not None:
                raise self._failure
            for name, since, changes in self._scanned:
                new = [c for c in changes if c.key not in since] if since else changes
                if name in self._backoff:
                    # only now is it known whether the scan found more than the ring held yet
                    if new:
                        sooner |= self._found(name)
                    else:
                        self._quiet(name)
                out += new
            self._scanned = []
            self._scanned_ready.clear()
        if sooner:
            self._wake_scanner.set()
        return out

    def backoff(self, name: str) -> int:
        """How many times its usual period the next periodic scan of ``name`` waits (1: none;
        see ``_IDLE_BACKOFF``)."""
        return self._backoff.get(name, 1)

    def _quiet(self, name: str) -> None:
        """A scan of ``name`` found nothing new: wait longer for the next one (under the lock)."""
        self._backoff[name] = min(2 * self._backoff[name], _IDLE_BACKOFF)

    def _found(self, name: str) -> bool:
        """A scan of ``name`` found what the tracer did not report: back to the usual period
        (under the lock). True when that brings its next scan forward."""
        self._backoff[name] = 1
        due = self._usual_due[name]
        if due >= self._due[name]:
            return False
        self._due[name] = due
        return True

    def _note(self, events: list[WatchEvent]) -> list[WatchEvent]:
        """Record what the tracer reported (the overlay) and which maps need a rescan."""
        with self._overlay_lock:
            self._note_locked(events)
        return events

    def _note_locked(self, events: list[WatchEvent]) -> None:
        if events and all(type(e) is Change for e in events):
            changes = cast(list[Change], events)
            first = changes[0].map
            if all(c.map == first for c in changes):  # the usual batch: one map's, noted in C
                notes = self._overlay.setdefault(first, Notes())
                notes.add_columns(list(map(_KEY, changes)), list(map(_VALUE, changes)))
                return
        reported: dict[str, list[tuple[bytes, bytes | None]]] = {}
        for e in events:
            if type(e) is Change:
                reported.setdefault(e.map, []).append((e.key, e.value))
            elif isinstance(e, Overflow):
                self._rescan.update(self.traced if e.map is None else (e.map,))
                self._wake_scanner.set()
        for name, pairs in reported.items():
            self._overlay.setdefault(name, Notes()).add(pairs)

    # --- the scanner thread ------------------------------------------------------------------

    def _scan_loop(self) -> None:
        try:
            while not self._stop.is_set():
                with self._overlay_lock:
                    now = time.monotonic()
                    # a map whose last results are not read yet waits: its filter (see
                    # _take_scanned) covers the reports since that one dump
                    waiting = {n for n, _, _ in self._scanned}
                    # a rescan (after lost events) need not wait for the interval, but it
                    # does for the scan budget: under a flood of overflows it would scan
                    # back to back, taking the CPU the flood needs
                    next_at = {n: self._earliest[n] if n in self._rescan else t
                               for n, t in self._due.items()}
                    due = [n for n, t in next_at.items()
                           if t <= now and n not in waiting and not self._scans_held]
                    self._rescan.difference_update(due)
                    # no map at all: reopen() wakes us when it brings some
                    soonest = min(next_at.values(), default=now + 1.0)
                    wait = _RESULT_CHECK if waiting else soonest - now
                    if self._scans_held:
                        wait = 1.0  # release_scans() wakes us
                if not due:
                    self._wake_scanner.wait(max(0.0, wait))
                    self._wake_scanner.clear()
                    continue
                for name in due:
                    with self._scan_lock:
                        if name in self._pollers:  # not left out by reopen() meanwhile
                            self._scan_due(name)
        except BaseException as err:  # a reader must not wait forever on a dead scanner
            if self._stop.is_set():
                return
            log.exception("map scan failed")
            with self._overlay_lock:
                self._failure = err
            self._scanned_ready.set()

    def _scan_due(self, name: str) -> None:
        """Scan ``name``, hand its changes over and schedule its next scan."""
        started = time.monotonic()
        changes, since = self._scan(name)
        # at most _SCAN_SHARE of the time dumping a map (the diff is not counted)
        p = self._pollers[name]
        budget = p.last_scan_seconds / _SCAN_SHARE
        with self._overlay_lock:
            self._earliest[name] = started + budget
            period = max(self._interval[name], budget)
            self._usual_due[name] = started + period
            if not changes and name in self._backoff:
                self._quiet(name)
            idle = period * self._backoff.get(name, 1)
            self._due[name] = started + min(idle, max(period, _IDLE_MAX_S))
            if changes:  # whether they are new is up to _take_scanned
                self._scanned.append((name, since, changes))
                self._scanned_ready.set()

    def _scan(self, name: str) -> tuple[list[Change], Notes]:
        """Changes between what the consumer was told about ``name`` and its content now, and
        the overlay begun at the dump (what is reported from then on)."""
        poller = self._pollers[name]
        since = Notes()
        with self._overlay_lock:  # before the dump: see the module docstring
            told = self._overlay.pop(name, None) or Notes()
            self._overlay[name] = since
        snap = poller.rescan()
        prev, poller.baseline = poller.baseline, snap
        if prev is None:
            return (full(name, snap) if self.emit_initial else []), since
        with self._overlay_lock:  # reported during the dump: the tracer has the last word
            during = since.copy()
        return diff(name, prev, snap, told, skip=during), since
