"""Prometheus metrics, one registry per agent so several agents can share a test process.

docs/metrics.md lists every metric (a test holds it to this registry). Names follow Prometheus
conventions: base units (``_seconds``, ``_bytes``), counters exported with ``_total`` (added by
prometheus_client). Per-peer labels only ever name members: a session exists only for a node the
transport admitted (transport/base.py). Who sets what: counters where the event happens
(pipeline.py, peering.py); gauges on the agent's loop, in peering.py (``peers()``, called at each
status refresh every 0.25 s, and at each digest answer) and status.py.

The labelled counters whose label values are known in advance (rejection reasons; per map, the
ops applied and how changes were seen) exist at 0 from the start: Prometheus's ``rate`` and
``increase`` count from a series' first sample, so a series born at its first event would hide
that event (the first rejection, the first burst of writes) from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bpfsync.errors import PeerError
from bpfsync.model import Op, Seen

# bpfsync_rejected_total's reasons besides the PeerError classes' names (peering.py)
_OTHER_REJECTIONS = ("repair_busy", "unsolicited_answered", "internal_error")


def _subclasses(cls: type[PeerError]) -> list[type[PeerError]]:
    out: list[type[PeerError]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.local_changes = Counter(
            "bpfsync_local_changes", "Changes seen in local maps and sent to peers",
            ["map", "seen"], registry=r,
        )
        self.echoes = Counter(
            "bpfsync_echoes_suppressed", "Watcher reports of this agent's own writes, ignored",
            ["map"], registry=r,
        )
        self.applied = Counter(
            "bpfsync_applied", "Peer records written to the local kernel map", ["map", "op"],
            registry=r,
        )
        self.rejected = Counter(
            "bpfsync_rejected", "Peer input refused before reaching the kernel", ["reason"],
            registry=r,
        )
        self.overflows = Counter(
            "bpfsync_watch_overflows", "Ring-buffer overflows that forced a rescan", registry=r,
        )
        self.coalesced = Counter(
            "bpfsync_watch_coalesced",
            "Changes superseded by a newer change of their key before the agent handled them",
            registry=r,
        )
        self.repairs = Counter(
            "bpfsync_repair_buckets", "Digest buckets found different and pulled", ["map"],
            registry=r,
        )
        self.filtered = Counter(
            "bpfsync_filtered", "Changes of entries that do not pass their map's filter: kept on"
            " this node, not sent", ["map"], registry=r,
        )
        self.raced = Counter(
            "bpfsync_counter_raced", "In-place counter keys the data plane changed while peers'"
            " counts were being folded in; their increments were kept, not overwritten", ["map"],
            registry=r,
        )
        self.entries = Gauge(
            "bpfsync_map_entries", "Keys per synced map, tombstones included", ["map"], registry=r
        )
        self.map_present = Gauge(
            "bpfsync_map_present", "1 while a map is pinned at the synced map's path (a name:"
            " map: while it is open), 0 while the pin is empty; the agent syncs the map it"
            " finds there next", ["map"], registry=r,
        )
        self.scan_backoff = Gauge(
            "bpfsync_watch_scan_backoff", "How many times its usual period the map's next scan"
            " waits: up to 4 while scans find nothing the tracer does not report", ["map"],
            registry=r,
        )
        self.ready = Gauge("bpfsync_ready", "1 once the first catch-up is done and while every"
                           " present map is caught up", registry=r)
        self.peer_connected = Gauge(
            "bpfsync_peer_connected", "1 while a stream to the peer is up", ["peer"], registry=r,
        )
        self.stream_connected = Gauge(
            "bpfsync_stream_connected", "With transport nats: 1 while the NATS servers are"
            " reached, 0 while none is", registry=r,
        )
        self.stream_backlog = Gauge(
            "bpfsync_stream_backlog_bytes", "With transport nats: bytes of this node's batches"
            " waiting to be stored by the change stream (they grow while NATS is away)",
            registry=r,
        )
        self.peer_lag = Gauge(
            "bpfsync_peer_lag_records", "Records for the peer not yet acknowledged by it: queued"
            " in its outbox or in batches it has not acked", ["peer"], registry=r,
        )
        self.divergent_buckets = Gauge(
            "bpfsync_divergent_buckets", "Digest buckets of the map that differ stably between"
            " this node and the peer (same hashes on both sides as at the previous round), at"
            " the peer's latest routine digest; 0 while records are on their way", ["peer", "map"],
            registry=r,
        )
        self.tls_expiry = Gauge(
            "bpfsync_tls_cert_expiry_timestamp_seconds",
            "When this node's TLS certificate expires (unset without TLS)", registry=r,
        )
        self.state_failures = Counter(
            "bpfsync_state_write_failures", "Writes to the state file that failed, by reason"
            " (disk_full, io); syncing goes on, and the maps are stored whole again once a"
            " write succeeds", ["reason"], registry=r,
        )
        for reason in ("disk_full", "io"):
            self.state_failures.labels(reason)
        self.state_set_aside = Counter(
            "bpfsync_state_set_aside", "State files set aside as unusable (damaged, another"
            " node's or format version, a map's sizes changed): the agent started without them",
            registry=r,
        )
        self.apply_seconds = Histogram(
            "bpfsync_apply_seconds", "Time to write one inbound batch to the kernel", registry=r,
            buckets=(1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0),
        )
        for reason in sorted({c.__name__ for c in _subclasses(PeerError)}) + list(
            _OTHER_REJECTIONS
        ):
            self.rejected.labels(reason)
        self._maps: set[str] = set()

    def map_series(self, name: str) -> None:
        """Make the map's counters exist at 0 (see the module docstring); idempotent."""
        if name in self._maps:
            return
        self._maps.add(name)
        for op in Op:
            self.applied.labels(name, op.value)
        for seen in Seen:
            self.local_changes.labels(name, seen.value)

    def watch_transport(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Export the transport's counters (rejected streams by reason, malformed frames,
        disconnects, ...) as ``bpfsync_transport_events_total{event=...}``."""
        self.registry.register(_TransportEvents(stats))


class _TransportEvents(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "bpfsync_transport_events", "Transport events: streams refused by reason, frames"
            " refused, peers disconnected, TLS reloads", labels=["event"],
        )
        for event, n in sorted(self._stats().items()):
            family.add_metric([event], n)
        yield family
