"""A data plane that restarts: its loader recreates the program and maps at the same pins (new
map objects, empty), on one of three nodes (tests/bpf/percpu_blocklist.bpf.c, real packets).

- The restarted node enforces the cluster's blocks again within RECOVER_S; the others lose
  nothing; a block added through the restarted node afterwards reaches them.
- A data plane that comes up after its agent: the agent runs without the map, then syncs it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from netlab import Netlab, ipv4, wait_for

PROBE_RATE = 300.0
RECOVER_S = 5.0  # from the data plane's restart to the node dropping the cluster's blocks
DROP = 0x1
POLICY = {"[0:8]": "lww", "[8:64]": "local"}
STATS = struct.Struct("<QQ")  # struct pcb_stats {passed, dropped}


def block(lab: Netlab, node: str, addr: str) -> None:
    m = lab[node].maps["pcb_v4"]
    m.update(ipv4(addr), struct.pack("<Q", DROP) * m.ncpus)


def blocked_on(lab: Netlab, addr: str) -> dict[str, bool]:
    out = {}
    for n in lab:
        raw = n.maps["pcb_v4"].lookup(ipv4(addr)) if "pcb_v4" in n.maps else None
        out[n.name] = raw is not None and all(v & DROP for (v,) in struct.iter_unpack("<Q", raw))
    return out


def dropped(lab: Netlab, node: str) -> int:
    return STATS.unpack(lab[node].maps["pcb_stats"].lookup(bytes(4)) or b"")[1]


def drops_again(lab: Netlab, node: str, timeout: float) -> bool:
    """Whether ``node`` drops packets (its counter grows) within ``timeout``."""
    base = dropped(lab, node)
    return wait_for(lambda: dropped(lab, node) > base, timeout)


def map_ids(lab: Netlab, node: str) -> dict[str, int | None]:
    status = lab[node].agent.status() or {}
    return {m["name"]: m.get("id") for m in status.get("maps", [])}


def test_a_restarted_data_plane_gets_the_clusters_blocks_back(
    netlab: Callable[..., Netlab],
) -> None:
    lab = netlab("tests/percpu_blocklist", "pcb_filter")
    first, second = lab.add_source("198.18.0.91"), lab.add_source("198.18.0.92")
    lab.start_agents([{"path": "pcb_v4", "policy": POLICY}, {"path": "pcb_v6", "policy": POLICY}])
    block(lab, "a", first)
    assert wait_for(lambda: all(blocked_on(lab, first).values()), 2), blocked_on(lab, first)
    old_id = map_ids(lab, "c")["pcb_v4"]

    with lab.sending(first, [lab["c"].address], PROBE_RATE / 3, 9, b"probe"):
        assert drops_again(lab, "c", 2)
        lab["c"].stop_data_plane()
        lab["c"].start_data_plane(lab)  # new program, new empty maps, same pins
        restarted = time.monotonic()
        assert lab["c"].maps["pcb_v4"].lookup(ipv4(first)) is None
        assert drops_again(lab, "c", RECOVER_S), "the restarted node does not drop the block"
        print(f"c drops the block again {time.monotonic() - restarted:.3f} s after its restart")
    assert blocked_on(lab, first) == {"a": True, "b": True, "c": True}
    assert wait_for(lambda: map_ids(lab, "c")["pcb_v4"] not in (None, old_id), 2), map_ids(
        lab, "c")

    block(lab, "c", second)  # into the new map: reaches the others
    assert wait_for(lambda: all(blocked_on(lab, second).values()), 2), blocked_on(lab, second)
    assert all(blocked_on(lab, first).values())  # nothing lost


def test_a_data_plane_that_comes_up_after_its_agent_is_synced(
    netlab: Callable[..., Netlab],
) -> None:
    lab = netlab("tests/percpu_blocklist", "pcb_filter")
    addr, late = lab.add_source("198.18.0.93"), lab.add_source("198.18.0.94")
    lab["c"].stop_data_plane()  # c's pins are empty when its agent starts
    lab.start_agents([{"path": "pcb_v4", "policy": POLICY}, {"path": "pcb_v6", "policy": POLICY}])
    status = lab["c"].agent.status() or {}
    assert status.get("ready") and {m["name"]: m.get("present") for m in status["maps"]} == {
        "pcb_v4": False, "pcb_v6": False}, status.get("maps")
    block(lab, "a", addr)  # while c has no map

    lab["c"].start_data_plane(lab)
    with lab.sending(addr, [lab["c"].address], PROBE_RATE / 3, 9, b"probe"):
        assert drops_again(lab, "c", RECOVER_S), "the late data plane does not drop the block"
    block(lab, "c", late)  # and c's own writes reach the others
    assert wait_for(lambda: all(blocked_on(lab, late).values()), 2), blocked_on(lab, late)
