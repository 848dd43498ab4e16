"""What an agent shows of itself: the /status document and /slots/MAP (http.py serves them; the
`bpfsync status` and `dump --agent` commands read them). Built on the agent's loop from its
parts, read by the HTTP thread as a finished value: nothing here runs off the loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bpfsync.agent.metrics import AgentMetrics
from bpfsync.agent.pipeline import MapStats
from bpfsync.agent.synced import SyncedMap
from bpfsync.agent.watchers import BatchWatcher
from bpfsync.core.membership import Membership
from bpfsync.core.replica import Replica
from bpfsync.transport.tls import TlsMaterial

__all__ = ["SLOTS_LIMIT", "map_rows", "security", "slots"]

SLOTS_LIMIT = 100_000  # keys /slots returns at most: a page a person or a script can read


def map_rows(
    synced: Mapping[str, SyncedMap], replica: Replica, stats: Mapping[str, MapStats],
    watcher: BatchWatcher | None, metrics: AgentMetrics,
) -> list[dict[str, Any]]:
    """One row per synced map (and the map gauges of the metrics, set on the way)."""
    rows = []
    for name, sm in synced.items():
        st = stats.get(name) or MapStats()
        metrics.map_series(name)
        registers = replica.registers(name)
        metrics.entries.labels(name).set(registers)
        backoff = watcher.backoff(name) if watcher is not None else 1
        metrics.scan_backoff.labels(name).set(backoff)
        rows.append({
            "name": name, "path": sm.path, "registers": registers,
            "buckets_at_rest": replica.buckets_at_rest(name), "policy": sm.policy.name,
            "reported": st.reported, "local_changes": st.local_changes, "applied": st.applied,
            "rejected": st.rejected, "scan_backoff": backoff,
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
