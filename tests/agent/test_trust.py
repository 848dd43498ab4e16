"""Only the cluster's own nodes can change a map, and no peer can crash or exhaust another.

Real agents over real gRPC on loopback, real certificates made for each test's cluster, and a
rogue peer (rogue.py) built from the project's own codec. Each attack of the trust issue is here
as a regression test, against the behaviour it found: any node id was a peer, one record with a
logical clock of 2^64 - 1 stopped every agent, one frame numbered 10^12 silenced a real peer,
and every made-up id that said Hello got a send queue.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from rogue import Rogue, counter, hello, metrics, rss_mb, write

from bpfsync.core.hlc import MAX_LOGICAL
from bpfsync.core.messages import Answered
from bpfsync.demo.cluster import KEY, MAP_NAME, Cluster, Node, session, wait_for
from bpfsync.transport import codec
from bpfsync.transport.certs import issue_node, make_ca

BPFSYNC = [sys.executable, "-m", "bpfsync.cli.main"]


def _stats(node: Node) -> dict[str, int]:
    st = node.status()
    assert st is not None
    return {**st["replica"], **st["transport"]}


def _nobody_has(cluster: Cluster, key: int) -> bool:
    return all(KEY.pack(key) not in n.content() for n in cluster)


def test_with_tls_only_the_clusters_certified_members_get_in(tmp_path: Path) -> None:
    """No certificate, another CA's, a valid one for a non-member, a valid one claiming a
    member's id: each is refused before any state exists for it, and nothing it sends
    reaches a map."""
    with Cluster(tag="tls", tls=True) as cl:
        cl.start()
        assert cl.wait_ready(30)
        a = cl["a"]
        a.put(1, session(1))
        assert cl.wait_converged(30)
        # every member's streams are open before counting: a link still coming up would be
        # counted below as one the rogues opened
        assert cl.wait_linked(30)
        assert cl.pki is not None
        ca = cl.pki / "ca.pem"
        other = tmp_path / "other"
        make_ca(other)
        outsider = issue_node("b", other / "ca.pem", other / "ca.key", other, ips=("127.0.0.1",))
        mallory = cl.issue("mallory", tmp_path)
        opened = _stats(a)["streams_opened"]

        # no certificate, and a certificate of another CA: gRPC's TLS layer refuses the
        # handshake, so no stream is ever opened (there is no hook to count these)
        for rogue in (Rogue(a.address), Rogue(a.address, (other / "ca.pem", outsider)),
                      Rogue(a.address, (ca, outsider))):
            code, _ = rogue.send(hello("b"), write("b", 1, 9001, session(9)))
            assert code == grpc.StatusCode.UNAVAILABLE
        assert _stats(a)["streams_opened"] == opened

        # the cluster's CA, a non-member: refused at its Hello, counted
        code, details = Rogue(a.address, (ca, mallory)).send(
            hello("mallory"), write("mallory", 1, 9002, session(9)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not a member" in details
        # ... and claiming a member's id with its own certificate
        code, details = Rogue(a.address, (ca, mallory)).send(
            hello("b"), write("b", 1, 9003, session(9)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "certificate" in details

        assert wait_for(lambda: _stats(a)["rejected_not_member"] == 1, 10)
        assert _stats(a)["rejected_unauthenticated"] == 1
        st = a.status()
        assert st is not None and st["security"]["membership"] == "listed"
        assert sorted(p["node"] for p in st["peers"]) == ["b", "c"]  # no state for mallory
        assert "mallory" not in metrics(a)
        time.sleep(1)
        assert all(_nobody_has(cl, k) for k in (9001, 9002, 9003))
        # and the members still sync
        cl["c"].put(2, session(2))
        assert cl.wait_converged(30) and KEY.pack(2) in a.content()


def test_plaintext_on_an_address_other_hosts_reach_needs_insecure() -> None:
    with Cluster(("solo",), tag="insecure") as cl:
        node = cl["solo"]
        cmd = [*BPFSYNC, "run", "--node-id", "solo", "--listen", f"0.0.0.0:{node.port}", "--map",
               str(node.pin)]
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2
        err = " ".join(refused.stderr.split())
        assert "--insecure" in err and "tls" in err and f"0.0.0.0:{node.port}" in err
        node.start(["--listen", f"0.0.0.0:{node.port}", "--insecure"])
        assert wait_for(node.is_ready, 30), node.log()
        assert "TLS is off" in node.log()


def test_one_record_at_the_top_of_the_clock_range_stops_nobody() -> None:
    """The one-record crash: a stamp within the drift bound whose logical part is 2^64 - 1,
    sent once by a member, made every agent exit with struct.error."""
    with Cluster(tag="bomb", tls=True) as cl:
        cl.start(["--allow-node", "m"])
        assert cl.wait_ready(30)
        assert cl.pki is not None
        m = Rogue(cl["a"].address, (cl.pki / "ca.pem", cl.issue("m")))
        code, details = m.send(hello("m"), write("m", 1, 77, session(77), logical=2**64 - 1))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "logical" in details
        # the highest legal logical part is taken, and carries into the wall part from there
        code, _ = m.send(hello("m"), write("m", 1, 78, session(78), logical=MAX_LOGICAL))
        assert code is None  # the stream was fine
        assert cl.wait(lambda: all(KEY.pack(78) in n.content() for n in cl), 30)
        for i, node in enumerate(cl, start=100):  # every clock still stamps, every agent lives
            node.put(i, session(i))
        assert cl.wait_converged(30)
        assert all(KEY.pack(i) in cl["c"].content() for i in (100, 101, 102))
        assert all(n.running for n in cl) and KEY.pack(77) not in cl["b"].content()


def test_a_spoofed_sequence_number_cannot_silence_a_real_peer() -> None:
    """One frame claiming to be b with batch number 10^12 made a drop b's batches as resends:
    each of b's changes then waited for the digest repair (3.5 s). Plaintext on purpose: it
    lets anyone claim b's id, which TLS refuses (the test above); numbering per incarnation
    and the sequence window keep b's own stream flowing anyway."""
    with Cluster(("a", "b"), tag="seq") as cl:
        cl.start()
        assert cl.wait_ready(30) and cl.wait_linked(30)
        a, b = cl["a"], cl["b"]
        spoof = Rogue(a.address)
        runs = [hello("b"), write("b", 10**12, 500, session(500)),
                write("b", 10**12 + 10**6, 501, session(501))]  # then far beyond the window
        code, details = spoof.send(*runs)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "beyond the last" in details
        for i in range(5):
            key = 600 + i
            started = time.monotonic()
            b.put(key, session(key))
            assert wait_for(lambda k=key: KEY.pack(k) in a.content(), 10, every=0.01)
            took = time.monotonic() - started
            assert took < 1.0, f"b's write {i} took {took:.2f} s to reach a (repair, not stream)"
        assert b.running and a.running


