"""A real Prometheus scraping three real agents every second, asked the operators' questions in
PromQL over its HTTP API: how far behind each peer is, records applied per second, rejections
by reason, ring overflows, readiness, divergence; then one agent is killed and the answers
change. The alert rules in deploy/prometheus pass promtool's checks and unit tests, and every
expression of the Grafana dashboard runs on this Prometheus.

Prometheus is Debian's package, installed here when missing (the test fails, never skips, when it
cannot be installed or started). The package's own service is not used: if it runs, it is
stopped, and the test runs its own ``prometheus`` on a loopback port with its own config and data
directory, removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml

from bpfsync.core.messages import Batch, Hello, MapSchema, Record, Stamp
from bpfsync.demo.cluster import (
    KEY,
    MAP_NAME,
    VALUE,
    Cluster,
    free_port,
    session,
    stop_process,
    wait_for,
)
from bpfsync.errors import BpfsyncError
from bpfsync.kernel.info import UpdateFlags
from bpfsync.transport import codec
from bpfsync.transport.rpc import METHOD

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "bpfsync.json"
SCHEMA = MapSchema(MAP_NAME, KEY.size, VALUE.size)

Answer = dict[Any, float]  # label value (or tuple of them) -> sample value


# --- Prometheus: the package, and a process of our own -----------------------------------------


def _stop_packaged_service() -> None:
    """The package starts prometheus.service where it can (systemd, no policy-rc.d veto): stop
    it, it is not ours to scrape with and it would hold port 9090."""
    if Path("/run/systemd/system").is_dir():
        if subprocess.run(["systemctl", "is-active", "--quiet", "prometheus"]).returncode == 0:
            subprocess.run(["systemctl", "stop", "prometheus"], check=True)
    elif Path("/etc/init.d/prometheus").exists() and subprocess.run(
        ["/etc/init.d/prometheus", "status"], capture_output=True
    ).returncode == 0:
        subprocess.run(["/etc/init.d/prometheus", "stop"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def binaries() -> tuple[str, str]:
    """``prometheus`` and ``promtool``, from Debian's package (installed if missing)."""
    def found() -> tuple[str, str] | None:
        prom, tool = shutil.which("prometheus"), shutil.which("promtool")
        return (prom, tool) if prom and tool else None

    if found() is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # without recommends: they bring prometheus-node-exporter, a service on port 9100
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
        res = subprocess.run(install, capture_output=True, text=True, env=env)
        if res.returncode != 0:  # a stale package list: update it once and try again
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            res = subprocess.run(install, capture_output=True, text=True, env=env)
        if res.returncode != 0 or found() is None:
            pytest.fail(f"cannot install Debian's prometheus package: {res.stderr[-2000:]}")
    _stop_packaged_service()
    paths = found()
    assert paths is not None
    return paths


