"""Counter maps across three real agents: both layouts, with maps made without BTF."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfsync.demo.cluster import AgentProcess, free_port, wait_for
from bpfsync.kernel.info import MapType
from bpfsync.kernel.maps import Map

U32 = 4
ROOT = Path("/sys/fs/bpf")


def _create(path: Path) -> Map:
    m = Map.create(MapType.HASH, U32, 8, 1024, name=path.name)  # no BTF: whole-value policy
    m.pin(str(path))
    return m


class Trio:
    """Three nodes, each a counter map (+ a companion map for the exact layout) and an agent."""

    def __init__(self, layout: str, configs: Path) -> None:
        self.configs = configs
        self.root = ROOT / f"bpfsync-ctr-{uuid.uuid4().hex[:8]}"
        self.names = ("a", "b", "c")
        self.ports = {n: free_port() for n in self.names}
        self.http = {n: free_port() for n in self.names}
        self.maps: dict[str, Map] = {}
        self.companions: dict[str, Map] = {}
        self.agents = {n: AgentProcess(self.http[n], configs / f"{n}.log") for n in self.names}
        try:
            self._build(layout)
        except BaseException:
            self.close()
            raise

    def _build(self, layout: str) -> None:
        configs = self.configs
        for n in self.names:
            (self.root / n).mkdir(parents=True)
            self.maps[n] = _create(self.root / n / "hits")
            entry: dict[str, object] = {"path": str(self.root / n / "hits"), "policy": "counter"}
            if layout == "exact":
                self.companions[n] = _create(self.root / n / "hits_peers")
                entry |= {"counters": "exact", "companion": str(self.root / n / "hits_peers")}
            cfg = {
                "node_id": n, "listen": f"127.0.0.1:{self.ports[n]}",
                "peers": [f"127.0.0.1:{self.ports[o]}" for o in self.names if o != n],
                "http_listen": f"127.0.0.1:{self.http[n]}", "maps": [entry],
                "watch": {"poll_interval": 0.05},
            }
            (configs / f"{n}.yaml").write_text(json.dumps(cfg))  # JSON is YAML

    def start(self) -> None:
        for n, agent in self.agents.items():
            agent.spawn(["run", "--config", str(self.configs / f"{n}.yaml")])

    def ready(self) -> bool:
        return all(agent.is_ready() for agent in self.agents.values())

    def count(self, m: Map, key: int) -> int:
        raw = m.lookup(key.to_bytes(U32, "little"))
        return 0 if raw is None else int.from_bytes(raw, "little")

    def bump(self, n: str, key: int, by: int) -> None:
        """The data plane of node ``n`` counts ``by`` more for ``key`` (read-modify-write)."""
        m = self.maps[n]
        m.update(key.to_bytes(U32, "little"), (self.count(m, key) + by).to_bytes(8, "little"))

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for m in [*self.maps.values(), *self.companions.values()]:
            m.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def trio(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Trio]:
    t = Trio(request.param, tmp_path)
    try:
        yield t
    finally:
        t.close()


@pytest.mark.parametrize("trio", ["exact"], indirect=True)
def test_exact_counters_fill_the_companion_with_the_other_nodes_sum(trio: Trio) -> None:
    trio.start()
    assert wait_for(trio.ready, 30)
    adds = {"a": 5, "b": 3, "c": 11}
    for n, by in adds.items():
        trio.bump(n, 7, by)

    def settled() -> bool:
        return all(
            trio.count(trio.companions[n], 7) == sum(v for o, v in adds.items() if o != n)
            for n in trio.names
        )

    assert wait_for(settled, 30), {n: trio.count(trio.companions[n], 7) for n in trio.names}
    # the data plane's own maps were never written by the agents
    assert {n: trio.count(trio.maps[n], 7) for n in trio.names} == adds


@pytest.mark.parametrize("trio", ["in-place"], indirect=True)
def test_in_place_counters_hold_the_cluster_total(trio: Trio) -> None:
    trio.start()
    assert wait_for(trio.ready, 30)
    for rnd in range(3):
        for i, n in enumerate(trio.names):
            trio.bump(n, 9, i + 1 + rnd)
        time.sleep(0.3)
    total = sum(i + 1 + rnd for rnd in range(3) for i in range(3))

    def settled() -> bool:
        return all(trio.count(trio.maps[n], 9) == total for n in trio.names)

    assert wait_for(settled, 30), {n: trio.count(trio.maps[n], 9) for n in trio.names}


@pytest.mark.parametrize("trio", ["in-place"], indirect=True)
def test_dump_shows_every_nodes_slot(trio: Trio) -> None:
    trio.start()
    assert wait_for(trio.ready, 30)
    key = int.from_bytes(bytes([198, 18, 0, 7]), "little")  # an IPv4 address as a __u32 key
    for i, n in enumerate(trio.names):
        trio.bump(n, key, 10 * (i + 1))
    assert wait_for(lambda: all(trio.count(trio.maps[n], key) == 60 for n in trio.names), 30)
    res = subprocess.run(
        [sys.executable, "-m", "bpfsync.cli.main", "dump", str(trio.root / "a" / "hits"),
         "--json", "--addr", "key", "--agent", f"127.0.0.1:{trio.http['a']}"],
        capture_output=True, text=True, check=True,
    )
    (line,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert line["key_fields"] == "198.18.0.7"
    slots = {node: int.from_bytes(bytes.fromhex(v), "little")
             for node, v in line["slots"].items()}
    assert slots == {"a": 10, "b": 20, "c": 30}, line
