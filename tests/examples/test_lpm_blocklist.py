"""tests/bpf/lpm_blocklist.bpf.c on three nodes: a /24 blocked by a user-space write to one
node's pinned LPM trie drops a source inside it on all three, a source outside it keeps passing,
and the inside one passes again everywhere once that node deletes the prefix.

Measured with packets, as test_blocklist.py does: a client sends from the inside address to
every node all along (one packet per node every 10 ms), and the time from the write to each
node's first drop (to its first pass again, after the delete) is read from the nodes' counters.
Bound: PROPAGATION_BOUND = 2 s for every node. The trie is traced like a hash map (here by the
bpf(2) hooks: the agents watch by `syscall+poll`), so the expected time is the write's report, a
gRPC hop and a map write, not a poll interval. The local node reacts at once (its program reads
the trie the write went to).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from netlab import Netlab, tai_ns, wait_for

from bpfsync.kernel.maps import Map
from bpfsync.layout import prefix_bytes

PROBE_RATE = 300.0  # packets per second per source, round-robin: one per node every 10 ms
PROPAGATION_BOUND = 2.0  # seconds from the write on one node to the effect on every node
STEADY = 0.3  # seconds over which a settled state must not change

TRIE, STATS = "lpm_blocklist", "lpm_stats"
BLOCKED = "198.18.64.0/24"
INSIDE = "198.18.64.66"
OUTSIDE = "198.18.65.66"  # in the same /23: the prefix length is what keeps it out
COUNTS = struct.Struct("<QQ")  # struct lpm_stats {passed, dropped}
PASSED, DROPPED = 0, 1


def stats(lab: Netlab) -> dict[str, tuple[int, int]]:
    return {n.name: COUNTS.unpack(n.maps[STATS].lookup(bytes(4)) or b"") for n in lab}


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


def assert_steady(lab: Netlab, frozen: tuple[int, ...], growing: tuple[int, ...]) -> None:
    """Over STEADY seconds, the ``frozen`` counters stay put and the ``growing`` ones grow, on
    every node."""
    before = stats(lab)
    time.sleep(STEADY)
    after = stats(lab)
    for name in before:
        for field in frozen:
            assert after[name][field] == before[name][field], (name, before, after)
        for field in growing:
            assert after[name][field] > before[name][field], (name, before, after)


def keys(lab: Netlab) -> list[list[bytes]]:
    return [[k for k, _ in n.maps[TRIE].items()] for n in lab]


def test_a_prefix_blocked_through_one_node_reaches_all(netlab: Callable[..., Netlab]) -> None:
    lab = netlab("tests/lpm_blocklist", "lpm_blocklist_filter")
    inside, outside = lab.add_source(INSIDE), lab.add_source(OUTSIDE)
    lab.start_agents([{"path": TRIE}])  # lww, the default
    # traced, not only polled: the trie is each agent's only map
    assert [(n.agent.status() or {}).get("watch") for n in lab] == ["syscall+poll"] * 3
    key, value = prefix_bytes(BLOCKED, 8), struct.pack("<Q", tai_ns())
    nodes = [n.address for n in lab]

    with lab.sending(inside, nodes, PROBE_RATE, 9, b"probe"):
        assert wait_for(lambda: all(s[PASSED] > 0 for s in stats(lab).values()), 5)
        assert_steady(lab, frozen=(DROPPED,), growing=(PASSED,))

        with Map.open(lab["a"].pin(TRIE)) as trie:
            trie.update(key, value)
        blocked = seconds_until_moves(lab, DROPPED, PROPAGATION_BOUND)
        print("blocked after (s):", {k: round(v, 3) for k, v in sorted(blocked.items())})
        assert set(blocked) == set(lab.nodes), f"not dropping within the bound: {blocked}"
        assert_steady(lab, frozen=(PASSED,), growing=(DROPPED,))
        assert keys(lab) == [[key]] * 3
        assert [n.maps[TRIE].lookup(key) for n in lab] == [value] * 3

        with lab.sending(outside, nodes, PROBE_RATE, 9, b"probe"):  # outside the /24: passes
            assert_steady(lab, frozen=(), growing=(PASSED, DROPPED))
        assert_steady(lab, frozen=(PASSED,), growing=(DROPPED,))  # the inside source alone again

        with Map.open(lab["a"].pin(TRIE)) as trie:
            assert trie.delete(key)
        unblocked = seconds_until_moves(lab, PASSED, PROPAGATION_BOUND)
        print("unblocked after (s):", {k: round(v, 3) for k, v in sorted(unblocked.items())})
        assert set(unblocked) == set(lab.nodes), f"still dropping after the bound: {unblocked}"
        assert_steady(lab, frozen=(DROPPED,), growing=(PASSED,))
        assert keys(lab) == [[]] * 3


def test_host_bits_past_the_prefix_name_the_same_entry_everywhere(
    netlab: Callable[..., Netlab],
) -> None:
    """The kernel keeps one entry for 198.18.64.7/24 and 198.18.64.0/24: the agents take both
    as the one canonical key, so a delete by either spelling is the entry's delete."""
    lab = netlab("tests/lpm_blocklist", "lpm_blocklist_filter")
    lab.start_agents([{"path": TRIE}])
    sloppy, canonical = prefix_bytes("198.18.64.7/24", 8), prefix_bytes(BLOCKED, 8)
    value = struct.pack("<Q", tai_ns())
    with Map.open(lab["a"].pin(TRIE)) as trie:
        trie.update(sloppy, value)
    assert wait_for(lambda: keys(lab)[1:] == [[canonical]] * 2, PROPAGATION_BOUND), keys(lab)
    with Map.open(lab["b"].pin(TRIE)) as trie:  # deleted on b by the canonical spelling
        assert trie.delete(canonical)
    assert wait_for(lambda: keys(lab) == [[]] * 3, PROPAGATION_BOUND), keys(lab)
    with Map.open(lab["c"].pin(TRIE)) as trie:  # and written again on c with host bits
        trie.update(prefix_bytes("198.18.64.200/24", 8), value)
    assert wait_for(lambda: keys(lab)[:2] == [[canonical]] * 2, PROPAGATION_BOUND), keys(lab)
    time.sleep(STEADY)
    assert keys(lab)[:2] == [[canonical]] * 2 and len(keys(lab)[2]) == 1
