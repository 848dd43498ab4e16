"""examples/dns_ratelimit on three nodes: one client's DNS queries spread over the nodes are
limited cluster-wide with bpfsync, and only per node without it.

The bound. A node drops a query once its own count plus its companion (the other nodes' counts,
as the agent last wrote them) reaches the limit. The companion lags the other nodes by the sync
delay D: the agent's poll interval (50 ms), one gRPC hop and the companion write. So when the
cluster crosses the limit, the queries the other nodes admitted in the last D are not seen yet
and are admitted again here: at most about RATE x D queries over the limit. With D held to
250 ms (5 poll intervals, room for a loaded 2-core machine) and RATE = 200 queries/s, the cluster
admits at most LIMIT + 50 = 1.5 x LIMIT. It also admits at least LIMIT: a node drops only when
own + a lagging (never ahead) view of the others already reaches the limit. Without the agents
each node admits exactly LIMIT of its own share: 3 x LIMIT.
"""

from __future__ import annotations

import signal
import struct
import time
from collections.abc import Callable

import pytest
from netlab import Netlab, ipv4, tai_ns, wait_for

LIMIT = 100
QUERIES = 600  # 200 per node: each node alone would admit LIMIT of them
RATE = 200.0  # queries per second, in total, round-robin over the nodes
MAX_SYNC_DELAY = 0.25  # seconds
BOUND = LIMIT + int(RATE * MAX_SYNC_DELAY)  # 150
WINDOW_NS = 60 * 10**9  # long enough for one run; the test checks it stayed in one window

RL_CONFIG = struct.Struct("<QQ")  # struct rl_config {limit, window_ns}
RL_VALUE = struct.Struct("<QQ")  # struct rl_value {window, count}
STATS = struct.Struct("<QQ")  # struct rl_stats {passed, dropped}

SYNC_RL_COUNTS = [{
    "path": "rl_counts",  # netlab: the node's own pin
    "policy": {"count": "counter", "window": "epoch"},
    "counters": "exact",
    "companion": "rl_peers",
}]


def dns_query(qname: str, qid: int = 0x5353) -> bytes:
    """A standard query for qname's A record, as a stub resolver sends it."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in qname.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(
        "!HH", 1, 1)


def stats(lab: Netlab) -> dict[str, tuple[int, int]]:
    return {n.name: STATS.unpack(n.maps["rl_stats"].lookup(bytes(4)) or b"") for n in lab}


def entry(m_value: bytes | None) -> tuple[int, int] | None:
    return None if m_value is None else RL_VALUE.unpack(m_value)


def run_queries(lab: Netlab, src: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """Send QUERIES from ``src`` round-robin over the nodes, inside one window; returns the
    window and each node's (passed, dropped) for this run."""
    need = QUERIES / RATE + 3
    left = WINDOW_NS - tai_ns() % WINDOW_NS
    if left < need * 1e9:
        time.sleep(left / 1e9 + 0.01)
    window = tai_ns() // WINDOW_NS
    before = stats(lab)
    sent = lab.send(src, [n.address for n in lab], QUERIES, RATE, 53, dns_query("example.com"))
    assert sent == QUERIES

    def delta() -> dict[str, tuple[int, int]]:
        now = stats(lab)
        return {k: (now[k][0] - before[k][0], now[k][1] - before[k][1]) for k in now}

    share = QUERIES // len(lab.nodes)
    assert wait_for(lambda: all(p + d == share for p, d in delta().values()), 5), (
        f"not every query reached its node's XDP program: {delta()}")
    for n in lab:
        e = entry(n.maps["rl_counts"].lookup(ipv4(src)))
        assert e is not None and e[0] == window, f"{n.name}: the run straddled windows: {e}"
    return window, delta()


