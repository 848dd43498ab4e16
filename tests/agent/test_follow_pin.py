"""Real agents follow their maps' pins (agent/daemon.py, core/replica.py S5-S6,
agent/readiness.py Y5-Y6): a data plane that restarts recreates its map at the same pin, a new
map object, usually empty; one that is not up yet has pinned nothing. Over real gRPC on
loopback, with real maps."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bpfsync.demo.cluster import KEY, Cluster, Node, session

CONVERGE_S = 60.0
BPFSYNC = [sys.executable, "-m", "bpfsync.cli.main"]


def _row(node: Node) -> dict[str, Any]:
    """The node's row of its one map in /status ({} if it does not answer within 10 s: a
    loaded host may take the 2 s of one request)."""
    st = node.status()
    deadline = time.monotonic() + 10
    while st is None and time.monotonic() < deadline:
        time.sleep(0.1)
        st = node.status()
    return st["maps"][0] if st else {}


def _present(node: Node) -> float | None:
    url = f"http://127.0.0.1:{node.http_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith('bpfsync_map_present{map="sessions"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def _status_cli(node: Node) -> str:
    env = {**os.environ, "COLUMNS": "250"}  # one line per row
    return subprocess.run([*BPFSYNC, "status", "--http", f"127.0.0.1:{node.http_port}"],
                          capture_output=True, text=True, check=True, env=env).stdout


def _map_line(out: str) -> str:
    return next(line for line in out.splitlines() if "sessions" in line and "│" in line)


def test_a_map_recreated_at_its_pin_is_refilled_and_synced_again() -> None:
    """b's data plane restarts while its agent runs: its map is recreated empty at the pin and
    gets a key before the agent notices. Within seconds b's map holds the cluster's content and
    that key, the other nodes lose nothing and get the key, writes flow both ways again, status
    shows the new map id, and b's state store follows the new object (a restart of b resumes
    on it without seeding anything)."""
    with Cluster(tag="follow") as cl:
        a, b, c = cl["a"], cl["b"], cl["c"]
        cl.start()
        assert cl.wait_ready(30)
        for k in range(300):
            a.put(k, session(k))
        assert cl.wait_converged(CONVERGE_S)
        held = a.content()
        old_id = b.map.info.id
        assert _row(b)["id"] == old_id and str(old_id) in _map_line(_status_cli(b))

        started = time.monotonic()
        b.recreate_map()
        b.put(900, session(900))  # the data plane's, before the agent looks at the pin again
        new_id = b.map.info.id
        assert new_id != old_id and len(b.content()) == 1
        want = {**held, KEY.pack(900): session(900)}
        shrunk = []

        def refilled() -> bool:
            shrunk.extend(n.name for n in (a, c) if len(n.content()) < len(held))
            return b.content() == want

        assert cl.wait(refilled, CONVERGE_S, every=0.05), (len(b.content()), b.log()[-3000:])
        seconds = time.monotonic() - started
        assert not shrunk, shrunk  # no node ever took the empty map for deletes
        assert cl.wait(lambda: all(n.content() == want for n in cl), CONVERGE_S)
        print(f"recreated -> refilled in {seconds:.2f} s")
        assert seconds < 5, seconds
        log = b.log()
        assert "a new map object is pinned at" in log and "took in the new map object" in log

        assert cl.wait(lambda: _row(b).get("id") == new_id and b.is_ready(), 10), _row(b)
        row = _row(b)
        assert row["present"] and row["ready"] and row["problem"] is None, row
        line = _map_line(_status_cli(b))
        assert str(new_id) in line and "ready" in line, line
        assert _present(b) == 1

        b.put(901, session(901))  # a write into the new map reaches the others
        a.put(902, session(902))  # ... and theirs reach it
        want |= {KEY.pack(901): session(901), KEY.pack(902): session(902)}
        assert cl.wait(lambda: all(n.content() == want for n in cl), CONVERGE_S), [
            len(n.content()) for n in cl]

        b.stop()  # its store holds the new object: the restart compares digests only
        b.start()
        assert cl.wait(b.is_ready, 30), b.log()[-3000:]
        st = b.status()
        assert st is not None
        assert st["replica"].get("local.seeded", 0) == 0, st["replica"]
        assert st["replica"].get("received.applied", 0) == 0, st["replica"]
        assert b.content() == want


def test_an_agent_started_before_its_map_is_pinned_syncs_it_once_it_is() -> None:
    """b's agent starts before b's data plane pinned its map: it runs and is ready (a missing
    map holds no readiness), says the map is missing, drops the peers' records of it, and once
    the map is pinned (and written to before the agent looks), the map gets the cluster's
    content and its key reaches the others; writes flow both ways."""
    with Cluster(tag="late") as cl:
        a, b, c = cl["a"], cl["b"], cl["c"]
        b.remove_map()
        cl.start()
        assert cl.wait_ready(30), b.log()[-3000:]
        row = _row(b)
        assert row["present"] is False and row["id"] is None and not row["ready"], row
        assert "missing" in _map_line(_status_cli(b))
        assert _present(b) == 0
        assert "nothing is pinned at" in b.log()
        for k in range(200):
            a.put(k, session(k))
        assert cl.wait(lambda: len(c.content()) == 200, CONVERGE_S)
        assert cl.wait(lambda: _row(b).get("records_while_missing", 0) > 0, 10), _row(b)
        assert b.running

        b.load_map()
        b.put(500, session(500))
        want = {**a.content(), KEY.pack(500): session(500)}
        assert cl.wait(lambda: all(n.content() == want for n in cl), CONVERGE_S), [
            len(n.content()) for n in cl]
        assert cl.wait(lambda: _row(b).get("id") == b.map.info.id and b.is_ready(), 10)
        assert _row(b)["present"] and _present(b) == 1
        assert str(b.map.info.id) in _map_line(_status_cli(b))

        b.put(501, session(501))
        c.put(502, session(502))
        want |= {KEY.pack(501): session(501), KEY.pack(502): session(502)}
        assert cl.wait(lambda: all(n.content() == want for n in cl), CONVERGE_S)


def test_a_pin_emptied_while_running_is_reported_and_the_next_map_is_taken_in() -> None:
    """b's data plane unpins its map and goes away while b's agent runs: the agent says the
    pin is empty and keeps running (and ready); the map pinned there next is filled."""
    with Cluster(("a", "b"), tag="unpin") as cl:
        a, b = cl["a"], cl["b"]
        cl.start()
        assert cl.wait_ready(30)
        for k in range(100):
            a.put(k, session(k))
        assert cl.wait_converged(CONVERGE_S)
        old_id = b.map.info.id
        b.remove_map()
        assert cl.wait(lambda: _row(b).get("present") is False, 10), _row(b)
        assert _row(b)["id"] == old_id and b.is_ready() and _present(b) == 0
        assert "missing (syncing" in _map_line(_status_cli(b))
        a.put(100, session(100))  # synced into the object b's agent still has open
        time.sleep(1)
        assert b.running
        b.load_map()
        assert cl.wait(lambda: len(b.content()) == 101, CONVERGE_S), b.log()[-3000:]
        assert cl.wait(lambda: _row(b).get("present") is True and b.is_ready(), 10)


def test_a_lone_node_with_restore_writes_its_registers_into_the_new_map(tmp_path: Path) -> None:
    """S6 while running: a node without peers, whose map asks for restore: on_empty, finds a
    new, empty map at its pin and writes what it holds into it; without restore, the new map
    stays as empty as its (absent) peers leave it (S5)."""
    with Cluster(("solo",), tag="solo") as cl:
        node = cl["solo"]
        cfg = tmp_path / "solo.yaml"
        cfg.write_text(f"node_id: solo\nmaps: [{{path: {node.pin}, restore: on_empty}}]\n"
                       "sync: {catchup_timeout_s: 1}\n")  # fmt: skip
        node.start(["--config", str(cfg)])
        assert cl.wait_ready(30)
        for k in range(50):
            node.put(k, session(k))
        time.sleep(1)  # the agent has taken the writes
        held = node.content()
        node.recreate_map()
        assert cl.wait(lambda: node.content() == held, 20), node.log()[-3000:]
        assert "restored" in node.log()
        node.stop()
        node.start(["--no-state"])  # restore: never (the default)
        assert cl.wait_ready(30)
        node.recreate_map()
        assert cl.wait(lambda: "took in the new map object" in node.log().split("agent started")
                       [-1], 20)  # fmt: skip
        assert node.content() == {}
