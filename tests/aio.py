"""The asyncio tests' two helpers: run a test coroutine under a deadline, await a condition.

pytest-asyncio is not a dependency: each asyncio test is a plain function that hands its
coroutine to ``run``. Waits are on conditions with a timeout, never on fixed sleeps; the
synchronous tests use ``bpfsync.demo.cluster.wait_for`` (the demo's own), this is its twin for
code on the loop. Importable from every test directory: tests/ holds a conftest.py and no
``__init__.py``, so pytest puts it on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["WAIT", "eventually", "run"]

T = TypeVar("T")
WAIT = 20.0  # seconds for any one condition: generous, the tests must pass on a loaded 2-core box


def run(test: Callable[[], Coroutine[Any, Any, None]], timeout: float = 120.0) -> None:
    """Run ``test()`` on a fresh event loop; fail it if it takes longer than ``timeout`` s."""

    async def main() -> None:
        await asyncio.wait_for(test(), timeout)

    asyncio.run(main())


async def eventually(
    check: Callable[[], T | None], what: str, timeout: float = WAIT, every: float = 0.01
) -> T:
    """Call ``check`` every ``every`` s, letting the loop run in between, until it returns
    something truthy, and return that; after ``timeout`` s (and one last call), raise an
    AssertionError naming ``what``. ``every=0`` checks once per turn of the loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        await asyncio.sleep(every)
    if result := check():
        return result
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
