"""A cluster of real agents on this machine: the harness behind `make demo` and the e2e tests.

Each node gets its own loaded copy of ``bpf/demo.bpf.o`` (so its own ``sessions`` map, pinned
under its own directory, plus the ``write_op`` program that writes that map from BPF) and its own
``bpfsync run`` process talking gRPC on loopback. The agents sync the maps by their shared name.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from bpfsync.kernel.objects import BpfObject
from bpfsync.transport.certs import Issued, issue_node, make_ca

BPFFS = Path("/sys/fs/bpf")
MAP_NAME = "sessions"
KEY = struct.Struct("<I")
VALUE = struct.Struct("<QIHBB")  # struct session {bytes, backend, port, proto, flags}
OP = struct.Struct("<II")  # struct demo_op header {op, key}; the value follows
DEMO_UPDATE, DEMO_DELETE = 1, 2
RANGE = struct.Struct("<IIIIQ")  # struct demo_range {first, count, modulus, pad, base}
RANGE_MAX = 256  # DEMO_RANGE_MAX: writes per write_range run
_XDP_PASS = 2


def demo_object() -> Path:
    path = Path(str(resources.files("bpfsync") / "bpf" / "demo.bpf.o"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not built: run `make bpf`")
    return path


_PORTS = range(20000, 32000)  # below the kernel's ephemeral range (32768-60999 by default)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now and stays free until an agent binds it: picked below
    the ephemeral range, so no outgoing connection or port-0 listener can take it meanwhile."""
    for _ in range(1000):
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port in 20000-31999")


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> int:
    """Signal ``proc``, wait up to ``timeout`` seconds, then kill it; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def session(n: int) -> bytes:
    """A deterministic demo value derived from ``n``."""
    return VALUE.pack(n * 1500, n % 7, 1024 + n % 50000, 6 if n % 2 else 17, n % 256)


class AgentProcess:
    """One ``bpfsync run`` process: its log in a file, its HTTP /status endpoint."""

    def __init__(self, http_port: int, log_path: Path) -> None:
        self.http_port = http_port
        self.log_path = log_path
        # the agent's state file (state.dir), next to its log: kept across restarts of this
        # agent, its own (two agents sharing one would set each other's file aside)
        self.state_dir = log_path.with_suffix(".state")
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, args: Sequence[str]) -> None:
        """Start ``bpfsync ARGS...`` (e.g. ``run --config FILE``), appending to the log. ``run``
        keeps its state in ``state_dir`` unless ARGS say where (--state-dir, --no-state)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"agent {self.log_path.stem} is already running")
        if args and args[0] == "run" and not {"--state-dir", "--no-state"} & set(args):
            args = [*args, "--state-dir", str(self.state_dir)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bpfsync.cli.main", *args],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the agent and wait for it; returns its exit code (None if it was not running)."""
        proc, self.proc = self.proc, None
        return None if proc is None else stop_process(proc, sig, timeout)

    def forget_state(self) -> None:
        """Remove the agent's state file (its next start is a fresh node's)."""
        shutil.rmtree(self.state_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any] | None:
        try:
            url = f"http://127.0.0.1:{self.http_port}/status"
            with urllib.request.urlopen(url, timeout=2) as resp:
                data: dict[str, Any] = json.load(resp)
                return data
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def is_ready(self) -> bool:
        st = self.status()
        return bool(st and st.get("ready"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Node(AgentProcess):
    """One node: its map (pinned), its BPF writer program and, while started, its agent."""

    def __init__(
        self, name: str, root: Path, port: int, http_port: int, entries: int | None = None
    ) -> None:
        """``entries``: the map's max_entries, when not the object's 65,536."""
        super().__init__(http_port, Path(f"/tmp/bpfsync-{root.name}-{name}.log"))
        self.name = name
        self.dir = root / name
        self.pin = self.dir / MAP_NAME
        self.port = port
        self.peers: list[str] = []
        self.tls: tuple[Path, Issued] | None = None  # the CA's certificate, and this node's
        # with NATS instead of the mesh: the servers, the cluster's subject prefix, the members
        self.nats: tuple[tuple[str, ...], str, tuple[str, ...]] | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self._entries = entries
        self._load()

    def _load(self) -> None:
        self.obj = BpfObject.open(demo_object())
        if self._entries is not None:
            self.obj.map_spec(MAP_NAME).set_max_entries(self._entries)
        self.obj.load()
        self.map = self.obj.map(MAP_NAME)
        self.map.pin(str(self.pin))
        self.writer = self.obj.program("write_op")
        self.range_writer = self.obj.program("write_range")

    def recreate_map(self) -> None:
        """The data plane restarts: its map is made anew (empty, another map id) and pinned
        where the old one was. A running agent follows it to the new map."""
        self.remove_map()
        self.load_map()

    def remove_map(self) -> None:
        """The data plane goes away: its program and map are freed (but for an agent's
        reference) and the pin removed."""
        self.map.close()
        self.obj.close()
        with contextlib.suppress(OSError):
            self.pin.unlink()

    def load_map(self) -> None:
        """The data plane comes up (after ``remove_map``): a new map, empty, pinned."""
        self._load()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- the agent -----------------------------------------------------------------------------

    def command(self, extra: Sequence[str] = ()) -> list[str]:
        cmd = ["run", "--node-id", self.name, "--listen", self.address, "--map", str(self.pin),
               "--http", f"127.0.0.1:{self.http_port}"]
        if self.nats is not None:
            servers, prefix, members = self.nats
            cmd += ["--transport", "nats", "--nats-cluster", prefix]
            for url in servers:
                cmd += ["--nats", url]
            for member in members:
                cmd += ["--allow-node", member]
            return cmd + list(extra)
        for p in self.peers:
            cmd += ["--peer", p]
        if self.tls is not None:
            ca, mine = self.tls
            cmd += ["--tls-ca", str(ca), "--tls-cert", str(mine.cert), "--tls-key", str(mine.key)]
        return cmd + list(extra)

    def start(self, extra: Sequence[str] = ()) -> None:
        self.spawn(self.command(extra))

    # --- the data plane ------------------------------------------------------------------------

    def put(self, key: int, value: bytes) -> None:
        """A user-space write (bpf(2) from this process, not the agent)."""
        self.map.update(KEY.pack(key), value)

    def delete(self, key: int) -> None:
        self.map.delete(KEY.pack(key))

    def bpf_put(self, key: int, value: bytes) -> None:
        """A write made by a BPF program: ``write_op`` run with BPF_PROG_TEST_RUN."""
        res = self.writer.test_run(OP.pack(DEMO_UPDATE, key) + value)
        if res.retval != _XDP_PASS:  # bpf_map_update_elem failed
            raise RuntimeError(f"BPF update of key {key} on {self.name} failed")

    def bpf_put_range(self, first: int, count: int, modulus: int, base: int) -> None:
        """``count`` (at most RANGE_MAX) writes by a BPF program in one run of ``write_range``:
        key (first + i) % modulus gets a session whose ``bytes`` is base + i, the rest zero."""
        if not 0 <= count <= RANGE_MAX or modulus <= 0:
            raise ValueError(f"count must be 0..{RANGE_MAX} and modulus > 0, got {count}, "
                             f"{modulus}")
        res = self.range_writer.test_run(RANGE.pack(first, count, modulus, 0, base))
        if res.retval != _XDP_PASS:
            raise RuntimeError(f"BPF update of keys {first}.. on {self.name} failed")

    def bpf_delete(self, key: int) -> None:
        self.writer.test_run(OP.pack(DEMO_DELETE, key) + bytes(VALUE.size))

    def content(self) -> dict[bytes, bytes]:
        return self.map.dump().to_dict()

    def close(self) -> None:
        self.stop()
        self.forget_state()
        self.map.close()
        self.obj.close()
        with contextlib.suppress(OSError):
            self.pin.unlink()



def wait_for(cond: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:
    """Poll ``cond`` every ``every`` s until it holds or ``timeout`` s pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()

class Cluster:
    """N nodes in a full mesh; a context manager that always cleans up pins and processes.

    ``tls``: the nodes run with mutual TLS, certificates issued by a CA made for the cluster
    (``issue`` makes more), and know their peers by id (``ID@HOST:PORT``). ``factory`` makes
    each node from (name, root, port, http port), e.g. with a larger map. ``nats``: the nodes
    sync through the NATS servers at these URLs (``transport: nats``), not a mesh.
    """

    def __init__(
        self, names: Sequence[str] = ("a", "b", "c"), tag: str | None = None, tls: bool = False,
        factory: Callable[[str, Path, int, int], Node] = Node,
        nats: Sequence[str] | None = None,
    ) -> None:
        self.root = BPFFS / f"bpfsync-{tag or 'cluster'}-{uuid.uuid4().hex[:8]}"
        self.nodes: dict[str, Node] = {}
        self.pki: Path | None = None
        try:
            for n in names:
                self.nodes[n] = factory(n, self.root, free_port(), free_port())
            if tls:
                self.pki = Path(tempfile.mkdtemp(prefix="bpfsync-pki-"))
                make_ca(self.pki, days=2)
                for node in self.nodes.values():
                    node.tls = (self.pki / "ca.pem", self.issue(node.name))
        except BaseException:
            self.close()
            raise
        for node in self.nodes.values():
            node.peers = [f"{o.name}@{o.address}" if tls else o.address
                          for o in self.nodes.values() if o is not node]
            if nats is not None:  # the cluster's own subjects: clusters may share servers
                node.nats = (tuple(nats), f"bpfsync-{self.root.name[-8:]}", tuple(self.nodes))

    def issue(self, node: str, out: Path | None = None) -> Issued:
        """A certificate for ``node`` from the cluster's CA (in ``out``, default the CA's)."""
        assert self.pki is not None, "a cluster made without tls has no CA"
        return issue_node(node, self.pki / "ca.pem", self.pki / "ca.key", out or self.pki,
                          ips=("127.0.0.1",), days=2, force=True)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def start(self, extra: Sequence[str] = ()) -> None:
        for node in self:
            node.start(extra)

    def wait(self, cond: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:
        return wait_for(cond, timeout, every)

    def wait_ready(self, timeout: float = 30.0, nodes: Sequence[Node] | None = None) -> bool:
        return self.wait(lambda: all(n.is_ready() for n in (nodes or list(self))), timeout)

    def linked(self) -> bool:
        """Every node's links to every other node are up (both directions)."""
        for node in self:
            st = node.status()
            if st is None:
                return False
            up = {p["node"] for p in st["peers"] if p["connected"] and p["inbound"]}
            if up != {n.name for n in self if n is not node}:
                return False
        return True

    def wait_linked(self, timeout: float = 30.0) -> bool:
        return self.wait(self.linked, timeout)

    def converged(self) -> bool:
        contents = [n.content() for n in self]
        return all(c == contents[0] for c in contents[1:])

    def wait_converged(self, timeout: float) -> bool:
        return self.wait(self.converged, timeout, every=0.2)

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        if self.pki is not None:
            shutil.rmtree(self.pki, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(self.root)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
