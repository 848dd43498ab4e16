"""examples/blocklist on three nodes: an address blocked by a user-space write on one node is
dropped by all three, and passes again everywhere once that node deletes it.

Measured with packets: a client sends from the address to every node all along (one packet per
node every 10 ms), and the time from the write to each node's first drop (to its first pass
again, after the delete) is read from the nodes' counters. Bound: PROPAGATION_BOUND = 2 s for
every node; the expected time is the agents' poll interval (50 ms) plus a gRPC hop and a map
write. The local node reacts at once (its program reads the map the write went to).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from netlab import Netlab, ipv4, tai_ns, wait_for

PROBE_RATE = 300.0  # packets per second in total, round-robin: one per node every 10 ms
PROPAGATION_BOUND = 2.0  # seconds from the write on one node to the effect on every node
STEADY = 0.3  # seconds over which a settled state must not change

BLOCK = struct.Struct("<QII")  # struct block {added_ns, reason, pad}
STATS = struct.Struct("<QQ")  # struct bl_stats {passed, dropped}
PASSED, DROPPED = 0, 1


def stats(lab: Netlab) -> dict[str, tuple[int, int]]:
    return {n.name: STATS.unpack(n.maps["bl_stats"].lookup(bytes(4)) or b"") for n in lab}


def seconds_until_moves(lab: Netlab, field: int, timeout: float) -> dict[str, float]:
    """Per node, seconds until counter ``field`` grows past its value at the call."""
    start, base = time.monotonic(), stats(lab)
    took: dict[str, float] = {}
    while len(took) < len(base) and time.monotonic() - start < timeout:
        now = stats(lab)
        for name, value in now.items():
            if name not in took and value[field] > base[name][field]:
                took[name] = time.monotonic() - start
        time.sleep(0.002)
    return took


def assert_steady(lab: Netlab, frozen: int, growing: int) -> None:
    """Over STEADY seconds, counter ``frozen`` stays put and ``growing`` grows, on every node."""
    before = stats(lab)
    time.sleep(STEADY)
    after = stats(lab)
    for name in before:
        assert after[name][frozen] == before[name][frozen], (name, before, after)
        assert after[name][growing] > before[name][growing], (name, before, after)


def test_block_and_unblock_through_one_node_reach_all(netlab: Callable[..., Netlab]) -> None:
    lab = netlab("blocklist", "blocklist_filter")
    src = lab.add_source("198.18.0.66")
    lab.start_agents([{"path": "blocklist"}])  # lww, the default
    key, value = ipv4(src), BLOCK.pack(tai_ns(), 42, 0)

    with lab.sending(src, [n.address for n in lab], PROBE_RATE, 9, b"probe"):
        assert wait_for(lambda: all(s[PASSED] > 0 for s in stats(lab).values()), 5)
        assert_steady(lab, frozen=DROPPED, growing=PASSED)

        lab["a"].maps["blocklist"].update(key, value)
        blocked = seconds_until_moves(lab, DROPPED, PROPAGATION_BOUND)
        print("blocked after (s):", {k: round(v, 3) for k, v in sorted(blocked.items())})
        assert set(blocked) == set(lab.nodes), f"not dropping within the bound: {blocked}"
        assert_steady(lab, frozen=PASSED, growing=DROPPED)
        assert [n.maps["blocklist"].lookup(key) for n in lab] == [value] * 3

        assert lab["a"].maps["blocklist"].delete(key)
        unblocked = seconds_until_moves(lab, PASSED, PROPAGATION_BOUND)
        print("unblocked after (s):", {k: round(v, 3) for k, v in sorted(unblocked.items())})
        assert set(unblocked) == set(lab.nodes), f"still dropping after the bound: {unblocked}"
        assert_steady(lab, frozen=DROPPED, growing=PASSED)
        assert [n.maps["blocklist"].lookup(key) for n in lab] == [None] * 3
