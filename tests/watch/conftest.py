"""Fixtures for the watcher tests: a veth pair whose far end sits in a network namespace of its
own (198.18.0.1/30 here, 198.18.0.2/30 there). BPF objects and maps: tests/conftest.py.

Everything created (objects, pins, links, namespaces, interfaces) is removed at teardown, also
when the test fails. Needs root and the test objects built by ``make bpf``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_names = itertools.count()


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
