"""One-command end-to-end benchmark of bpfsync against the seed design (needs root, bpffs).

    .venv/bin/python bench/run.py [--quick] [--plot DIR]

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
  persist   thr-user on fresh clusters with the state store (the default) and with --no-state,
            --persist-runs of each, interleaved: writes/s and the agents' CPU (/proc/PID/stat)
  latency   ~10k writes/s on a (monotonic ns in the value); this process sees b's agent write
            them through its own bpf(2) syscall hooks; agents in watch mode auto (the default:
            bpf(2) hooks on this host) at 10k/s and at 80% of the rate thr-user sustained, and
            poll-only at 0.25 s for comparison; and at 10k/s with mutual TLS
  catch-up  a holds N entries and is ready; b starts empty: time to ready and identical, bytes read
            sent by the two agents (ss -ti bytes_sent), RSS of both then, and again once every
            bucket of both maps is frozen (core/frozen.py: quiet buckets take a third of the memory)
  restart   a and b converged on N entries; b's agent restarted on its unchanged map (SIGTERM,
            SIGKILL), with its state file and with --no-state: spawn -> /readyz, the log's
            events on the way, the bytes and records b sent and received
  detect    MapPoller scan+diff of a 1M-entry u32 -> 16 B hash (bench/poll_scan.py's helpers),
            and what the bpf(2) hooks cost every other process (bench/syscall_hooks.py)
  profile   py-spy record of a and b during thr-user (if py-spy is installed)
--plot DIR also draws the latency CDFs, the throughput per phase and the catch-up as PNGs in DIR
(bench/plots.py, matplotlib from the dev extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import seed_baseline
import syscall_hooks
from fixtures import BenchCluster, BigNode, PlainNode, log, rss_mb
from phases import (
    burst,
    catchup,
    detection,
    latency,
    persist_cost,
    restart,
    throughput,
    trace_bench,
)
from report import report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~5 s phases instead of 30 s")
    ap.add_argument("--rate", type=float, default=250_000, help="offered writes/s on a")
    ap.add_argument("--low-rate", type=float, default=50_000,
                    help="a second, lower offered rate for the user-space phase (0: skip)")
    ap.add_argument("--keyspace", type=int, default=1 << 20)
    ap.add_argument("--catchup-entries", type=int, default=1_000_000)
    ap.add_argument("--persist-runs", type=int, default=2,
                    help="runs of the persist phase with the store and without, each")
    ap.add_argument("--skip", default="",
                    help="comma list of phases to skip: thr tls thr256 persist lat catchup "
                         "restart burst trace detect")
    ap.add_argument("--plot", type=Path, metavar="DIR",
                    help="also write the figures as PNGs into DIR (bench/plots.py)")
    args = ap.parse_args()
    if args.plot:  # before the phases: a missing matplotlib fails now, not after the run
        import plots

        args.plot.mkdir(parents=True, exist_ok=True)
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
    if "persist" not in skip and args.persist_runs > 0:
        log(f"cost of the state store: 16B user-space writes, with the store and --no-state, "
            f"{args.persist_runs} runs each, interleaved")
        R["persist"] = persist_cost(args.rate, secs, args.keyspace, wait_max, args.persist_runs)
        log(f"  { {k: v for k, v in R['persist'].items() if k != 'runs'} }")
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
                log(f"  {_brief(R[key])}")
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
                log(f"  {_brief(R['lat_auto_tls'])}")
    if "catchup" not in skip:
        log(f"catch-up of {args.catchup_entries} entries")
        R["catchup"] = catchup(args.catchup_entries, 60.0 if q else 120.0)
        log(f"  {R['catchup']}")
    if "restart" not in skip:
        log(f"restart of b on its unchanged {args.catchup_entries}-entry map, with its state "
            "file and with --no-state")
        R["restart"] = restart(args.catchup_entries, 60.0 if q else 120.0)
        for run in R["restart"]["runs"]:
            log(f"  {run}")
        if not R["restart"]["runs"]:
            log(f"  {R['restart']}")
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
            json.dumps({k: _brief(v) for k, v in R.items()}, default=str))
    report(R, sys.argv)
    if args.plot:
        for path in plots.plot_all(R, args.plot):
            log(f"plot: {path}")


def _brief(result: Any) -> Any:
    """A phase's results without phases.latency's raw latencies (for the plots only)."""
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if k != "samples_ms"}
    return result


if __name__ == "__main__":
    main()
