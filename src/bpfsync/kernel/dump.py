"""A map's full content, read with BPF_MAP_LOOKUP_BATCH into contiguous buffers (``MapDump``).

One batch call per chunk, written straight into numpy buffers: no per-entry Python work. Kernel
behaviours handled here:

- the call returns ENOENT when it reaches the end of the map, *with* the last entries filled in;
- a hash map iterates by bucket and never splits one: if a chunk cannot hold the next bucket the
  call fails with ENOSPC and nothing copied, so the chunk is grown and the call repeated;
- the resume token is a bucket index for hash maps and the last key for arrays, so it is sized for
  the larger of the two;
- map types without batch support (EINVAL / ENOTSUPP) fall back to get_next_key + lookup.

A dump is not an atomic snapshot: entries written while it runs may or may not be in it, but a hash
bucket is read under its lock, so every key appears at most once.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from bpfsync.errors import _ENOTSUPP, kernel_error
from bpfsync.kernel import _libbpf

Bytes2D = npt.NDArray[np.uint8]

DEFAULT_CHUNK = 65536  # entries per syscall: few syscalls, bounded time inside each one
_MAX_PREALLOC = 256 << 20  # bytes allocated up front; np.empty pages cost nothing until written


class MapDump:
    """Every (key, value) of a map at one moment, as two contiguous row-major buffers.

    ``keys`` and ``values`` are ``count * key_size`` and ``count * value_size`` bytes; for per-CPU
    maps ``value_size`` is the raw per-CPU stride (8-padded value times possible CPUs).
    ``key_array``/``value_array`` are read-only ``(count, size)`` uint8 views of the same memory.
    """

    __slots__ = ("_keys", "_values", "key_array", "key_size", "value_array", "value_size")

    def __init__(self, key_array: Bytes2D, value_array: Bytes2D) -> None:
        if key_array.shape[0] != value_array.shape[0]:
            raise ValueError("a dump needs as many values as keys")
        key_array.flags.writeable = False
        value_array.flags.writeable = False
        self.key_array = key_array
        self.value_array = value_array
        self.key_size = int(key_array.shape[1])
        self.value_size = int(value_array.shape[1])
        self._keys: bytes | None = None
        self._values: bytes | None = None

    @classmethod
    def from_bytes(cls, keys: bytes, values: bytes, key_size: int, value_size: int) -> MapDump:
        if key_size <= 0 or value_size <= 0:
            raise ValueError("key and value sizes must be positive")
        if len(keys) % key_size or len(values) % value_size:
            raise ValueError("buffer length is not a multiple of the entry size")
        k = np.frombuffer(keys, dtype=np.uint8).reshape(-1, key_size)
        v = np.frombuffer(values, dtype=np.uint8).reshape(-1, value_size)
        dump = cls(k, v)
        dump._keys, dump._values = keys, values
        return dump

    @property
    def count(self) -> int:
        return int(self.key_array.shape[0])

    @property
    def keys(self) -> bytes:
        if self._keys is None:
            self._keys = self.key_array.tobytes()
        return self._keys

    @property
    def values(self) -> bytes:
        if self._values is None:
            self._values = self.value_array.tobytes()
        return self._values

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        keys, values, ks, vs = self.keys, self.values, self.key_size, self.value_size
        for i in range(self.count):
            yield keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs]

    def to_dict(self) -> dict[bytes, bytes]:
        return dict(iter(self))

    def __repr__(self) -> str:
        return (
            f"MapDump(count={self.count}, key_size={self.key_size}, value_size={self.value_size})"
        )


def lookup_batch_all(
    fd: int, key_size: int, value_size: int, max_entries: int, chunk: int = DEFAULT_CHUNK
) -> MapDump | None:
    """Read a whole map with BPF_MAP_LOOKUP_BATCH; None if the map type has no batch lookup."""
    chunk = max(1, chunk)
    cap = max(1, min(max_entries, _MAX_PREALLOC // (key_size + value_size)))
    keys = np.empty(cap * key_size, dtype=np.uint8)
    values = np.empty(cap * value_size, dtype=np.uint8)
    token_size = max(key_size, 8)
    tokens = (ctypes.create_string_buffer(token_size), ctypes.create_string_buffer(token_size))
    in_batch: ctypes.Array[ctypes.c_char] | None = None  # NULL: start from the beginning
    n = 0
    while True:
        # up to the room left: a map holds at most max_entries, so the buffers grow (a copy,
        # and every page touched) only for a bucket bigger than that room, or a map over it
        count = min(chunk, cap - n)
        if count <= 0:
            cap = max(cap * 2, n + chunk)
            keys = _grow(keys, cap * key_size)
            values = _grow(values, cap * value_size)
            continue
        out_batch = tokens[0] if in_batch is not tokens[0] else tokens[1]
        ret, got = _libbpf.map_lookup_batch(
            fd,
            in_batch,
            out_batch,
            keys.ctypes.data + n * key_size,
            values.ctypes.data + n * value_size,
            count,
        )
        if ret == -errno.ENOSPC and got == 0:
            if count < chunk:  # the room left is smaller than the next hash bucket
                cap = max(cap * 2, n + chunk)
                keys = _grow(keys, cap * key_size)
                values = _grow(values, cap * value_size)
            else:
                chunk *= 2  # the next hash bucket holds more entries than one chunk
            continue
        if ret in (-errno.EINVAL, -_ENOTSUPP, -errno.EOPNOTSUPP) and n == 0 and got == 0:
            return None
        if ret < 0 and ret != -errno.ENOENT:
            raise kernel_error(ret, f"BPF_MAP_LOOKUP_BATCH after {n} entries")
        n += got
        if ret == -errno.ENOENT:
            break
        in_batch = out_batch
    return MapDump(
        keys[: n * key_size].reshape(n, key_size), values[: n * value_size].reshape(n, value_size)
    )


def _grow(buf: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    bigger = np.empty(size, dtype=np.uint8)
    bigger[: buf.size] = buf
    return bigger


def iterate_all(fd: int, key_size: int, value_size: int) -> MapDump:
    """Slow path for maps without batch lookup: get_next_key, then lookup, one entry at a time."""
    key = ctypes.create_string_buffer(key_size)
    value = ctypes.create_string_buffer(value_size)
    keys: list[bytes] = []
    values: list[bytes] = []
    seen: set[bytes] = set()  # get_next_key restarts from the first key if ours was deleted
    prev: ctypes.Array[ctypes.c_char] | None = None
    while True:
        ret = _libbpf.map_get_next_key(fd, prev, key)
        if ret == -errno.ENOENT:
            break
        if ret < 0:
            raise kernel_error(ret, "BPF_MAP_GET_NEXT_KEY")
        prev = ctypes.create_string_buffer(key.raw, key_size)
        if key.raw in seen:
            continue
        ret = _libbpf.map_lookup_elem(fd, key, value)
        if ret == -errno.ENOENT:  # deleted since get_next_key
            continue
        if ret < 0:
            raise kernel_error(ret, "BPF_MAP_LOOKUP_ELEM")
        seen.add(key.raw)
        keys.append(key.raw)
        values.append(value.raw)
    return MapDump.from_bytes(b"".join(keys), b"".join(values), key_size, value_size)
