"""What a restarting node compares: the kernel map as found at start against the registers it
stored (replica.py, rules S4-S6), and the stored content it writes back when it restores.

A restart on an unchanged million-entry map must be ready within a second, so an lww map is
compared by array operations: the kernel's keys sorted once, the registers' live keys looked
up in them, values compared row by row. Per-origin maps (counters, max, min) imply a value per
key from several registers: compared key by key, as such maps are small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bpfsync.core.frozen import live_values
from bpfsync.core.lww_table import LwwTable
from bpfsync.core.table import MapTable

__all__ = ["differences", "live_content"]

Items = Sequence[tuple[bytes, bytes]]


def differences(table: MapTable, items: Items) -> list[tuple[bytes, bytes | None]]:
    """The keys whose kernel value (``items``: the kernel map's entries) is not the value the
    registers imply, each with the kernel's value (None: the registers imply a value, the
    kernel holds none). Keys are listed once, in no particular order."""
    ks, vs = table.schema.key_size, table.schema.value_size
    if any(len(key) != ks or len(value) != vs for key, value in items):
        raise ValueError(f"map {table.name!r}: kernel entries of other sizes than {ks}/{vs}")
    if not isinstance(table, LwwTable):
        return _differences_by_key(table, items)
    n = len(items)
    kernel_keys = np.frombuffer(b"".join([k for k, _ in items]), np.uint8).reshape(n, ks)
    kernel_values = np.frombuffer(b"".join([v for _, v in items]), np.uint8).reshape(n, vs)
    order = np.lexsort(kernel_keys.T[::-1])  # byte by byte: the order of 'S' items
    sorted_keys = np.ascontiguousarray(kernel_keys[order]).view(f"S{ks}").ravel()
    matched = np.zeros(n, bool)
    out: list[tuple[bytes, bytes | None]] = []
    for keys, records in table.bucket_columns():
        live, values = live_values(records, vs)
        keys, values = keys[live], values[live]
        if not len(keys):
            continue
        at = np.searchsorted(sorted_keys, keys)
        found = np.zeros(len(keys), bool)
        inside = at < n
        found[inside] = sorted_keys[at[inside]] == keys[inside]
        where = order[at[found]]
        matched[where] = True
        same = (kernel_values[where] == values[found]).all(axis=1)
        raw = keys.view(f"V{ks}")
        out += [(key, None) for key in raw[~found].tolist()]  # deleted while down
        now = np.ascontiguousarray(kernel_values[where[~same]]).view(f"V{vs}").ravel()
        out += zip(raw[found][~same].tolist(), now.tolist(), strict=True)
    if not matched.all():  # new keys, or keys the registers hold as tombstones
        out += [items[i] for i in np.flatnonzero(~matched).tolist()]
    return out


def _differences_by_key(table: MapTable, items: Items) -> list[tuple[bytes, bytes | None]]:
    kernel = dict(items)
    out: list[tuple[bytes, bytes | None]] = []
    for key in list(table.all_keys()):
        want, got = table.kernel_value(key), kernel.pop(key, None)
        if want != got:
            out.append((key, got))
    out += kernel.items()  # keys the registers do not hold
    return out


def live_content(table: MapTable) -> tuple[bytes, bytes, int]:
    """Every key the registers imply a value for, and those values: (keys joined, values
    joined in the keys' order, how many)."""
    if not isinstance(table, LwwTable):
        pairs = [(key, table.kernel_value(key)) for key in table.all_keys()]
        kept = [(key, value) for key, value in pairs if value is not None]
        return b"".join(k for k, _ in kept), b"".join(v for _, v in kept), len(kept)
    keys_out: list[bytes] = []
    values_out: list[bytes] = []
    count = 0
    for keys, records in table.bucket_columns():
        live, values = live_values(records, table.schema.value_size)
        keys_out.append(keys[live].tobytes())
        values_out.append(values[live].tobytes())
        count += int(live.sum())
    return b"".join(keys_out), b"".join(values_out), count
