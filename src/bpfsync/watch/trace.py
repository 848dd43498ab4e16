"""The trace watcher: kernel hooks report each successful map write through a ring buffer.

``TraceWatcher`` loads ``bpf/trace.bpf.o``, picks one of its two hook sets (``Hooks``), writes
the watched map ids and the agent's process id into the object's maps, attaches, and turns ring
records into ``Change``s in bulk:

- ``FEXIT`` — fexit programs on the map-op functions (those this kernel lacks, probed in its
  BTF, are turned off): every write, from user space and from BPF programs.
- ``SYSCALL`` — the raw ``sys_enter``/``sys_exit`` tracepoints (tp_btf) around bpf(2): every
  write made from user space, single or batched, by any process; not BPF programs' writes
  (``sees_programs`` is False: the caller must poll for those; ``AutoWatcher`` does). For kernels
  whose policy refuses fexit but runs BTF tracepoints, like this project's CI host.
- ``AUTO`` (default) — ``FEXIT``, else ``SYSCALL``; ``refused`` says why fexit was not used.

Where neither loads, ``start()`` raises the ``KernelError`` that says why; ``AutoWatcher`` then
polls alone. The rest of this text holds for both sets unless it says otherwise.

- Only successful ops are reported (fexit sees the return value).
- A record holds one map op, or as many elements of a bpf(2) batch command as its key and
  value areas fit (``elements()`` unpacks them): 16 of a 4-byte key and a 16-byte value, so a
  20,000-element batch takes 0.7 MB of the 8 MiB ring, not 10.7 MB, and two reads per record
  instead of two per element (which is what the hooks cost the writer).
- Keys, and values of maps that are not per-CPU, are captured up to 256 bytes (``KEY_MAX``,
  ``VALUE_MAX``); a larger map is refused with ``NotSupportedError`` naming the limit.
- Per-CPU maps: the kernel record carries the key only (a program's write is one CPU's share,
  a syscall's write all of them); the value is re-read from the map, every CPU, once per key per
  batch. A key gone by then is reported as deleted.
- The agent's own writes (bpf(2) map writes by the agent's process, outside interrupts) are
  suppressed in the kernel so that applying a peer's change does not echo it; see
  ``trace.bpf.c`` for how, and what that cannot tell apart.
- Loss is never silent: a full ring drops records and counts them per map, and a fexit program
  that could not run because another instance was active on the CPU (a softirq interrupting it)
  is counted by the kernel as a recursion miss. Both come out as ``Overflow`` events, after
  which the caller must rescan (``AutoWatcher`` does).

Not seen: in-place writes through lookup pointers, LRU evictions; under ``FEXIT``, deletions by
BPF_MAP_LOOKUP_AND_DELETE_BATCH; under ``SYSCALL``, anything a BPF program writes, and batches
of more than ``BATCH_MAX`` elements (reported as ``Overflow``). ``AutoWatcher``'s poll covers them.
"""

from __future__ import annotations

import enum
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bpfsync.errors import NotSupportedError, PermissionDeniedError
from bpfsync.kernel.features import function_exists, preempt_count_in_btf, tracing_supported
from bpfsync.kernel.info import ProgramInfo
from bpfsync.kernel.links import Link
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject
from bpfsync.kernel.ringbuf import DEFAULT_MAX_RECORDS, RingBuffer
from bpfsync.model import Change, Overflow, Seen, WatchEvent, changes
from bpfsync.watch.trace_abi import (
    CONFIG,
    COUNTER_KEYS,
    RECORD,
    REQUIRED_FUNCTIONS,
    WATCH_ENTRY,
    WATCH_MAX,
    Counter,
    OwnMode,
    check_traceable,
    elements,
)

__all__ = ["MISS_CHECK_SECONDS", "OBJECT", "SYSCALL_HOOK", "Hooks", "TraceStats", "TraceWatcher",
           "object_path"]


class Hooks(enum.Enum):
    """Which kernel hooks report the writes."""

    FEXIT = "fexit"  # the map-op functions: every write, from user space and BPF programs
    SYSCALL = "syscall"  # bpf(2) entry and exit (tp_btf): user-space writes only
    AUTO = "auto"  # fexit where the kernel allows it, else syscall


OBJECT = "trace.bpf.o"
SYSCALL_HOOK = "__x64_sys_bpf"
_OWN_HOOK_PROGRAMS = ("agent_bpf_enter", "agent_bpf_exit")
_SYSCALL_PROGRAMS = ("sys_bpf_enter", "sys_bpf_exit")

# How often the kernel's per-program recursion-miss counters are read (one syscall per program).
MISS_CHECK_SECONDS = 0.25


