"""One-command end-to-end benchmark of bpfsync against the seed design (needs root, bpffs).

    .venv/bin/python bench/run.py [--quick]

Phases (each bounded; every pin and process is cleaned up by the Cluster context manager):
  seed      bench/seed_baseline.py: one unary gRPC call per change, new channel per call, 1 peer,
            4-byte key/value (the reference every ratio is computed against)
  Agents run the default watch mode (auto: on this host, bpf(2) syscall hooks for user-space
  writes plus a poll every 0.25 s for BPF programs' writes) unless a phase says otherwise.
  thr-user  3 agents (a, b, c) on loopback, demo map (u32 -> 16 B) resized to --keyspace entries;
            user-space batch updates on a at --rate for --seconds, keys cycled over the key space
            (each write has a unique value); time until b and c hold exactly a's content
  thr-bpf   same, writes made by the write_range BPF program via BPF_PROG_TEST_RUN (256 a run:
            one run a write, a Python loop offered only 75-120k writes/s)
  thr-tls   thr-user again with mutual TLS between the agents (certificates from the cluster's
            own CA, peers given as ID@HOST:PORT), right after thr-user for a fair comparison
  thr-256   same as thr-user with 256-byte values (a bpftool-created hash map, no BTF)
  latency   ~10k writes/s on a (monotonic ns in the value); this process sees b's agent write
            them through its own bpf(2) syscall hooks; agents in watch mode auto (the default:
            bpf(2) hooks on this host) at 10k/s and at 80% of the rate thr-user sustained, and
            poll-only at 0.25 s for comparison; and at 10k/s with mutual TLS
  catch-up  a holds N entries and is ready; b starts empty: time to ready and identical, bytes read
            sent by the two agents (ss -ti bytes_sent), RSS of both then, and again once every
            bucket of both maps is frozen (core/frozen.py: quiet buckets take a third of the memory)
  detect    MapPoller scan+diff of a 1M-entry u32 -> 16 B hash (bench/poll_scan.py's helpers),
            and what the bpf(2) hooks cost every other process (bench/syscall_hooks.py)
  profile   py-spy record of a and b during thr-user (if py-spy is installed)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import poll_scan
import seed_baseline
import syscall_hooks

from bpfsync.core.digest import DEFAULT_BUCKETS
from bpfsync.demo.cluster import (
    MAP_NAME,
    RANGE_MAX,
    AgentProcess,
    Cluster,
    Node,
)
from bpfsync.kernel.maps import Map
from bpfsync.watch.poll import MapPoller
from bpfsync.watch.trace import Hooks, TraceWatcher
from bpfsync.watch.trace_abi import elements

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
        self.map.close()
        with contextlib.suppress(OSError):
            self.pin.unlink()


class BenchCluster(Cluster):
    def __init__(self, factory: Any, names: tuple[str, ...], tag: str, tls: bool = False) -> None:
        super().__init__(names, tag, tls, factory)

    def start_with(self, poll: float, nodes: list[Node] | None = None,
                   catchup_s: float = 1.0, mode: str = "auto") -> None:
        for node in nodes or list(self):
            cfg = Path(f"/tmp/bpfsync-{self.root.name}-{node.name}.yaml")
            cfg.write_text(
                f"node_id: {node.name}\nmaps:\n  - path: {node.pin}\n"
                f"watch:\n  mode: {mode}\n  poll_interval: {poll}\n"
                f"  syscall_hooks: {'true' if mode == 'auto' else 'false'}\n"
                f"sync:\n  catchup_timeout_s: {catchup_s}\n")
            node.start(["--config", str(cfg)])

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


# --- phases ------------------------------------------------------------------------------------

WRITE_TICK = 0.005  # s between the throughput writer's batches


def throughput(c: BenchCluster, rate: float, seconds: float, keyspace: int, vsize: int,
               use_bpf: bool, wait_max: float, base: int, profile_s: float = 0) -> dict[str, Any]:
    """Write on a at ``rate`` for ``seconds`` (keys cycle over ``keyspace``), then wait until b and
    c hold a's content. ``base`` offsets the unique value so that phases never repeat a value."""
    a, b, cc = c["a"], c["b"], c["c"]
    ap0 = {n.name: applied(n) for n in (b, cc)}
    words = vsize // 8
    prof = start_profile([a, b], profile_s) if profile_s else []
    written = 0
    start = time.perf_counter()
    # one batch per WRITE_TICK (1,250 entries at 250k/s), as a control plane would write. A
    # writer that wrote whatever was due every few microseconds took 18 CPU-s in a 30 s run
    # (12 of them Python per call) from the agents on this 2-core machine; now 6
    tick_n = min(rate * WRITE_TICK, 20000, keyspace)
    while (el := time.perf_counter() - start) < seconds:
        n = min(int(rate * el) - written, 20000, keyspace)
        if n < tick_n:
            time.sleep(WRITE_TICK / 4)
            continue
        idx = np.arange(written, written + n, dtype=np.uint64)
        keys = (idx % keyspace).astype(np.uint32)
        vals = np.zeros((n, words), dtype=np.uint64)
        vals[:, 0] = idx + base + 1
        if use_bpf:  # the same keys and values, written by write_range, RANGE_MAX a run
            for j in range(0, n, RANGE_MAX):
                a.bpf_put_range(int(keys[j]), min(RANGE_MAX, n - j), keyspace, int(vals[j, 0]))
        else:
            a.map.update_batch(keys, vals)
        written += n
    write_s = time.perf_counter() - start
    # the value each touched key must end with: its last write
    last = np.arange(max(0, written - keyspace), written, dtype=np.uint64)
    touched = (last % keyspace).astype(np.int64)
    expected = last + base + 1

    def holds(n: Node) -> int:
        d = n.map.dump()
        k = np.asarray(d.key_array).reshape(-1).view(np.uint32).astype(np.int64)
        v = np.asarray(d.value_array)[:, :8].copy().view(np.uint64).reshape(-1)
        got = np.zeros(keyspace, dtype=np.uint64)
        got[k[k < keyspace]] = v[k < keyspace]
        return int(np.count_nonzero(got[touched] == expected))

    done_at = None
    deadline = time.perf_counter() + wait_max
    held = {}
    while time.perf_counter() < deadline:
        # two 1M-entry dumps cost ~0.7 s of a core, taken from the agents under test on this
        # 2-core machine: compare the maps only once a has nothing queued for b or c
        drained(a, deadline)
        checked = time.perf_counter()
        held = {n.name: holds(n) for n in (b, cc)}
        if min(held.values()) == touched.size:
            done_at = checked - start
            break
        time.sleep(0.5)
    total_s = done_at if done_at is not None else time.perf_counter() - start
    ap = {n.name: applied(n) - ap0[n.name] for n in (b, cc)}
    profiles = finish_profile(prof)
    st = a.status() or {}
    stb = b.status() or {}
    return {
        "b_stats": {"replica": stb.get("replica"), "transport": stb.get("transport"),
                    "peers": stb.get("peers")},
        "written": written, "write_s": write_s, "offered_rate": written / write_s,
        "converged": done_at is not None, "total_s": total_s,
        "writes_per_s": written / total_s, "keys_final_ok": held, "keys_touched": touched.size,
        "applied_b": ap["b"], "applied_c": ap["c"],
        "distinct_applied_per_s": min(ap.values()) / total_s,
        "profiles": profiles,
        "a_stats": {"replica": st.get("replica"), "transport": st.get("transport"),
                    "peers": [{k: p.get(k) for k in ("node", "sent", "reconnects", "dropped",
                                                     "last_error")}
                              for p in st.get("peers", [])]},
    }


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


