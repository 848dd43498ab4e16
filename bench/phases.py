"""The benchmark's phases (bench/run.py runs them; bench/README.md says what each measures and
what bounds it). Each is bounded in time and cleans up through the cluster's context manager."""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import poll_scan
from fixtures import (
    BenchCluster,
    BigNode,
    Node,
    applied,
    cpu_s,
    drained,
    finish_profile,
    log,
    log_events,
    pct,
    readyz,
    rss_mb,
    same_content,
    start_profile,
    wire_bytes,
)

from bpfsync.core.digest import DEFAULT_BUCKETS
from bpfsync.demo.cluster import MAP_NAME, RANGE_MAX
from bpfsync.watch.poll import MapPoller
from bpfsync.watch.trace import Hooks, TraceWatcher
from bpfsync.watch.trace_abi import elements

WRITE_TICK = 0.005  # s between the throughput writer's batches


def throughput(c: BenchCluster, rate: float, seconds: float, keyspace: int, vsize: int,
               use_bpf: bool, wait_max: float, base: int, profile_s: float = 0) -> dict[str, Any]:
    """Write on a at ``rate`` for ``seconds`` (keys cycle over ``keyspace``), then wait until b and
    c hold a's content. ``base`` offsets the unique value so that phases never repeat a value."""
    a, b, cc = c["a"], c["b"], c["c"]
    ap0 = {n.name: applied(n) for n in (b, cc)}
    pids = {n.name: n.proc.pid for n in (a, b, cc) if n.proc is not None}
    cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
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
    # the agents' CPU from the first write until b and c were found identical (or the wait
    # ended): what the whole run cost them, the draining included
    cpu = {name: cpu_s(pid) - cpu0[name] for name, pid in pids.items()}
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
        "cpu_s": cpu,
        "profiles": profiles,
        "a_stats": {"replica": st.get("replica"), "transport": st.get("transport"),
                    "peers": [{k: p.get(k) for k in ("node", "sent", "reconnects", "dropped",
                                                     "last_error")}
                              for p in st.get("peers", [])]},
    }


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
            "max": float(x.max()) if x.size else float("nan"),
            "samples_ms": x}  # every latency, for bench/plots.py; the table reads the above


def catchup(entries: int, wait_max: float) -> dict[str, Any]:
    factory = lambda n, r, p, h: BigNode(n, r, p, h, entries)  # noqa: E731
    with BenchCluster(factory, ("a", "b"), "bench-catchup") as c:
        a, b = c["a"], c["b"]
        _fill(a, entries)
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


def _fill(node: Node, entries: int, base: int = 0) -> None:
    """Keys 0..entries-1 with distinct values, in one batch (what catch-up and restart load);
    ``base`` makes every value another one."""
    keys = np.arange(entries, dtype=np.uint32)
    vals = np.zeros((entries, 2), dtype=np.uint64)
    vals[:, 0] = np.arange(entries, dtype=np.uint64) * 1500
    vals[:, 1] = np.arange(entries, dtype=np.uint64) + base
    node.map.update_batch(keys, vals)


