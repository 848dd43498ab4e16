"""How the gRPC mesh and NATS JetStream scale with the number of nodes, on this machine.

    .venv/bin/python bench/scale.py [--quick] [--nodes 3,10,30] [--transports mesh,nats]
                                    [--skip cpu,lat,rate,catchup] [--keep-logs]

For each transport and each N (default 3 and 10), N agents on loopback (nodes a, b, n02, ...;
a writes, b is the latency phase's receiver) with the demo map resized to 2^18 entries, each
agent with its state store; over NATS one nats-server with JetStream started by this script
for each cluster. The phases, each bounded (~60 s; --quick ~30 s):

  cpu      one batch update of --changes distinct keys on a (default 200k; --quick 100k), until
           every other node has applied them all (their /status) and holds a's content: a's
           CPU (/proc/PID/stat utime + stime) per change, net of what a spends idle (measured
           just before), the CPU of all agents and of the nats-server; bytes a sent (mesh: its
           links' bytes_sent; NATS: what it published) and, over NATS, what the server
           delivered to the other nodes (its /connz)
  lat      1k, then 10k, one-key writes/s on a for 10 s (--quick 5 s), each value its
           monotonic write time, seen on b through this process's bpf(2) hooks
           (bench/phases.py's latency)
  rate     50k writes/s offered on a for 10 s (--quick 5 s), keys cycled over the map: writes/s
           absorbed end to end, until every node holds a's final content
  catchup  NATS, N = 3 only, twice: a 1M-entry map filled on a and read by b; every agent
           stopped, right after b read the fill (c replays the stream) and once a's and b's
           snapshots hold it (c reads them and skips the stream they cover); a fresh c
           (--no-state) started: spawn -> /readyz 200 and -> identical to a

The agents' scans run every 5 s (watch.poll_interval), not 0.25 s: every write here is a
user-space one, which the bpf(2) hooks see at once, and at N = 10 the idle scans of ten maps
every 0.25 s would take a core of the machine's two. Prints figures and never asserts: a
table per N (mesh | nats), the projection to 100 and 1,000 nodes, warnings and errors from
the agents' and the server's logs, and the raw figures as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from fixtures import (
    BenchCluster,
    BigNode,
    applied,
    cpu_s,
    log,
    log_events,
    readyz,
    rss_mb,
    same_content,
    sorted_dump,
)
from phases import RESTART_CATCHUP_S, WRITE_TICK, latency

from bpfsync.agent.config import SyncConfig
from bpfsync.demo.cluster import Cluster, Node, free_port, stop_process

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
KEYSPACE = 1 << 18  # every map's max_entries: the cpu phase's keys and the rate phase's cycle
POLL_S = 5.0  # the agents' watch.poll_interval (module docstring)
PROJECT_N = (100, 1000)
DIGEST_BUCKETS = SyncConfig().digest_buckets  # the agents' (the bench leaves it as it is)


# --- a nats-server of our own ------------------------------------------------------------------

class NatsServer:
    """One nats-server with JetStream on loopback; its config, store and log in a directory of
    its own, which close() removes (also after a failed start)."""

    def __init__(self) -> None:
        self.port, self.http_port = free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bpfsync-scale-nats-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def __enter__(self) -> NatsServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        conf = self.dir / "nats.conf"
        # 8 MB messages, as the agent's batches may be up to half the servers' max_payload
        conf.write_text(f'listen: "127.0.0.1:{self.port}"\n'
                        f'http: "127.0.0.1:{self.http_port}"\nmax_payload: 8MB\n'
                        f'jetstream {{\n  store_dir: "{self.dir / "store"}"\n}}\n')
        with (self.dir / "nats.log").open("ab") as out:
            self.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while self.get("/healthz?js-enabled-only=true") is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not serve: {self.log()[-2000:]}")
            time.sleep(0.05)

    def get(self, path: str) -> Any:
        """The monitoring port's JSON answer to ``path``; None unless it answers 200."""
        try:
            with self._http.open(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
                return json.load(r)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def connections(self) -> dict[str, dict[str, int]]:
        """Messages and bytes each client connection sent (in_) and was sent (out_), by the
        client's name ("bpfsync NODE")."""
        conns = (self.get("/connz?limit=4096") or {}).get("connections") or []
        return {c.get("name", ""): {k: int(c.get(k, 0)) for k in
                                    ("in_msgs", "in_bytes", "out_msgs", "out_bytes")}
                for c in conns}

    def cpu_s(self) -> float:
        return cpu_s(self.proc.pid) if self.proc is not None else 0.0

    def log(self) -> str:
        path = self.dir / "nats.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def problems(self) -> list[str]:
        return [x for x in self.log().splitlines() if "[ERR]" in x or "[WRN]" in x]

    def close(self) -> None:
        try:
            if self.proc is not None:
                stop_process(self.proc)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- a cluster of N ----------------------------------------------------------------------------

class ScaleCluster(BenchCluster):
    """BenchCluster of ``names`` with maps of ``entries``, over the mesh or, given ``nats``
    (server URLs), over NATS."""

    def __init__(self, names: Sequence[str], tag: str, entries: int,
                 nats: Sequence[str] | None = None) -> None:
        factory = lambda n, r, p, h: BigNode(n, r, p, h, entries)  # noqa: E731
        Cluster.__init__(self, tuple(names), tag, factory=factory, nats=nats)

    def __enter__(self) -> ScaleCluster:
        return self


def node_names(n: int) -> list[str]:
    """a (the writer), b (the latency phase's receiver), then n02, n03, ..."""
    return ["a", "b", *(f"n{i:02d}" for i in range(2, n))][:n]


# the one warning every agent logs on this project's machine, which refuses fexit (README)
_EXPECTED = "warning: fexit refused"


def log_problems(nodes: Sequence[Node], since: float) -> dict[str, Any]:
    """Warning and error lines the agents logged at or after the wall time ``since`` (once
    all were ready: the start's own, such as a link refused before its peer listens, are not
    findings), and every line that is not JSON (a traceback): how many of each message
    (numbers as N), and the first few lines as written."""
    counts: Counter[str] = Counter()
    first: list[str] = []
    for n in nodes:
        for line in n.log().splitlines():
            try:
                rec = json.loads(line)
                at = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
                bad = rec.get("level") in ("warning", "error", "critical") and at >= since
                what = f"{rec.get('level')}: {rec.get('msg')}"
            except (ValueError, KeyError, TypeError, AttributeError):
                bad, what = bool(line.strip()), "not JSON: " + line[:120]
            if bad and not what.startswith(_EXPECTED):
                counts[re.sub(r"\d+", "N", what)] += 1
                if len(first) < 6:
                    first.append(f"{n.name}: {line[:400]}")
    return {"counts": dict(counts.most_common(12)), "first": first}


def tidy_logs(nodes: Sequence[Node], problems: dict[str, Any], keep: bool) -> list[str] | None:
    """The agents' log files, kept (their paths returned) when they hold warnings or errors
    or ``keep`` says so, else removed."""
    if problems["counts"] or keep:
        return [str(n.log_path) for n in nodes]
    for n in nodes:
        n.log_path.unlink(missing_ok=True)
    return None


# --- the phases --------------------------------------------------------------------------------

def _pids(nodes: Sequence[Node]) -> dict[str, int]:
    return {n.name: n.proc.pid for n in nodes if n.proc is not None}


def _a_sent(a: Node) -> dict[str, int]:
    """What a's agent says it sent: to its peers (messages, bytes) and into the stream."""
    st = a.status() or {}
    peers = st.get("peers") or []
    tr = st.get("transport") or {}
    return {"messages": sum(int(p.get("sent") or 0) for p in peers),
            "bytes": sum(int(p.get("bytes_sent") or 0) for p in peers),
            "published": int(tr.get("published", 0)),
            "published_bytes": int(tr.get("published_bytes", 0))}


def cpu_phase(c: ScaleCluster, server: NatsServer | None, changes: int, wait_max: float,
              idle_s: float) -> dict[str, Any]:
    """One batch of ``changes`` distinct keys on a, until every other node applied them all."""
    nodes = list(c)
    a, others = nodes[0], nodes[1:]
    pids = _pids(nodes)
    # what each agent spends doing nothing (Hellos, digests, scans): taken off a's figure
    idle0, t_idle = {k: cpu_s(p) for k, p in pids.items()}, time.perf_counter()
    time.sleep(idle_s)
    idle = {k: (cpu_s(p) - idle0[k]) / (time.perf_counter() - t_idle) for k, p in pids.items()}
    ap0 = {n.name: applied(n) for n in others}
    sent0, conns0 = _a_sent(a), server.connections() if server else {}
    srv0 = server.cpu_s() if server else 0.0
    cpu0 = {k: cpu_s(p) for k, p in pids.items()}
    keys = np.arange(changes, dtype=np.uint32)
    vals = np.zeros((changes, 2), dtype=np.uint64)
    vals[:, 0] = np.arange(changes, dtype=np.uint64) + 1
    t0 = time.perf_counter()
    a.map.update_batch(keys, vals)
    done = c.wait(lambda: all(applied(n) - ap0[n.name] >= changes for n in others), wait_max,
                  every=0.2)
    secs = time.perf_counter() - t0
    cpu = {k: cpu_s(p) - cpu0[k] for k, p in pids.items()}
    srv = server.cpu_s() - srv0 if server else 0.0
    sent1, conns1 = _a_sent(a), server.connections() if server else {}
    sent = {k: sent1[k] - sent0[k] for k in sent1}
    delivered = {k: sum(v[k] - conns0.get(name, {}).get(k, 0) for name, v in conns1.items()
                        if name != f"bpfsync {a.name}")
                 for k in ("out_msgs", "out_bytes")}
    a_net = max(0.0, cpu["a"] - idle["a"] * secs)
    identical = done and same_content(a, others)
    return {
        "changes": changes, "done": done, "identical": identical, "seconds": secs,
        "a_cpu_s": cpu["a"], "a_idle_cpu_per_s": idle["a"],
        "a_us_per_change": 1e6 * a_net / changes,
        "a_us_per_change_raw": 1e6 * cpu["a"] / changes,
        "agents_cpu_s": sum(cpu.values()), "agents_us_per_change": 1e6 * sum(cpu.values())
        / changes, "agents_idle_cpu_per_s": sum(idle.values()),
        "server_cpu_s": srv, "a_sent": sent, "server_delivered": delivered,
        # bytes of one change as sent to one node: a's link bytes / (N-1) on the mesh, a's
        # publishes over NATS, and what the server sent each other node
        "bytes_per_copy": (sent["bytes"] / changes / max(1, len(others)) if server is None
                           else sent["published_bytes"] / changes),
        "delivered_bytes_per_copy": (delivered["out_bytes"] / changes / max(1, len(others))
                                     if server else None),
        "rss_mb_mean": float(np.mean([rss_mb(p) for p in pids.values()])),
        "rss_mb_max": max(rss_mb(p) for p in pids.values()),
    }


def rate_phase(c: ScaleCluster, rate: float, seconds: float, wait_max: float,
               base: int) -> dict[str, Any]:
    """``rate`` writes/s on a for ``seconds`` (one batch a WRITE_TICK, keys cycled over the
    map, each value unique), then until every node holds a's final content. Nodes are compared
    one at a time, each until it matches (nothing writes any more): one map dump at a time."""
    nodes = list(c)
    a, pending = nodes[0], nodes[1:]
    written = 0
    tick_n = rate * WRITE_TICK
    start = time.perf_counter()
    while (el := time.perf_counter() - start) < seconds:
        n = int(rate * el) - written
        if n < tick_n:
            time.sleep(WRITE_TICK / 4)
            continue
        idx = np.arange(written, written + n, dtype=np.uint64)
        vals = np.zeros((n, 2), dtype=np.uint64)
        vals[:, 0] = idx + base + 1
        a.map.update_batch((idx % KEYSPACE).astype(np.uint32), vals)
        written += n
    write_s = time.perf_counter() - start
    ref_k, ref_v = sorted_dump(a.map)
    deadline = start + write_s + wait_max
    done_at = None
    while pending and time.perf_counter() < deadline:
        began = time.perf_counter()
        k, v = sorted_dump(pending[0].map)
        if k.shape == ref_k.shape and np.array_equal(k, ref_k) and np.array_equal(v, ref_v):
            pending.pop(0)
            done_at = began - start
            continue
        time.sleep(0.5)
    ok = not pending
    total = done_at if ok and done_at is not None else time.perf_counter() - start
    return {"written": written, "offered_per_s": written / write_s, "write_s": write_s,
            "converged": ok, "behind": [n.name for n in pending], "total_s": total,
            "writes_per_s": written / total if ok else None}


def catchup_phase(server: NatsServer, entries: int, wait_max: float, keep_logs: bool,
                  settled: bool) -> dict[str, Any]:
    """NATS, a, b, c: ``entries`` on a, read by b; a and b stopped (``settled``: once their
    snapshots hold the fill, else at once); a fresh c started."""
    tag = "scale-catchup-" + ("settled" if settled else "burst")
    with ScaleCluster(("a", "b", "c"), tag, 1 << 20, nats=[server.url]) as c:
        a, b, cc = c["a"], c["b"], c["c"]
        c.start_with(POLL_S, [a, b])
        res: dict[str, Any] = {"entries": entries, "settled": settled}
        if not c.wait_ready(60, [a, b]):
            problems = log_problems([a, b], 0.0)
            return {**res, "ready_ab": False, "problems": problems,
                    "logs": tidy_logs(list(c), problems, True)}
        since = time.time()
        ap0 = applied(b)
        stored0 = _settle_snapshots((a, b), wait_max)
        keys = np.arange(entries, dtype=np.uint32)
        vals = np.zeros((entries, 2), dtype=np.uint64)
        vals[:, 0] = np.arange(entries, dtype=np.uint64) * 1500
        vals[:, 1] = np.arange(entries, dtype=np.uint64)
        t = time.perf_counter()
        a.map.update_batch(keys, vals)
        filled = c.wait(lambda: applied(b) - ap0 >= entries, wait_max, every=0.2)
        res["b_read_s"] = time.perf_counter() - t
        res["b_identical"] = filled and same_content(a, [b])
        if settled:  # every digest bucket changed: each is stored again by its keeper
            t = time.perf_counter()
            res["snapshots_current"] = c.wait(
                lambda: _snapshots_stored((a, b)) - stored0 >= DIGEST_BUCKETS, wait_max,
                every=0.2)
            res["snapshots_s"] = time.perf_counter() - t
        res["stored"] = {n.name: {k: (n.status() or {}).get("transport", {}).get(k, 0)
                                  for k in ("published", "snapshots_stored")} for n in (a, b)}
        for n in (a, b):
            n.stop()
        wall0, t0 = time.time(), time.perf_counter()
        c.start_with(POLL_S, [cc], catchup_s=RESTART_CATCHUP_S, extra=["--no-state"])
        ready_s = identical_s = None
        while time.perf_counter() - t0 < wait_max:
            if readyz(cc):
                ready_s = time.perf_counter() - t0
                break
            time.sleep(0.01)
        while ready_s is not None and time.perf_counter() - t0 < wait_max:
            began = time.perf_counter() - t0
            if cc.map.dump().count == entries and same_content(a, [cc]):
                identical_s = began
                break
            time.sleep(0.2)
        st = cc.status() or {}
        ev = log_events(cc, wall0, ("agent started", "caught up", "ready"))
        assert cc.proc is not None
        c_rss = rss_mb(cc.proc.pid)
        problems = log_problems(list(c), since)
        return {**res, "ready_s": ready_s, "identical_s": identical_s,
                "events": {m: {k: e[k] for k in ("at_s", "why", "after_s") if k in e}
                           for m, e in ev.items()},
                "c_transport": st.get("transport"), "c_stream": st.get("stream"),
                "c_replica": st.get("replica"),
                "c_rss_mb": c_rss, "problems": problems,
                "logs": tidy_logs(list(c), problems, keep_logs),
                "server_problems": server.problems()[:6]}


def _settle_snapshots(nodes: Sequence[Node], wait_max: float) -> int:
    """The snapshots ``nodes`` stored, once they stopped storing (their first round stores
    every bucket, empty or not)."""
    t, last, same_since = time.perf_counter(), -1, time.perf_counter()
    while time.perf_counter() - t < wait_max:
        now = _snapshots_stored(nodes)
        if now != last:
            last, same_since = now, time.perf_counter()
        elif now >= DIGEST_BUCKETS and time.perf_counter() - same_since > 2.0:
            break
        time.sleep(0.2)
    return last


def _snapshots_stored(nodes: Sequence[Node]) -> int:
    return sum((n.status() or {}).get("transport", {}).get("snapshots_stored", 0)
               for n in nodes)


def run_cluster(transport: str, n: int, args: argparse.Namespace, q: bool) -> dict[str, Any]:
    """One cluster of ``n`` over ``transport``: its phases, then what its logs say. A failure
    is a finding too: it is kept in the results and the run goes on with the next cluster."""
    res: dict[str, Any] = {"transport": transport, "nodes": n}
    server = NatsServer() if transport == "nats" else None
    try:
        if server is not None:
            server.start()
        urls = [server.url] if server else None
        with ScaleCluster(node_names(n), f"scale-{transport}{n}", KEYSPACE, nats=urls) as c:
            since = 0.0
            try:
                t = time.perf_counter()
                c.start_with(POLL_S)
                # an agent that exits (a bad flag, an import error) ends the wait at once
                c.wait(lambda: any(not x.running for x in c) or all(x.is_ready() for x in c),
                       60 if n <= 10 else 120, every=0.2)
                res["start_s"] = time.perf_counter() - t
                exited = {x.name: x.proc.returncode for x in c
                          if x.proc is not None and x.proc.poll() is not None}
                ready = not exited and all(x.is_ready() for x in c)
                if exited:
                    res["exited"] = exited
                if ready:
                    since = time.time()
                    log(f"  {n} agents ready in {res['start_s']:.1f} s")
                    _phases(c, server, args, q, res)
                else:
                    res["not_ready"] = [x.name for x in c if x.name in exited
                                        or not x.is_ready()]
                    log(f"  not ready after {res['start_s']:.0f} s: {res['not_ready']}")
            except Exception as err:
                res["error"] = f"{type(err).__name__}: {err}"
                log(f"  FAILED: {res['error']}")
            res["problems"] = log_problems(list(c), since)
            res["logs"] = tidy_logs(list(c), res["problems"], args.keep_logs)
            if server is not None:
                res["server_problems"] = server.problems()[:6]
    except Exception as err:  # the server or the nodes did not start
        res["error"] = f"{type(err).__name__}: {err}"
        log(f"  FAILED: {res['error']}")
    finally:
        if server is not None:
            server.close()
    return res


def _phases(c: ScaleCluster, server: NatsServer | None, args: argparse.Namespace, q: bool,
            res: dict[str, Any]) -> None:
    time.sleep(1.0)  # the first digest and Hello rounds
    if "cpu" not in args.skip:
        res["cpu"] = cpu_phase(c, server, args.changes, 30 if q else 60, 1.0 if q else 2.0)
        log(f"  cpu: {_brief(res['cpu'])}")
    if "lat" not in args.skip:
        for key, rate in (("lat", 1000.0), ("lat10k", 10_000.0)):
            seconds = 5.0 if q else 10.0
            # poll only sets how long b is watched after the last write: max(2, 10 poll) s;
            # every write its own key, so none hides another
            r = latency(c, 0.2, rate, seconds, keyspace=min(KEYSPACE, int(rate * seconds)))
            res[key] = {k: r[k] for k in ("written", "observed", "p50", "p99", "p999", "max")}
            log(f"  {key}: {res[key]}")
    if "rate" not in args.skip:
        res["rate"] = rate_phase(c, 50_000.0, 5.0 if q else 10.0, 25 if q else 50, 1 << 40)
        log(f"  rate: {res['rate']}")


def _brief(r: dict[str, Any]) -> str:
    return (f"{'done' if r['done'] else 'NOT done'} in {r['seconds']:.1f} s, identical "
            f"{r['identical']}, a {r['a_us_per_change']:.1f} us/change (raw "
            f"{r['a_us_per_change_raw']:.1f}), agents {r['agents_us_per_change']:.1f} us/change,"
            f" server {r['server_cpu_s']:.1f} s, {r['bytes_per_copy']:.1f} B/copy")


# --- the tables ---------------------------------------------------------------------------------

def _f(x: Any, fmt: str = "{:,.1f}", unit: str = "") -> str:
    return "n/a" if x is None else fmt.format(x) + unit


def _cell(r: dict[str, Any] | None, metric: str) -> str:
    if r is None:
        return "not run"
    if "error" in r:
        return f"FAILED: {r['error'][:80]}"
    if "not_ready" in r:
        gone = f", {len(r['exited'])} exited" if r.get("exited") else ""
        return f"NOT ready in {r['start_s']:.0f} s ({len(r['not_ready'])} agents{gone})"
    if metric == "start":
        return f"{r['start_s']:.1f} s"
    found: dict[str, Any] | None = r.get(metric if metric in _OWN_PHASE else "cpu")
    if found is None:
        return "skipped"
    p = found
    if metric not in _OWN_PHASE and not p["done"]:
        return f"NOT done in {p['seconds']:.0f} s"
    match metric:
        case "cpu_a":
            return (f"{p['a_us_per_change']:.1f} us (raw {p['a_us_per_change_raw']:.1f}; "
                    f"idle {100 * p['a_idle_cpu_per_s']:.0f}% of a core)")
        case "cpu_all":
            srv = f"; nats-server {1e6 * p['server_cpu_s'] / p['changes']:.1f} us" \
                if r["transport"] == "nats" else ""
            return f"{p['agents_us_per_change']:.1f} us{srv}"
        case "cpu_time":
            return f"{p['seconds']:.1f} s{'' if p['identical'] else ', NOT identical'}"
        case "cpu_bytes":
            s = f"{p['bytes_per_copy']:.1f} B"
            if p["delivered_bytes_per_copy"] is not None:
                s += f" (server -> each node {p['delivered_bytes_per_copy']:.1f} B)"
            return s
        case "rss":
            return f"{p['rss_mb_mean']:.0f} / {p['rss_mb_max']:.0f} MB"
        case "lat" | "lat10k":
            return (f"{p['p50']:.1f} / {p['p99']:.1f} ms ({p['observed']:,} of "
                    f"{p['written']:,} seen)")
        case "rate":
            if not p["converged"]:
                return (f"NOT converged {p['total_s']:.0f} s after the first write "
                        f"({len(p['behind'])} nodes behind)")
            return (f"{p['writes_per_s']:,.0f}/s ({p['written']:,} offered at "
                    f"{p['offered_per_s']:,.0f}/s, done {p['total_s']:.1f} s)")
    return "?"


_OWN_PHASE = ("lat", "lat10k", "rate")  # metrics with a phase of their own (else the cpu one)
_METRICS = (
    ("start", "agents start -> all ready"),
    ("cpu_a", "origin a: CPU per change, net of its idle CPU"),
    ("cpu_all", "all agents: CPU per change"),
    ("cpu_time", "{k} changes on a -> applied on every node"),
    ("cpu_bytes", "bytes per change sent by a, per copy"),
    ("rss", "agent RSS mean / max, map of {k}"),
    ("lat", "latency a -> b at 1k/s: p50 / p99"),
    ("lat10k", "latency a -> b at 10k/s: p50 / p99"),
    ("rate", "50k writes/s offered: writes/s absorbed by every node"),
)


def _fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """cost = c0 + c1 (N - 1), least squares over two or more N (None with fewer). A falling
    line is taken as flat, at the mean: more receivers cannot make a change cheaper, so a
    negative slope is the noise of the measured points (extended to N = 1,000 it would
    project a negative cost)."""
    if len({n for n, _ in points}) < 2:
        return None
    x = np.array([n - 1 for n, _ in points], dtype=float)
    cost = np.array([v for _, v in points], dtype=float)
    slope, intercept = (float(v) for v in np.polyfit(x, cost, 1))
    return (intercept, slope) if slope >= 0 else (float(cost.mean()), 0.0)


def projection(R: dict[str, dict[int, dict[str, Any]]], ns: Sequence[int]) -> list[list[str]]:
    rows: list[list[str]] = []
    per: dict[str, dict[str, Any]] = {}
    for tr in ("mesh", "nats"):
        ok = {n: r["cpu"] for n, r in R.get(tr, {}).items()
              if r.get("cpu") and r["cpu"]["done"]}
        per[tr] = {
            "a": _fit([(n, cp["a_us_per_change"]) for n, cp in ok.items()]),
            "all": _fit([(n, cp["agents_us_per_change"]) for n, cp in ok.items()]),
            "copy": float(np.mean([cp["bytes_per_copy"] for cp in ok.values()])) if ok else None,
            "deliv": (float(np.mean([cp["delivered_bytes_per_copy"] for cp in ok.values()]))
                      if ok and tr == "nats" else None),
            "measured": ok,
        }
    for n in sorted({*ns, *PROJECT_N}):
        cells: dict[str, list[str]] = {}
        how = []
        for tr in ("mesh", "nats"):
            p = per[tr]
            cp = p["measured"].get(n)
            if cp is not None:
                how.append(f"{tr}: measured")
                a_us, all_us = cp["a_us_per_change"], cp["agents_us_per_change"]
                copy, deliv = cp["bytes_per_copy"], cp["delivered_bytes_per_copy"]
            else:
                how.append(f"{tr}: projected")
                a_us = p["a"][0] + p["a"][1] * (n - 1) if p["a"] else None
                all_us = p["all"][0] + p["all"][1] * (n - 1) if p["all"] else None
                copy, deliv = p["copy"], p["deliv"]
            if tr == "mesh":
                out = f"{n - 1:,} sends by a; 0 by servers"
                byts = f"a {_f(copy * (n - 1) if copy else None, '{:,.0f}', ' B')}"
            else:
                out = f"1 publish by a; {n - 1:,} deliveries by the server"
                byts = (f"a {_f(copy, '{:,.0f}', ' B')}; server "
                        f"{_f(deliv * (n - 1) if deliv else None, '{:,.0f}', ' B')}")
            cells[tr] = [out, byts, _f(a_us, "{:,.1f}", " us"), _f(all_us, "{:,.1f}", " us")]
        for i, what in enumerate(("messages per change (record copies)", "bytes per change sent",
                                  "origin CPU per change", "all agents' CPU per change")):
            rows.append([str(n), what, cells["mesh"][i], cells["nats"][i],
                         "by design" if i == 0 else ", ".join(how)])
    return rows


def _c_read(r: dict[str, Any]) -> str:
    tr, rep = r["c_transport"] or {}, r["c_replica"] or {}
    stored = ", ".join(f"{n} {v['snapshots_stored']}" for n, v in r["stored"].items())
    return (f"{tr.get('snapshots_read', 0)} bucket snapshots (stored by then: {stored}, empty "
            f"ones included), {tr.get('streamed', 0)} stream messages (skipped up to "
            f"{tr.get('stream_skipped_to', 0)}); records applied "
            f"{rep.get('received.applied', 0):,}, ignored {rep.get('received.ignored', 0):,}; "
            f"RSS {r['c_rss_mb']:.0f} MB")


def _c_ready(r: dict[str, Any]) -> str:
    why = r["events"].get("ready", {}).get("why")
    return _f(r["ready_s"], "{:.2f}", " s") + (f" ({why})" if why else "")


_CATCHUP_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("entries: a -> b (while both run)",
     lambda r: f"{r['entries']:,} in {r['b_read_s']:.1f} s, identical {r['b_identical']}"),
    ("a's and b's snapshots stored again after b read the fill",
     lambda r: (f"{r['snapshots_s']:.1f} s, complete {r['snapshots_current']}"
                if r["settled"] else "not waited for")),
    ("c: spawn -> /readyz 200 (target <= 3 s)", _c_ready),
    ("c: spawn -> identical to a", lambda r: _f(r["identical_s"], "{:.2f}", " s")),
    ("c: what it read", _c_read),
]


