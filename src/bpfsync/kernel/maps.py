"""An open BPF map (``Map``): find it, read and write elements one at a time or in batches, dump it.

A map is found by pin path, by name or by id (``Map.open("/sys/fs/bpf/x" | "name:x" | "id:7")``);
ids are local to one kernel, so configuration names maps by pin path or name. A ``Map`` owns one
file descriptor, closed by ``close()`` or the ``with`` block.

Keys and values are raw bytes exactly ``key_size`` / ``value_stride`` long; for per-CPU maps a
value is every possible CPU's value, each padded to 8 bytes (``value_stride``). Batch operations
take contiguous buffers (bytes, bytearray, memoryview or numpy arrays) so that no per-entry Python
work happens; lists of ``bytes`` are accepted for convenience. Wrong sizes are the caller's bug and
raise ``ValueError``; everything the kernel refuses raises a ``KernelError`` subclass.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from bpfsync.errors import (
    ConfigError,
    InvalidError,
    KernelError,
    KeyNotFoundError,
    NotFoundError,
    NotSupportedError,
    kernel_error,
)
from bpfsync.kernel import _libbpf
from bpfsync.kernel._closing import Closing
from bpfsync.kernel.dump import DEFAULT_CHUNK, MapDump, iterate_all, lookup_batch_all
from bpfsync.kernel.info import MapInfo, MapType, UpdateFlags, possible_cpus, value_stride

# A contiguous buffer of packed entries, or a convenience list of one ``bytes`` per entry.
Buffer = bytes | bytearray | memoryview | npt.NDArray[np.generic]
Entries = Buffer | Sequence[bytes]


class Map(Closing):
    """An open BPF map. Create with ``Map.open`` and friends; owns ``fd`` until ``close()``."""

    def __init__(self, fd: int, info: MapInfo | None = None) -> None:
        """Wrap ``fd`` (ownership passes to the Map). Use ``Map.open*`` rather than this."""
        self._fd = fd
        try:
            self.info = info if info is not None else MapInfo.from_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        self.percpu = self.info.type.percpu
        self.ncpus = possible_cpus()
        self.value_stride = value_stride(self.info.type, self.info.value_size)

    # --- finding maps --------------------------------------------------------------------------

    @classmethod
    def open(cls, spec: str) -> Map:
        """Open ``/pin/path``, ``name:NAME`` or ``id:N``."""
        kind, sep, rest = spec.partition(":")
        if sep and kind == "name":
            return cls.open_by_name(rest)
        if sep and kind == "id":
            if not rest.isdigit():
                raise ConfigError(f"map spec {spec!r}: id must be a number, as in 'id:42'")
            return cls.open_by_id(int(rest))
        if spec.startswith("/"):
            return cls.open_pinned(spec)
        raise ConfigError(
            f"map spec {spec!r}: expected an absolute pin path, 'name:NAME' or 'id:N'"
        )

    @classmethod
    def open_pinned(cls, path: str) -> Map:
        fd = _libbpf.obj_get(path)
        kind = _fd_kind(fd)
        if kind != "bpf-map":
            os.close(fd)
            raise InvalidError(f"{path} is a pinned {kind or 'object'}, not a map", errno.EINVAL)
        return cls(fd)

    @classmethod
    def create(
        cls, map_type: MapType, key_size: int, value_size: int, max_entries: int, name: str = "",
        flags: int = 0,
    ) -> Map:
        """A new map without BTF (like ``bpftool map create``); pin it to keep it past close.
        ``flags`` are its ``map_flags`` (``MapFlags``; an LPM trie needs ``NO_PREALLOC``)."""
        if len(name) > 15:
            raise ValueError(f"map names are at most 15 characters, {name!r} is {len(name)}")
        return cls(_libbpf.map_create(int(map_type), name, key_size, value_size, max_entries,
                                      int(flags)))

    @classmethod
    def open_by_id(cls, map_id: int) -> Map:
        return cls(_libbpf.map_get_fd_by_id(map_id))

    @classmethod
    def open_by_name(cls, name: str) -> Map:
        """The one map with this name; the kernel keeps 15 characters, so compare those."""
        wanted = name[: _libbpf.BPF_OBJ_NAME_LEN - 1]
        found: list[Map] = []
        try:
            for map_id in map_ids():
                try:
                    m = cls.open_by_id(map_id)
                except NotFoundError:  # gone since we listed it
                    continue
                if m.info.name == wanted:
                    found.append(m)
                else:
                    m.close()
            if not found:
                raise NotFoundError(f"no map named {wanted!r}", errno.ENOENT)
            if len(found) > 1:
                ids = ", ".join(str(m.info.id) for m in found)
                raise ConfigError(
                    f"{len(found)} maps are named {wanted!r} (ids {ids}); "
                    "name the map by its pin path instead"
                )
        except BaseException:
            for m in found:
                m.close()
            raise
        return found[0]

    # --- properties ----------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError("operation on a closed map")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def key_size(self) -> int:
        return self.info.key_size

    @property
    def value_size(self) -> int:
        """The declared value size (one CPU's value for per-CPU maps); see ``value_stride``."""
        return self.info.value_size

    @property
    def max_entries(self) -> int:
        return self.info.max_entries

    # --- single elements -----------------------------------------------------------------------

    def lookup(self, key: bytes) -> bytes | None:
        """The value stored under ``key`` (``value_stride`` bytes), or None if absent.

        Of an LPM trie too: the kernel answers a trie's lookup with the longest prefix it holds
        that contains ``key`` (``match``), so ``10.1.0.0/16`` would find ``10.0.0.0/8``'s value
        where the /16 is gone; here a key the trie does not hold itself is absent."""
        value = self.match(key)
        if value is not None and self.info.type == MapType.LPM_TRIE and not self._holds(key):
            return None
        return value

    def match(self, key: bytes) -> bytes | None:
        """BPF_MAP_LOOKUP_ELEM as the kernel answers it: ``lookup`` for every type but an LPM
        trie, whose answer is the value of the longest prefix holding ``key`` (what a BPF
        program's lookup finds), or None."""
        self._check_key(key)
        value = ctypes.create_string_buffer(self.value_stride)
        ret = _libbpf.map_lookup_elem(self.fd, key, value)
        if ret == -errno.ENOENT:
            return None
        self._check(ret, "lookup")
        return value.raw

    def _holds(self, key: bytes) -> bool:
        """Whether an LPM trie holds ``key`` itself. The trie's get_next_key walks in postorder
        and starts over at the first key for a key it does not hold; for one it holds it answers
        the key after it (None after the last), never the first."""
        return self.next_key(key) != self.next_key(None)

    def update(self, key: bytes, value: bytes, flags: int = UpdateFlags.ANY) -> None:
        """Create or replace (``flags``: ``UpdateFlags.NOEXIST`` / ``EXIST`` restrict that)."""
        self._check_key(key)
        self._check_value(value)
        ret = _libbpf.map_update_elem(self.fd, key, value, int(flags))
        if ret == -errno.ENOENT and flags & UpdateFlags.EXIST:
            raise KeyNotFoundError(f"update {self.info.describe()}: key not in map", errno.ENOENT)
        self._check(ret, "update")

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was not there."""
        self._check_key(key)
        self._check_deletable()
        ret = _libbpf.map_delete_elem(self.fd, key)
        if ret == -errno.ENOENT:
            return False
        self._check(ret, "delete")
        return True

    def next_key(self, key: bytes | None) -> bytes | None:
        """BPF_MAP_GET_NEXT_KEY: the key after ``key`` (the first if None), None at the end.
        About 10x slower than ``dump()`` for whole maps."""
        if key is not None:
            self._check_key(key)
        out = ctypes.create_string_buffer(self.key_size)
        ret = _libbpf.map_get_next_key(self.fd, key, out)
        if ret == -errno.ENOENT:
            return None
        self._check(ret, "get_next_key")
        return out.raw

    # --- batches -------------------------------------------------------------------------------

    def update_batch(
        self,
        keys: Entries,
        values: Entries,
        count: int | None = None,
        flags: int = UpdateFlags.ANY,
    ) -> None:
        """BPF_MAP_UPDATE_BATCH over ``count`` packed keys and values (default: all of them)."""
        k, count = self._entries(keys, self.key_size, count, "keys")
        v, _ = self._entries(values, self.value_stride, count, "values")
        if count == 0:
            return
        ret, done = _libbpf.map_update_batch(self.fd, k.ctypes.data, v.ctypes.data, count, flags)
        if ret < 0:
            raise self._error(ret, f"update_batch (failed after {done} of {count} entries)")

    def delete_batch(self, keys: Entries, count: int | None = None) -> int:
        """Delete ``count`` packed keys; keys not in the map are skipped. Returns how many went."""
        self._check_deletable()
        k, count = self._entries(keys, self.key_size, count, "keys")
        deleted = start = 0
        while start < count:
            addr = k.ctypes.data + start * self.key_size
            ret, done = _libbpf.map_delete_batch(self.fd, addr, count - start)
            deleted += done
            if ret == -errno.ENOENT:  # the kernel stops at the first missing key: skip it
                start += done + 1
                continue
            if ret < 0:
                raise self._error(ret, f"delete_batch (failed after {deleted} deletions)")
            break
        return deleted

    def dump(self, chunk: int = DEFAULT_CHUNK) -> MapDump:
        """Every entry, read with BPF_MAP_LOOKUP_BATCH in chunks of ``chunk`` entries."""
        dump = lookup_batch_all(self.fd, self.key_size, self.value_stride, self.max_entries, chunk)
        if dump is None:
            dump = iterate_all(self.fd, self.key_size, self.value_stride)
        return dump

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs of one ``dump()``."""
        return iter(self.dump())

    # --- pinning and lifetime ------------------------------------------------------------------

    def pin(self, path: str) -> None:
        """Pin the map at ``path`` (on a bpffs mount such as /sys/fs/bpf)."""
        _libbpf.obj_pin(self.fd, path)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            with contextlib.suppress(OSError):
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self._fd}"
        return (
            f"<Map {self.info.describe()} key {self.key_size} value {self.value_size}"
            f" max {self.max_entries} {state}>"
        )

    # --- helpers -------------------------------------------------------------------------------

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"key is {len(key)} bytes, map {self.name!r} needs {self.key_size}")

    def _check_value(self, value: bytes) -> None:
        if len(value) != self.value_stride:
            what = "per-CPU value (padded value x possible CPUs)" if self.percpu else "value"
            raise ValueError(
                f"value is {len(value)} bytes, map {self.name!r} needs a {self.value_stride}-byte "
                + what
            )

    def _check_deletable(self) -> None:
        if self.info.type.is_array:
            raise NotSupportedError(
                f"{self.info.describe()}: elements of array maps always exist and cannot be "
                "deleted; write a zero value instead",
                errno.EINVAL,
            )

    def _error(self, ret: int, op: str) -> KernelError:
        return kernel_error(ret, f"{op} on map {self.info.describe()}")

    def _check(self, ret: int, op: str) -> None:
        if ret < 0:
            raise self._error(ret, op)

    def _entries(
        self, buf: Entries, size: int, count: int | None, what: str
    ) -> tuple[npt.NDArray[np.uint8], int]:
        """A contiguous uint8 view of ``buf`` and the number of entries to use from it."""
        if isinstance(buf, np.ndarray):
            arr = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
        elif isinstance(buf, (bytes, bytearray, memoryview)):
            arr = np.frombuffer(buf, dtype=np.uint8)
        else:
            if any(len(b) != size for b in buf):
                raise ValueError(f"every one of the {what} must be {size} bytes")
            arr = np.frombuffer(b"".join(buf), dtype=np.uint8)
        available, rest = divmod(arr.size, size)
        if count is None:
            if rest:
                raise ValueError(f"{what}: {arr.size} bytes is not a multiple of {size}")
            count = available
        elif count < 0 or count > available:
            raise ValueError(f"{what}: {count} entries requested, buffer holds {available}")
        return arr, count