def latency(c: BenchCluster, poll: float, rate: float, seconds: float,
            keyspace: int = 20000) -> dict[str, Any]:
    """Writes on a carry their monotonic time; b's agent writes them into b's map with bpf(2),
    which this process sees through its own syscall hooks (agent_tgid 0: nothing suppressed)
    within microseconds, without scanning b's map and without competing for the CPU."""
    a, b = c["a"], c["b"]
    vsize = b.map.info.value_size
    seen = np.zeros(keyspace, dtype=np.uint64)
    lats: list[np.ndarray] = []
    written = 0
    with TraceWatcher({"b": b.map}, agent_tgid=0, hooks=Hooks.SYSCALL) as observer:
        start_ns = time.monotonic_ns()
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            now = time.perf_counter()
            if now < end:
                n = min(int(rate * (now - t0)) - written, keyspace)
                if n > 0:
                    idx = np.arange(written, written + n, dtype=np.uint64)
                    vals = np.zeros((n, 2), dtype=np.uint64)
                    vals[:, 0] = time.monotonic_ns()
                    a.map.update_batch((idx % keyspace).astype(np.uint32), vals)
                    written += n
            elif now > end + max(2.0, 10 * poll):
                break
            recs = observer.read_records(timeout=0.0005)
            obs = time.monotonic_ns()
            if not len(recs):
                continue
            kk, vv, deleted = elements(recs, 4, vsize)  # b's batches: packed records
            keys = kk[~deleted].copy().view(np.uint32).reshape(-1)
            ts = vv[~deleted][:, :8].copy().view(np.uint64).reshape(-1)
            new = (ts != seen[keys]) & (ts >= start_ns)
            if new.any():
                lats.append((obs - ts[new]) / 1e6)
                seen[keys[new]] = ts[new]
    x = np.concatenate(lats) if lats else np.zeros(0)
    return {"poll": poll, "written": written, "observed": int(x.size),
            "p50": pct(x, 50), "p99": pct(x, 99), "p999": pct(x, 99.9),
            "max": float(x.max()) if x.size else float("nan")}


