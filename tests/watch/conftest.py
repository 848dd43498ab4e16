"""Fixtures for the watcher tests: BPF objects, bpftool-made maps, and a veth pair whose far end
sits in a network namespace of its own (198.18.0.1/30 here, 198.18.0.2/30 there).

Everything created (objects, pins, links, namespaces, interfaces) is removed at teardown, also
when the test fails. Needs root and the test objects built by ``make bpf``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpfsync.kernel.info import MapType
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject

TESTS_BPF = Path(__file__).resolve().parent.parent / "bpf"
_names = itertools.count()


@pytest.fixture
def load_object() -> Iterator[Callable[..., BpfObject]]:
    """``load_object(name)``: tests/bpf/<name>.bpf.o opened and loaded; closed at teardown."""
    objects: list[BpfObject] = []

    def load(name: str) -> BpfObject:
        path = TESTS_BPF / f"{name}.bpf.o"
        if not path.exists():
            pytest.fail(f"{path} is missing: run `make bpf`")
        obj = BpfObject.open(path)
        objects.append(obj)
        obj.load()
        return obj

    yield load
    for obj in objects:
        obj.close()


@pytest.fixture
def make_map() -> Iterator[Callable[..., Map]]:
    """``make_map(type, key_size, value_size, entries)``: a map without BTF, open (not pinned);
    it goes at teardown."""
    opened: list[Map] = []

    def make(kind: str, key: int, value: int, entries: int) -> Map:
        m = Map.create(MapType[kind.upper()], key, value, entries, name="bst_poll")
        opened.append(m)
        return m

    try:
        yield make
    finally:
        for m in opened:
            m.close()


@dataclass(frozen=True)
class VethNetns:
    netns: str
    host_if: str  # in our namespace, 198.18.0.1/30
    ifindex: int
    host_ip: str
    peer_ip: str  # the far end, inside ``netns``

    def send_udp(self, count: int, port: int = 9) -> None:
        """Send ``count`` UDP datagrams from inside the namespace to the host end."""
        code = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range({count}):\n"
            f"    s.sendto(b'bpfsync-test', ('{self.host_ip}', {port}))\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", code],
            check=True,
            capture_output=True,
            timeout=30,
        )


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def veth_netns() -> Iterator[VethNetns]:
    tag = f"{os.getpid() % 100000:05d}{next(_names)}"
    netns, host_if, peer_if = f"bpfsync-test-{tag}", f"bst{tag}a", f"bst{tag}b"
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _ip("link", "set", peer_if, "netns", netns)
        _ip("addr", "add", "198.18.0.1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", netns, "addr", "add", "198.18.0.2/30", "dev", peer_if)
        _ip("-n", netns, "link", "set", peer_if, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        ifindex = int(Path(f"/sys/class/net/{host_if}/ifindex").read_text())
        yield VethNetns(netns, host_if, ifindex, "198.18.0.1", "198.18.0.2")
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