def persist_cost(rate: float, seconds: float, keyspace: int, wait_max: float,
                 pairs: int) -> dict[str, Any]:
    """thr-user with the state store (the default) and with ``--no-state``, ``pairs`` runs of
    each, interleaved (store, no state, no state, store, ...: a drift of the host's speed over
    the phase weighs on both alike), each on a fresh cluster; the medians and their ratio."""
    factory = lambda n, r, p, h: BigNode(n, r, p, h, keyspace)  # noqa: E731
    order = [x for i in range(pairs)
             for x in (("store", "no_state") if i % 2 == 0 else ("no_state", "store"))]
    runs: dict[str, list[dict[str, Any]]] = {"store": [], "no_state": []}
    for label in order:
        with BenchCluster(factory, ("a", "b", "c"), "bench-persist") as c:
            c.start_with(0.25, extra=[] if label == "store" else ["--no-state"])
            if not c.wait_ready(30):
                runs[label].append({"converged": False, "ready": False, "total_s": 0.0,
                                    "keys_final_ok": {}, "keys_touched": 0})
                continue
            r = throughput(c, rate, seconds, keyspace, 16, False, wait_max, 0)
            states = {n.name: (n.status() or {}).get("state") for n in c}
            r["state"] = states
            # what the store held at the end (the file, its WAL and shared memory)
            r["state_mb"] = {n.name: sum(f.stat().st_size for f in n.state_dir.glob("*")) / 1e6
                             for n in c if n.state_dir.is_dir()}
            r.pop("profiles", None)
            runs[label].append(r)
        log(f"  {label}: {_thr_brief(r)}")

    def med(label: str, f: Any) -> float | None:
        xs = [f(r) for r in runs[label] if r.get("converged")]
        return statistics.median(xs) if xs else None

    summary: dict[str, Any] = {"pairs": pairs, "order": order, "runs": runs}
    for label in runs:
        summary[label] = {
            "converged": sum(bool(r.get("converged")) for r in runs[label]),
            "writes_per_s": med(label, lambda r: r["writes_per_s"]),
            "cpu_s": med(label, lambda r: sum(r["cpu_s"].values())),
            "cpu_a_s": med(label, lambda r: r["cpu_s"]["a"]),
            "cpu_bc_s": med(label, lambda r: r["cpu_s"]["b"] + r["cpu_s"]["c"]),
            # CPU per write, since the runs' lengths differ by their draining
            "cpu_us_per_write": med(label, lambda r: 1e6 * sum(r["cpu_s"].values())
                                    / r["written"]),
        }
    s, n = summary["store"], summary["no_state"]
    summary["ratio"] = (s["writes_per_s"] / n["writes_per_s"]
                        if s["writes_per_s"] and n["writes_per_s"] else None)
    summary["cpu_ratio"] = (s["cpu_us_per_write"] / n["cpu_us_per_write"]
                            if s["cpu_us_per_write"] and n["cpu_us_per_write"] else None)
    return summary


def _thr_brief(r: dict[str, Any]) -> str:
    if not r.get("converged"):
        return f"NOT converged ({r.get('total_s', 0):.0f} s)"
    cpu = r["cpu_s"]
    return (f"{r['writes_per_s']:,.0f} writes/s, done {r['total_s']:.1f} s, agents' CPU "
            f"{cpu['a']:.1f}/{cpu['b']:.1f}/{cpu['c']:.1f} s (a/b/c)")


# b's sync.catchup_timeout_s in the restart phase: the agent's default, as an operator's
# restart has it, not the 1 s of the other phases (whose nodes start together, empty)
RESTART_CATCHUP_S = 10.0
_RESTART_EVENTS = ("restarted on stored state", "agent started", "peer up", "caught up", "ready")
_EVENT_FIELDS = ("at_s", "msg", "case", "registers", "held_back", "seeded", "why", "after_s",
                 "buckets_repaired")


