"""What an agent shows of itself: the /status document and /slots/MAP (http.py serves them; the
`bpfsync status` and `dump --agent` commands read them). Built on the agent's loop from its
parts, read by the HTTP thread as a finished value: nothing here runs off the loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from bpfsync.agent.metrics import AgentMetrics
from bpfsync.agent.pipeline import MapStats
from bpfsync.agent.synced import SyncedMap
from bpfsync.agent.watchers import BatchWatcher
from bpfsync.core.membership import Membership
from bpfsync.core.replica import Replica
from bpfsync.transport.tls import TlsMaterial

__all__ = ["SLOTS_LIMIT", "Presence", "map_rows", "security", "slots"]

SLOTS_LIMIT = 100_000  # keys /slots returns at most: a page a person or a script can read


@dataclass(slots=True)
class Presence:
    """What a configured map's pin holds, as the agent last looked (readiness.py Y6)."""

    path: str
    present: bool = True  # a map is pinned there (a name: map: it is open)
    problem: str | None = None  # why the map found there is not synced (refused, unreadable)


def map_rows(
    synced: Mapping[str, SyncedMap], replica: Replica, stats: Mapping[str, MapStats],
    watcher: BatchWatcher | None, metrics: AgentMetrics,
    presence: Mapping[str, Presence] | None = None, catching: Collection[str] = (),
    absent_records: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per configured map, synced or not yet (and the map gauges of the metrics, set
    on the way). ``id`` is the kernel's id of the map object synced; ``present`` says whether
    a map is pinned at ``path``; ``ready``: present, synced and caught up (``catching``
    names those still catching up: readiness.py Y5)."""
    presence = presence or {}
    absent_records = absent_records or Counter()
    rows = []
    for name, sm in synced.items():
        st = stats.get(name) or MapStats()
        metrics.map_series(name)
        registers = replica.registers(name)
        metrics.entries.labels(name).set(registers)
        backoff = watcher.backoff(name) if watcher is not None else 1
        metrics.scan_backoff.labels(name).set(backoff)
        pin = presence.get(name) or Presence(sm.path)
        metrics.map_present.labels(name).set(pin.present)
        rows.append({
            "name": name, "path": sm.path, "id": sm.map.info.id, "present": pin.present,
            "ready": pin.present and name not in catching, "problem": pin.problem,
            "registers": registers,
            "buckets_at_rest": replica.buckets_at_rest(name), "policy": sm.policy.name,
            "reported": st.reported, "local_changes": st.local_changes, "applied": st.applied,
            "rejected": st.rejected, "scan_backoff": backoff,
        })
    for name, pin in presence.items():
        if name in synced:
            continue
        metrics.map_present.labels(name).set(pin.present)
        rows.append({
            "name": name, "path": pin.path, "id": None, "present": pin.present, "ready": False,
            "problem": pin.problem, "registers": 0, "records_while_missing":
            absent_records.get(name, 0),
        })
    return rows


def security(
    tls: TlsMaterial | None, members: Membership, metrics: AgentMetrics
) -> dict[str, Any]:
    """The TLS material in use (None: plaintext) and the membership (core/membership.py)."""
    if tls is not None:
        metrics.tls_expiry.set(tls.not_after)
    return {
        "tls": None if tls is None else {
            "fingerprint": tls.fingerprint, "names": list(tls.names), "not_after": tls.not_after,
        },
        "membership": members.mode, "members": members.known(),
    }


def slots(replica: Replica, sm: SyncedMap) -> dict[str, Any]:
    """Every node's register per key of the map (at most ``SLOTS_LIMIT`` keys)."""
    keys: dict[str, dict[str, Any]] = {}
    for rec in replica.records(sm.name):
        if len(keys) >= SLOTS_LIMIT and rec.key.hex() not in keys:
            continue
        keys.setdefault(rec.key.hex(), {})[rec.stamp.node] = {
            "value": None if rec.value is None else rec.value.hex(),
            "stamp": [rec.stamp.wall, rec.stamp.logical],
        }
    return {"map": sm.name, "policy": sm.policy.name, "keys": keys}