def test_ten_thousand_made_up_identities_cost_nothing(tmp_path: Path) -> None:
    """Every node id that said Hello got a send queue fed with every local change: 2,000 fake
    Hellos and 4,000 writes took an agent from 102 to 396 MB. Now each is refused at its Hello
    and nothing is kept: the agent's RSS may grow by at most 40 MB (gRPC's own buffers)."""
    fakes = 10_000
    with Cluster(("a", "b"), tag="ids") as cl:
        cl.start()
        assert cl.wait_ready(30) and cl.wait_linked(30)
        a = cl["a"]
        before = rss_mb(a)
        rogue = Rogue(a.address)
        runs = [[hello(f"fake-{i}")] for i in range(fakes)]
        results = asyncio.run(rogue.streams(runs, linger=5, concurrency=64))
        for i in range(4000):  # local changes, which once went to every fake queue
            a.put(10_000 + i, session(i))
        assert all(code == grpc.StatusCode.PERMISSION_DENIED for code, _ in results)
        assert cl.wait_converged(60)
        grown = rss_mb(a) - before
        print(f"RSS of a: {before:.0f} MB before, grew {grown:.1f} MB with {fakes} fake ids")
        assert wait_for(lambda: _stats(a)["rejected_not_member"] >= fakes, 10)
        assert grown < 40, f"RSS grew {grown:.1f} MB"
        st = a.status()
        assert st is not None and [p["node"] for p in st["peers"]] == ["b"]
        assert "fake-" not in metrics(a)
        log = a.log()
        assert log.count("rejected a stream") < 20  # rate-limited, not 10,000 lines


