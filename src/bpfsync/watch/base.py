"""What every watcher looks like from the outside.

A watcher observes a set of named maps and reports what it sees as ``WatchEvent``s (``Change`` or
``Overflow`` from ``bpfsync.model``). ``events()`` blocks and yields until ``close()`` is called,
from any thread; ``close()`` is idempotent. How changes are detected (a ring buffer fed by fexit
programs, or periodic scans) is the implementation's business.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from bpfsync.model import WatchEvent


@runtime_checkable
class Watcher(Protocol):
    """A source of ``WatchEvent``s for a set of maps."""

    def events(self) -> Iterator[WatchEvent]:
        """Yield events as they are observed, until ``close()`` is called."""
        ...

    def close(self) -> None:
        """Stop ``events()`` (from any thread) and release kernel resources."""
        ...