class Prometheus:
    """Our own prometheus process: config, rules, data and log in a temp dir, on loopback."""

    def __init__(self, binary: str, targets: dict[str, int], rules: Sequence[Path]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bpfsync-prometheus-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(r) for r in rules],
            "scrape_configs": [{
                "job_name": "bpfsync",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"node": name}}
                                   for name, port in targets.items()],
            }],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = self.dir / "prometheus.log"
        try:
            with self.log_path.open("wb") as log:
                self.proc = subprocess.Popen(
                    [binary, f"--config.file={self.dir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={self.dir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            if not wait_for(self._ready, 60, every=0.2):
                pytest.fail(f"prometheus did not start: {self.log()}")
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}: {self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query over the HTTP API: (labels, value) per sample."""
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{expr}: {err.read().decode(errors='replace')}") from err
        assert body["status"] == "success", body
        data = body["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        assert data["resultType"] == "vector", data
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def answer(self, expr: str, *by: str) -> Answer:
        """The samples keyed by the values of labels ``by`` (one label: its value alone)."""
        out: Answer = {}
        for labels, value in self.query(expr):
            key = tuple(labels.get(b, "") for b in by)
            out[key[0] if len(key) == 1 else key] = value
        return out

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


# --- a rogue stream claiming a member's id (plaintext authenticates nothing) --------------------


async def _stream(address: str, frames: Sequence[bytes], linger: float) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(METHOD)()
        try:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError,
                                     TimeoutError):
                for frame in frames:
                    await call.write(frame)
                async with asyncio.timeout(linger):
                    while await call.read() is not grpc.aio.EOF:
                        pass
        finally:
            call.cancel()


def send(address: str, *frames: bytes, linger: float = 3.0) -> None:
    asyncio.run(_stream(address, frames, linger))


def hello(node: str) -> bytes:
    return codec.encode(Hello(node, time.time_ns(), (SCHEMA,)))


# --- the test ----------------------------------------------------------------------------------


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from walk(p.get("panels", []))

    for p in walk(json.loads(DASHBOARD.read_text())["panels"]):
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            yield p["title"], expr


def test_alert_rules_pass_promtool_checks_and_unit_tests(binaries: tuple[str, str]) -> None:
    _, promtool = binaries
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        res = subprocess.run([promtool, *args], cwd=RULES_DIR, capture_output=True, text=True)
        assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
        assert "SUCCESS" in res.stdout


def test_prometheus_answers_the_operators_questions(binaries: tuple[str, str]) -> None:
    started = time.monotonic()
    logs: list[Path] = []
    try:
        with Cluster(tag="prom") as cluster:
            logs = [n.log_path for n in cluster]
            try:
                cluster.start()
                assert cluster.wait_ready(60) and cluster.wait_linked(30)
                prom = Prometheus(binaries[0], {n.name: n.http_port for n in cluster},
                                  [RULES_DIR / "alerts.yml"])
                try:
                    _ask(prom, cluster)
                except BaseException:
                    print(f"--- prometheus log ---\n{prom.log()}")
                    raise
                finally:
                    prom.close()
            except BaseException:
                for n in cluster:
                    print(f"--- agent log of {n.name} (last 3000 chars) ---\n{n.log()[-3000:]}")
                raise
    finally:
        for path in logs:  # the cluster removed its pins and stopped its agents
            path.unlink(missing_ok=True)
    print(f"test took {time.monotonic() - started:.1f} s")


def _ask(prom: Prometheus, cluster: Cluster) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    def ask(expr: str, *by: str) -> Answer:  # printed: pytest -s shows the answers
        got = prom.answer(expr, *by)
        print(f"{expr}  ->  {got}")
        return got

    def until(expr: str, by: Sequence[str], ok: Callable[[Answer], bool],
              timeout: float = 30) -> Answer:
        assert wait_for(lambda: ok(prom.answer(expr, *by)), timeout, every=0.5), (
            f"{expr}: {prom.answer(expr, *by)}")
        return ask(expr, *by)

    def scraped() -> None:  # two scrapes after now: what the agents show now is in Prometheus
        time.sleep(2.2)

    # -- every node up, ready and linked, nothing behind --
    until('up{job="bpfsync"}', ["node"], lambda r: r == {"a": 1, "b": 1, "c": 1})
    until("bpfsync_ready", ["node"], lambda r: r == {"a": 1, "b": 1, "c": 1})
    pairs = {(x, y): 1.0 for x in "abc" for y in "abc" if x != y}
    until("bpfsync_peer_connected", ["node", "peer"], lambda r: r == pairs)
    until("bpfsync_peer_lag_records", ["node", "peer"],
          lambda r: r == dict.fromkeys(pairs, 0.0))

    # -- records applied per second: 3000 writes on a in 3 s (the counters exist at 0 from the
    # start, so rate and increase count the first burst too) --
    t0 = time.monotonic()
    for k in range(1, 3001):
        a.put(k, session(k))
        if k % 100 == 0:
            time.sleep(max(0.0, t0 + k / 1000 - time.monotonic()))  # ~1000 writes a second
    assert cluster.wait_converged(60)
    scraped()
    applied = ask("sum by (node) (bpfsync_applied_total)", "node")
    assert applied == {"a": 0, "b": 3000, "c": 3000}  # every write was a's own
    rate = ask("sum by (node) (rate(bpfsync_applied_total[20s]))", "node")
    assert rate["a"] == 0 and rate["b"] > 0 and rate["c"] > 0
    ask("sum by (node) (increase(bpfsync_applied_total[1m]))", "node")
    local = ask("sum by (node) (rate(bpfsync_local_changes_total[20s]))", "node")
    assert local["a"] > 0
    ask("max by (node, peer) (max_over_time(bpfsync_peer_lag_records[30s]))", "node", "peer")
    until("bpfsync_peer_lag_records", ["node", "peer"],
          lambda r: r == dict.fromkeys(pairs, 0.0))
    ask("bpfsync_map_entries", "node")

    # -- rejections by reason, and a divergence: a rogue claims to be b (plaintext lets it) and
    # sends 300 records only it has, one of a map nobody syncs, one stamped 100 s ahead; a
    # stranger's stream is refused by the transport --
    now = time.time_ns()
    records = tuple(Record(MAP_NAME, KEY.pack(100_000 + i), session(i), Stamp(now, 0, "b"))
                    for i in range(300))  # fmt: skip
    bad = (Record("no-such-map", KEY.pack(1), session(1), Stamp(now, 0, "b")),
           Record(MAP_NAME, KEY.pack(2), session(2), Stamp(now + 100 * 10**9, 0, "b")))
    send(a.address, hello("b"), codec.encode(Batch("b", 0, records + bad)), linger=1.0)
    send(a.address, hello("mallory"))
    # (unsolicited_answered also counts every routine digest answer's Answered, about one per
    # peer and round on every node: docs/metrics.md)
    rogue = {("a", "UnknownMapError"): 1, ("a", "ClockDriftError"): 1}
    until("sum by (node, reason) (bpfsync_rejected_total) > 0", ["node", "reason"],
          lambda r: {k: v for k, v in r.items() if k[1] != "unsolicited_answered"} == rogue)
    until('sum by (node, event) (bpfsync_transport_events_total{event=~"rejected_.*"})',
          ["node", "event"], lambda r: r.get(("a", "rejected_not_member"), 0) == 1)
    scraped()
    rejected = ask('sum by (node, reason) (increase(bpfsync_rejected_total'
                   '{reason!="unsolicited_answered"}[1m])) > 0', "node", "reason")
    assert set(rejected) == set(rogue)
    # a holds 300 keys b and c lack: the second routine digest finds the buckets stable, and
    # repair takes 64 a round, so the gauge stays up for a few rounds
    # (b and c may differ for a round too, as a's answers reach them at different times)
    until("max by (node, peer) (max_over_time(bpfsync_divergent_buckets[1m]))", ["node", "peer"],
          lambda r: r.get(("a", "b"), 0) > 64 and r.get(("a", "c"), 0) > 64)
    assert cluster.wait_converged(60)
    until("max by (node, peer) (bpfsync_divergent_buckets)", ["node", "peer"],
          lambda r: len(r) == 6 and max(r.values()) == 0)
    ask("sum by (node) (increase(bpfsync_repair_buckets_total[1m]))", "node")

    # -- ring overflows: a batch update the kernel refuses (elem_flags other than BPF_F_LOCK)
    # may have written any of its elements, as far as the bpf(2) hooks can tell: they count it
    # as dropped, like records lost to a full ring, and the agent rescans the map --
    mode = (a.status() or {}).get("watch")
    with contextlib.suppress(BpfsyncError):
        a.map.update_batch(KEY.pack(200_000) + KEY.pack(1), session(7) * 2,
                           flags=UpdateFlags.NOEXIST)
    expected = 1 if mode == "syscall+poll" else 0  # fexit sees element writes, none here
    until("sum by (node) (bpfsync_watch_overflows_total)", ["node"],
          lambda r: r == {"a": expected, "b": 0, "c": 0})
    ask("sum by (node) (increase(bpfsync_watch_overflows_total[1m]))", "node")
    a.put(200_001, session(1))  # and a's changes still reach the others
    assert cluster.wait(lambda: KEY.pack(200_001) in c.content(), 30)

    # -- every dashboard panel's query runs here --
    empty = [title for title, expr in dashboard_exprs() if not prom.query(expr)]
    print(f"dashboard panels' queries with no data yet: {empty}")
    ask('ALERTS{alertstate=~"pending|firing"}', "alertname", "node", "peer")

    # -- kill c: the answers change --
    killed_at = time.monotonic()
    c.stop(signal.SIGKILL)
    until('up{job="bpfsync"}', ["node"], lambda r: r == {"a": 1, "b": 1, "c": 0})
    until("bpfsync_ready", ["node"], lambda r: r == {"a": 1, "b": 1})  # c's series gone stale
    until("bpfsync_peer_connected", ["node", "peer"],
          lambda r: r == {("a", "b"): 1, ("a", "c"): 0, ("b", "a"): 1, ("b", "c"): 0})
    for k in range(300_000, 300_100):
        a.put(k, session(k))
    assert cluster.wait(lambda: KEY.pack(300_099) in b.content(), 30)
    lag = until("bpfsync_peer_lag_records", ["node", "peer"],
                lambda r: r.get(("a", "c"), 0) >= 100 and r.get(("a", "b")) == 0)
    assert lag[("b", "c")] == 0 and ("c", "a") not in lag
    until('count by (peer) (bpfsync_divergent_buckets{peer="c"})', ["peer"], lambda r: r == {})
    alerts = until('ALERTS{alertstate="pending"}', ["alertname", "node", "peer"],
                   lambda r: {("BpfsyncAgentDown", "c", ""), ("BpfsyncPeerDown", "a", "c"),
                              ("BpfsyncPeerDown", "b", "c")} <= set(r))
    # and no other, but the overflow's (its rate over 5 minutes is above 0)
    assert {name for name, _, _ in alerts} == {"BpfsyncAgentDown", "BpfsyncPeerDown"} | (
        {"BpfsyncRingOverflows"} if expected else set())
    print(f"answers changed {time.monotonic() - killed_at:.1f} s after the kill")
