"""A restart loses nothing: real agents keep their replica state in state.dir (agent/store.py,
agent/persist.py; rules P1, S4-S6 and H1 in core/replica.py), over real gRPC on loopback."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from bpfsync.demo.cluster import KEY, RANGE_MAX, VALUE, Cluster, Node, session

CONVERGE_S = 60.0


def _key(i: int) -> bytes:
    return KEY.pack(i)


def _synced(cl: Cluster, writer: Node, keys: int) -> None:
    """Every agent started and ready, and keys 0..``keys`` - 1 written on ``writer`` and
    synced everywhere."""
    cl.start()
    assert cl.wait_ready(30)
    for k in range(keys):
        writer.put(k, session(k))
    assert cl.wait_converged(CONVERGE_S)


def _everywhere(cl: Cluster, want: dict[bytes, bytes | None]) -> bool:
    """Every node's map holds ``want``'s values (None: the key is absent)."""
    for node in cl:
        content = node.content()
        if any(content.get(key) != value for key, value in want.items()):
            return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_what_the_data_plane_changed_while_the_agent_was_down_wins(sig: int) -> None:
    """The issue's scenario: a key synced everywhere; b's agent stops; b's map gets an update
    of that key, a new key and a delete; b's agent starts again: every node ends with b's
    values, and keys nobody touched keep their values."""
    with Cluster(tag="down") as cl:
        a, b = cl["a"], cl["b"]
        _synced(cl, a, 50)
        b.stop(sig)
        b.put(1, session(1001))  # updated while down
        b.put(900, session(900))  # created while down
        b.delete(2)  # deleted while down
        b.start()
        assert cl.wait(b.is_ready, 30), b.log()[-3000:]
        want: dict[bytes, bytes | None] = {_key(1): session(1001), _key(900): session(900),
                                           _key(2): None, _key(3): session(3)}  # fmt: skip
        assert cl.wait(lambda: _everywhere(cl, want), CONVERGE_S), [n.content().get(_key(1))
                                                                    for n in cl]  # fmt: skip
        assert cl.wait_converged(CONVERGE_S)
        assert len(a.content()) == 50
        assert "took the changes made while the agent was down" in b.log()


def test_sigkill_during_a_flood_loses_no_write() -> None:
    """b's BPF program writes ~50k entries/s over 5000 keys; b's agent is killed, the flood
    goes on while it is down, and on half of the keys while it starts again: every key ends,
    on every node, with the last value written (the other half's were written while down)."""
    with Cluster(tag="flood") as cl:
        b = cl["b"]
        cl.start()
        assert cl.wait_ready(30)
        keys, base, rate = 5000, 1, 50_000
        last: dict[bytes, bytes] = {}
        started = time.monotonic()
        killed = restarted = False
        runs = 0
        while (elapsed := time.monotonic() - started) < 4.0 and runs < 4000:  # bounded
            modulus = keys // 2 if restarted else keys
            first = (runs * RANGE_MAX) % modulus
            b.bpf_put_range(first, RANGE_MAX, modulus, base)
            for i in range(RANGE_MAX):
                last[_key((first + i) % modulus)] = VALUE.pack(base + i, 0, 0, 0, 0)
            base += RANGE_MAX
            runs += 1
            if not killed and elapsed > 1.0:
                b.stop(signal.SIGKILL)
                killed = True
            if killed and not restarted and elapsed > 2.5:
                b.start()
                restarted = True
            time.sleep(max(0.0, runs * RANGE_MAX / rate - (time.monotonic() - started)))
        assert killed and restarted and runs * RANGE_MAX >= 100_000 and len(last) == keys
        assert cl.wait(b.is_ready, 30), b.log()[-3000:]
        assert cl.wait(lambda: all(n.content() == last for n in cl), CONVERGE_S), {
            n.name: sum(n.content().get(k) != v for k, v in last.items()) for n in cl}


def test_a_cluster_whose_every_map_was_lost_restores_only_where_asked(tmp_path: Path) -> None:
    """Every agent killed, every map recreated empty (a power loss of all nodes): with
    restore: on_empty the maps come back to the last synced state; without, they stay empty
    (a map emptied on purpose)."""
    with Cluster(tag="power") as cl:
        for node in cl:
            cfg = tmp_path / f"{node.name}.yaml"
            cfg.write_text(f"node_id: {node.name}\n"
                           f"maps: [{{path: {node.pin}, restore: on_empty}}]\n"
                           "sync: {catchup_timeout_s: 2}\n")  # fmt: skip
            node.start(["--config", str(cfg)])
        assert cl.wait_ready(30)
        for k in range(300):
            cl["a"].put(k, session(k))
            cl["c"].put(1000 + k, session(k))
        assert cl.wait(lambda: len(cl["b"].content()) == 600, CONVERGE_S)
        cl["b"].delete(5)
        assert cl.wait(lambda: all(len(n.content()) == 599 for n in cl), CONVERGE_S)
        held = cl["a"].content()
        assert len(held) == 599
        time.sleep(1.5)  # one fsync interval: what a power loss may lose is on disk
        for node in cl:
            node.stop(signal.SIGKILL)
            node.recreate_map()
        for node in cl:
            node.start(["--config", str(tmp_path / f"{node.name}.yaml")])
        assert cl.wait_ready(30)
        assert cl.wait(lambda: all(n.content() == held for n in cl), CONVERGE_S)
        assert "restored" in cl["a"].log()
        for node in cl:  # again, without restore: the empty maps stay empty
            node.stop(signal.SIGKILL)
            node.recreate_map()
        cl.start()
        assert cl.wait_ready(30)
        time.sleep(2)
        assert all(n.content() == {} for n in cl)


def _damage(path: Path, how: str, other: Path) -> None:
    db = path / "bpfsync.db"
    if how == "random bytes":
        db.write_bytes(bytes(range(256)) * 64)
    elif how == "truncated":
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 2])
    elif how == "another node's":
        db.write_bytes((other / "bpfsync.db").read_bytes())
    else:
        with sqlite3.connect(db) as conn:
            if how == "another format":
                conn.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
            elif how == "sizes changed":
                conn.execute("UPDATE maps SET value_size = value_size + 8")
            elif how == "damaged blob":  # one bit of one bucket's registers
                bucket, blob = conn.execute("SELECT bucket, blob FROM buckets WHERE"
                                            " length(blob) > 64 LIMIT 1").fetchone()  # fmt: skip
                blob = blob[:40] + bytes([blob[40] ^ 1]) + blob[41:]
                conn.execute("UPDATE buckets SET blob = ? WHERE bucket = ?", (blob, bucket))
        conn.close()
    for extra in ("bpfsync.db-wal", "bpfsync.db-shm"):
        if how in ("random bytes", "truncated", "another node's"):
            (path / extra).unlink(missing_ok=True)


