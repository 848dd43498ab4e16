"""agent/persist.py on a real SQLite store: whatever point a process dies at, the store's
snapshots and log give back the replica's registers (core/replica.py P1, P2), and the log is
dropped as the snapshots take it in."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from pathlib import Path

from bpfsync.agent.metrics import AgentMetrics
from bpfsync.agent.persist import Persister
from bpfsync.agent.store import MapIdentity, MapShape, open_store
from bpfsync.core.messages import MapSchema, Record, Stamp
from bpfsync.core.replica import Replica

T = time.time_ns()
TTL = 3600 * 10**9
M = MapSchema("blocklist", 4, 8)
C = MapSchema("ratelimit", 4, 8, "counter")
SHAPES = [MapShape(s.name, s.key_size, s.value_size, s.policy) for s in (M, C)]


def replica() -> Replica:
    return Replica("a", (M, C), TTL, digest_buckets=64)


def reloaded(state_dir: Path) -> Replica:
    """What a restart would take in from the store as it is now (the writer still running)."""
    opened = open_store(state_dir, "a", SHAPES)
    fresh = replica()
    for name, stored in opened.maps.items():
        fresh.load(name, [(b, blob) for b, _, blob in stored.buckets],
                   [blob for _, blob in stored.log], nbuckets=stored.identity.nbuckets,
                   horizon=None, now_ns=time.time_ns())  # fmt: skip
    opened.store.close()
    return fresh


def _log_rows(state_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(state_dir / "bpfsync.db")) as conn:
        return int(conn.execute("SELECT count(*) FROM log").fetchone()[0])


def test_the_store_always_gives_back_the_registers(tmp_path: Path) -> None:
    rng = random.Random(7)
    r = replica()
    opened = open_store(tmp_path, "a", SHAPES)
    persister = Persister(opened.store, r, AgentMetrics())
    for schema in (M, C):
        persister.track(schema, MapIdentity(1, "boot", 64), None)
    persister.tick()  # stored whole
    for step in range(60):
        batch = []
        for _ in range(rng.randrange(1, 300)):
            key = rng.randrange(5000).to_bytes(4, "little")
            value = None if rng.random() < 0.1 else rng.randrange(1 << 40).to_bytes(8, "little")
            rec = r.local_change(M.name, key, value, T + step * 10**6)
            if rec is not None:
                batch.append(rec)
        peer = [Record(C.name, rng.randrange(50).to_bytes(4, "little"),
                       rng.randrange(1000).to_bytes(8, "little"), Stamp(T + step, 0, "b"))
                for _ in range(20)]  # fmt: skip
        res = r.receive(peer, T + step * 10**6, "b")
        persister.log(batch)
        persister.log(res.forward)
        if rng.random() < 0.5:
            persister.tick()
        if step % 10 == 9:  # a process dying here: the store as it is gives back the registers
            back = reloaded(tmp_path)
            for name in (M.name, C.name):
                assert sorted(back.records(name)) == sorted(r.records(name)), step
    assert _log_rows(tmp_path) > 0
    for _ in range(20):  # quiet: a few cycles of visits take the log into the snapshots
        persister.tick()
    assert _log_rows(tmp_path) == 0
    persister.flush()
    opened.store.close()
    back = reloaded(tmp_path)
    for name in (M.name, C.name):
        assert sorted(back.records(name)) == sorted(r.records(name))
        assert back.digest(name) == r.digest(name)