def catchup(entries: int, wait_max: float) -> dict[str, Any]:
    factory = lambda n, r, p, h: BigNode(n, r, p, h, entries)  # noqa: E731
    with BenchCluster(factory, ("a", "b"), "bench-catchup") as c:
        a, b = c["a"], c["b"]
        keys = np.arange(entries, dtype=np.uint32)
        vals = np.zeros((entries, 2), dtype=np.uint64)
        vals[:, 0] = np.arange(entries, dtype=np.uint64) * 1500
        vals[:, 1] = np.arange(entries, dtype=np.uint64)
        a.map.update_batch(keys, vals)
        t = time.perf_counter()
        c.start_with(0.25, [a])

        def a_loaded() -> bool:
            st = a.status()
            return bool(st and st.get("ready") and st["maps"][0]["registers"] >= entries)

        a_ok = c.wait(a_loaded, wait_max, every=0.2)
        a_load_s = time.perf_counter() - t
        assert a.proc is not None
        a_rss = rss_mb(a.proc.pid)
        t0 = time.perf_counter()
        c.start_with(0.25, [b])
        assert b.proc is not None
        ready_s = same_s = None
        deadline = t0 + wait_max
        while time.perf_counter() < deadline:
            if ready_s is None and b.is_ready():
                ready_s = time.perf_counter() - t0
            # identical when the comparison began: it takes ~1 s (two 1M dumps), and a has
            # stopped writing, so a match means the maps already matched then
            began = time.perf_counter() - t0
            if ready_s is not None and b.map.dump().count == entries and same_content(a, [b]):
                same_s = began
                break
            time.sleep(0.05)
        wire = wire_bytes(a.port, b.port)
        st_a = a.status() or {}
        st_b = b.status() or {}
        a_rss_after, b_rss = rss_mb(a.proc.pid), rss_mb(b.proc.pid)

        def at_rest(n: Node) -> int:
            st = n.status()
            return int(st["maps"][0].get("buckets_at_rest", 0)) if st else 0

        # quiet buckets freeze (core/frozen.py): wait for both maps to settle, then measure again
        t_rest = time.perf_counter()
        rested = c.wait(lambda: at_rest(a) == at_rest(b) == DEFAULT_BUCKETS, 90, every=0.5)
        rest = {"settled": rested, "after_s": time.perf_counter() - t_rest,
                "a_rss": rss_mb(a.proc.pid), "b_rss": rss_mb(b.proc.pid),
                "b_frozen_at_identical": st_b.get("maps", [{}])[0].get("buckets_at_rest")}
        return {
            "entries": entries, "a_loaded": a_ok, "a_load_s": a_load_s, "ready_s": ready_s,
            "identical_s": same_s, "wire": wire,
            "a_peers": [{k: p.get(k) for k in ("node", "sent", "reconnects", "dropped",
                                               "last_error")} for p in st_a.get("peers", [])],
            "a_rss": a_rss, "a_rss_after": a_rss_after, "b_rss": b_rss, "rest": rest,
            "b_peers": [{k: p.get(k) for k in ("node", "sent", "received")}
                        for p in st_b.get("peers", [])],
        }


