"""Helpers for transport tests: real meshes on 127.0.0.1, events collected, conditions awaited.

pytest-asyncio is not a dependency: each test is a coroutine run by ``run`` under a deadline. Waits
are on conditions with a timeout (generous: the tests must pass on a loaded 2-core machine), never
on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from bpfsync.core.messages import Batch, Hello, MapSchema, Record, Stamp
from bpfsync.demo.cluster import free_port
from bpfsync.transport import Event, GrpcMesh, MeshOptions, PeerDown, PeerUp, Received

T = TypeVar("T")
WAIT = 20.0  # seconds for any one condition

_incarnations = itertools.count(int(time.time()))

FAST = MeshOptions(backoff_base=0.02, backoff_cap=0.25, handshake_timeout=5.0)


def run(test: Callable[[], Coroutine[Any, Any, None]], timeout: float = 120.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(test(), timeout)

    asyncio.run(main())


async def eventually(check: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return result


def hello(node: str) -> Hello:
    return Hello(node=node, incarnation=next(_incarnations),
                 maps=(MapSchema("m", key_size=4, value_size=8),))


def batch(sender: str, seq: int, n: int = 3, node: str | None = None) -> Batch:
    return Batch(sender, seq, tuple(
        Record("m", i.to_bytes(4, "little"), None if i == 1 else seq.to_bytes(8, "little"),
               Stamp(wall=1_000 + i, logical=i, node=node or sender))
        for i in range(n)
    ))


class Node:
    """A GrpcMesh plus a task that records its events, for tests to wait on."""

    def __init__(self, mesh: GrpcMesh) -> None:
        self.mesh = mesh
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, name: str, peers: Sequence[str] = (), port: int = 0,
                    options: MeshOptions = FAST, collect: bool = True, **kw: Any) -> Node:
        """Start a mesh node; with ``collect`` False nobody reads its events (a stuck agent)."""
        node = cls(GrpcMesh(hello(name), f"127.0.0.1:{port}", peers, options=options, **kw))
        await node.mesh.start()
        if collect:
            node._task = asyncio.create_task(node._collect())
        return node

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.mesh.port}"

    async def _collect(self) -> None:
        async for event in self.mesh.events():
            self.events.append(event)
            self._changed.set()

    async def wait_event(self, match: Callable[[Event], bool], what: str,
                         timeout: float = WAIT, start: int = 0) -> Event:
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for ev in self.events[seen:]:
                if match(ev):
                    return ev
            seen = len(self.events)
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.mesh.node}: timed out waiting for {what}; "
                                     f"events: {self.events[-10:]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def up(self, peer: str, start: int = 0) -> PeerUp:
        ev = await self.wait_event(lambda e: isinstance(e, PeerUp) and e.peer == peer,
                                   f"PeerUp({peer})", start=start)
        assert isinstance(ev, PeerUp)
        return ev

    async def down(self, peer: str, start: int = 0) -> PeerDown:
        ev = await self.wait_event(lambda e: isinstance(e, PeerDown) and e.peer == peer,
                                   f"PeerDown({peer})", start=start)
        assert isinstance(ev, PeerDown)
        return ev

    async def received(self, peer: str, count: int) -> list[Any]:
        """Wait until ``count`` messages from ``peer`` arrived; return them in order."""
        def got() -> list[Any]:
            msgs = [e.message for e in self.events if isinstance(e, Received) and e.peer == peer]
            return msgs if len(msgs) >= count else []
        return await eventually(got, f"{count} messages from {peer} at {self.mesh.node}")

    def state(self, peer: str) -> Any:
        states = [p for p in self.mesh.peers() if p.node == peer]
        return states[0] if states else None

    async def close(self) -> None:
        await self.mesh.close()
        if self._task is not None:
            await asyncio.wait_for(self._task, WAIT)  # events() ends at close


async def closing(*nodes: Node) -> None:
    await asyncio.gather(*(n.close() for n in nodes))


async def mesh(names: list[str], options: MeshOptions = FAST) -> list[Node]:
    """Start one node per name, each dialing all the others, and wait until all links are up."""
    ports = [free_port() for _ in names]
    addrs = [f"127.0.0.1:{p}" for p in ports]
    nodes = []
    for i, name in enumerate(names):
        others = [a for j, a in enumerate(addrs) if j != i]
        nodes.append(await Node.start(name, others, port=ports[i], options=options))
    waits: list[Awaitable[Any]] = [
        n.up(other) for n in nodes for other in names if other != n.mesh.node
    ]
    await asyncio.gather(*waits)
    return nodes