def report(R: dict[str, dict[int, dict[str, Any]]], cu: list[dict[str, Any]],
           ns: Sequence[int], changes: int, argv: list[str], took: float,
           load: tuple[str, str]) -> None:
    k = f"{changes // 1000}k" if changes % 1000 == 0 else f"{changes:,}"
    for n in ns:
        print(f"\nN = {n}\n\n| metric | mesh | nats |\n|---|---|---|")
        for key, label in _METRICS:
            label = label.format(k=k)
            print(f"| {label} | {_cell(R.get('mesh', {}).get(n), key)} | "
                  f"{_cell(R.get('nats', {}).get(n), key)} |")
    if cu:
        print("\nNATS catch-up of a fresh node (c, --no-state), every other agent stopped: right "
              "after the fill, and once a's and b's snapshots hold it\n")
        print("| metric | " + " | ".join(
            "snapshots current" if r["settled"] else "right after the fill" for r in cu)
            + " |\n|---|" + "---|" * len(cu))
        for label, cell in _CATCHUP_ROWS:
            print(f"| {label} | " + " | ".join(
                cell(r) if "ready_s" in r else
                f"NOT measured: {r.get('error') or 'a and b not ready'}" for r in cu) + " |")
    print("\nProjection per change. 'measured': this run's cpu phase at that N. 'projected': "
          "copies by design; bytes = the measured bytes per copy (mean over the N measured) "
          "times the copies; CPU = a least-squares line in N-1 through the measured N (flat "
          "at their mean if it falls)\n")
    print("| N | per change | mesh | nats | how |\n|---|---|---|---|---|")
    for row in projection(R, ns):
        print("| " + " | ".join(row) + " |")
    problems = [(f"{tr} N={n}", r.get("problems"), r.get("server_problems"), r.get("logs"))
                for tr in R for n, r in R[tr].items()]
    problems += [(f"nats catch-up ({'settled' if r['settled'] else 'burst'})",
                  r.get("problems"), r.get("server_problems"), r.get("logs")) for r in cu]
    print("\nWarnings and errors in the logs")
    for where, p, sp, logs in problems:
        if (p and p["counts"]) or sp:
            print(f"  {where}: {p['counts'] if p else {}}")
            for line in (p or {}).get("first", []):
                print(f"    {line}")
            for line in sp or []:
                print(f"    nats-server: {line}")
            if logs:
                print(f"    logs kept: {logs[0]} ...")
    if not any((p and p["counts"]) or sp for _, p, sp, _ in problems):
        print("  none")
    print(f"\ncommand: .venv/bin/python {' '.join(argv)}  ({took:.0f} s; load average at the "
          f"start {load[0]}, at the end {load[1]})")
    print("json: " + json.dumps({"runs": {tr: {str(n): r for n, r in R[tr].items()} for tr in R},
                                 "catchup": cu, "seconds": took,
                                 "load": load}, default=str))