def restart(entries: int, wait_max: float) -> dict[str, Any]:
    """a and b converged on an ``entries``-entry map (as catch-up builds them); b's agent is then
    restarted on its unchanged map: ended by SIGTERM, then by SIGKILL, each time started again
    with its state file, then the same twice with ``--no-state``. Each: the time from the spawn
    to /readyz answering 200, the agent's log events on the way, and what b sent and received
    once both sides have nothing left to send."""
    factory = lambda n, r, p, h: BigNode(n, r, p, h, entries)  # noqa: E731
    with BenchCluster(factory, ("a", "b"), "bench-restart") as c:
        a, b = c["a"], c["b"]
        _fill(a, entries)
        c.start_with(0.25, [a])

        def a_loaded() -> bool:
            st = a.status()
            return bool(st and st.get("ready") and st["maps"][0]["registers"] >= entries)

        if not c.wait(a_loaded, wait_max, every=0.2):
            return {"entries": entries, "converged": False, "runs": []}
        c.start_with(0.25, [b], catchup_s=RESTART_CATCHUP_S)
        deadline = time.perf_counter() + wait_max
        converged = False
        while time.perf_counter() < deadline:
            if readyz(b) and b.map.dump().count == entries and same_content(a, [b]):
                converged = True
                break
            time.sleep(0.2)

        def stored_whole() -> bool:
            st = (b.status() or {}).get("state") or {}
            return MAP_NAME in st.get("stored_whole", ())

        # every entry rewritten once on a while both run: the registers then carry a's real
        # stamps, as in a cluster that has been running. Had they kept a's seed stamps (what a
        # catch-up leaves), b's seeds after a --no-state restart would outrank them (a seed
        # stamp is wall 0, logical 0 and the node id, b > a): the first such restart would push
        # every entry to a and the next find the digests equal, neither what a restart does
        if converged:
            ap0 = applied(b)
            _fill(a, entries, base=entries)
            deadline = time.perf_counter() + wait_max
            converged = c.wait(lambda: applied(b) - ap0 >= entries, wait_max, every=0.2)
            while converged and time.perf_counter() < deadline:
                if same_content(a, [b]):
                    break
                time.sleep(0.5)
            else:
                converged = False
        stored = c.wait(stored_whole, 30, every=0.2)
        if not converged or not stored:
            return {"entries": entries, "converged": converged, "stored": stored, "runs": []}
        runs = [_restart_once(c, a, b, label, sig, wait_max)
                for label, sig in (("state", signal.SIGTERM), ("state", signal.SIGKILL),
                                   ("no_state", signal.SIGTERM), ("no_state", signal.SIGKILL))]
        return {"entries": entries, "converged": True, "stored": True, "runs": runs}


def _received(st: dict[str, Any]) -> int:
    """Peer records the agent took in (merged, ignored as older, or stale), by its replica."""
    return sum(int(v) for k, v in (st.get("replica") or {}).items() if k.startswith("received."))


def _restart_once(c: BenchCluster, a: Node, b: Node, label: str, sig: int,
                  wait_max: float) -> dict[str, Any]:
    # the same quiet before every stop: nothing queued either way, and a full cycle of the
    # persister's bucket visits (2 s) since the last start
    end = time.perf_counter() + 30
    drained(b, end)
    drained(a, end)
    time.sleep(2.5)
    a_recv0 = _received(a.status() or {})
    t = time.perf_counter()
    rc = b.stop(sig, timeout=60)
    stop_s = time.perf_counter() - t
    wall0 = time.time()
    t0 = time.perf_counter()
    files = {f.name: f.stat().st_size for f in b.state_dir.glob("*")} if label == "state" else {}
    c.start_with(0.25, [b], catchup_s=RESTART_CATCHUP_S,
                 extra=["--no-state"] if label == "no_state" else [])
    ready_s = None
    while time.perf_counter() - t0 < wait_max:
        if readyz(b):
            ready_s = time.perf_counter() - t0
            break
        time.sleep(0.01)
    events = log_events(b, wall0, _RESTART_EVENTS)
    # what the restart made b and a exchange: once neither has anything left for the other
    end = time.perf_counter() + 30
    drained(b, end)
    drained(a, end)
    st_b, st_a = b.status() or {}, a.status() or {}
    peer: dict[str, Any] = next((p for p in st_b.get("peers", []) if p.get("node") == "a"), {})
    identical = b.map.dump().count == a.map.dump().count and same_content(a, [b])
    rep = st_b.get("replica") or {}
    return {
        "state": label, "signal": signal.Signals(sig).name, "stop_rc": rc, "stop_s": stop_s,
        "ready_s": ready_s,
        "events": {m: {k: e[k] for k in _EVENT_FIELDS if k in e} for m, e in events.items()},
        "b_bytes_sent": peer.get("bytes_sent"), "b_bytes_received": peer.get("bytes_received"),
        "b_messages_sent": peer.get("sent"), "b_messages_received": peer.get("received"),
        "b_records_received": _received(st_b), "b_records_sent": _received(st_a) - a_recv0,
        "b_seeded": rep.get("local.seeded", 0), "b_loaded": rep.get("restart.loaded", 0),
        "wire": wire_bytes(b.port, a.port), "identical": identical,
        "b_state": st_b.get("state"), "state_files": files,
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
