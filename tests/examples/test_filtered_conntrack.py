"""examples/conntrack on three nodes with a filter (replica.py F1-F4): only flows of at least
MIN_PACKETS sync. Real packets count the flows in XDP; user-space writes make one stop passing.

- a flow below the bound stays on the node that saw it; once it passes, the others take it;
- a flow that stops passing on its node is no longer sent: the others keep what it last synced;
- a peer's value is not written over a node's own entry that does not pass;
- an entry that comes of age (``age()``) is sent without changing.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from netlab import Netlab, ipv4, tai_ns, wait_for

VIP = "198.18.255.2"
SPORT, DPORT = 40100, 8080
MIN_PACKETS = 10
RATE = 200.0
CONVERGE_S = 5.0
QUIET_S = 1.0  # how long an entry that must not sync is watched for not arriving
AGE_S = 2  # the age condition's seconds: more than QUIET_S

CONN = struct.Struct("<QQQ")  # struct conn {packets, bytes, last_seen}
FLOW = struct.Struct("!4s4sHHB3x")


def packets_on(lab: Netlab, key: bytes) -> dict[str, int | None]:
    return {n.name: None if (raw := n.maps["conns"].lookup(key)) is None else CONN.unpack(raw)[0]
            for n in lab}


def stays(lab: Netlab, key: bytes, want: dict[str, int | None]) -> bool:
    """``want`` holds all along QUIET_S (nothing arrives that must not)."""
    return not wait_for(lambda: packets_on(lab, key) != want, QUIET_S)


def test_only_flows_that_pass_the_filter_sync(netlab: Callable[..., Netlab]) -> None:
    lab = netlab("conntrack", "conntrack")
    src = lab.add_source("198.18.0.2")
    lab.start_agents([{
        "path": "conns",
        "policy": {"packets": "counter", "bytes": "counter", "last_seen": "max"},
        "filter": [f"value.packets >= {MIN_PACKETS}", "key.proto == 17"],
    }], watch_mode="poll")
    key = FLOW.pack(ipv4(src), ipv4(VIP), SPORT, DPORT, 17)
    lab.route(VIP, lab["a"])

    below = MIN_PACKETS - 4
    assert lab.send(src, [VIP], below, RATE, DPORT, b"x" * 64, sport=SPORT) == below
    assert wait_for(lambda: packets_on(lab, key)["a"] == below, 2)
    assert stays(lab, key, {"a": below, "b": None, "c": None}), packets_on(lab, key)

    assert lab.send(src, [VIP], 8, RATE, DPORT, b"x" * 64, sport=SPORT) == 8
    total = below + 8
    assert wait_for(lambda: set(packets_on(lab, key).values()) == {total}, CONVERGE_S), (
        packets_on(lab, key))

    # it stops passing on a (user space lowers its count): no longer sent, b and c keep it
    conns_a = lab["a"].maps["conns"]
    stamp = CONN.unpack(conns_a.lookup(key) or b"")[2]
    conns_a.update(key, CONN.pack(3, 3 * 106, stamp))
    assert stays(lab, key, {"a": 3, "b": total, "c": total}), packets_on(lab, key)

    # b's flow grows (its own slot): c takes it, a's own entry, which does not pass, stays
    conns_b = lab["b"].maps["conns"]
    _, nbytes, seen = CONN.unpack(conns_b.lookup(key) or b"")
    conns_b.update(key, CONN.pack(total + 100, nbytes, seen))
    assert wait_for(lambda: packets_on(lab, key)["c"] == total + 100, CONVERGE_S), (
        packets_on(lab, key))
    assert stays(lab, key, {"a": 3, "b": total + 100, "c": total + 100}), packets_on(lab, key)


def test_an_entry_that_comes_of_age_is_sent_without_changing(
    netlab: Callable[..., Netlab],
) -> None:
    """F3: an age condition met by time alone, with no write to the entry, is seen by the
    agent's re-check of held-back entries."""
    lab = netlab("conntrack", "conntrack")
    lab.start_agents([{
        "path": "conns", "policy": {"packets": "counter", "bytes": "counter", "last_seen": "max"},
        "filter": [f"age(value.last_seen) >= {AGE_S}"],
    }], watch_mode="poll")
    key = FLOW.pack(ipv4("198.18.0.3"), ipv4(VIP), SPORT, DPORT, 17)
    written = time.monotonic()
    lab["a"].maps["conns"].update(key, CONN.pack(7, 700, tai_ns()))  # young: not sent yet
    assert stays(lab, key, {"a": 7, "b": None, "c": None}), packets_on(lab, key)
    assert wait_for(lambda: set(packets_on(lab, key).values()) == {7}, AGE_S + 3), (
        packets_on(lab, key))
    took = time.monotonic() - written
    print(f"sent {took:.2f} s after the write ({AGE_S} s to come of age)")
    assert took >= AGE_S
