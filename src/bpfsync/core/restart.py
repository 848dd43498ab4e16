"""What a restarting node compares: the kernel map as found at start against the registers it
stored (replica.py, rules S4-S6), and the stored content it writes back when it restores.

A restart on an unchanged million-entry map must be ready within a second, so an lww map is
compared by array operations, in two steps:

- its fingerprint first: the number of entries and the 64-bit sum of a hash of each entry's
  key and value (``Content.fingerprint``), for the kernel's entries and for the registers'
  live ones. Equal fingerprints: no entry differs, and nothing is sorted. The hash chains
  the entry's 64-bit words through bijective steps, so entries that differ in one word never
  collide, and a set of changes leaves the sum as it was with odds of about 2^-64. The content
  is this node's own kernel map and registers, not a peer's input.
- otherwise, the keys: the registers' live keys and the kernel's sorted together, equal
  neighbours paired, their values compared row by row.

Per-origin maps (counters, max, min) imply a value per key from several registers: compared
key by key, as such maps are small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bpfsync.core.frozen import live_values
from bpfsync.core.lww_table import LwwTable
from bpfsync.core.table import MapTable

__all__ = ["Content", "differences", "live_content", "live_rows"]

# the fingerprint's hash: its seed, and the odd multiplier each word is mixed in with
_SEED = 0x243F6A8885A308D3
_WORD = 0x9E3779B97F4A7C15

@dataclass(slots=True)
class Content:
    """A map's entries as two arrays of rows: keys (n, key size) and values (n, value size), as
    a dump reads them (no Python object per entry)."""

    keys: np.ndarray
    values: np.ndarray
    _print: tuple[int, int] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, items: Sequence[tuple[bytes, bytes]], key_size: int, value_size: int) -> Content:
        if {len(k) for k, _ in items} - {key_size} or {len(v) for _, v in items} - {value_size}:
            raise ValueError(f"entries of other sizes than {key_size}/{value_size} bytes")
        keys = np.frombuffer(b"".join([k for k, _ in items]), np.uint8)
        values = np.frombuffer(b"".join([v for _, v in items]), np.uint8)
        return cls(keys.reshape(-1, key_size), values.reshape(-1, value_size))

    def __len__(self) -> int:
        return len(self.keys)

    def fingerprint(self) -> tuple[int, int]:
        """(entries, the sum modulo 2^64 of every entry's hash); computed once. Equal content
        gives equal fingerprints in any row order."""
        if self._print is None:
            words = np.concatenate([_words(self.keys), _words(self.values)], axis=1)
            self._print = (len(self), int(_row_hashes(words).sum(dtype=np.uint64)))
        return self._print

    def pairs(self) -> list[tuple[bytes, bytes]]:
        ks, vs = self.keys.shape[1], self.values.shape[1]
        keys, values = self.keys.tobytes(), self.values.tobytes()
        return [(keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs])
                for i in range(len(self))]  # fmt: skip


def differences(
    table: MapTable, content: Content, live: Content | None = None
) -> list[tuple[bytes, bytes | None]]:
    """The keys whose kernel value (``content``) is not the value the registers imply, each
    with the kernel's value (None: the registers imply a value, the kernel holds none). Keys
    are listed once, in no particular order. ``live``: an lww table's ``live_rows``, when
    taken already (they must be of the table as it is now)."""
    ks, vs = table.schema.key_size, table.schema.value_size
    if content.keys.shape[1:] != (ks,) or content.values.shape[1:] != (vs,):
        raise ValueError(f"map {table.name!r}: kernel entries of other sizes than {ks}/{vs}")
    if not isinstance(table, LwwTable):
        return _differences_by_key(table, content.pairs())
    registers = live_rows(table) if live is None else live
    if registers.fingerprint() == content.fingerprint():
        return []
    sk, sv = registers.keys, registers.values
    kk, kv = content.keys, content.values
    m = len(sk)
    if ks <= 8:  # one word a key: the kernel's sorted, the registers' looked up in them
        at_stored, at_kernel = _pairs_by_word(_words(sk)[:, 0], _words(kk)[:, 0])
    else:
        at_stored, at_kernel = _pairs_by_rows(sk, kk)
        if len(at_stored) != len(np.unique(at_stored)):
            raise ValueError(f"map {table.name!r}: a key twice on one side")
    matched_stored = np.zeros(m, bool)
    matched_stored[at_stored] = True
    matched_kernel = np.zeros(len(kk), bool)
    matched_kernel[at_kernel] = True
    differ = at_kernel[~(_words(sv[at_stored]) == _words(kv[at_kernel])).all(axis=1)]
    out: list[tuple[bytes, bytes | None]] = [(row.tobytes(), None) for row in sk[~matched_stored]]
    for i in np.concatenate([differ, np.flatnonzero(~matched_kernel)]).tolist():
        out.append((kk[i].tobytes(), kv[i].tobytes()))
    return out


def live_rows(table: LwwTable) -> Content:
    """Every key the registers of an lww table hold a live value for, and that value."""
    ks, vs = table.schema.key_size, table.schema.value_size
    stored_keys, stored_values = [np.empty((0, ks), np.uint8)], [np.empty((0, vs), np.uint8)]
    for keys, records in table.bucket_columns():
        live, values = live_values(records, vs)
        stored_keys.append(np.ascontiguousarray(keys[live]).view(np.uint8).reshape(-1, ks))
        stored_values.append(values[live])
    return Content(np.concatenate(stored_keys), np.concatenate(stored_values))


def _row_hashes(words: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of words: the words chained, first to last, by
    ``h = g((h ^ w) * _WORD)`` from ``_SEED``, then splitmix64's finaliser. For a given ``h``
    each step is a bijection of ``w`` (an odd multiplier; ``g(x) = x ^ x >> 32`` is one too),
    and for a given ``w`` one of ``h``: rows that differ in one word differ in their hash."""
    h = np.full(len(words), _SEED, np.uint64)
    for j in range(words.shape[1]):
        h ^= words[:, j]
        h *= np.uint64(_WORD)
        h ^= h >> np.uint64(32)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _words(rows: np.ndarray) -> np.ndarray:
    """Rows of bytes (n, size) as 64-bit words (n, ceil(size / 8)), zero-padded: equal rows
    are equal words. Native byte order: only equality matters, and it sorts fastest."""
    n, size = rows.shape
    width = -(-size // 8) * 8
    if width == size and rows.flags.c_contiguous:
        return rows.view(np.uint64)
    padded = np.zeros((n, width), np.uint8)
    padded[:, :size] = rows
    return padded.view(np.uint64)


def _pairs_by_word(stored: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stored index, kernel index) of every key in both, for keys of one word each."""
    order = np.argsort(kernel)
    ranked = kernel[order]
    asked = np.argsort(stored)  # looked up in order: the search then walks memory forwards
    queries = stored[asked]
    at = np.searchsorted(ranked, queries)
    found = np.zeros(len(queries), bool)
    inside = at < len(ranked)
    found[inside] = ranked[at[inside]] == queries[inside]
    return asked[found], order[at[found]]


def _pairs_by_rows(stored: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_pairs_by_word`` for longer keys: both sides sorted together, equal neighbours paired
    (each side's keys are distinct, so a pair is a register and a kernel entry)."""
    m = len(stored)
    both = np.concatenate([stored, kernel])
    order = np.lexsort(_words(both).T[::-1])
    ranked = both[order]
    j = np.flatnonzero((ranked[1:] == ranked[:-1]).all(axis=1))
    first, second = order[j], order[j + 1]
    if ((first < m) == (second < m)).any():
        raise ValueError("a key twice on one side")
    return np.minimum(first, second), np.maximum(first, second) - m


def _differences_by_key(
    table: MapTable, items: Sequence[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes | None]]:
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
    rows = live_rows(table)
    return rows.keys.tobytes(), rows.values.tobytes(), len(rows)
