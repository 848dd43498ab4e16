"""An in-process cluster: N real agents on one asyncio loop, over the in-memory transport.

For fast functional tests of agent logic (gubernator's in-process cluster, without its
sockets): each node has its own real BPF map, pinned in its own directory on bpffs, and, while
started, its own ``bpfsync.agent.daemon.Agent`` with its own metrics registry. The agents talk
through one ``MemoryNetwork``, whose links a test cuts, heals and holds (``network.hold``: a
slow link). No processes, no gRPC, no timers to wait out: a test takes a fraction of a second
where a cluster of processes takes seconds to start. ``tests/agent/test_cluster.py`` keeps the
end-to-end tests of real processes on loopback.

    async def body() -> None:
        async with InProcessCluster(("a", "b", "c")) as cl:
            await cl.start()                  # every agent, then until each one is ready
            cl["a"].put(1, session(1))
            await cl.wait_converged()
            cl.partition("c")                 # c's links to a and b are cut
            await cl["c"].restart()           # a new Agent (a new incarnation) on c's map
            cl.heal()

    run(body)                                 # aio.run: the test under a deadline

The agents find writes by polling their map (``watch.mode: poll``): the bpf(2) hooks would see
none of the test's writes, since an agent ignores map writes made by its own process, which is
the test's too. ``FAST`` picks settings that keep a test to a fraction of a second;
``InProcessCluster(settings=...)`` overrides them per section. Leaving the ``async with``
stops every agent (awaiting its task), closes every map and removes every pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from aio import eventually
from prometheus_client import Gauge

from bpfsync.agent.config import AgentConfig, parse_config
from bpfsync.agent.daemon import Agent
from bpfsync.agent.metrics import AgentMetrics
from bpfsync.demo.cluster import BPFFS, KEY, MAP_NAME, VALUE
from bpfsync.kernel.info import MapType
from bpfsync.kernel.maps import Map
from bpfsync.transport.memory import MemoryNetwork

__all__ = ["FAST", "WAIT", "InProcessCluster", "InProcessNode"]

WAIT = 10.0  # seconds for any one condition (readiness, convergence) unless a test says less
STOP_S = 10.0  # an agent that has not stopped by then is cancelled

# poll every 20 ms (default 0.25 s); a node that finds no peer starts alone after 0.5 s (10 s),
# one whose linked peers stay silent after three times that; the routine digest every 0.5 s (2 s)
FAST: Mapping[str, Mapping[str, Any]] = {
    "watch": {"mode": "poll", "poll_interval": 0.02},
    "sync": {"catchup_timeout_s": 0.5, "anti_entropy_interval_s": 0.5},
}


class _ReadyGauge:
    """An agent's ``bpfsync_ready`` gauge that also tells the node the moment it is set: the
    agent sets it when it reports ready, after its catch-up's last kernel write."""

    def __init__(self, gauge: Gauge, on_set: Callable[[float], None]) -> None:
        self._gauge = gauge
        self._on_set = on_set

    def set(self, value: float) -> None:
        self._gauge.set(value)
        self._on_set(value)


