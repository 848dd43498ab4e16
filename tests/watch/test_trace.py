"""The trace watcher's host-side contract: the record layout shared with C, the limits it
refuses up front, and a clean refusal where the kernel forbids tracing programs.

Its behaviour on a kernel that allows fexit is tested inside the VM (tests/vm/guest).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bpfsync.errors import KernelError, NotSupportedError, PermissionDeniedError
from bpfsync.kernel.features import function_exists, tracing_supported
from bpfsync.kernel.info import MapInfo, MapType
from bpfsync.kernel.maps import Map
from bpfsync.watch.base import Watcher
from bpfsync.watch.trace import Hooks, TraceWatcher, object_path
from bpfsync.watch.trace_abi import (
    KEY_MAX,
    OP_DELETE,
    OP_UPDATE,
    RECORD,
    REQUIRED_FUNCTIONS,
    VALUE_MAX,
    check_traceable,
    elements,
)

BPF_DIR = Path(__file__).resolve().parents[2] / "src" / "bpfsync" / "bpf"

LAYOUT_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/types.h>
#include "trace.h"
#define F(field) printf(#field " %zu %zu\n", offsetof(struct trace_record, field), \
                        sizeof(((struct trace_record *)0)->field))
int main(void)
{
    F(map_id); F(key_len); F(value_len); F(op); F(flags); F(count); F(tgid); F(key); F(value);
    printf("size %zu 0\n", sizeof(struct trace_record));
    printf("KEY_MAX %d 0\nVALUE_MAX %d 0\n", TRACE_KEY_MAX, TRACE_VALUE_MAX);
    return 0;
}
"""


def info(kind: MapType, key: int, value: int) -> MapInfo:
    return MapInfo(7, kind, "m", key, value, 16, 0, 0, 0, 0)


def test_the_record_dtype_matches_trace_h(tmp_path: Path) -> None:
    """Compile trace.h with the host compiler and compare every offset and size."""
    src, exe = tmp_path / "layout.c", tmp_path / "layout"
    src.write_text(LAYOUT_PROGRAM)
    subprocess.run(["clang", f"-I{BPF_DIR}", "-o", exe, src], check=True)
    out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    c = {name: (int(a), int(b)) for name, a, b in (line.split() for line in out.splitlines())}
    assert c.pop("size")[0] == RECORD.itemsize
    assert c.pop("KEY_MAX")[0] == KEY_MAX
    assert c.pop("VALUE_MAX")[0] == VALUE_MAX
    assert set(c) == set(RECORD.names)
    for name, (offset, size) in c.items():
        dtype, py_offset = RECORD.fields[name][:2]
        assert (py_offset, dtype.itemsize) == (offset, size), name


def record(op: int, keys: list[bytes], values: list[bytes]) -> np.void:
    rec = np.zeros(1, RECORD)
    rec["op"], rec["count"] = op, len(keys)
    rec["key_len"], rec["value_len"] = len(keys[0]), len(values[0]) if values else 0
    joined_keys, joined_values = b"".join(keys), b"".join(values)
    rec["key"][0, : len(joined_keys)] = np.frombuffer(joined_keys, np.uint8)
    rec["value"][0, : len(joined_values)] = np.frombuffer(joined_values, np.uint8)
    rec["value"][0, len(joined_values) :] = 0xEE  # what a delete leaves: stale ring bytes
    return rec[0]


def rows(a: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in a]


def test_elements_unpack_single_and_packed_records_in_ring_order() -> None:
    keys = [bytes([i]) * 4 for i in range(17)]
    values = [bytes([i + 100]) * 24 for i in range(17)]  # 24 bytes: 10 to a record
    recs = np.array([
        record(OP_UPDATE, keys[:1], values[:1]),
        record(OP_UPDATE, keys[1:4], values[1:4]),
        record(OP_DELETE, keys[4:16], []),  # 12 keys: more than 10 values would fit
        record(OP_UPDATE, keys[16:], values[16:]),
    ], RECORD)  # fmt: skip
    k, v, deleted = elements(recs, 4, 24)
    assert rows(k) == keys
    assert [r for r, d in zip(rows(v), deleted, strict=True) if not d] == values[:4] + values[16:]
    assert deleted.tolist() == [False] * 4 + [True] * 12 + [False]
    k, v, deleted = elements(recs, 4, 0)  # values not wanted (per-CPU maps)
    assert rows(k) == keys and v.shape == (17, 0)


