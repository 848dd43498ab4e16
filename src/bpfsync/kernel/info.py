"""What the kernel says about a map (``MapInfo``: type and shape) or a program (``ProgramInfo``),
and the per-CPU value layout.

Per-CPU maps hand user space one value per *possible* CPU, each padded to 8 bytes; the number of
possible CPUs comes from ``/sys/devices/system/cpu/possible`` (a range list such as ``0-3,8``).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from bpfsync.kernel import _libbpf


class MapType(enum.IntEnum):
    """``enum bpf_map_type``. Types newer than this list decode as ``UNKNOWN_<n>``."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31
    CGRP_STORAGE = 32
    ARENA = 33

    @classmethod
    def _missing_(cls, value: object) -> MapType | None:
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member

    @property
    def percpu(self) -> bool:
        """User space sees one value per possible CPU."""
        return self in _PERCPU

    @property
    def is_array(self) -> bool:
        """Keys are u32 indexes that always exist: elements cannot be deleted."""
        return self in (MapType.ARRAY, MapType.PERCPU_ARRAY)

    @property
    def is_hash(self) -> bool:
        return self in (
            MapType.HASH,
            MapType.LRU_HASH,
            MapType.PERCPU_HASH,
            MapType.LRU_PERCPU_HASH,
        )


_PERCPU = frozenset(
    {
        MapType.PERCPU_HASH,
        MapType.PERCPU_ARRAY,
        MapType.LRU_PERCPU_HASH,
        MapType.PERCPU_CGROUP_STORAGE,
    }
)


class MapFlags(enum.IntFlag):
    """``map_flags`` of BPF_MAP_CREATE (the ones bpfsync uses)."""

    NONE = 0
    NO_PREALLOC = 1  # BPF_F_NO_PREALLOC: allocate elements on update (LPM tries require it)


class UpdateFlags(enum.IntFlag):
    """``flags`` of BPF_MAP_UPDATE_ELEM (and ``elem_flags`` of the batch form)."""

    ANY = 0  # create or replace
    NOEXIST = 1  # create only
    EXIST = 2  # replace only
    LOCK = 4  # BPF_F_LOCK: take the value's bpf_spin_lock


@dataclass(frozen=True, slots=True)
class MapInfo:
    """BPF_OBJ_GET_INFO_BY_FD for a map. ``name`` is the kernel's (at most 15 characters)."""

    id: int
    type: MapType
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    btf_id: int
    btf_key_type_id: int
    btf_value_type_id: int

    @classmethod
    def from_fd(cls, fd: int) -> MapInfo:
        raw = _libbpf.map_info(fd)
        return cls(
            id=raw.id,
            type=MapType(raw.type),
            name=raw.name.decode(errors="replace"),
            key_size=raw.key_size,
            value_size=raw.value_size,
            max_entries=raw.max_entries,
            flags=raw.map_flags,
            btf_id=raw.btf_id,
            btf_key_type_id=raw.btf_key_type_id,
            btf_value_type_id=raw.btf_value_type_id,
        )

    def describe(self) -> str:
        """Short human form for messages: ``'counts' (id 42, hash)``."""
        return f"{self.name!r} (id {self.id}, {self.type.name.lower()})"


@dataclass(frozen=True, slots=True)
class ProgramInfo:
    """BPF_OBJ_GET_INFO_BY_FD for a program. ``run_cnt``/``run_time_ns`` count only while
    kernel.bpf_stats_enabled is on; ``recursion_misses`` counts runs a tracing program missed
    because it was already running on that CPU (kernel 5.12+, else 0)."""

    id: int
    type: int
    name: str
    run_cnt: int
    run_time_ns: int
    recursion_misses: int
    verified_insns: int

    @classmethod
    def from_fd(cls, fd: int) -> ProgramInfo:
        raw = _libbpf.prog_info(fd)
        return cls(
            id=raw.id,
            type=raw.type,
            name=raw.name.decode(errors="replace"),
            run_cnt=raw.run_cnt,
            run_time_ns=raw.run_time_ns,
            recursion_misses=raw.recursion_misses,
            verified_insns=raw.verified_insns,
        )


def parse_cpu_list(text: str) -> int:
    """Count the CPUs in a kernel CPU list such as ``0-3,8-9`` (-> 6)."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs: how many values a per-CPU map holds per key."""
    with open("/sys/devices/system/cpu/possible") as f:
        return parse_cpu_list(f.read())


def round_up8(n: int) -> int:
    return (n + 7) & ~7


def value_stride(map_type: MapType, value_size: int) -> int:
    """Bytes per value in user-space buffers: value_size, or 8-padded times CPUs for per-CPU."""
    if map_type.percpu:
        return round_up8(value_size) * possible_cpus()
    return value_size


@functools.cache
def boot_id() -> str:
    """This boot's random id: a map id names one map object only within one boot."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()
