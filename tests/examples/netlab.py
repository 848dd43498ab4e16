"""A lab for the examples: real packets through real XDP programs on nodes that run real agents.

Topology (every address in 198.18.0.0/15, the range reserved for benchmarks)::

    client netns: sources on lo (198.18.0.x/32), one veth per node
      ├─ to-a 198.18.1.1/30 ──veth── eth0 198.18.1.2/30   netns of node a   [XDP on eth0]
      ├─ to-b 198.18.2.1/30 ──veth── eth0 198.18.2.2/30   netns of node b   [XDP on eth0]
      └─ to-c 198.18.3.1/30 ──veth── eth0 198.18.3.2/30   netns of node c   [XDP on eth0]

Sources sit on the client's lo, so one source address reaches every node (the rate limit is per
source) and routes decide which node a packet goes through.

Each node loads its own copy of the example's object in the test process, attaches the program
from inside its netns (an ifindex names an interface of the caller's netns) and pins its maps
under /sys/fs/bpf/bpfsync-ex-<id>/<node>/. Agents are processes in the host netns on loopback,
configured by a YAML file each: the data plane is namespaced, the control plane is not, as with
an agent on a management network.

``Netlab.close()`` removes everything (agents, senders, links, objects, pins, namespaces), also
after a failed set-up. Needs root, iproute2 and ``make bpf``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bpfsync.demo.cluster import AgentProcess, free_port
from bpfsync.demo.cluster import wait_for as cluster_wait_for
from bpfsync.kernel.links import Link
from bpfsync.kernel.maps import Map, unpin
from bpfsync.kernel.objects import BpfObject

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TEST_PROGRAMS = Path(__file__).resolve().parents[2] / "tests" / "bpf"
BPFFS = Path("/sys/fs/bpf")
CLONE_NEWNET = 0x40000000
POLL_INTERVAL = 0.05  # the agents' watch.poll_interval: the dominant part of their sync delay

_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if res.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block in network namespace ``name``: setns(2) moves only the calling thread."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), f"setns into {name}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET):  # cannot continue in the wrong netns
                os.abort()
    finally:
        os.close(own)


def wait_for(cond: Callable[[], bool], timeout: float, every: float = 0.02) -> bool:
    return cluster_wait_for(cond, timeout, every)  # the packet tests poll more often


def tai_ns() -> int:
    """CLOCK_TAI, the clock bpfsync_now_ns() reads in BPF."""
    return time.clock_gettime_ns(time.CLOCK_TAI)


def ipv4(addr: str) -> bytes:
    """An IPv4 address as a map key: 4 bytes in network order (what ip->saddr holds)."""
    return socket.inet_aton(addr)


def udp_frame(src: str, dst: str, sport: int, dport: int, payload: bytes,
              ip_options: bytes = b"") -> bytes:
    """An Ethernet + IPv4 + UDP frame for BPF_PROG_TEST_RUN (checksums left 0)."""
    assert len(ip_options) % 4 == 0
    ihl = 5 + len(ip_options) // 4
    total = ihl * 4 + 8 + len(payload)
    iph = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0, 0, 64, 17, 0,
                      ipv4(src), ipv4(dst))
    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    udph = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return eth + iph + ip_options + udph + payload


# Runs in the client netns: sends ``count`` datagrams (or, with count -1, until killed or the
# timeout) round-robin over ``targets`` at ``rate`` per second. A target is [address, device]:
# with a device, its socket is bound to it (SO_BINDTODEVICE picks that path of a multipath
# route); sockets share src:sport (SO_REUSEPORT), so one flow can take several paths at once.
_SENDER = r"""
import json, socket, sys, time
spec = json.loads(sys.argv[1])
socks = []
for dst, dev in spec["targets"]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if dev:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
    s.bind((spec["src"], spec["sport"]))
    socks.append((s, dst))
payload, count = bytes.fromhex(spec["payload"]), spec["count"]
start = time.monotonic()
sent = 0
while count < 0 or sent < count:
    now = time.monotonic()
    if now - start > spec["timeout"]:
        break
    delay = start + sent / spec["rate"] - now
    if delay > 0:
        time.sleep(delay)
    s, dst = socks[sent % len(socks)]
    s.sendto(payload, (dst, spec["port"]))
    sent += 1