def burst(entries: int, wait_max: float) -> dict[str, Any]:
    """One burst of ``entries`` distinct writes on a (one batch update): the time until b and c
    hold exactly a's content. Unlike the offered-rate phases, nothing is rewritten while it
    drains, so this is the replication capacity itself (detection, send, merge and apply)."""
    factory = lambda n, r, p, h: BigNode(n, r, p, h, 1 << 20)  # noqa: E731
    with BenchCluster(factory, ("a", "b", "c"), "bench-burst") as c:
        a, b, cc = c["a"], c["b"], c["c"]
        c.start_with(0.25)
        if not c.wait(lambda: all(n.is_ready() for n in (a, b, cc)), 60):
            return {"entries": entries, "seconds": None}
        keys = np.arange(entries, dtype=np.uint32)
        vals = np.zeros((entries, 2), dtype=np.uint64)
        vals[:, 0] = 1500
        vals[:, 1] = np.arange(entries, dtype=np.uint64)
        ap0 = {n.name: applied(n) for n in (b, cc)}
        t0 = time.perf_counter()
        a.map.update_batch(keys, vals)

        def done() -> bool:
            # the agents' counts first: dumping three 1M-entry maps every 0.1 s while records
            # still arrive took most of a core from the agents under test
            if any(applied(n) - ap0[n.name] < entries for n in (b, cc)):
                return False
            return (b.map.dump().count == entries and cc.map.dump().count == entries
                    and same_content(a, [b, cc]))

        ok = c.wait(done, wait_max, every=0.1)
        secs = time.perf_counter() - t0
        return {"entries": entries, "seconds": secs if ok else None,
                "rate": entries / secs if ok else 0.0}


def trace_bench(seconds: float) -> list[str]:
    """bench/trace_events.py (host ring reader, and the tracer in the kernel VM): its lines."""
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("trace_events.py")),
                          "--seconds", str(seconds)], capture_output=True, text=True,
                         timeout=900)
    lines = [x for x in res.stdout.splitlines() if x.startswith(("host", "vm"))]
    return lines or [f"trace bench failed (exit {res.returncode}): {res.stderr[-300:]}"]


