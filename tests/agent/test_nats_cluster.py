"""Real agents syncing through real nats-server processes (transport: nats, natsbus.py): the
mesh's end-to-end behaviours over NATS, catch-up from JetStream alone, bad credentials and
records that non-members publish on the cluster's subjects."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from natslab import NatsCluster, NatsServer, UserPassword, Users
from test_cluster import _mixed_writes

from bpfsync.core.messages import Batch, Record, Stamp
from bpfsync.demo.cluster import KEY, Cluster, Node, free_port, session
from bpfsync.transport import codec

CONVERGE_S = 60.0


def _status(node: Node) -> dict[str, Any]:
    st = node.status()
    assert st is not None, f"agent {node.name} does not answer /status"
    return st


def _transport(node: Node) -> dict[str, int]:
    return dict(_status(node)["transport"])


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture
def bus_cluster(nats_server: NatsServer) -> Iterator[Cluster]:
    with Cluster(tag="nats", nats=[nats_server.url]) as c:
        yield c
        for n in c:
            print(f"--- agent log of node {n.name} (last 3000 chars) ---")
            print(n.log()[-3000:])


def _start_with_config(node: Node, text: str, where: Path) -> None:
    """Start ``node``'s agent with its flags and a config file (in ``where``) holding
    ``text`` too."""
    cfg = where / f"{node.name}-nats.yaml"
    cfg.write_text(f"node_id: {node.name}\nmaps:\n  - path: {node.pin}\n{text}")
    node.start(["--config", str(cfg)])


def test_random_writes_on_three_nodes_converge_over_nats(bus_cluster: Cluster) -> None:
    bus_cluster.start()
    assert bus_cluster.wait_ready(30), "agents did not report ready"
    _mixed_writes(bus_cluster, 5_000, 2_000, seed=7)
    assert bus_cluster.wait_converged(CONVERGE_S), "maps differ after the bound"
    a = bus_cluster["a"]
    assert 0 < len(a.content()) < 2_000
    st = _status(a)
    assert st["stream"]["connected"] is True
    # published once, whatever the number of peers: a's batches went to the stream, and no
    # batch of changes went to b or c directly
    assert _transport(a)["published"] > 0
    assert all(p["unacked_batches"] == 0 for p in st["peers"])
    shown = subprocess.run(
        [sys.executable, "-m", "bpfsync.cli.main", "status", "--http",
         f"127.0.0.1:{a.http_port}"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert "NATS nats://" in shown.stdout and "connected to" in shown.stdout, shown.stdout


def test_concurrent_writes_of_one_key_settle_over_nats(bus_cluster: Cluster) -> None:
    bus_cluster.start()
    assert bus_cluster.wait_ready(30)
    for round_ in range(20):
        bus_cluster["a"].put(7, session(1000 + round_))
        bus_cluster["b"].put(7, session(2000 + round_))
    assert bus_cluster.wait_converged(CONVERGE_S)
    assert bus_cluster["c"].content()[KEY.pack(7)] in (session(1019), session(2019))


def test_a_killed_node_catches_up_from_the_stream_before_ready(bus_cluster: Cluster) -> None:
    bus_cluster.start()
    assert bus_cluster.wait_ready(30)
    for k in range(1000):
        bus_cluster["a"].put(k, session(k))
    assert bus_cluster.wait_converged(CONVERGE_S)
    c = bus_cluster["c"]
    c.stop(signal.SIGKILL)
    for k in range(1000, 1500):
        bus_cluster["a"].put(k, session(k))
        bus_cluster["b"].put(k - 1000, session(k + 7))
    c.start()
    _wait(c.is_ready, 30, "c ready again")
    # what was written while it was down is there the moment it reports ready
    content = c.content()
    assert all(content.get(KEY.pack(k)) == session(k) for k in range(1000, 1500))
    assert bus_cluster.wait_converged(CONVERGE_S)


def test_a_new_node_catches_up_from_jetstream_while_every_other_agent_is_stopped(
    nats_server: NatsServer, tmp_path: Path,
) -> None:
    """The stream keeps 4 s of changes here, so after a while it holds nothing of the first
    writes: the new node has the snapshots alone for them, the stream for the last ones (it
    reads the snapshots before it makes its consumer: the stream must still hold them then)."""
    settings = (f"transport: nats\nallowed_nodes: [a, b, c]\nnats:\n"
                f"  servers: [{nats_server.url}]\n  stream_max_age_s: 4\n"
                f"  snapshot_interval_s: 0.5\n")  # fmt: skip
    with Cluster(tag="natsalone", nats=[nats_server.url]) as c:
        a, b, new = c["a"], c["b"], c["c"]
        for node in (a, b):
            _start_with_config(node, settings, tmp_path)
        _wait(lambda: a.is_ready() and b.is_ready(), 30, "a and b ready")
        for k in range(2000):
            (a if k % 2 else b).put(k, session(k))
        _wait(lambda: a.content() == b.content() and len(a.content()) == 2000, CONVERGE_S,
              "a and b converged")
        time.sleep(5.5)  # the stream forgets those writes; the snapshots were stored by now
        for k in range(2000, 2100):
            a.put(k, session(k))
        _wait(lambda: len(b.content()) == 2100, CONVERGE_S, "b has the last writes")
        want = a.content()
        a.stop()
        b.stop()
        _start_with_config(new, settings, tmp_path)
        _wait(new.is_ready, 30, "the new node ready")
        assert new.content() == want
        st = _transport(new)
        assert st.get("snapshots_read", 0) > 0
        log = new.log()
        assert '"why": "caught up with stream"' in log


def test_wrong_nats_credentials_are_a_clear_start_up_error(tmp_path: Path) -> None:
    server = NatsServer(auth=UserPassword("bpfsync", "right"))
    with server, Cluster(("a",), tag="natsauth", nats=[server.url]) as c:
        a = c["a"]
        cfg = tmp_path / "a.yaml"
        cfg.write_text(
            f"node_id: a\nmaps:\n  - path: {a.pin}\ntransport: nats\n"
            f"allowed_nodes: [a, b]\nnats:\n  servers: [{server.url}]\n"
            f"  user: bpfsync\n  password: wrong\n")  # fmt: skip
        started = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "bpfsync.cli.main", "run", "--config", str(cfg),
             "--no-state"], capture_output=True, text=True, timeout=60)  # fmt: skip
        took = time.monotonic() - started
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "cannot connect to the NATS servers" in out and "Authorization Violation" in out, out
    assert "Traceback" not in out, out
    assert took < 30, took  # the first refusal ends the start; no retry loop


def test_an_agent_waits_for_jetstream_and_a_stop_meanwhile_ends_it_cleanly(
    tmp_path: Path,
) -> None:
    """A server without JetStream (or a cluster still electing its leaders) does not answer
    the stream's creation: the agent says so, stays up and not ready, asks again, and is
    ready once JetStream answers; a SIGTERM while it waits stops it at once."""
    port = free_port()
    plain = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Cluster(("a",), tag="natsjs", nats=[f"nats://127.0.0.1:{port}"]) as c:
            a = c["a"]
            text = "allowed_nodes: [a, b]\n"  # the flags name the server
            time.sleep(0.5)  # the plain server listening
            _start_with_config(a, text, tmp_path)
            _wait(lambda: "JetStream does not answer" in a.log(), 30, "a says it waits")
            assert a.running and not a.is_ready()
            stopping = time.monotonic()
            assert a.stop() == 0, a.log()
            assert time.monotonic() - stopping < 5
            assert "Traceback" not in a.log() and "agent stopped" in a.log(), a.log()
            # again, and JetStream comes while it waits
            _start_with_config(a, text, tmp_path)
            _wait(lambda: a.log().count("JetStream does not answer") >= 2, 30, "a waits again")
            plain.terminate()
            plain.wait(10)
            with NatsServer(port=port):
                assert c.wait_ready(30), a.log()
    finally:
        plain.kill()
        plain.wait(10)


def test_records_a_non_member_publishes_on_the_stream_are_refused_and_counted(
    bus_cluster: Cluster, nats_server: NatsServer,
) -> None:
    bus_cluster.start()
    assert bus_cluster.wait_ready(30)
    a, b = bus_cluster["a"], bus_cluster["b"]
    a.put(1, session(1))
    assert bus_cluster.wait_converged(CONVERGE_S)
    prefix = a.nats[1] if a.nats else ""
    now = time.time_ns() + 10**9

    def rec(key: int, node: str) -> Record:
        return Record("sessions", KEY.pack(key), session(666), Stamp(now, 0, node))

    frames = [
        # a non-member, on its own subject
        (f"{prefix}.changes.mallory", Batch("mallory", 0, (rec(1, "mallory"),))),
        # a member's batch on another member's subject (a spoofed sender)
        (f"{prefix}.changes.c", Batch("a", 0, (rec(2, "a"),))),
        # a member's subject and id, carrying a record whose origin is no member
        (f"{prefix}.changes.a", Batch("a", 0, (rec(3, "mallory"),))),
    ]

    async def publish() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        for subject, batch in frames:
            await js.publish(subject, codec.encode(batch))
        await nc.close()

    asyncio.run(publish())
    _wait(lambda: _transport(b).get("rejected_not_member", 0) >= 1
          and _transport(b).get("rejected_spoofed", 0) >= 1, 20, "b counted the refusals")
    time.sleep(1.0)
    for node in bus_cluster:
        content = node.content()
        assert content[KEY.pack(1)] == session(1), node.name
        assert KEY.pack(2) not in content and KEY.pack(3) not in content, node.name
    replica = _status(b)["replica"]
    assert replica.get("rejected.not_member", 0) >= 1, json.dumps(replica)


def test_ten_agents_on_a_three_server_nats_cluster_lose_nothing(
    nats_cluster: NatsCluster, tmp_path: Path,
) -> None:
    """One server killed while the agents write, then every server stopped and started
    again: the agents keep their maps meanwhile, say so, and converge on every write."""
    names = tuple("abcdefghij")
    settings_nodes: Sequence[str] = list(nats_cluster.urls)
    with Cluster(names, tag="nats10", nats=settings_nodes) as c:
        text = (f"transport: nats\nallowed_nodes: [{', '.join(names)}]\nnats:\n"
                f"  servers: [{', '.join(settings_nodes)}]\n  replicas: 3\n")  # fmt: skip
        for node in c:
            _start_with_config(node, text, tmp_path)
        ready = c.wait_ready(90)
        assert ready, "\n".join(f"--- {n.name}\n{n.log()[-2000:]}" for n in c if not n.is_ready())
        rng = random.Random(3)
        nodes = list(c)
        written: dict[int, bytes] = {}
        for i in range(3000):
            if i == 1000:
                nats_cluster.kill(0)
            key = rng.randrange(1500)
            written[key] = session(i)
            # each key on one node: then the last value written is the one every node ends
            # with (two nodes writing a key within a millisecond would stamp in either order)
            nodes[key % len(nodes)].put(key, written[key])
            if i % 100 == 0:
                time.sleep(0.05)  # bounded in time: ~1.5 s of writes in all
        nats_cluster.start(0)
        assert c.wait_converged(CONVERGE_S), "maps differ after a server was killed"
        want = {KEY.pack(k): v for k, v in written.items()}
        assert c["a"].content() == want, "a write was lost"
        for i in range(len(nats_cluster)):
            nats_cluster.stop(i)
        def away(n: Node) -> bool:
            st = n.status()  # None while a busy agent answers late: asked again
            return st is not None and st["stream"]["connected"] is False

        _wait(lambda: all(away(n) for n in nodes), 30, "every agent says NATS is away")
        for k in range(2000, 2100):
            c["b"].put(k, session(k))  # written while no server runs
        assert all(n.content() == want for n in nodes if n.name != "b")  # they keep their maps
        nats_cluster.start_all(current=False)  # the agents bring their consumers current
        assert c.wait_converged(CONVERGE_S), "maps differ after NATS came back"
        assert KEY.pack(2099) in c["j"].content()


def test_a_restarted_node_reads_only_what_it_missed_from_the_stream(
    bus_cluster: Cluster,
) -> None:
    """A restarted node with its state resumes its durable consumer: it reads only what it
    missed, not the whole stream again."""
    bus_cluster.start()
    assert bus_cluster.wait_ready(30)
    a, c = bus_cluster["a"], bus_cluster["c"]
    for k in range(500):
        a.put(k, session(k))
    assert bus_cluster.wait_converged(CONVERGE_S)
    c.stop()
    a.put(900, session(900))
    c.start()
    _wait(c.is_ready, 30, "c ready")
    assert c.content().get(KEY.pack(900)) == session(900)
    assert _transport(c).get("streamed", 0) <= 3, _transport(c)


def test_what_the_stream_no_longer_holds_is_repaired_by_a_peer_before_ready(
    nats_server: NatsServer, tmp_path: Path,
) -> None:
    """c is away longer than the stream's retention (1 s) and no snapshot is stored
    meanwhile: a peer's digest answer brings it what it missed before it reports ready."""
    settings = (f"transport: nats\nallowed_nodes: [a, b, c]\nnats:\n"
                f"  servers: [{nats_server.url}]\n  stream_max_age_s: 1\n"
                f"  snapshot_interval_s: 3600\n")  # fmt: skip
    with Cluster(tag="natsgap", nats=[nats_server.url]) as c:
        for node in c:
            _start_with_config(node, settings, tmp_path)
        assert c.wait_ready(30)
        a, late = c["a"], c["c"]
        late.stop()
        for k in range(300):
            a.put(k, session(k))
        _wait(lambda: len(c["b"].content()) == 300, CONVERGE_S, "b has a's writes")
        time.sleep(2.5)  # the stream forgot them
        _start_with_config(late, settings, tmp_path)
        _wait(late.is_ready, 30, "c ready")
        assert len(late.content()) == 300, "c reported ready without what it missed"
        assert _transport(late).get("streamed", 0) == 0  # it came from the peer, not the stream


