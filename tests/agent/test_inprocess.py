"""Agent logic on an in-process cluster (inprocess.py): real agents, real maps, memory links.

Each test checks an outcome a user would see, the maps' contents and readiness: convergence of
writes made on every node, a partitioned node catching up after the heal, a restarted agent
caught up by the time it reports ready, and concurrent writes on both sides of a partition
settling by last writer wins.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from aio import eventually, run
from inprocess import InProcessCluster, InProcessNode

from bpfsync.agent import daemon
from bpfsync.agent.persist import read_state
from bpfsync.demo.cluster import KEY, MAP_NAME, session

LABELS = {"map": MAP_NAME}


def entries(keys: range | list[int], base: int = 0) -> dict[bytes, bytes]:
    """The map content of ``session(k + base)`` written at every key ``k``."""
    return {KEY.pack(k): session(k + base) for k in keys}


async def stamped(node: InProcessNode, *keys: int) -> None:
    """Until ``node``'s agent has taken its own writes of ``keys`` in (stamped them)."""
    await eventually(lambda: all(node.origin(k) == node.name for k in keys),
                     f"{node.name} stamping its writes of {len(keys)} keys")


def test_three_agents_converge_after_writes_on_each() -> None:
    async def body() -> None:
        async with InProcessCluster() as cl:
            await cl.start()
            for i, node in enumerate(cl):  # a: 0-99, b: 100-199, c: 200-299
                for k in range(100 * i, 100 * (i + 1)):
                    node.put(k, session(k))
            assert await cl.wait_converged() == entries(range(300))
            cl["b"].delete(5)  # a's key, deleted on b
            cl["c"].put(150, session(7))  # b's key, overwritten on c
            want = entries([k for k in range(300) if k not in (5, 150)])
            want[KEY.pack(150)] = session(7)
            assert await cl.wait_converged() == want
            # one registry per agent: each counts its own node's writes only
            seen = {n.name: n.counter("bpfsync_local_changes_total", **LABELS, seen="poll")
                    for n in cl}
            assert seen == {"a": 100, "b": 101, "c": 101}

    run(body, timeout=60)


def test_a_partitioned_node_catches_up_after_the_heal() -> None:
    async def body() -> None:
        async with InProcessCluster() as cl:
            a, b, c = cl["a"], cl["b"], cl["c"]
            await cl.start()
            for k in range(50):
                a.put(k, session(k))
            before = await cl.wait_converged()
            cl.partition("c")
            for k in range(50, 150):
                a.put(k, session(k))
                b.put(k + 1000, session(k))
            for k in range(10):
                b.delete(k)
            during = await cl.wait_converged(["a", "b"])
            assert len(during) == 40 + 100 + 100
            assert c.content() == before  # nothing crossed the cut
            assert c.ready  # a node cut off stays ready: it serves what it has
            cl.heal("c")
            assert await cl.wait_converged() == during

    run(body, timeout=60)


def test_a_restarted_agent_is_caught_up_when_it_reports_ready() -> None:
    """While c is down, a and b are cut from each other too, so each holds writes the other
    lacks: c must be caught up by both (every peer it is linked with) before it reports ready.
    b's link to c is held until a has answered, so a's answer cannot make c ready. c's map is
    read at the very instant it reports ready (``at_ready``), not some loop turns later."""

    async def body() -> None:
        async with InProcessCluster() as cl:
            a, b, c = cl["a"], cl["b"], cl["c"]
            await cl.start()
            for k in range(100):
                a.put(k, session(k))
            await cl.wait_converged()
            first = c.incarnations[-1]
            await c.stop()
            cl.network.cut("a", "b")
            for k in range(100, 2100):
                a.put(k, session(k))
            for k in range(20):
                b.delete(k)
            for k in range(20, 40):
                b.put(k, session(k + 5000))
            for k in range(3000, 3500):
                b.put(k, session(k))
            want = entries([*range(40, 2100), *range(3000, 3500)])
            want.update(entries(range(20, 40), base=5000))
            await stamped(a, *range(100, 2100))  # in a's replica: what it answers c from
            await stamped(b, *range(40), *range(3000, 3500))
            cl.network.hold("b", "c")  # b's batches and its answer wait on the link
            await c.start(wait_ready=False)
            assert c.incarnations[-1] != first
            await eventually(lambda: c.answered() == {"a"}, "a answering c's catch-up")
            assert not c.ready and c.at_ready is None  # b, linked, has not answered yet
            cl.network.release("b", "c")
            await c.wait_ready()
            assert c.at_ready == want
            # the new agent's own registry: the catch-up is all it applied (2000 + 500 new keys
            # and 20 new values at least; at most every key once)
            applied = c.counter("bpfsync_applied_total", **LABELS, op="update")
            assert 2520 <= applied <= len(want), applied
            cl.heal()
            assert await cl.wait_converged() == want

    run(body, timeout=60)


def test_writes_on_both_sides_of_a_partition_settle_by_last_writer_wins() -> None:
    async def body() -> None:
        async with InProcessCluster() as cl:
            a, b, c = cl["a"], cl["b"], cl["c"]
            await cl.start()
            cl.partition("c")
            # key 1: c writes first, a later; key 2: a first, c later. Each write waits until its
            # agent stamped it, so the order of the stamps is the order of the writes.
            c.put(1, session(10))
            await stamped(c, 1)
            a.put(2, session(20))
            await stamped(a, 2)
            a.put(1, session(11))
            await stamped(a, 1)
            c.put(2, session(21))
            await stamped(c, 2)
            await cl.wait_converged(["a", "b"])
            assert b.get(1) == session(11) and b.get(2) == session(20)  # a's side only
            assert c.get(1) == session(10) and c.get(2) == session(21)
            cl.heal("c")
            want = {KEY.pack(1): session(11), KEY.pack(2): session(21)}
            assert await cl.wait_converged() == want
            await eventually(lambda: all(n.origin(1) == "a" and n.origin(2) == "c" for n in cl),
                             "every agent holding a's write of key 1 and c's of key 2")

    run(body, timeout=60)


def test_the_catch_up_timeout_counts_from_when_the_node_can_be_dialed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Y2: a node whose start is slow (here its stored state takes 1 s to read, as a large
    map's does) still gives its peers the whole catch-up timeout (0.5 s) once it listens: it
    does not come up alone the moment it listens because the clock ran while it loaded."""
    read_done: list[float] = []

    def slow_read(*args: Any) -> Any:
        time.sleep(1.0)
        try:
            return read_state(*args)
        finally:
            read_done.append(time.monotonic())

    monkeypatch.setattr(daemon, "read_state", slow_read)

    async def body() -> None:
        async with InProcessCluster(("a", "b")) as cl:  # b never starts: a is alone
            await cl.start(["a"])
            ready_at = time.monotonic()
            assert read_done and ready_at - read_done[0] >= 0.45

    run(body)