def detection(entries: int) -> dict[str, float]:
    with poll_scan.scratch_map("hash", 4, 16, entries) as m:
        keys = np.arange(entries, dtype=np.uint32)
        vals = np.zeros((entries, 2), dtype=np.uint64)
        vals[:, 0] = np.arange(entries, dtype=np.uint64)
        m.update_batch(keys, vals)
        poller = MapPoller("bench", m)
        poller.poll()
        t0, _ = poll_scan.poll_time(poller, lambda: None, 3)
        rng = np.random.default_rng(7)
        one = max(1, entries // 100)

        def change() -> None:
            idx = rng.choice(entries, size=one, replace=False)
            vals[idx, 0] += 1
            m.update_batch(keys[idx], vals[idx])

        t1, n1 = poll_scan.poll_time(poller, change, 3)
        return {"entries": entries, "nochange_ms": t0 * 1e3, "one_pct_ms": t1 * 1e3,
                "one_pct_changes": n1, "scan_ms": poller.last_scan_seconds * 1e3,
                "diff_ms": poller.last_diff_seconds * 1e3}


# --- main --------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~5 s phases instead of 30 s")
    ap.add_argument("--rate", type=float, default=250_000, help="offered writes/s on a")
    ap.add_argument("--low-rate", type=float, default=50_000,
                    help="a second, lower offered rate for the user-space phase (0: skip)")
    ap.add_argument("--keyspace", type=int, default=1 << 20)
    ap.add_argument("--catchup-entries", type=int, default=1_000_000)
    ap.add_argument("--skip", default="", help="comma list of phases to skip")
    args = ap.parse_args()
    q = args.quick
    secs = 5.0 if q else 30.0
    lat_secs = 5.0 if q else 10.0
    wait_max = 20.0 if q else 45.0
    skip = set(filter(None, args.skip.split(",")))
    R: dict[str, Any] = {}

    log("seed baseline")
    R["seed"] = seed_baseline.run(3.0 if q else 10.0)
    log(f"  {R['seed']}")

    if "thr" not in skip:
        factory = lambda n, r, p, h: BigNode(n, r, p, h, args.keyspace)  # noqa: E731
        with BenchCluster(factory, ("a", "b", "c"), "bench-thr") as c:
            c.start_with(0.25)
            assert c.wait_ready(30), "agents not ready"
            log("throughput, user-space batch writes")
            R["thr_user"] = throughput(c, args.rate, secs, args.keyspace, 16, False, wait_max, 0,
                                       profile_s=secs)
            log(f"  { {k: v for k, v in R['thr_user'].items() if k != 'profiles'} }")
            if args.low_rate:
                log(f"throughput, user-space batch writes at {args.low_rate:,.0f}/s")
                R["thr_user_low"] = throughput(c, args.low_rate, secs, args.keyspace, 16, False,
                                               wait_max, 1 << 41)
                log(f"  { {k: v for k, v in R['thr_user_low'].items() if k != 'profiles'} }")
            assert c["b"].proc is not None
            R["thr_rss_b"] = rss_mb(c["b"].proc.pid)
            log("throughput, BPF writes (write_range test_run)")
            R["thr_bpf"] = throughput(c, args.rate, secs, args.keyspace, 16, True, wait_max,
                                      1 << 40)
            log(f"  { {k: v for k, v in R['thr_bpf'].items() if k != 'profiles'} }")
        if "tls" not in skip:
            with BenchCluster(factory, ("a", "b", "c"), "bench-tls", tls=True) as c:
                c.start_with(0.25)
                assert c.wait_ready(30), "agents not ready"
                log("throughput, user-space batch writes, mutual TLS")
                R["thr_user_tls"] = throughput(c, args.rate, secs, args.keyspace, 16, False,
                                               wait_max, 0)
                log(f"  { {k: v for k, v in R['thr_user_tls'].items() if k != 'profiles'} }")
    if "thr256" not in skip:
        ks = min(args.keyspace, 1 << 18)
        factory = lambda n, r, p, h: PlainNode(n, r, p, h, ks, 256)  # noqa: E731
        with BenchCluster(factory, ("a", "b", "c"), "bench-256") as c:
            c.start_with(0.25)
            assert c.wait_ready(30), "agents not ready"
            log("throughput, 256-byte values")
            R["thr_256"] = throughput(c, args.rate, secs, ks, 256, False, wait_max, 0)
            log(f"  { {k: v for k, v in R['thr_256'].items() if k != 'profiles'} }")
    if "lat" not in skip:
        with BenchCluster(lambda n, r, p, h: BigNode(n, r, p, h, 65536), ("a", "b", "c"),
                          "bench-lat") as c:
            # 80% of the highest rate the cluster sustained (the user-space throughput phase)
            top = R.get("thr_user", {}).get("distinct_applied_per_s", 0.0)
            runs = [("lat_auto", "auto", 0.25, 10_000.0), ("lat_poll", "poll", 0.25, 10_000.0)]
            if top:
                runs.insert(1, ("lat_auto_80", "auto", 0.25, 0.8 * top))
            for key, mode, poll, rate in runs:
                c.start_with(poll, mode=mode)
                assert c.wait_ready(30), "agents not ready"
                log(f"latency at {rate:,.0f}/s, watch mode {mode}, poll interval {poll}")
                R[key] = {**latency(c, poll, rate, lat_secs), "rate": rate, "mode": mode}
                log(f"  {R[key]}")
                for n in c:
                    n.stop()
        if "tls" not in skip:
            with BenchCluster(lambda n, r, p, h: BigNode(n, r, p, h, 65536), ("a", "b", "c"),
                              "bench-lat-tls", tls=True) as c:
                c.start_with(0.25)
                assert c.wait_ready(30), "agents not ready"
                log("latency at 10,000/s, watch mode auto, mutual TLS")
                R["lat_auto_tls"] = {**latency(c, 0.25, 10_000.0, lat_secs), "rate": 10_000.0,
                                     "mode": "auto", "tls": True}
                log(f"  {R['lat_auto_tls']}")
    if "catchup" not in skip:
        log(f"catch-up of {args.catchup_entries} entries")
        R["catchup"] = catchup(args.catchup_entries, 60.0 if q else 120.0)
        log(f"  {R['catchup']}")
    if "burst" not in skip:
        n = 200_000 if q else 1_000_000
        log(f"burst of {n} writes on a")
        R["burst"] = burst(n, 120.0 if q else 300.0)
        log(f"  {R['burst']}")
    if "trace" not in skip:
        log("trace watcher events/s (host ring reader; fexit tracer in the kernel VM)")
        R["trace"] = trace_bench(2.0 if q else 3.0)
        log("  " + "\n  ".join(R["trace"]))
    if "detect" not in skip:
        log("detection (poll scan+diff)")
        R["detect"] = detection(1_000_000)
        log(f"  {R['detect']}")
        log("what the bpf(2) syscall hooks cost other processes")
        R["hooks"] = syscall_hooks.run()
        log(f"  {R['hooks']}")
    with contextlib.suppress(OSError):
        Path(f"/tmp/bpfsync-bench-results-{'quick' if q else 'full'}.json").write_text(
            json.dumps(R, default=str))
    report(R, sys.argv)


def report(R: dict[str, Any], argv: list[str]) -> None:
    seed = R["seed"]
    rows: list[tuple[str, str, str, str]] = []  # metric, value, vs seed, target

    def thr_rows(key: str, label: str) -> None:
        if key not in R:
            return
        t = R[key]
        if t["converged"]:
            rows.append((f"{label}: writes/s on a -> b+c", f"{t['writes_per_s']:,.0f}",
                         f"{t['writes_per_s'] / seed['rate']:,.1f}x", ">=200k/s, >=100x"))
        else:
            rows.append((f"{label}: writes/s on a -> b+c",
                         f"NOT converged {t['total_s']:.0f}s after start: b,c hold "
                         f"{min(t['keys_final_ok'].values()) if t['keys_final_ok'] else 0:,}"
                         f" of {t['keys_touched']:,} final values", "n/a", ">=200k/s, >=100x"))
        rows.append((f"{label}: distinct records applied/s (min of b,c)",
                     f"{t['distinct_applied_per_s']:,.0f}",
                     f"{t['distinct_applied_per_s'] / seed['rate']:,.1f}x", ""))
        rows.append((f"{label}: offered / written",
                     f"{t['offered_rate']:,.0f}/s, {t['written']:,} in {t['write_s']:.1f}s; "
                     f"done {t['total_s']:.1f}s; final values on b,c "
                     f"{min(t['keys_final_ok'].values()) if t['keys_final_ok'] else 0:,}"
                     f"/{t['keys_touched']:,}", "", ""))

    rows.append(("seed: changes/s (unary, new conn, 1 peer, 4B)", f"{seed['rate']:,.0f}", "1x",
                 ""))
    rows.append(("seed: latency p50/p99/p99.9",
                 f"{seed['p50_ms']:.2f}/{seed['p99_ms']:.2f}/{seed['p999_ms']:.2f} ms", "1x", ""))
    thr_rows("thr_user", "16B user-space")
    thr_rows("thr_user_tls", "16B user-space, mutual TLS")
    plain, tls = R.get("thr_user"), R.get("thr_user_tls")
    if plain and tls and plain["converged"] and tls["converged"]:
        rows.append(("mutual TLS: 16B writes/s against plaintext",
                     f"{100 * tls['writes_per_s'] / plain['writes_per_s']:.0f}%", "", ">=90%"))
    thr_rows("thr_user_low", "16B user-space, lower offered rate")
    thr_rows("thr_bpf", "16B BPF write_range")
    thr_rows("thr_256", "256B user-space")
    if "thr_256" not in R:
        rows.append(("256B", "not measured", "", ""))
    for key in ("lat_auto", "lat_auto_tls", "lat_auto_80", "lat_poll"):
        lt = R.get(key)
        if lt:
            how = "auto (bpf(2) hooks + poll)" if lt["mode"] == "auto" else f"poll {lt['poll']}s"
            how += ", mutual TLS" if lt.get("tls") else ""
            rows.append((f"latency a->b @{lt['rate']:,.0f}/s, {how}: p50/p99/p99.9",
                         f"{lt['p50']:.1f}/{lt['p99']:.1f}/{lt['p999']:.1f} ms "
                         f"({lt['observed']:,} of {lt['written']:,} seen)",
                         f"p99 {lt['p99'] / seed['p99_ms']:.1f}x seed", "p99 <=10 ms"))
    plain, tls = R.get("lat_auto"), R.get("lat_auto_tls")
    if plain and tls:
        rows.append(("mutual TLS: latency p99 @10k/s against plaintext",
                     f"{tls['p99'] - plain['p99']:+.1f} ms", "", "<=+1 ms"))
    bu = R.get("burst")
    if bu:
        if bu["seconds"] is None:
            rows.append((f"burst of {bu['entries']:,} writes on a -> identical on b and c",
                         "NOT in time", "", ">=200k/s, >=100x"))
        else:
            rows.append((f"burst of {bu['entries']:,} writes on a -> identical on b and c",
                         f"{bu['seconds']:.1f} s = {bu['rate']:,.0f} records/s to each peer",
                         f"{bu['rate'] / seed['rate']:,.1f}x", ">=200k/s, >=100x"))
    for line in R.get("trace", []):
        rows.append(("trace watcher events into Python", " ".join(line.split()), "",
                     ">=1M events/s"))
    cu = R.get("catchup")
    if cu:
        idt = f"{cu['identical_s']:.2f} s" if cu["identical_s"] is not None else "NOT in time"
        rdy = f"{cu['ready_s']:.2f} s" if cu["ready_s"] is not None else "never"
        rows.append((f"catch-up of {cu['entries']:,} entries (new node)",
                     f"ready {rdy}, identical {idt}", "", "<=2 s"))
        rows.append(("catch-up TCP bytes a->b / b->a (ss -ti, live sockets only)",
                     f"{cu['wire']['from_sender'] / 1e6:.1f} MB / "
                     f"{cu['wire']['from_receiver'] / 1e6:.1f} MB; a's link to b reconnects "
                     f"{sum(p['reconnects'] or 0 for p in cu['a_peers'])}, dropped "
                     f"{sum(p['dropped'] or 0 for p in cu['a_peers'])}", "", ""))
        rows.append((f"agent RSS with {cu['entries']:,} entries, just caught up (a / b)",
                     f"{cu['a_rss_after']:.0f} MB / {cu['b_rss']:.0f} MB (b's buckets frozen: "
                     f"{cu['rest']['b_frozen_at_identical']}/{DEFAULT_BUCKETS})", "", "<=300 MB"))
        rest = cu["rest"]
        rows.append((f"agent RSS with {cu['entries']:,} entries at rest (a / b)",
                     f"{rest['a_rss']:.0f} MB / {rest['b_rss']:.0f} MB, every bucket frozen "
                     f"{rest['after_s']:.0f} s later" if rest["settled"] else
                     f"{rest['a_rss']:.0f} MB / {rest['b_rss']:.0f} MB, NOT all buckets frozen "
                     "in 90 s", "", "<=300 MB"))
        rows.append(("a: initial load of the full map (start -> ready)",
                     f"{cu['a_load_s']:.1f} s", "", ""))
    if "thr_rss_b" in R:
        rows.append(("agent b RSS after 16B throughput", f"{R['thr_rss_b']:.0f} MB", "", ""))
    d = R.get("detect")
    if d:
        rows.append((f"poll scan+diff {d['entries']:,} entries: no change / 1% changed",
                     f"{d['nochange_ms']:.0f} ms / {d['one_pct_ms']:.0f} ms "
                     f"(scan {d['scan_ms']:.0f} + diff {d['diff_ms']:.0f})", "", ""))

    h = R.get("hooks")
    if h:
        rows.append(("bpf(2) hooks: cost per syscall of every process (getppid)",
                     f"{h['getppid_ns']:.0f} -> {h['getppid_hooked_ns']:.0f} ns", "", ""))
        rows.append(("bpf(2) hooks: a bpf(2) map update of an unwatched map",
                     f"{h['bpf_update_ns']:.0f} -> {h['bpf_update_hooked_ns']:.0f} ns", "", ""))
        rows.append(("bpf(2) hooks: watched batch writes -> ring -> numpy",
                     f"{h['batch_elements_per_s'] / 1e6:.2f} M elements/s (packed records)",
                     "", ""))
    w = [max(len(r[i]) for r in [*rows, ("metric", "value", "vs seed", "target")])
         for i in range(4)]
    print("\n" + "  ".join(h.ljust(w[i]) for i, h in enumerate(("metric", "value", "vs seed",
                                                                    "target"))))
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    print("\n| metric | value | vs seed | target |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\ncommand: " + " ".join([".venv/bin/python", *argv]))
    prof = R.get("thr_user", {}).get("profiles")
    if prof:
        for name, p in prof.items():
            print(f"\npy-spy, agent {name} during 16B throughput ({p['total']} samples):")
            print("  self:")
            for f, n in p["self"]:
                print(f"    {100 * n / max(1, p['total']):5.1f}%  {f}")
            print("  inclusive (bpfsync frames):")
            for f, n in p["incl"]:
                print(f"    {100 * n / max(1, p['total']):5.1f}%  {f}")


if __name__ == "__main__":
    main()
