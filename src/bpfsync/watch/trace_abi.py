"""The user-space side of bpf/trace.h: the ring record's layout, the tracer's limits and enums,
what the tracer can watch, and ``elements()``, which unpacks records.

trace.h is shared by trace.bpf.c and this module: a change to one is a change to both (the
tests load the object and check the layout against it). Nothing here loads or attaches anything;
the watcher that does is trace.py.
"""

from __future__ import annotations

import enum
import struct

import numpy as np
import numpy.typing as npt

from bpfsync.errors import NotSupportedError
from bpfsync.kernel.info import MapInfo, MapType

__all__ = [
    "BATCH_MAX", "CONFIG", "COUNTER_KEYS", "F_INTERRUPT", "F_VALUE_NOT_CAPTURED", "KEY_MAX",
    "OP_DELETE", "OP_UPDATE", "RECORD", "REQUIRED_FUNCTIONS", "VALUE_MAX", "WATCH_ENTRY",
    "WATCH_MAX", "Counter", "OwnMode", "check_traceable", "elements",
]

KEY_MAX = 256  # TRACE_KEY_MAX
VALUE_MAX = 256  # TRACE_VALUE_MAX
WATCH_MAX = 1024  # TRACE_WATCH_MAX
BATCH_MAX = 1 << 16  # TRACE_BATCH_MAX
OP_UPDATE, OP_DELETE = 1, 2  # enum trace_op
F_VALUE_NOT_CAPTURED, F_INTERRUPT = 1, 2  # enum trace_flag

RECORD = np.dtype(
    {
        "names": ["map_id", "key_len", "value_len", "op", "flags", "count", "tgid", "key",
                  "value"],
        "formats": ["<u4", "<u2", "<u2", "u1", "u1", "<u2", "<u4", ("u1", KEY_MAX),
                    ("u1", VALUE_MAX)],
        "offsets": [0, 4, 6, 8, 9, 10, 12, 16, 16 + KEY_MAX],
        "itemsize": 16 + KEY_MAX + VALUE_MAX,
    }
)  # fmt: skip
WATCH_ENTRY = struct.Struct("<Q")  # struct trace_watch
CONFIG = struct.Struct("<II")  # struct trace_config


class OwnMode(enum.IntEnum):
    """``enum trace_own_mode``: how the kernel side recognises the agent's own writes."""

    OFF = 0  # report everything
    SYSCALL = 1  # agent thread inside a map-writing bpf(2) call, not in an interrupt
    TGID = 2  # agent process, not in an interrupt (kernel without the bpf(2) entry hook)


class Counter(enum.IntEnum):
    """Slots of the per-CPU ``counters`` array (``enum trace_counter``)."""

    SUBMITTED = 0
    DROPPED = 1
    SUPPRESSED = 2


COUNTER_KEYS = {slot: struct.pack("<I", slot) for slot in Counter}


def elements(
    records: npt.NDArray[np.void], key_size: int, value_size: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """The elements of one map's ``records``, in ring order: keys ``(n, key_size)``, values
    ``(n, value_size)`` (meaningless where deleted or not captured; none for ``value_size`` 0)
    and which were deletes. A record holds ``count`` elements back to back (trace.h): one for a
    map op, many for a bpf(2) batch."""
    n, counts = len(records), records["count"]
    deleted = records["op"] == OP_DELETE
    if not n or int(counts.max()) == 1:
        keys = records["key"][:, :key_size]
        values = records["value"][:, :value_size]
        return keys, values, deleted
    # every record is cut into as many slots as fit; the first `count` of each are elements
    per = KEY_MAX // key_size
    keys = records["key"][:, : per * key_size].reshape(n, per, key_size)
    keys = keys[np.arange(per) < counts[:, None]]
    values = np.zeros((len(keys), value_size), np.uint8)
    carry = records["value_len"] != 0  # not deletes: those pack more keys than values fit
    if value_size and carry.any():
        per = VALUE_MAX // value_size
        kept = records[carry]
        found = kept["value"][:, : per * value_size].reshape(len(kept), per, value_size)
        values[np.repeat(carry, counts)] = found[np.arange(per) < kept["count"][:, None]]
    return keys, values, np.repeat(deleted, counts)


# Kernel functions a map type's writes go through, all required to watch that type.
REQUIRED_FUNCTIONS: dict[MapType, tuple[str, ...]] = {
    MapType.HASH: ("htab_map_update_elem", "htab_map_delete_elem"),
    MapType.LRU_HASH: ("htab_lru_map_update_elem", "htab_lru_map_delete_elem"),
    MapType.PERCPU_HASH: (
        "htab_percpu_map_update_elem", "bpf_percpu_hash_update", "htab_map_delete_elem",
    ),
    MapType.LRU_PERCPU_HASH: (
        "htab_lru_percpu_map_update_elem", "bpf_percpu_hash_update", "htab_lru_map_delete_elem",
    ),
    MapType.ARRAY: ("array_map_update_elem",),
    MapType.PERCPU_ARRAY: ("array_map_update_elem", "bpf_percpu_array_update"),
    # batch commands on a trie go through the generic batch code, which calls these per element
    MapType.LPM_TRIE: ("trie_update_elem", "trie_delete_elem"),
}  # fmt: skip


def check_traceable(name: str, info: MapInfo) -> None:
    """Raise ``NotSupportedError`` if the trace watcher cannot watch this map (type or size)."""
    if info.type not in REQUIRED_FUNCTIONS:
        kinds = ", ".join(t.name.lower() for t in REQUIRED_FUNCTIONS)
        raise NotSupportedError(
            f"map {name!r} {info.describe()}: the trace watcher handles {kinds} maps only"
        )
    if info.key_size > KEY_MAX:
        raise NotSupportedError(
            f"map {name!r} {info.describe()} has {info.key_size}-byte keys: the trace watcher "
            f"captures keys of at most {KEY_MAX} bytes (TRACE_KEY_MAX); poll this map instead"
        )
    if not info.type.percpu and info.value_size > VALUE_MAX:
        raise NotSupportedError(
            f"map {name!r} {info.describe()} has {info.value_size}-byte values: the trace "
            f"watcher captures values of at most {VALUE_MAX} bytes (TRACE_VALUE_MAX); poll this "
            "map instead"
        )
