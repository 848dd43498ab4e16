"""docs/metrics.md lists every metric the agent registers, with its type and labels, and nothing
it does not; the names follow Prometheus's conventions."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from bpfsync.agent.metrics import AgentMetrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_ROW = re.compile(r"^\| `(?P<name>[a-z_:]+)` \| (?P<type>\w+) \|(?P<labels>[^|]*)\|")


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, labels) from the table of docs/metrics.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            assert m["name"] not in rows, f"{m['name']} is listed twice"
            rows[m["name"]] = (m["type"], tuple(re.findall(r"`(\w+)`", m["labels"])))
    return rows


def registered() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name (as scraped: counters with ``_total``) -> (type, labels) of every metric an agent
    registers, read from its registry."""
    metrics = AgentMetrics()
    metrics.watch_transport(lambda: {})
    labels = {m._name: tuple(m._labelnames) for m in vars(metrics).values()
              if isinstance(m, MetricWrapperBase)}  # fmt: skip
    labels["bpfsync_transport_events"] = ("event",)  # the collector of the transport's stats
    out = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = (family.type, labels[family.name])
    return out


def test_every_registered_metric_is_documented_with_its_type_and_labels() -> None:
    docs, reg = documented(), registered()
    missing = sorted(reg.keys() - docs.keys())
    assert not missing, f"metrics the agent registers that docs/metrics.md does not list: {missing}"
    stale = sorted(docs.keys() - reg.keys())
    assert not stale, f"docs/metrics.md lists metrics the agent does not register: {stale}"
    for name, (kind, labels) in reg.items():
        assert docs[name] == (kind, labels), f"{name}: registered as {kind} {labels}"


def test_names_follow_prometheus_conventions() -> None:
    for name, (kind, _) in registered().items():
        assert name.startswith("bpfsync_"), name
        assert name.endswith("_total") == (kind == "counter"), name
        assert not re.search(r"_(milli|micro|nano)?seconds_.|_ms$|_millis|_kb$|_mb$", name), name
        if kind == "histogram":
            assert name.endswith(("_seconds", "_bytes")), name


def test_counters_with_known_labels_exist_at_zero_before_their_first_event() -> None:
    """So that rate() and increase() count the first rejection, the first burst of a map."""
    metrics = AgentMetrics()
    value = metrics.registry.get_sample_value
    assert value("bpfsync_rejected_total", {"reason": "ClockDriftError"}) == 0
    assert value("bpfsync_rejected_total", {"reason": "unsolicited_answered"}) == 0
    assert value("bpfsync_applied_total", {"map": "m", "op": "update"}) is None
    metrics.map_series("m")
    metrics.map_series("m")
    for op in ("update", "delete"):
        assert value("bpfsync_applied_total", {"map": "m", "op": op}) == 0
    for seen in ("trace", "poll"):
        assert value("bpfsync_local_changes_total", {"map": "m", "seen": seen}) == 0
