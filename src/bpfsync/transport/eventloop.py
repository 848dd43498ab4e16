"""The event loop the gRPC mesh runs on: asyncio's, with grpcio's wake-up backlog drained.

grpcio's asyncio stack hands the C core's events to the loop through a socketpair: a poller
thread queues each event and writes one byte for it; the loop's reader for that socket reads
one byte and handles every queued event. When loop turns are long (a slice of local changes,
a batch merged), several events arrive per turn, and the bytes nobody needs pile up. After
~280 of them the socket is full and the poller thread blocks in write(2). That thread also
drives the C core's I/O, so every stream of the process stalls until the loop, one byte per
turn, has read the socket down: seconds, under load.

``GrpcEventLoop`` wraps that reader: each call first drops every byte but one, then lets grpcio
read the last one and handle the queue. The poller queues an event before it writes the
event's byte, so the events of the bytes dropped are in the queue that same call handles.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import termios
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVarTuple

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

Ts = TypeVarTuple("Ts")

# the class grpcio's asyncio stack (grpc._cython.cygrpc) reads its wake-up socket with
_POLLER = "PollerCompletionQueue"


class GrpcEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop, with grpcio's wake-up reader wrapped (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.grpc_wakeups: DrainingReader | None = None  # once grpcio has bound to this loop

    def add_reader(
        self, fd: FileDescriptorLike, callback: Callable[[*Ts], object], *args: *Ts
    ) -> None:
        if is_grpc_wakeup(callback):
            self.grpc_wakeups = DrainingReader(fd, callback)
            super().add_reader(fd, self.grpc_wakeups, *args)
        else:
            super().add_reader(fd, callback, *args)


def is_grpc_wakeup(callback: Callable[..., object]) -> bool:
    """Whether ``callback`` is grpcio's reader of its wake-up socket (a bound method of its
    poller, wrapped in functools.partial by grpcio 1.5x and later)."""
    func = getattr(callback, "func", callback)
    return type(getattr(func, "__self__", None)).__name__ == _POLLER


class DrainingReader:
    """grpcio's wake-up reader, called with at most one byte left in the socket."""

    def __init__(self, fd: FileDescriptorLike, read_one: Callable[..., object]) -> None:
        self._fd: int = fd if isinstance(fd, int) else fd.fileno()
        self._read_one = read_one
        self.dropped = 0  # stale wake-up bytes read here, not by grpcio

    def pending(self) -> int:
        """Bytes waiting in the wake-up socket."""
        count = array.array("i", [0])
        fcntl.ioctl(self._fd, termios.FIONREAD, count)
        return count[0]

    def __call__(self, *args: object) -> None:
        stale = self.pending() - 1
        if stale > 0:  # never all: grpcio's read of the last byte must not find it empty
            self.dropped += len(os.read(self._fd, stale))
        self._read_one(*args)