class InProcessNode:
    """One node: its map (pinned; it outlives the agents) and, while started, its agent.

    ``at_ready``: the map's content at the instant the current agent reported ready (None
    before), read when the agent sets its ``bpfsync_ready`` gauge: what a client trusting
    /readyz would find in the map.
    """

    def __init__(self, cluster: InProcessCluster, name: str, entries: int) -> None:
        self.name = name
        self.cluster = cluster
        self.pin = cluster.root / name / MAP_NAME
        self.pin.parent.mkdir(parents=True)
        self.map = Map.create(MapType.HASH, KEY.size, VALUE.size, entries, name=MAP_NAME)
        self.map.pin(str(self.pin))
        # state.dir: on a real file system (bpffs holds no files), kept across this node's agents
        self.state_dir = cluster.state_root / name
        self.agent: Agent | None = None
        self.metrics: AgentMetrics | None = None  # the current (or last) agent's registry
        self.incarnations: list[int] = []  # of every agent started on this node, in order
        self.at_ready: dict[bytes, bytes] | None = None
        self._task: asyncio.Task[None] | None = None

    # --- the agent -----------------------------------------------------------------------------

    def config(self) -> AgentConfig:
        """This node's agent configuration: its map, the cluster's members, the settings."""
        data: dict[str, Any] = {
            "node_id": self.name,
            "maps": [{"path": str(self.pin)}],
            "allowed_nodes": list(self.cluster.names),
            "state": {"dir": str(self.state_dir)},
        }
        data.update(self.cluster.settings)
        return parse_config(data, f"in-process node {self.name}")

    async def start(self, wait_ready: bool = True, timeout: float = WAIT) -> Agent:
        """Start a new agent on this node's map (its task on the running loop); with
        ``wait_ready``, return once it reports ready."""
        if self.running:
            raise RuntimeError(f"the agent of node {self.name} is already running")
        self.metrics = AgentMetrics()
        self.metrics.ready = _ReadyGauge(self.metrics.ready, self._reported)  # type: ignore[assignment]
        self.at_ready = None
        agent = Agent(self.config(), metrics=self.metrics,
                      transport_factory=self.cluster.network.transport)
        self.agent = agent
        self.incarnations.append(agent.incarnation)
        self._task = asyncio.create_task(agent.run(), name=f"agent-{self.name}")
        if wait_ready:
            await self.wait_ready(timeout)
        return agent

    def _reported(self, ready: float) -> None:
        if ready and self.at_ready is None:
            self.at_ready = self.content()

    async def stop(self) -> None:
        """Stop the agent and wait for it; re-raises what it failed with, if it did."""
        task, self._task = self._task, None
        if task is None:
            return
        assert self.agent is not None
        self.agent.stop()
        done, _ = await asyncio.wait([task], timeout=STOP_S)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise AssertionError(f"the agent of node {self.name} did not stop in {STOP_S} s")
        task.result()

    async def restart(self, wait_ready: bool = True, timeout: float = WAIT) -> Agent:
        """Stop the agent and start a new one on the same map, as a restarted process would."""
        await self.stop()
        return await self.start(wait_ready, timeout)

    @property
    def running(self) -> bool:
        """An agent was started and has not been stopped. Raises if it failed meanwhile: a
        test waiting on an agent that died would only see a timeout."""
        if self._task is None:
            return False
        if self._task.done():
            self._task.result()  # the agent's exception, if any
            raise AssertionError(f"the agent of node {self.name} stopped by itself")
        return True

    @property
    def ready(self) -> bool:
        """The running agent reports ready (what /readyz would say)."""
        return self.running and self.agent is not None and self.agent.ready

    async def wait_ready(self, timeout: float = WAIT) -> None:
        await eventually(lambda: self.ready, f"node {self.name} ready", timeout)

    def origin(self, key: int) -> str | None:
        """The node whose write of ``key`` this node's agent holds (None: none, or no agent).
        Also tells when the agent has taken a local write in: then it is this node."""
        if self.agent is None or not self.running:
            return None
        held = self.agent.replica.slots(MAP_NAME, KEY.pack(key))
        return next(iter(held), None)

    def answered(self) -> set[str]:
        """The peers that have answered the current agent's catch-up digest of its map."""
        return set(self.agent.catchup.answered.get(MAP_NAME, ())) if self.agent else set()

    def counter(self, name: str, **labels: str) -> float:
        """A sample of the current agent's own registry, e.g. ``bpfsync_applied_total``."""
        assert self.metrics is not None, f"no agent was started on node {self.name}"
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    # --- the data plane ------------------------------------------------------------------------

    def put(self, key: int, value: bytes) -> None:
        """A user-space write into this node's map (what a program or an operator does)."""
        self.map.update(KEY.pack(key), value)

    def delete(self, key: int) -> None:
        self.map.delete(KEY.pack(key))

    def get(self, key: int) -> bytes | None:
        return self.map.lookup(KEY.pack(key))

    def content(self) -> dict[bytes, bytes]:
        return self.map.dump().to_dict()