BAD = ["random bytes", "truncated", "another node's", "another format", "sizes changed",
       "damaged blob"]  # fmt: skip


def test_each_bad_state_file_is_set_aside_and_the_agent_starts_as_without_one() -> None:
    """Corrupt, truncated, another node's, another format version, a map's sizes changed, a
    damaged bucket: one clear log line, the file renamed (not deleted), the agent ready and
    syncing; never a crash loop."""
    with Cluster(("a", "b"), tag="bad") as cl:
        a, b = cl["a"], cl["b"]
        _synced(cl, a, 3000)
        for n, how in enumerate(BAD):
            b.stop()
            _damage(b.state_dir, how, a.state_dir)
            before = {p.name for p in b.state_dir.iterdir()}
            b.start()
            assert cl.wait(b.is_ready, 30), (how, b.log()[-3000:])
            aside = {p.name for p in b.state_dir.iterdir()} - before
            assert any(name.startswith("bpfsync.db.bad-") for name in aside), (how, aside)
            assert "set aside" in b.log().split("agent started")[-2], how
            a.put(10_000 + n, session(n))
            assert cl.wait_converged(CONVERGE_S), how
            assert len(b.content()) == 3001 + n



def test_a_restart_on_an_unchanged_map_exchanges_digests_only() -> None:
    """Cheap restarts: b restarts on its unchanged map and is ready without a record sent
    either way (before, it sent every entry with a seed stamp, which lost everywhere, and was
    sent every record again)."""
    with Cluster(tag="cheap") as cl:
        a, b = cl["a"], cl["b"]
        _synced(cl, a, 3000)

        def received() -> int:
            st = a.status()
            assert st is not None
            return sum(v for k, v in st["replica"].items() if k.startswith("received."))

        for sig in (signal.SIGTERM, signal.SIGKILL):
            before = received()
            b.stop(sig)
            b.start()
            assert cl.wait(b.is_ready, 30), b.log()[-3000:]
            st = b.status()
            assert st is not None
            assert st["replica"].get("local.seeded", 0) == 0
            assert st["replica"].get("received.applied", 0) == 0, st["replica"]
            time.sleep(1)  # what b would send after ready
            assert received() == before, (sig, received() - before)


def test_a_full_disk_is_counted_and_syncing_goes_on(tmp_path: Path) -> None:
    """b's state.dir is a 512 KiB tmpfs: its writes fail once it is full; the failures are
    counted, the agent keeps syncing, and it stores its map whole again once there is room."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)], check=True)
    try:
        with Cluster(("a", "b"), tag="full") as cl:
            a, b = cl["a"], cl["b"]
            a.start()
            b.start(["--state-dir", str(small / "state")])
            assert cl.wait_ready(30)
            for k in range(20_000):
                a.put(k, session(k))
            assert cl.wait_converged(CONVERGE_S)
            assert cl.wait(lambda: _disk_full(b) > 0, 30), b.log()[-3000:]
            a.put(50_000, session(1))
            assert cl.wait_converged(CONVERGE_S)
            assert b.running
            subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)

            def stored_whole() -> bool:
                st = b.status()
                return st is not None and st["state"]["stored_whole"] == ["sessions"]

            assert cl.wait(stored_whole, 30), b.status()
            failed = _disk_full(b)
            a.put(50_001, session(2))
            assert cl.wait_converged(CONVERGE_S)
            time.sleep(1)
            assert _disk_full(b) == failed
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _disk_full(node: Node) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics").read().decode()
    metric = 'bpfsync_state_write_failures_total{reason="disk_full"}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(metric))  # fmt: skip