def object_path() -> Path:
    """The compiled tracer shipped in the package (built by `make bpf`)."""
    path = Path(str(resources.files("bpfsync") / "bpf" / OBJECT))
    if not path.is_file():
        raise NotSupportedError(f"the tracer {path} is not built (run `make bpf`)")
    return path


@dataclass(frozen=True, slots=True)
class TraceStats:
    """Totals since ``start()`` from the kernel side's counters."""

    submitted: int  # records put in the ring
    dropped: int  # records lost to a full ring
    suppressed: int  # own writes not reported
    recursion_misses: int  # writes the fexit programs could not see (reported as Overflow)


@dataclass(frozen=True, slots=True)
class _Watched:
    name: str
    map: Map
    key_size: int
    value_size: int
    percpu: bool


class TraceWatcher:
    """Reports every successful update and delete of ``maps`` (cluster name -> open ``Map``).

    ``start()`` loads and attaches; ``read(timeout)`` returns the events ready (waiting up to
    ``timeout`` seconds for the first); ``events()`` yields until ``close()``, which any thread
    may call. The maps stay the caller's: the watcher never closes them.

    ``agent_tgid`` is the process whose bpf(2) map writes are its own and not reported: this
    process by default, 0 for none.
    """

    def __init__(
        self,
        maps: Mapping[str, Map],
        *,
        agent_tgid: int | None = None,
        ring_size: int | None = None,
        max_batch: int = DEFAULT_MAX_RECORDS,
        path: str | os.PathLike[str] | None = None,
        hooks: Hooks = Hooks.AUTO,
    ) -> None:
        if not maps:
            raise ValueError("nothing to watch")
        if len(maps) > WATCH_MAX:
            raise NotSupportedError(f"the trace watcher watches at most {WATCH_MAX} maps")
        self._watched: dict[int, _Watched] = {}
        for name, m in maps.items():
            check_traceable(name, m.info)
            if m.info.id in self._watched:
                other = self._watched[m.info.id].name
                raise ValueError(f"{other!r} and {name!r} are the same map (id {m.info.id})")
            self._watched[m.info.id] = _Watched(
                name, m, m.info.key_size, m.info.value_size, m.info.type.percpu
            )
        self.agent_tgid = os.getpid() if agent_tgid is None else agent_tgid
        self.ring_size = ring_size
        self.max_batch = max_batch
        self.path = Path(path) if path is not None else None
        self.own_mode = OwnMode.OFF
        self._want = hooks
        self.hooks: Hooks | None = None  # the set attached, after start()
        self.refused = ""  # why the preferred set was refused, when AUTO fell back
        self.attached: list[str] = []  # kernel functions (or tracepoints) hooked
        self._obj: BpfObject | None = None
        self._links: list[Link] = []
        self._ring: RingBuffer | None = None
        self._counters: Map | None = None
        self._watch_map: Map | None = None
        self._prog_fds: list[int] = []
        self._dropped: dict[int, int] = dict.fromkeys(self._watched, 0)
        self._dropped_total = 0
        self._misses = 0
        self._next_miss_check = 0.0
        self._lock = threading.Lock()  # one read at a time; close() waits for it
        self._closed = False

    # --- lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        """Load, configure and attach. Raises the ``KernelError`` that says why tracing is
        impossible here (with ``hooks="auto"``: why neither hook set works)."""
        if self._obj is not None or self.hooks is not None:
            raise ValueError("TraceWatcher.start() called twice")
        choices = (Hooks.FEXIT, Hooks.SYSCALL) if self._want is Hooks.AUTO else (self._want,)
        refusals: list[str] = []
        if self._want is Hooks.AUTO:
            # the probe program loads in ~20 ms; a refused load of the whole object takes ~90
            fexit, why = tracing_supported()
            if not fexit:
                choices = (Hooks.SYSCALL,)
                refusals.append(f"{Hooks.FEXIT.value}: {why}")
        for hooks in choices:
            try:
                self._start(hooks)
            except (NotSupportedError, PermissionDeniedError) as err:
                refusals.append(f"{hooks.value}: {str(err).splitlines()[0]}")
                if hooks is choices[-1]:
                    if len(refusals) > 1:
                        raise type(err)("; ".join(refusals), err.errno) from err
                    raise
            else:
                self.hooks = hooks
                self.refused = "; ".join(refusals)
                return

    def _start(self, hooks: Hooks) -> None:
        if hooks is Hooks.FEXIT:
            self._check_functions()
            self.own_mode = self._choose_own_mode()
        else:  # bpf(2) callers run in task context: the tgid alone is exact
            self.own_mode = OwnMode.TGID if self.agent_tgid else OwnMode.OFF
        obj = BpfObject.open(self.path or object_path())
        self._obj = obj
        try:
            self._configure_programs(obj, hooks)
            if self.ring_size is not None:
                obj.map_spec("events").set_max_entries(self.ring_size)
            obj.load()
            self._fill_maps(obj)
            events = obj.map("events")
            try:
                self._ring = RingBuffer(events.fd, events.info.max_entries, RECORD)
            finally:
                events.close()
            self._attach(obj)
        except BaseException:
            self._teardown()
            raise

    @property
    def mode(self) -> str:
        """``trace`` (fexit), ``syscall`` (bpf(2) hooks), or ``none`` before ``start()``."""
        if self.hooks is None:
            return "none"
        return "trace" if self.hooks is Hooks.FEXIT else "syscall"

    @property
    def sees_programs(self) -> bool:
        """Whether writes made by BPF programs are reported (not by the syscall hooks)."""
        return self.hooks is Hooks.FEXIT

    def close(self) -> None:
        """Detach and free everything; a ``read()`` in another thread returns empty. Idempotent."""
        self._closed = True
        if self._ring is not None:
            self._ring.wake()
        with self._lock:
            self._teardown()

    def _teardown(self) -> None:
        for link in reversed(self._links):  # map ops first, the own-write hooks last
            link.destroy()
        self._links.clear()
        for m in (self._ring, self._counters, self._watch_map):
            if m is not None:
                m.close()
        self._ring = self._counters = self._watch_map = None
        self._prog_fds.clear()
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> TraceWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading -------------------------------------------------------------------------------

    def read(self, timeout: float | None = 0.0) -> list[WatchEvent]:
        """The events ready now; if none, wait up to ``timeout`` s (None: forever) for some."""
        with self._lock:
            out = self._drain()
        ring = self._ring
        if out or timeout == 0 or ring is None:
            return out
        ring.wait(timeout)
        with self._lock:
            return self._drain()

    def read_records(self, timeout: float | None = 0.0) -> npt.NDArray[np.void]:
        """The raw ring records (``RECORD``; ``elements()`` unpacks them), undecoded: for
        diagnostics and benchmarks. Values of per-CPU maps are not re-read and no ``Overflow``
        check is made."""
        with self._lock:
            if self._closed or self._ring is None:
                return np.empty(0, RECORD)
            ring = self._ring
            out = ring.read(self.max_batch)
        if len(out) or timeout == 0:
            return out
        ring.wait(timeout)
        with self._lock:
            if self._closed:
                return np.empty(0, RECORD)
            return ring.read(self.max_batch)

    def events(self) -> Iterator[WatchEvent]:
        """Yield events as they arrive until ``close()``."""
        while not self._closed:
            yield from self.read(timeout=0.5)

    def note_written(self, name: str, writes: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Nothing to do: the consumer's own writes are suppressed in the kernel, and there is
        no scan to compare with them (AutoWatcher.note_written has the polling side)."""

    def note_filled(self, name: str, keys: bytes, values: bytes, count: int) -> None:
        """Nothing to do, as for ``note_written``."""

    def backoff(self, name: str) -> int:
        """1: this watcher never scans (``AutoWatcher.backoff`` has the scans')."""
        return 1

    def stats(self) -> TraceStats:
        with self._lock:
            counters = self._read_counters()
            return TraceStats(
                submitted=counters[Counter.SUBMITTED],
                dropped=counters[Counter.DROPPED],
                suppressed=counters[Counter.SUPPRESSED],
                recursion_misses=self._misses,
            )

    def _drain(self) -> list[WatchEvent]:
        if self._closed or self._ring is None:
            return []
        records = self._ring.read(self.max_batch)
        out: list[WatchEvent] = self._decode(records) if len(records) else []
        out += self._overflows()
        return out

    def _decode(self, records: npt.NDArray[np.void]) -> list[WatchEvent]:
        """Records -> Changes, in ring order; whole groups per map, not per record."""
        ids = records["map_id"]
        first = int(ids[0])
        if (ids == first).all():
            w = self._watched.get(first)
            return list(self._changes(w, records)) if w is not None else []
        # each record's changes (a batch's record holds several), put back in ring order
        out: list[list[Change]] = [[] for _ in range(len(records))]
        for map_id in np.unique(ids).tolist():
            w = self._watched.get(map_id)
            if w is None:  # unwatched since the record was made
                continue
            rows = np.flatnonzero(ids == map_id)
            found = self._changes(w, records[rows])
            start = 0
            for i, end in zip(rows.tolist(), np.cumsum(records["count"][rows]).tolist(),
                              strict=True):
                out[i] = found[start:end]
                start = end
        return [c for group in out for c in group]

    def _changes(self, w: _Watched, recs: npt.NDArray[np.void]) -> list[Change]:
        ks = w.key_size
        karr, varr, deleted = elements(recs, ks, 0 if w.percpu else w.value_size)
        n = len(karr)
        # 'V' items come out as bytes objects, sliced in C (7x a list of slices)
        keys: list[bytes] = np.frombuffer(karr.tobytes(), f"V{ks}").tolist()
        values: list[bytes | None]
        if w.percpu:
            current: dict[bytes, bytes | None] = {}
            values = [None] * n
            for i in np.flatnonzero(~deleted).tolist():
                key = keys[i]
                if key not in current:
                    current[key] = w.map.lookup(key)
                values[i] = current[key]
        else:
            values = np.frombuffer(varr.tobytes(), f"V{w.value_size}").tolist()
            for i in np.flatnonzero(deleted).tolist():
                values[i] = None
        return changes(w.name, keys, values, Seen.TRACE)

    def _overflows(self) -> list[WatchEvent]:
        """Overflow events for records dropped, or writes missed, since the last check."""
        out: list[WatchEvent] = []
        dropped = self._read_counter(Counter.DROPPED)  # once per read: one slot, not all
        if dropped != self._dropped_total and self._watch_map is not None:
            self._dropped_total = dropped
            for map_id, w in self._watched.items():
                raw = self._watch_map.lookup(struct.pack("<I", map_id))
                total = WATCH_ENTRY.unpack(raw)[0] if raw is not None else 0
                if total != self._dropped[map_id]:
                    out.append(Overflow(w.name, total - self._dropped[map_id]))
                    self._dropped[map_id] = total
        now = time.monotonic()
        if now >= self._next_miss_check:
            self._next_miss_check = now + MISS_CHECK_SECONDS
            misses = sum(ProgramInfo.from_fd(fd).recursion_misses for fd in self._prog_fds)
            if misses != self._misses:
                out.append(Overflow(None, misses - self._misses))
                self._misses = misses
        return out

    def _read_counters(self) -> list[int]:
        return [self._read_counter(slot) for slot in Counter]

    def _read_counter(self, slot: Counter) -> int:
        if self._counters is None:
            return 0
        raw = self._counters.lookup(COUNTER_KEYS[slot])
        return int(np.frombuffer(raw, "<u8").sum()) if raw else 0

    # --- setup ---------------------------------------------------------------------------------

    def _check_functions(self) -> None:
        for w in self._watched.values():
            kind = w.map.info.type
            missing = [fn for fn in REQUIRED_FUNCTIONS[kind] if not function_exists(fn)]
            if missing:
                raise NotSupportedError(
                    f"map {w.name!r}: this kernel lacks {', '.join(missing)}, through which "
                    f"{kind.name.lower()} maps are written, so their writes cannot be traced"
                )

    def _choose_own_mode(self) -> OwnMode:
        if self.agent_tgid == 0:
            return OwnMode.OFF
        if not preempt_count_in_btf():
            raise NotSupportedError(
                "this kernel's BTF has neither __preempt_count nor pcpu_hot, so the tracer "
                "cannot tell a softirq write from the agent's own: own-write suppression is "
                "impossible (agent_tgid=0 reports every write, own ones included)"
            )
        return OwnMode.SYSCALL if function_exists(SYSCALL_HOOK) else OwnMode.TGID

    def _configure_programs(self, obj: BpfObject, hooks: Hooks) -> None:
        for prog in obj.programs.values():
            kind, _, fn = prog.section.partition("/")
            if kind == "tp_btf":
                prog.set_autoload(hooks is Hooks.SYSCALL and prog.name in _SYSCALL_PROGRAMS)
            elif kind not in ("fentry", "fexit"):
                continue
            elif hooks is not Hooks.FEXIT:
                prog.set_autoload(False)  # one refused fexit program fails the whole load
            elif prog.name in _OWN_HOOK_PROGRAMS:
                prog.set_autoload(self.own_mode == OwnMode.SYSCALL)
            else:
                prog.set_autoload(function_exists(fn))

    def _fill_maps(self, obj: BpfObject) -> None:
        with obj.map("trace_config") as config:
            config.update(struct.pack("<I", 0), CONFIG.pack(self.agent_tgid, self.own_mode))
        self._watch_map = obj.map("watched")
        for map_id in self._watched:
            self._watch_map.update(struct.pack("<I", map_id), WATCH_ENTRY.pack(0))
        self._counters = obj.map("counters")

    def _attach(self, obj: BpfObject) -> None:
        progs = [p for p in obj.programs.values() if p.autoload and "/" in p.section]
        # the own-write hooks go first, so no own write slips out between two attachments
        progs.sort(key=lambda p: p.name not in _OWN_HOOK_PROGRAMS)
        for prog in progs:
            self._links.append(prog.attach())
            self._prog_fds.append(prog.fd)
            fn = prog.section.partition("/")[2]
            if prog.name not in _OWN_HOOK_PROGRAMS:
                self.attached.append(fn)