def test_readiness_cannot_be_faked_by_an_unasked_answer(tmp_path: Path) -> None:
    """A catching-up node counted an Answered from anyone: with no peer linked, a rogue's
    Answered alone made it ready. Now only the answer to a digest it sent counts."""
    with Cluster(("a", "b"), tag="ready", tls=True) as cl:
        assert cl.pki is not None
        a = cl["a"]
        cfg = tmp_path / "a.yaml"
        cfg.write_text(yaml.safe_dump({"node_id": "a", "maps": [{"path": str(a.pin)}],
                                       "sync": {"catchup_timeout_s": 60}}))
        a.start(["--config", str(cfg), "--allow-node", "m"])  # b stays down: a waits
        assert wait_for(lambda: a.status() is not None, 30)
        m = Rogue(a.address, (cl.pki / "ca.pem", cl.issue("m")))
        answered = codec.encode(Answered(MAP_NAME, 0))
        code, _ = m.send(hello("m"), answered, answered, linger=1.0)
        assert code is None
        assert wait_for(lambda: counter(metrics(a), "bpfsync_rejected_total",
                                        reason="unsolicited_answered") >= 2, 10)
        assert not a.is_ready()
        cl["b"].start()  # a real peer answers a's digest: now a is ready
        assert wait_for(a.is_ready, 30)
        # and the answers to the routine digests that follow are taken, not refused
        before = counter(metrics(a), "bpfsync_rejected_total", reason="unsolicited_answered")
        time.sleep(5)  # two digest rounds
        b_page = metrics(cl["b"])
        assert counter(metrics(a), "bpfsync_rejected_total",
                       reason="unsolicited_answered") == before
        assert counter(b_page, "bpfsync_rejected_total", reason="unsolicited_answered") == 0


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_a_misbehaving_member_is_cut_off_and_the_rest_sync_on(tls: bool) -> None:
    """Input refused as a member's fault ends its streams (with TLS it is also refused for a
    while); the other members keep syncing."""
    with Cluster(tag="cut", tls=tls) as cl:
        cl.start(["--allow-node", "m"] if tls else [])
        assert cl.wait_ready(30) and cl.wait_linked(30)
        a = cl["a"]
        creds = (cl.pki / "ca.pem", cl.issue("m")) if cl.pki else None
        who = "m" if tls else "b"  # in plaintext, a rogue may claim a member's id
        rogue = Rogue(a.address, creds)
        frames = [hello(who), write(who, 5, 800, session(8)),
                  write(who, 5 + 10_000, 801, session(8))]  # far beyond the sequence window
        code, details = rogue.send(*frames)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "disconnected" in details
        assert wait_for(lambda: _stats(a)["disconnected"] >= 1, 10)
        if tls:
            code, details = rogue.send(hello("m"))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "backed off" in details
        cl["b"].put(3, session(3))
        cl["c"].put(4, session(4))
        assert cl.wait_converged(30) and KEY.pack(4) in a.content()
        assert all(n.running for n in cl)


def test_certificates_rotate_without_a_restart() -> None:
    """New files are taken on SIGHUP (or within seconds without it) and every link comes back
    with them; a broken set (a half-written certificate) is refused and the old one stays."""
    with Cluster(("a", "b"), tag="rotate", tls=True) as cl:
        cl.start()
        assert cl.wait_ready(30) and cl.wait_linked(30)
        a, b = cl["a"], cl["b"]
        assert a.tls is not None and a.proc is not None

        def fingerprint() -> str:
            st = a.status()
            assert st is not None
            return str(st["security"]["tls"]["fingerprint"])

        first = fingerprint()
        cert = a.tls[1].cert
        good = cert.read_bytes()
        cert.write_bytes(good[: len(good) // 2])  # half-written
        a.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: _stats(a)["tls_reload_failures"] >= 1, 10)
        assert fingerprint() == first
        b.put(1, session(1))
        assert cl.wait_converged(30)  # still syncing on the old set

        cl.issue("a")  # a new certificate and key for a, written over its files
        a.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: fingerprint() != first, 10)
        assert _stats(a)["tls_reloads"] == 1
        assert wait_for(lambda: cl.linked() and all(
            p["reconnects"] >= 1 for p in (a.status() or {}).get("peers", [])), 30)
        b.put(2, session(2))
        a.put(3, session(3))
        assert cl.wait_converged(30) and KEY.pack(2) in a.content()
        assert all(n.running for n in cl)