@pytest.mark.parametrize("transport", ["mesh", "nats"])
def test_limit_holds_cluster_wide_only_with_bpfsync(
    netlab: Callable[..., Netlab], transport: str, request: pytest.FixtureRequest,
) -> None:
    """Over the gRPC mesh and over NATS (a real nats-server: the agents' counts reach the
    others through its JetStream stream)."""
    nats = [request.getfixturevalue("nats_server").url] if transport == "nats" else None
    lab = netlab("dns_ratelimit", "dns_ratelimit", rodata=RL_CONFIG.pack(LIMIT, WINDOW_NS))
    lone_src, synced_src = lab.add_source("198.18.0.1"), lab.add_source("198.18.0.2")

    # without bpfsync: every node enforces the limit on its share alone
    _, alone = run_queries(lab, lone_src)
    print(f"without bpfsync: admitted {sum(p for p, _ in alone.values())} of {QUERIES} {alone}")
    assert alone == {n.name: (LIMIT, QUERIES // 3 - LIMIT) for n in lab}

    lab.start_agents(SYNC_RL_COUNTS, watch_mode="poll", nats=nats)
    window, synced = run_queries(lab, synced_src)
    admitted = sum(p for p, _ in synced.values())
    print(f"with bpfsync: admitted {admitted} of {QUERIES} (limit {LIMIT}, bound {BOUND}) "
          f"{synced}")
    assert LIMIT <= admitted <= BOUND

    # exact counters: each node's rl_counts holds only what it admitted (the agent never
    # writes it), and its companion converges on the other nodes' sum for the same window
    for n in lab:
        assert entry(n.maps["rl_counts"].lookup(ipv4(synced_src))) == (window, synced[n.name][0])

    def others(n_name: str) -> tuple[int, int]:
        return (window, sum(p for k, (p, _) in synced.items() if k != n_name))

    def companions() -> dict[str, tuple[int, int] | None]:
        return {n.name: entry(n.maps["rl_peers"].lookup(ipv4(synced_src))) for n in lab}

    assert wait_for(lambda: all(companions()[n.name] == others(n.name) for n in lab), 5), (
        f"companions {companions()} != the other nodes' counts {synced}")

    # counts the data plane made before the agents started are this node's own slots too
    # (the main map holds nothing else): the others' 2 x LIMIT reach every companion
    lone_window = entry(lab["a"].maps["rl_counts"].lookup(ipv4(lone_src)))
    assert lone_window is not None

    def lone_companions() -> list[tuple[int, int] | None]:
        return [entry(n.maps["rl_peers"].lookup(ipv4(lone_src))) for n in lab]

    assert wait_for(lambda: lone_companions() == [(lone_window[0], 2 * LIMIT)] * 3, 5), (
        f"entries made before the agents started are not synced: {lone_companions()}")


RESTART_LIMIT = 10**6  # nothing is dropped: every query reaching XDP is counted
RESTART_WINDOW_NS = 86_400 * 10**9  # one day: the test stays in one window (checked)
BEFORE = 30  # queries round-robin over the three nodes while every agent runs
WHILE_DOWN = 25  # queries to node X only, while its agent is down


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_counts_made_while_agent_down_join_the_cluster_sum(
    netlab: Callable[..., Netlab], sig: signal.Signals,
) -> None:
    """S4/H1 with real packets: the queries node X's program counts while X's agent is down
    (stopped by SIGTERM, or killed) are X's own contribution once the agent is back, so every
    node's own count + companion adds up to every query the programs counted."""
    lab = netlab("dns_ratelimit", "dns_ratelimit",
                 rodata=RL_CONFIG.pack(RESTART_LIMIT, RESTART_WINDOW_NS))
    src = lab.add_source("198.18.0.3")
    key = ipv4(src)
    x = lab["b"]
    left = RESTART_WINDOW_NS - tai_ns() % RESTART_WINDOW_NS
    if left < 30 * 10**9:  # once a day at most
        time.sleep(left / 1e9 + 0.01)
    window = tai_ns() // RESTART_WINDOW_NS

    def own() -> dict[str, tuple[int, int] | None]:
        return {n.name: entry(n.maps["rl_counts"].lookup(key)) for n in lab}

    def companions() -> dict[str, tuple[int, int] | None]:
        return {n.name: entry(n.maps["rl_peers"].lookup(key)) for n in lab}

    def passed() -> dict[str, int]:
        return {k: p for k, (p, _) in stats(lab).items()}

    def counted() -> dict[str, int]:
        """Each node's count for ``src`` as its program made it (all in ``window``)."""
        got = own()
        for name, e in got.items():
            assert e is not None and e[0] == window, f"{name}: {e} is not of window {window}"
        return {name: e[1] for name, e in got.items() if e is not None}

    def synced(counts: dict[str, int]) -> bool:
        """Every companion holds the other nodes' counts for ``window``."""
        comp = companions()
        return all(comp[n] == (window, sum(c for o, c in counts.items() if o != n))
                   for n in counts)

    lab.start_agents(SYNC_RL_COUNTS, watch_mode="poll")

    # 1. queries to every node, synced
    assert lab.send(src, [n.address for n in lab], BEFORE, RATE, 53,
                    dns_query("example.com")) == BEFORE
    assert wait_for(lambda: sum(passed().values()) == BEFORE, 10), (
        f"not every query reached its node's XDP program: {stats(lab)}")
    before = counted()
    assert before == {n.name: BEFORE // 3 for n in lab}, before
    assert wait_for(lambda: synced(before), 15), (
        f"companions {companions()} != the other nodes' counts {before}")

    # 2. X's agent down; queries to X only, counted by X's program alone
    code = x.agent.stop(sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), code
    x_passed = passed()[x.name]
    assert lab.send(src, [x.address], WHILE_DOWN, RATE, 53,
                    dns_query("example.com")) == WHILE_DOWN
    assert wait_for(lambda: passed()[x.name] == x_passed + WHILE_DOWN, 10), (
        f"not every query reached {x.name}'s XDP program: {stats(lab)}")
    during = counted()
    assert during == {**before, x.name: before[x.name] + WHILE_DOWN}, during
    assert not synced(during)  # no agent told the others

    # 3. X's agent back, with its stored state
    x.agent.start()
    assert wait_for(lambda: x.agent.is_ready() or not x.agent.running, 30, every=0.1), (
        f"{x.name}'s agent not ready after restart\n{lab.logs()}")
    assert x.agent.running, f"{x.name}'s agent exited\n{lab.logs()}"

    # 4. the cluster-wide sum, as every node sees it, holds every query the programs counted
    total = sum(during.values())  # exact counters: each node's rl_counts is its own count
    assert total == BEFORE + WHILE_DOWN

    def sums() -> dict[str, int | None]:
        comp = companions()
        return {n: None if comp[n] is None or comp[n][0] != window else c + comp[n][1]
                for n, c in counted().items()}

    assert wait_for(lambda: synced(during), 15), (
        f"companions {companions()} != the other nodes' counts {during}: {x.name}'s increments "
        f"counted while its agent was down are lost (restarted on stored state: "
        f"{'restarted on stored state' in x.agent.log()})")
    assert counted() == during  # the agent never writes rl_counts
    assert sums() == {n.name: total for n in lab}
    for n in lab:  # the others' companions hold X's count with its down-time increments
        if n is not x:
            third = sum(c for o, c in during.items() if o not in (n.name, x.name))
            assert companions()[n.name] == (window, before[x.name] + WHILE_DOWN + third)
