"""Read fixed-size records from a BPF ring buffer map in bulk, without a callback per record.

The kernel ABI (kernel/bpf/ringbuf.c): mmap the map's fd at offset 0 for one read-write page
holding the consumer position, and from offset ``PAGE_SIZE`` read-only for the producer page
followed by the data area, which the kernel maps twice back to back so that a record wrapping past
the end is still contiguous. Positions are byte counters that only grow; ``pos & (size - 1)`` is
the offset in the data area. Each record is an 8-byte header (``u32 len`` whose top bits are
BUSY, still being written, and DISCARD, to be skipped; ``u32 pg_off``) then ``len`` bytes, the whole
rounded up to 8.

Why not libbpf's ``ring_buffer__consume``: it calls back into Python for each record (~1.3 M/s
at best, and most events dropped under a fast producer). Here the records between the consumer
and producer positions are viewed as one numpy array, checked for BUSY/DISCARD with vectorised
operations, copied out in one go, and the consumer position is advanced once per batch (advancing
it per record makes the producer wake us for every record).

Memory ordering: the producer writes a record, then clears BUSY with a release store; we load
the producer position, then headers, then payloads. x86-64 never reorders loads with older
loads, so plain loads suffice there; this module refuses other architectures rather than guess.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import select
import threading

import numpy as np
import numpy.typing as npt

from bpfsync.errors import InvalidError, NotSupportedError

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
_LEN_MASK = ~(BUSY_BIT | DISCARD_BIT) & 0xFFFFFFFF
_BUSY = np.uint32(BUSY_BIT)
_NOT_DISCARD = np.uint32(~DISCARD_BIT & 0xFFFFFFFF)

# Bound on the records one ``read`` copies: the caller gets control back (and the producer its
# space) at least this often, however fast records arrive.
DEFAULT_MAX_RECORDS = 8192


def slot_size(record_size: int) -> int:
    """Bytes one record of ``record_size`` payload bytes occupies in the ring."""
    return (record_size + HDR_SIZE + 7) & ~7


class RingBuffer:
    """Consumer side of one BPF ring buffer whose records are all ``record`` (a numpy dtype).

    ``read()`` copies out what is ready (never blocks); ``wait()`` blocks in epoll until the
    kernel signals data or ``wake()`` is called; ``poll()`` combines both. Records of another size
    (a ring shared with other producers) are skipped and counted in ``foreign``. One thread reads
    at a time; ``wake()`` and ``close()`` may be called from any thread.
    """

    def __init__(self, fd: int, size: int, record: np.dtype[np.void]) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise NotSupportedError(
                f"ring buffer reader: lock-free reads are only verified on x86-64, "
                f"not {platform.machine()}"
            )
        page = mmap.PAGESIZE
        if size <= 0 or size & (size - 1) or size % page:
            raise InvalidError(f"ring buffer size {size} is not a power-of-2 multiple of {page}")
        self.record = record
        self.size = size
        self.stride = slot_size(record.itemsize)
        self.foreign = 0  # records of another size, skipped
        self._mask = size - 1
        self._slot = np.dtype(
            {
                "names": ["len", "rec"],
                "formats": ["<u4", record],
                "offsets": [0, HDR_SIZE],
                "itemsize": self.stride,
            }
        )
        self._lock = threading.Lock()  # read() vs close()
        # wait()/wake() vs close(): the eventfd and epoll stay open until no thread waits on
        # them, because closing an fd takes its pending event off the epoll ready list
        self._wait_lock = threading.Condition(threading.Lock())
        self._waiters = 0
        self._closed = False
        self._fd = os.dup(fd)  # ours to close; the map stays alive while we hold it
        self._cons_mm = mmap.mmap(
            self._fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        self._data_mm = mmap.mmap(
            self._fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._cons: npt.NDArray[np.uint64] = np.frombuffer(self._cons_mm, np.uint64, 1)
        self._prod: npt.NDArray[np.uint64] = np.frombuffer(self._data_mm, np.uint64, 1)
        self._data: npt.NDArray[np.uint8] = np.frombuffer(self._data_mm, np.uint8, offset=page)
        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._fd, select.EPOLLIN)
        self._epoll.register(self._wakefd, select.EPOLLIN)

    # --- reading ---------------------------------------------------------------------------

    def pending(self) -> int:
        """Bytes between the consumer and producer positions (committed or not)."""
        with self._lock:
            if self._closed:
                return 0
            return int(self._prod[0]) - int(self._cons[0])

    def read(self, max_records: int = DEFAULT_MAX_RECORDS) -> npt.NDArray[np.void]:
        """Copy out up to ``max_records`` ready records (oldest first) and release their space."""
        with self._lock:
            if self._closed:
                return np.empty(0, self.record)
            cons = int(self._cons[0])
            avail = int(self._prod[0]) - cons
            n = min(avail // self.stride, max_records)
            if n <= 0:
                return np.empty(0, self.record)
            off = cons & self._mask
            area = self._data[off : off + n * self.stride]
            lens = area.view(self._slot)["len"].copy()  # headers before payloads (see above)
            busy = (lens & _BUSY) != 0
            if busy.any():
                n = int(busy.argmax())
                lens = lens[:n]
            size = self.record.itemsize
            plain = lens == size  # committed, not discarded, our size
            all_plain = bool(plain.all())
            if not all_plain and not ((lens & _NOT_DISCARD) == size).all():
                return self._read_slow(cons, max_records)  # records of another size
            # one memcpy, then a strided view of the records in the copy (no per-field copy)
            out = area[: n * self.stride].copy().view(self._slot)["rec"]
            if not all_plain:
                out = out[plain]
            self._cons[0] = cons + n * self.stride
            return out

    def _read_slow(self, cons: int, max_records: int) -> npt.NDArray[np.void]:
        """Record-by-record walk, for discarded records and records of another size."""
        keep: list[npt.NDArray[np.void]] = []
        prod = int(self._prod[0])
        taken = 0
        while cons < prod and taken < max_records:
            off = cons & self._mask
            hdr = int(self._data[off : off + 4].view("<u4")[0])
            if hdr & BUSY_BIT:
                break
            length = hdr & _LEN_MASK
            if not hdr & DISCARD_BIT:
                if length == self.record.itemsize:
                    start = off + HDR_SIZE
                    keep.append(self._data[start : start + length].view(self.record).copy())
                else:
                    self.foreign += 1
            cons += slot_size(length)
            taken += 1
        self._cons[0] = cons
        return np.concatenate(keep) if keep else np.empty(0, self.record)

    # --- waiting ---------------------------------------------------------------------------

    def wait(self, timeout: float | None) -> bool:
        """Block until the ring has data, ``wake()`` is called or ``timeout`` (s) passes.

        Returns True if the ring may have data. The kernel wakes a consumer only for a record
        committed while the consumer had caught up; epoll is level-triggered on ``cons != prod``,
        so a record that was already there before the call returns at once.
        """
        with self._wait_lock:
            if self._closed:
                return False
            self._waiters += 1
        ready: list[tuple[int, int]] = []
        try:
            ready = self._epoll.poll(-1 if timeout is None else timeout)
        finally:
            with self._wait_lock:
                self._waiters -= 1
                self._wait_lock.notify_all()
                woken = any(fd == self._wakefd for fd, _ in ready)
                if woken and not self._closed:  # once closed it stays readable for all
                    with contextlib.suppress(BlockingIOError):  # another waiter took it
                        os.eventfd_read(self._wakefd)
        return any(fd == self._fd for fd, _ in ready)

    def poll(
        self, timeout: float | None, max_records: int = DEFAULT_MAX_RECORDS
    ) -> npt.NDArray[np.void]:
        """``read()``; if nothing was ready, ``wait(timeout)`` once and ``read()`` again."""
        out = self.read(max_records)
        if len(out) or timeout == 0:
            return out
        if self.wait(timeout):
            return self.read(max_records)
        return out

    def wake(self) -> None:
        """Make a ``wait()`` in another thread return now."""
        with self._wait_lock:
            if not self._closed:
                os.eventfd_write(self._wakefd, 1)

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close. Threads in ``wait()`` return first; later calls return nothing."""
        with self._wait_lock:
            if self._closed:
                return
            self._closed = True
            os.eventfd_write(self._wakefd, 1)  # never read again: wakes every waiter
            self._wait_lock.wait_for(lambda: self._waiters == 0, timeout=5.0)
        with self._lock:  # a read() in progress finishes first
            # numpy views export the mmaps' buffers: drop them before unmapping
            del self._cons, self._prod, self._data
            self._cons_mm.close()
            self._data_mm.close()
            self._epoll.close()
            os.close(self._wakefd)
            os.close(self._fd)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