def _nats_users(prefix: str, nodes: Sequence[str]) -> tuple[str, dict[str, str]]:
    """``bpfsync nats-users``'s block for ``nodes``, and each node's password in it."""
    res = subprocess.run(
        [sys.executable, "-m", "bpfsync.cli.main", "nats-users", *nodes, "--cluster", prefix],
        capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    passwords = dict(re.findall(r'\{user: "([^"]+)", password: "([^"]+)"', res.stdout))
    assert sorted(passwords) == sorted(nodes), res.stdout
    return res.stdout, passwords


def test_nodes_with_their_own_nats_users_sync_and_cannot_speak_for_each_other(
    tmp_path: Path,
) -> None:
    """Each node logs in as the user ``bpfsync nats-users`` made for it. Those permissions
    carry everything an agent does (the stream, its consumer, Hellos, digests, snapshots
    and a fresh node's catch-up from them); a's user cannot publish b's changes or Hellos,
    read b's messages, or read through b's consumer: the servers refuse each one."""
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    with Cluster(tag="natsusers", nats=[url]) as c:
        a, b, late = c["a"], c["b"], c["c"]
        prefix = a.nats[1] if a.nats else ""
        block, passwords = _nats_users(prefix, ["a", "b", "c"])
        with NatsServer(auth=Users(block), port=port):  # started by entering
            def start(node: Node) -> None:
                _start_with_config(node, (
                    f"transport: nats\nallowed_nodes: [a, b, c]\nnats:\n  servers: [{url}]\n"
                    f"  user: {node.name}\n  password: {passwords[node.name]}\n"
                    f"  snapshot_interval_s: 0.5\n"), tmp_path)  # fmt: skip

            for node in (a, b):
                start(node)
            _wait(lambda: a.is_ready() and b.is_ready(), 30, "a and b ready")
            for k in range(200):
                (a if k % 2 else b).put(k, session(k))
            _wait(lambda: len(a.content()) == len(b.content()) == 200, CONVERGE_S,
                  "a and b converged")
            _wait(lambda: _transport(a).get("snapshots_stored", 0)
                  + _transport(b).get("snapshots_stored", 0) > 0, 20, "snapshots stored")
            start(late)  # a node without state: it reads the snapshots first
            _wait(late.is_ready, 30, "c ready")
            _wait(lambda: late.content() == a.content(), CONVERGE_S, "c caught up")
            assert _transport(late).get("snapshots_read", 0) > 0, _transport(late)
            for node in c:  # the agents asked for nothing their users may not do
                assert "permission_denied" not in _transport(node), node.log()[-3000:]

            hex_b = b"b".hex()
            attempts = [
                ("publish", f"{prefix}.changes.b",
                 codec.encode(Batch("b", 0, (Record("sessions", KEY.pack(9001), session(1),
                                                    Stamp(time.time_ns(), 0, "b")),)))),
                ("publish", f"{prefix}.hello.b", b"x"),
                ("publish", f"{prefix}.to.{b'c'.hex()}.{hex_b}", b"x"),
                ("publish", f"$JS.API.CONSUMER.MSG.NEXT.{prefix}-changes.n{hex_b}", b"1"),
                ("publish", f"$JS.API.STREAM.DELETE.{prefix}-changes", b""),
                ("subscribe", f"{prefix}.to.{hex_b}.*", b""),
            ]

            async def as_a() -> list[str]:
                errors: list[str] = []

                async def on_error(e: Exception) -> None:
                    errors.append(str(e))

                nc = await nats.connect(url, user="a", password=passwords["a"],
                                        error_cb=on_error, allow_reconnect=False)
                for kind, subject, data in attempts:
                    if kind == "publish":
                        await nc.publish(subject, data)
                    else:
                        await nc.subscribe(subject)
                    await nc.flush()
                await asyncio.sleep(0.5)
                await nc.close()
                return errors

            errors = asyncio.run(as_a())
            for kind, subject, _ in attempts:
                said = f"{'subscription' if kind == 'subscribe' else kind} to \"{subject}\""
                assert any(said.lower() in e.lower() for e in errors), (subject, errors)
            time.sleep(1.0)
            for node in c:
                assert KEY.pack(9001) not in node.content(), node.name
                assert node.is_ready(), node.name
            _wait(lambda: a.content() == b.content() == late.content(), CONVERGE_S,
                  "still converged")