def map_ids() -> Iterator[int]:
    """Ids of every map in the kernel, ascending."""
    map_id: int | None = 0
    while (map_id := _libbpf.map_get_next_id(map_id or 0)) is not None:
        yield map_id


def pinned_map_id(path: str) -> int | None:
    """The id of the map pinned at ``path`` now, None when nothing is pinned there: two
    syscalls and no ``Map``, cheap enough to ask several times a second. Another kind of
    object pinned there raises ``InvalidError``, as ``Map.open_pinned`` does."""
    try:
        fd = _libbpf.obj_get(path)
    except NotFoundError:
        return None
    try:
        kind = _fd_kind(fd)
        if kind != "bpf-map":
            raise InvalidError(f"{path} is a pinned {kind or 'object'}, not a map", errno.EINVAL)
        return int(_libbpf.map_info(fd).id)
    finally:
        os.close(fd)


def unpin(path: str) -> None:
    """Remove a pin (the object lives on while other references exist)."""
    try:
        os.unlink(path)
    except OSError as e:
        raise kernel_error(e.errno or errno.EIO, f"unpin {path}") from e


def _fd_kind(fd: int) -> str:
    """'bpf-map', 'bpf-prog', 'bpf-link'... from the fd's anon inode name."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
    return target.removeprefix("anon_inode:")
