"""An attachment of a program to a hook (``Link``): a libbpf ``struct bpf_link``.

Destroying a link detaches the program unless the link is pinned, in which case the pin keeps it
attached (``unpin()`` first to detach for good). A ``Link`` that is garbage-collected is destroyed,
like an fd that is closed: keep a reference for as long as the program must stay attached.
"""

from __future__ import annotations

import contextlib

from bpfsync.errors import KernelError
from bpfsync.kernel import _libbpf
from bpfsync.kernel._closing import Closing


class Link(Closing):
    """A program attached somewhere; ``what`` says where, for messages."""

    def __init__(self, ptr: _libbpf.Ptr, what: str) -> None:
        self._ptr: _libbpf.Ptr | None = ptr
        self.what = what
        self.pin_path: str | None = None

    @property
    def fd(self) -> int:
        return _libbpf.link_fd(self._live())

    @property
    def destroyed(self) -> bool:
        return self._ptr is None

    def pin(self, path: str) -> None:
        """Pin at ``path`` on bpffs: the attachment then outlives this process."""
        _libbpf.link_pin(self._live(), path)
        self.pin_path = path

    def unpin(self) -> None:
        _libbpf.link_unpin(self._live())
        self.pin_path = None

    def destroy(self) -> None:
        """Release the link (detaching the program unless pinned). Idempotent."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _libbpf.link_destroy(ptr)

    def close(self) -> None:
        """``destroy()``: what the end of a ``with`` block does."""
        self.destroy()

    def _live(self) -> _libbpf.Ptr:
        if self._ptr is None:
            raise ValueError(f"link {self.what} is destroyed")
        return self._ptr

    def __del__(self) -> None:
        with contextlib.suppress(KernelError, AttributeError):
            self.destroy()

    def __repr__(self) -> str:
        state = "destroyed" if self._ptr is None else "attached"
        if self._ptr is not None and self.pin_path:
            state = f"pinned at {self.pin_path}"
        return f"<Link {self.what} {state}>"
