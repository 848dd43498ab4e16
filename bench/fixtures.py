"""What the benchmark phases stand on: nodes with a resized demo map or a plain bpftool map, a
cluster of them, and helpers that read agents' state (applied counts, RSS, wire bytes, map
contents) and profile them."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bpfsync.demo.cluster import MAP_NAME, AgentProcess, Cluster, Node
from bpfsync.kernel.maps import Map

PYSPY = Path(sys.executable).parent / "py-spy"


# --- nodes with a resized demo map, or a plain bpftool map ----------------------------------------

class BigNode(Node):
    """Node.__init__ with ``set_max_entries`` before load."""

    def __init__(self, name: str, root: Path, port: int, http_port: int, entries: int) -> None:
        super().__init__(name, root, port, http_port, entries)


class PlainNode(Node):
    """A node whose map is a bpftool-created hash (u32 -> value_size bytes); no BPF writer."""

    def __init__(self, name: str, root: Path, port: int, http_port: int, entries: int,
                 value_size: int) -> None:
        AgentProcess.__init__(self, http_port, Path(f"/tmp/bpfsync-{root.name}-{name}.log"))
        self.name, self.dir, self.port = name, root / name, port
        self.pin = self.dir / MAP_NAME
        self.peers = []
        self.tls = None
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["bpftool", "map", "create", str(self.pin), "type", "hash", "key", "4",
                        "value", str(value_size), "entries", str(entries), "name", MAP_NAME],
                       check=True)
        self.obj = None
        self.map = Map.open_pinned(str(self.pin))
        self.writer = None

    def close(self) -> None:
        self.stop()
        self.forget_state()
        self.map.close()
        with contextlib.suppress(OSError):
            self.pin.unlink()


class BenchCluster(Cluster):
    def __init__(self, factory: Any, names: tuple[str, ...], tag: str, tls: bool = False) -> None:
        super().__init__(names, tag, tls, factory)

    def start_with(self, poll: float, nodes: list[Node] | None = None,
                   catchup_s: float = 1.0, mode: str = "auto", extra: Sequence[str] = ()) -> None:
        """Start the agents of ``nodes`` (default all) with a config file of these settings;
        ``extra``: more command-line arguments (e.g. ``--no-state``; without it an agent keeps
        its state in its ``state_dir``, demo/cluster.py)."""
        for node in nodes or list(self):
            cfg = Path(f"/tmp/bpfsync-{self.root.name}-{node.name}.yaml")
            cfg.write_text(
                f"node_id: {node.name}\nmaps:\n  - path: {node.pin}\n"
                f"watch:\n  mode: {mode}\n  poll_interval: {poll}\n"
                f"  syscall_hooks: {'true' if mode == 'auto' else 'false'}\n"
                f"sync:\n  catchup_timeout_s: {catchup_s}\n")
            node.start(["--config", str(cfg), *extra])

    def close(self) -> None:
        super().close()
        for p in Path("/tmp").glob(f"bpfsync-{self.root.name}-*.yaml"):
            p.unlink(missing_ok=True)


# --- helpers -----------------------------------------------------------------------------------

def applied(node: Node) -> int:
    """The agent's count of records written to its map; a busy agent may answer /status late
    (its HTTP thread competes for the GIL), so ask again rather than count a timeout as 0."""
    deadline = time.monotonic() + 20
    while True:
        st = node.status()
        if st and st.get("maps"):
            return int(st["maps"][0]["applied"])
        if time.monotonic() > deadline:
            raise RuntimeError(f"agent {node.name} did not answer /status for 20 s")
        time.sleep(0.2)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (/proc/PID/stat utime + stime, its own
    threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def readyz(node: Node) -> bool:
    """The agent's /readyz answers 200 (ready); False also while it does not listen yet."""
    try:
        url = f"http://127.0.0.1:{node.http_port}/readyz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def log_events(node: Node, since: float, msgs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The first log line of each message in ``msgs`` that the agent wrote at or after the wall
    time ``since`` (time.time()), with its ``at_s``: seconds after ``since`` (the log's
    timestamps have millisecond resolution); under "first line", the first line of any message
    (how long the process took to start logging: the interpreter and the imports)."""
    out: dict[str, dict[str, Any]] = {}
    for line in node.log().splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
            at = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if at < since - 0.001:
            continue
        msg = rec.get("msg")
        if "first line" not in out:
            out["first line"] = {**rec, "at_s": at - since}
        if msg in msgs and msg not in out:
            out[msg] = {**rec, "at_s": at - since}
    return out


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v)
    return out


def sorted_dump(m: Map) -> tuple[np.ndarray, np.ndarray]:
    d = m.dump()
    keys = np.asarray(d.key_array).reshape(-1).view(np.uint32)
    order = np.argsort(keys, kind="stable")
    return keys[order], np.asarray(d.value_array)[order]


def drained(node: Node, deadline: float) -> None:
    """Wait until ``node`` has no record queued or unacknowledged for any peer (or until
    ``deadline``); its /status costs it little, unlike dumping the maps to compare."""
    while time.perf_counter() < deadline:
        st = node.status() or {}
        peers = st.get("peers") or []
        if peers and all(p["lag_records"] == 0 and p["unacked_batches"] == 0 for p in peers):
            return
        time.sleep(0.1)


def same_content(a: Node, others: list[Node]) -> bool:
    ka, va = sorted_dump(a.map)
    for o in others:
        ko, vo = sorted_dump(o.map)
        if ko.shape != ka.shape or not np.array_equal(ko, ka) or not np.array_equal(vo, va):
            return False
    return True


def pct(xs: np.ndarray, p: float) -> float:
    return float(np.percentile(xs, p)) if xs.size else float("nan")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wire_bytes(sender_port: int, receiver_port: int) -> dict[str, int]:
    """Bytes sent by every TCP socket between the two agents (ss -ti), split by direction.
    Sockets of connections that were reset before this call are not counted."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True,
                         text=True).stdout.splitlines()
    res = {"from_sender": 0, "from_receiver": 0}
    cur: tuple[int, int] | None = None
    for line in out:
        m = re.search(r"127\.0\.0\.1\]?:(\d+)\s+\S*127\.0\.0\.1\]?:(\d+)", line)
        if m:
            cur = (int(m.group(1)), int(m.group(2)))
            continue
        b = re.search(r"bytes_sent:(\d+)", line)
        if cur and b:
            lport, pport = cur
            if lport == sender_port or pport == receiver_port:
                res["from_sender"] += int(b.group(1))
            elif lport == receiver_port or pport == sender_port:
                res["from_receiver"] += int(b.group(1))
            cur = None
    return res


Profiling = list[tuple[str, subprocess.Popen[bytes], Path]]


def start_profile(nodes: list[Node], secs: float) -> Profiling:
    if not PYSPY.exists():
        return []
    out = []
    for n in nodes:
        assert n.proc is not None
        path = Path(f"/tmp/bpfsync-bench-pyspy-{n.name}-{os.getpid()}.txt")
        p = subprocess.Popen([str(PYSPY), "record", "-p", str(n.proc.pid), "-d", str(int(secs)),
                              "-r", "50", "-f", "raw", "-o", str(path), "--nonblocking"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append((n.name, p, path))
    return out


def finish_profile(procs: Profiling) -> dict[str, Any]:
    res = {}
    for name, p, path in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if not path.exists():
            continue
        self_t: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        total = 0
        for line in path.read_text().splitlines():
            stack, _, cnt = line.rpartition(" ")
            if not stack or not cnt.isdigit():
                continue
            frames = stack.split(";")
            total += int(cnt)
            self_t[frames[-1]] += int(cnt)
            for f in set(frames):
                if "bpfsync" in f:
                    incl[f] += int(cnt)
        path.unlink()
        res[name] = {"total": total, "self": self_t.most_common(10), "incl": incl.most_common(12)}
    return res
