"""The Grafana dashboard (deploy/grafana/bpfsync.json) and the alert rules
(deploy/prometheus/alerts.yml) ask only for metrics the agent exports: every PromQL expression
is read token by token and each metric name in it must be one of AgentMetrics' registry (with
the suffixes prometheus_client adds: ``_total``, ``_created``, ``_bucket``, ``_sum``,
``_count``). A renamed metric, or a typo in a panel, fails here rather than as an empty panel.
tests/deploy/test_prometheus.py runs the same expressions on a real Prometheus."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpfsync.agent.metrics import AgentMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "bpfsync.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# what prometheus_client exports for a family of each type, by suffix of the family's name
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
PROMETHEUS_OWN = {"up"}  # series Prometheus itself adds to every target

# PromQL's functions and aggregation operators: an identifier before "(" must be one of them
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes",
    "clamp", "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta",
    "deriv", "exp", "floor", "group", "histogram_quantile", "holt_winters", "idelta",
    "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log2",
    "log10", "max", "max_over_time", "min", "min_over_time", "predict_linear",
    "present_over_time", "quantile", "quantile_over_time", "rate", "resets", "round",
    "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev", "stddev_over_time", "stdvar",
    "stdvar_over_time", "sum", "sum_over_time", "time", "timestamp", "topk", "vector",
}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}  # take a label list

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])\d*)*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=(){}\[\],:@])
""", re.VERBOSE)
# a Grafana variable's query: label_values(SELECTOR, LABEL) or query_result(EXPR)
_VARIABLE = re.compile(r"^\s*(?:label_values\((?P<selector>.*),\s*\w+\s*\)|"
                       r"query_result\((?P<expr>.*)\))\s*$", re.DOTALL)
_GRAFANA_RANGES = re.compile(r"\$__(?:rate_interval|interval|range)\b|\$\{__(?:rate_interval|"
                             r"interval|range)\}")


def exported_names() -> set[str]:
    """Every series name an agent's /metrics can carry."""
    metrics = AgentMetrics()
    metrics.watch_transport(lambda: {})
    names = set()
    for family in metrics.registry.collect():
        assert family.type in _SUFFIXES, f"{family.name}: type {family.type} not handled here"
        names |= {family.name + s for s in _SUFFIXES[family.type]}
    return names


def tokens(expr: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        pos = m.end()
        assert m.lastgroup is not None
        if m.lastgroup != "space":
            yield m.lastgroup, m.group()


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana variable query) selects. Label
    names (in braces and after by/without/on/...), durations, strings and functions are not.
    Raises ValueError on unbalanced brackets or an unknown function."""
    toks = list(tokens(_GRAFANA_RANGES.sub("1m", expr)))
    names: set[str] = set()
    closing = {"(": ")", "{": "}", "[": "]"}
    stack: list[str] = []  # open brackets; "L" marks a label list's parenthesis
    for i, (kind, text) in enumerate(toks):
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "op" and text in closing:
            prev = toks[i - 1][1] if i else ""
            stack.append("L" if text == "(" and prev in GROUPING else text)
        elif kind == "op" and text in closing.values():
            if not stack or closing.get(stack[-1], ")") != text:
                raise ValueError(f"unbalanced {text!r} in {expr!r}")
            stack.pop()
        elif kind == "ident" and not (stack and stack[-1] in "{[L"):
            if nxt == "(":
                if text not in FUNCTIONS and text not in GROUPING:
                    raise ValueError(f"unknown function {text!r} in {expr!r}")
            elif text in FUNCTIONS and nxt in ("by", "without"):  # sum by (l) (...)
                continue
            elif text not in KEYWORDS and text not in GROUPING:
                names.add(text)
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r} in {expr!r}")
    return names


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expression) for every panel target and template variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(f"panel {p.get('title')!r}", t["expr"])
           for p in panels(dash["panels"]) for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        m = _VARIABLE.match(query["query"] if isinstance(query, dict) else query)
        assert m, f"variable {var['name']!r}: not label_values(...) or query_result(...)"
        out.append((f"variable {var['name']!r}", m["selector"] or m["expr"]))
    return out


def test_the_reader_finds_metric_names_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(bpfsync_apply_seconds_bucket'
            '{instance=~"$instance", le!="+Inf"}[$__rate_interval] offset 5m)))'
            ' / on (instance) group_left (peer) bpfsync_peer_connected == bool 1e3'
            ' or absent(up{job="x"}) unless foo:bar_ratio[5m:30s]')
    assert metric_names(expr) == {"bpfsync_apply_seconds_bucket", "bpfsync_peer_connected",
                                  "up", "foo:bar_ratio"}
    for bad in ("rate(x[5m]", "sum(x))", "rates(x[1m])", "x{a=\"b\""):
        with pytest.raises(ValueError):
            metric_names(bad)


def test_every_panel_asks_for_metrics_the_agent_exports() -> None:
    exported = exported_names() | PROMETHEUS_OWN
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used: set[str] = set()
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: {sorted(names - exported)} not exported: {expr!r}"
        used |= names
    # what operators ask first: peers, lag, throughput, rejections, entries per map
    assert {"bpfsync_peer_connected", "bpfsync_peer_lag_records", "bpfsync_applied_total",
            "bpfsync_rejected_total", "bpfsync_map_entries"} <= used


def test_the_dashboard_is_one_grafana_can_import() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "bpfsync" and dash["title"]
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash["panels"]):
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys()
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert all(t["refId"] for t in p["targets"])


def test_alert_rules_ask_for_metrics_the_agent_exports() -> None:
    exported = exported_names() | PROMETHEUS_OWN
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {
        "BpfsyncPeerDown", "BpfsyncPeerLagHigh", "BpfsyncDivergencePersists",
        "BpfsyncRingOverflows", "BpfsyncNotReady"}
    for r in rules:
        names = metric_names(r["expr"])
        assert names and names <= exported, f"{r['alert']}: {sorted(names - exported)}"
