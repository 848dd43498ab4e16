"""Fixtures for tests that run inside the kernel VM, and the result marker the host parses."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject

ROOT = Path(__file__).resolve().parents[3]
WRITER = ROOT / "tests" / "bpf" / "trace_writer.bpf.o"
RESULT_MARKER = "BPFSYNC-GUEST-RESULT"

# name in the test -> map in trace_writer.bpf.c, in the order its `apply` program numbers them
WRITER_MAPS = {
    "hash": "w_hash",
    "lru_hash": "w_lru",
    "percpu_hash": "w_pcpu",
    "lru_percpu_hash": "w_lru_pcpu",
    "array": "w_array",
    "percpu_array": "w_pcpu_array",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.guest)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stats = terminalreporter.stats
    counts = {k: len(stats.get(k, [])) for k in ("passed", "failed", "error", "skipped")}
    line = f"{RESULT_MARKER} " + " ".join(f"{k}={v}" for k, v in counts.items())
    terminalreporter.write_line(line)
    # printk is flushed to the console before power-off; the tty may not be
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(line + "\n")


@pytest.fixture(scope="session", autouse=True)
def loopback_up() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


@pytest.fixture(scope="session")
def writer() -> Iterator[BpfObject]:
    """trace_writer.bpf.o, loaded: the watched maps and the programs that write them."""
    with BpfObject.open(WRITER) as obj:
        obj.load()
        yield obj


@pytest.fixture(scope="session")
def writer_maps(writer: BpfObject) -> Iterator[dict[str, Map]]:
    maps = {name: writer.map(bpf_name) for name, bpf_name in WRITER_MAPS.items()}
    yield maps
    for m in maps.values():
        m.close()