def _load() -> str:
    """The 1-minute load average: other work on the machine shows in every figure."""
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases, 100k changes")
    ap.add_argument("--nodes", default="3,10", help="cluster sizes, e.g. 3,10,30")
    ap.add_argument("--transports", default="mesh,nats")
    ap.add_argument("--changes", type=int, help="the cpu phase's batch (200k; --quick 100k)")
    ap.add_argument("--catchup-entries", type=int, default=1_000_000)
    ap.add_argument("--skip", default="", help="of: cpu lat rate catchup")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep every agent's log (by default only those with warnings)")
    args = ap.parse_args()
    q = args.quick
    args.changes = min(args.changes or (100_000 if q else 200_000), KEYSPACE)
    args.skip = set(filter(None, args.skip.split(",")))
    ns = [int(x) for x in args.nodes.split(",") if x]
    if min(ns) < 2:
        ap.error("--nodes: at least 2 nodes a cluster")
    t0, load0 = time.perf_counter(), _load()
    R: dict[str, dict[int, dict[str, Any]]] = {}
    for n in ns:
        for tr in args.transports.split(","):
            log(f"{tr}, {n} nodes")
            R.setdefault(tr, {})[n] = run_cluster(tr, n, args, q)
    cu: list[dict[str, Any]] = []
    if "catchup" not in args.skip and "nats" in args.transports.split(","):
        for settled in (False, True):
            when = "once the snapshots hold the fill" if settled else "right after the fill"
            log(f"NATS catch-up of a fresh node on {args.catchup_entries:,} entries, {when}")
            try:
                with NatsServer() as server:
                    r = catchup_phase(server, args.catchup_entries, 30 if q else 60,
                                      args.keep_logs, settled)
            except Exception as err:
                r = {"entries": args.catchup_entries, "settled": settled,
                     "error": f"{type(err).__name__}: {err}"}
            log(f"  {r}")
            cu.append(r)
    report(R, cu, ns, args.changes, sys.argv, time.perf_counter() - t0, (load0, _load()))


if __name__ == "__main__":
    main()