print(sent)
"""


class Agent(AgentProcess):
    """One ``bpfsync run --config FILE`` process and its HTTP status endpoint."""

    def __init__(self, node: str, workdir: Path) -> None:
        super().__init__(free_port(), workdir / f"{node}.log")
        self.node = node
        self.port = free_port()
        self.config_path = workdir / f"{node}.yaml"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def configure(self, peers: Sequence[str], maps: Sequence[Mapping[str, Any]],
                  watch_mode: str, nats: Mapping[str, Any] | None = None,
                  members: Sequence[str] = ()) -> None:
        """``nats``: the config's nats section, to sync through NATS instead of ``peers``
        (``members``: the cluster's node ids)."""
        cfg: dict[str, Any] = {
            "node_id": self.node,
            "listen": self.address,
            "peers": list(peers),
            "http_listen": f"127.0.0.1:{self.http_port}",
            "watch": {"mode": watch_mode, "poll_interval": POLL_INTERVAL},
            "maps": [dict(m) for m in maps],
        }
        if nats is not None:
            del cfg["peers"]
            cfg.update(transport="nats", nats=dict(nats), allowed_nodes=list(members))
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def start(self) -> None:
        self.spawn(["run", "--config", str(self.config_path)])


class Node:
    """One node: a netns with a veth to the client, the example's program on it, its maps."""

    def __init__(self, lab: Netlab, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.netns = f"{lab.prefix}-{name}"
        self.address = f"198.18.{index}.2"  # eth0 here
        self.gateway = f"198.18.{index}.1"  # the client's end
        self.client_if = f"to-{name}"
        self.pin_dir = lab.pin_root / name
        self.obj: BpfObject | None = None
        self.link: Link | None = None
        self.maps: dict[str, Map] = {}
        self.agent = Agent(name, lab.workdir)

    def setup(self, lab: Netlab) -> None:
        ip("netns", "add", self.netns)
        ip("-n", self.netns, "link", "set", "lo", "up")
        # made in place: the host netns never holds these interfaces, so nothing leaks there
        ip("-n", lab.client, "link", "add", self.client_if, "type", "veth",
           "peer", "name", "eth0", "netns", self.netns)
        ip("-n", lab.client, "addr", "add", f"{self.gateway}/30", "dev", self.client_if)
        ip("-n", lab.client, "link", "set", self.client_if, "up")
        ip("-n", self.netns, "addr", "add", f"{self.address}/30", "dev", "eth0")
        ip("-n", self.netns, "link", "set", "eth0", "up")
        ip("-n", self.netns, "route", "add", "default", "via", self.gateway)  # to the sources
        self.start_data_plane(lab)

    def start_data_plane(self, lab: Netlab) -> None:
        """Load the program and its maps, pin the maps, attach it: what the data plane's
        loader does at its start (new map objects each time)."""
        obj = self.obj = BpfObject.open(lab.object_path)
        if lab.rodata is not None:
            spec = obj.map_spec(".rodata")
            current = spec.initial_value
            if current is None or len(current) != len(lab.rodata):
                raise ValueError(f".rodata is {len(current or b'')} bytes, the lab gives "
                                 f"{len(lab.rodata)}: the header and the test disagree")
            spec.set_initial_value(lab.rodata)
        obj.load()
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        for name in obj.maps:
            if "." not in name:  # not .rodata/.bss/.data
                m = self.maps[name] = obj.map(name)
                m.pin(str(self.pin_dir / name))
        with in_netns(self.netns):
            ifindex = socket.if_nametoindex("eth0")
            self.link = obj.program(lab.program).attach_xdp(ifindex)

    def pin(self, name: str) -> str:
        return str(self.pin_dir / name)

    def stop_data_plane(self) -> None:
        """Detach the program, unpin and close its maps: a data plane that stopped."""
        if self.link is not None:
            self.link.destroy()
            self.link = None
        for name, m in self.maps.items():
            unpin(self.pin(name))
            m.close()
        self.maps = {}
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def close(self) -> None:
        """Agent, link, maps, object, netns (its veth goes with it): each step runs anyway."""
        steps: list[Callable[[], object]] = [self.agent.stop]
        if self.link is not None:
            steps.append(self.link.destroy)
        steps += [m.close for m in self.maps.values()]
        if self.obj is not None:
            steps.append(self.obj.close)
        steps.append(lambda: subprocess.run(["ip", "netns", "del", self.netns],
                                            capture_output=True, timeout=10))
        for step in steps:
            with contextlib.suppress(Exception):
                step()


class Netlab:
    """The client netns and ``names`` nodes running ``examples/<example>/<example>.bpf.o``'s
    ``program`` (or a test program's: ``tests/bpf/<name>.bpf.o`` for an ``example`` given as
    ``tests/<name>``), with ``rodata`` (if given) as its .rodata; a context manager."""

    def __init__(self, example: str, program: str, names: Sequence[str] = ("a", "b", "c"),
                 rodata: bytes | None = None) -> None:
        test_program = example.removeprefix("tests/")
        self.object_path = (TEST_PROGRAMS / f"{test_program}.bpf.o" if test_program != example
                            else EXAMPLES / example / f"{example}.bpf.o")
        if not self.object_path.exists():
            raise FileNotFoundError(f"{self.object_path} is missing: run `make bpf`")
        self.program = program
        self.rodata = rodata
        tag = uuid.uuid4().hex[:8]
        self.prefix = f"bpfsync-ex-{tag}"
        self.client = f"{self.prefix}-client"
        self.pin_root = BPFFS / self.prefix
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self._senders: list[subprocess.Popen[bytes]] = []
        self.nodes: dict[str, Node] = {}
        try:
            ip("netns", "add", self.client)
            ip("-n", self.client, "link", "set", "lo", "up")
            for i, name in enumerate(names, 1):
                node = self.nodes[name] = Node(self, name, i)
                node.setup(self)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    # --- the client side -----------------------------------------------------------------------

    def add_source(self, addr: str) -> str:
        """A /32 on the client's lo: packets from it can go to any node."""
        ip("-n", self.client, "addr", "add", f"{addr}/32", "dev", "lo")
        return addr

    def route(self, dst: str, *via: Node) -> None:
        """Route the client's packets for ``dst`` (an address no node owns) through ``via``;
        through several nodes, a multipath route (a sender's (address, node.client_if)
        destinations then pick the path per packet)."""
        hops = [["nexthop", "via", n.address, "dev", n.client_if] for n in via]
        args = hops[0][1:] if len(hops) == 1 else [w for hop in hops for w in hop]
        ip("-n", self.client, "route", "replace", f"{dst}/32", *args)

    def _sender(self, src: str, dsts: Sequence[str | tuple[str, str]], count: int, rate: float,
                port: int, sport: int, payload: bytes, timeout: float) -> list[str]:
        targets = [list(d) if isinstance(d, tuple) else [d, None] for d in dsts]
        spec = {"src": src, "targets": targets, "count": count, "rate": rate, "port": port,
                "sport": sport, "payload": payload.hex(), "timeout": timeout}
        return ["ip", "netns", "exec", self.client, sys.executable, "-c", _SENDER,
                json.dumps(spec)]

    def send(self, src: str, dsts: Sequence[str | tuple[str, str]], count: int, rate: float,
             port: int, payload: bytes, sport: int = 0) -> int:
        """Send ``count`` UDP datagrams round-robin over ``dsts`` at ``rate``/s; returns how
        many went out (fewer only if it ran out of its time: count/rate + 10 s). A destination
        may be (address, client device) to take one path of a multipath route."""
        timeout = count / rate + 10
        res = subprocess.run(self._sender(src, dsts, count, rate, port, sport, payload, timeout),
                             capture_output=True, text=True, timeout=timeout + 10)
        if res.returncode:
            raise RuntimeError(f"sender failed: {res.stderr.strip()}")
        return int(res.stdout)

    @contextlib.contextmanager
    def sending(self, src: str, dsts: Sequence[str], rate: float, port: int, payload: bytes,
                timeout: float = 30.0) -> Iterator[None]:
        """Keep sending round-robin over ``dsts`` at ``rate``/s while the block runs (and at
        most ``timeout`` seconds)."""
        proc = subprocess.Popen(self._sender(src, dsts, -1, rate, port, 0, payload, timeout),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._senders.append(proc)
        try:
            yield
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"sender ended early ({proc.returncode}): {err.strip()}")
        finally:
            self._stop_sender(proc)

    def _stop_sender(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
        self._senders.remove(proc)

    # --- the agents ----------------------------------------------------------------------------

    def start_agents(self, maps: Sequence[Mapping[str, Any]], watch_mode: str = "auto",
                     timeout: float = 30.0, nats: Sequence[str] | None = None) -> None:
        """Start every node's agent syncing ``maps`` and wait until all report ready. Map paths
        (``path``, ``companion``) that are bare names mean the node's own pin of that map.
        ``watch_mode`` as in the example's bpfsync.yaml: poll for maps written in place.
        ``nats``: the agents sync through the NATS servers at these URLs, not a mesh."""
        section = None if nats is None else {"servers": list(nats), "cluster": self.prefix}
        for node in self:
            own = [{k: (node.pin(v) if k in ("path", "companion") and "/" not in v else v)
                    for k, v in m.items()} for m in maps]
            peers = [o.agent.address for o in self if o is not node]
            node.agent.configure(peers, own, watch_mode, section, [n.name for n in self])
        for node in self:
            node.agent.start()
        if not wait_for(lambda: all(n.agent.is_ready() or not n.agent.running for n in self),
                        timeout, every=0.1):
            raise TimeoutError(f"agents not ready after {timeout} s\n{self.logs()}")
        dead = [n.name for n in self if not n.agent.running]
        if dead:
            raise RuntimeError(f"agents of {dead} exited\n{self.logs()}")

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- agent log of node {n.name} (last {tail} chars) ---\n"
                         f"{n.agent.log()[-tail:]}" for n in self)

    # --- clean-up ------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove everything this lab made; every step runs even if an earlier one fails."""
        for proc in list(self._senders):
            with contextlib.suppress(Exception):
                self._stop_sender(proc)
        for node in self.nodes.values():
            node.close()
        shutil.rmtree(self.pin_root, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.client], capture_output=True, timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Netlab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