class InProcessCluster:
    """Nodes on one MemoryNetwork, a full mesh; an async context manager that always cleans up.

    ``entries``: each map's max_entries. ``settings``: config sections over ``FAST``, e.g.
    ``{"sync": {"catchup_timeout_s": 5}}`` (a section given replaces FAST's keys one by one).
    """

    def __init__(
        self, names: Sequence[str] = ("a", "b", "c"), entries: int = 4096,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.names = tuple(names)
        self.settings = {section: dict(values) for section, values in FAST.items()}
        for section, values in (settings or {}).items():
            self.settings.setdefault(section, {}).update(values)
        self.network = MemoryNetwork()
        self.root = BPFFS / f"bpfsync-inproc-{uuid.uuid4().hex[:8]}"
        self.state_root = Path(tempfile.mkdtemp(prefix="bpfsync-inproc-state-"))
        self.nodes: dict[str, InProcessNode] = {}
        try:
            for name in self.names:
                self.nodes[name] = InProcessNode(self, name, entries)
        except BaseException:
            self._remove_maps()
            raise

    def __getitem__(self, name: str) -> InProcessNode:
        return self.nodes[name]

    def __iter__(self) -> Iterator[InProcessNode]:
        return iter(self.nodes.values())

    def _pick(self, names: Iterable[str] | None) -> list[InProcessNode]:
        return list(self) if names is None else [self.nodes[n] for n in names]

    # --- agents --------------------------------------------------------------------------------

    async def start(
        self, names: Iterable[str] | None = None, wait_ready: bool = True, timeout: float = WAIT
    ) -> None:
        """Start the named nodes' agents (default: every node) together, then, with
        ``wait_ready``, wait until each one is ready."""
        nodes = self._pick(names)
        for node in nodes:
            await node.start(wait_ready=False)
        if wait_ready:
            await self.wait_ready([n.name for n in nodes], timeout)

    async def wait_ready(self, names: Iterable[str] | None = None, timeout: float = WAIT) -> None:
        nodes = self._pick(names)
        await eventually(lambda: all(n.ready for n in nodes),
                         f"{', '.join(n.name for n in nodes)} ready", timeout)

    async def stop(self, names: Iterable[str] | None = None) -> None:
        """Stop the named agents (default: all), every one even if one fails; re-raises the
        first failure."""
        results = await asyncio.gather(*(n.stop() for n in self._pick(names)),
                                       return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res

    # --- links ---------------------------------------------------------------------------------

    def partition(self, *side: str) -> None:
        """Cut every link between the nodes in ``side`` and the others, in both directions;
        the cut holds across agent restarts until ``heal``."""
        for a in side:
            for b in self.names:
                if b not in side:
                    self.network.cut(a, b)

    def heal(self, *side: str) -> None:
        """Heal what ``partition(*side)`` cut; with no names, every link. (One link:
        ``network.cut(a, b)`` and ``network.heal(a, b)``.)"""
        for a in side or self.names:
            for b in self.names:
                if a != b and (not side or b not in side):
                    self.network.heal(a, b)

    # --- maps ----------------------------------------------------------------------------------

    def converged(self, names: Iterable[str] | None = None) -> bool:
        """The named nodes' maps (default: all) hold the same entries."""
        contents = [n.content() for n in self._pick(names)]
        return all(c == contents[0] for c in contents[1:])

    async def wait_converged(
        self, names: Iterable[str] | None = None, timeout: float = WAIT
    ) -> dict[bytes, bytes]:
        """Wait until the named nodes' maps agree; returns the content they agree on."""
        nodes = self._pick(names)
        await eventually(lambda: self.converged([n.name for n in nodes]),
                         f"the maps of {', '.join(n.name for n in nodes)} converged", timeout)
        return nodes[0].content()

    # --- clean-up ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every agent, then close every map and remove every pin; re-raises the first
        agent failure once everything is cleaned up."""
        try:
            await self.stop()
        finally:
            self._remove_maps()

    def _remove_maps(self) -> None:
        for node in self.nodes.values():
            node.map.close()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.state_root, ignore_errors=True)

    async def __aenter__(self) -> InProcessCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