def test_elements_of_single_records_are_views_of_them() -> None:
    keys, values = [bytes([i]) * 3 for i in range(3)], [bytes([i]) * 5 for i in range(3)]
    recs = np.array([record(OP_UPDATE, [a], [b]) for a, b in zip(keys, values, strict=True)],
                    RECORD)  # fmt: skip
    k, v, deleted = elements(recs, 3, 5)
    assert (rows(k), rows(v), deleted.tolist()) == (keys, values, [False] * 3)
    assert k.base is not None  # the fast path copies nothing


@pytest.mark.parametrize("kind", list(REQUIRED_FUNCTIONS))
def test_every_traced_type_up_to_the_limits_is_accepted(kind: MapType) -> None:
    check_traceable("m", info(kind, KEY_MAX, VALUE_MAX))


def test_lpm_tries_are_traced_through_the_trie_functions() -> None:
    assert REQUIRED_FUNCTIONS[MapType.LPM_TRIE] == ("trie_update_elem", "trie_delete_elem")
    # the probe finds them in this host's BTF (the VM's 6.1 attaches them: tests/vm/guest)
    assert all(function_exists(fn) for fn in REQUIRED_FUNCTIONS[MapType.LPM_TRIE])
    check_traceable("blocked", info(MapType.LPM_TRIE, 8, 8))  # an IPv4 prefix
    check_traceable("blocked6", info(MapType.LPM_TRIE, 20, 8))  # an IPv6 prefix


def test_a_key_larger_than_the_limit_is_refused_naming_it() -> None:
    with pytest.raises(NotSupportedError, match=r"512-byte keys.*at most 256 bytes"):
        check_traceable("big", info(MapType.HASH, 512, 8))


def test_a_value_larger_than_the_limit_is_refused_naming_it() -> None:
    with pytest.raises(NotSupportedError, match=r"300-byte values.*at most 256 bytes"):
        check_traceable("big", info(MapType.LRU_HASH, 4, 300))


def test_per_cpu_values_are_re_read_so_their_size_is_not_limited() -> None:
    check_traceable("pcpu", info(MapType.PERCPU_HASH, 4, 4096))


@pytest.mark.parametrize("kind", [MapType.QUEUE, MapType.RINGBUF, MapType.HASH_OF_MAPS])
def test_map_types_without_traced_functions_are_refused(kind: MapType) -> None:
    with pytest.raises(NotSupportedError, match=r"handles .* maps only"):
        check_traceable("other", info(kind, 8, 8))


def test_a_too_large_map_is_refused_at_construction(make_map: Callable[..., Map]) -> None:
    big = make_map("hash", 4, 512, 8)
    with pytest.raises(NotSupportedError, match="TRACE_VALUE_MAX"):
        TraceWatcher({"big": big})


def test_the_tracer_object_is_built() -> None:
    assert object_path().stat().st_size > 0


def test_start_loads_where_tracing_is_allowed_and_says_why_not_elsewhere(
    make_map: Callable[..., Map],
) -> None:
    m = make_map("hash", 4, 8, 16)
    ok, _ = tracing_supported()
    watcher = TraceWatcher({"m": m}, hooks=Hooks.FEXIT)  # AUTO would fall back to bpf(2) hooks
    try:
        if ok:
            watcher.start()
            assert "htab_map_update_elem" in watcher.attached
        else:
            with pytest.raises(KernelError) as refused:
                watcher.start()
            if isinstance(refused.value, PermissionDeniedError):
                assert "refused this program type" in str(refused.value)
            assert watcher.attached == []
            assert watcher.read(0) == []  # nothing left half-started
    finally:
        watcher.close()
        watcher.close()  # idempotent
    assert not m.closed  # the caller's map stays open


def test_the_same_map_under_two_names_is_refused(make_map: Callable[..., Map]) -> None:
    m = make_map("hash", 4, 8, 16)
    with Map.open_by_id(m.info.id) as again, pytest.raises(ValueError, match="same map"):
        TraceWatcher({"a": m, "b": again})


def test_is_a_watcher(make_map: Callable[..., Map]) -> None:
    assert isinstance(TraceWatcher({"m": make_map("hash", 4, 8, 16)}), Watcher)
