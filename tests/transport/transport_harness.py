"""Helpers for transport tests: real meshes on 127.0.0.1, events collected, conditions awaited.

Each test is a coroutine run by ``aio.run`` under a deadline; waits are ``aio.eventually``, on
conditions with a timeout (``aio.WAIT``), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aio import WAIT, eventually

from bpfsync.core.messages import Batch, Hello, MapSchema, Record, Stamp
from bpfsync.demo.cluster import free_port
from bpfsync.transport import Event, GrpcMesh, MeshOptions, PeerDown, PeerUp, Received

_incarnations = itertools.count(int(time.time()))

FAST = MeshOptions(backoff_base=0.02, backoff_cap=0.25, handshake_timeout=5.0)


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

    async def wait_event(self, match: Callable[[Event], bool], what: str,
                         timeout: float = WAIT, start: int = 0) -> Event:
        """The first event from index ``start`` on that ``match``es."""
        def found() -> Event | None:
            return next((ev for ev in self.events[start:] if match(ev)), None)

        try:
            return await eventually(found, f"{what} at {self.mesh.node}", timeout)
        except AssertionError as err:
            raise AssertionError(f"{err}; events: {self.events[-10:]}") from None

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
