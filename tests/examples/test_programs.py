"""The example programs alone, run on crafted frames with BPF_PROG_TEST_RUN: the decisions each
makes from its maps, before any agent or network is involved."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator

import pytest
from netlab import EXAMPLES, ipv4, tai_ns, udp_frame

from bpfsync.kernel.objects import BpfObject

XDP_DROP, XDP_PASS = 1, 2
RL_CONFIG = struct.Struct("<QQ")  # struct rl_config {limit, window_ns}
RL_VALUE = struct.Struct("<QQ")  # struct rl_value {window, count}
STATS = struct.Struct("<QQ")  # struct rl_stats / bl_stats {passed, dropped}
BLOCK = struct.Struct("<QII")  # struct block {added_ns, reason, pad}
CONN = struct.Struct("<QQQ")  # struct conn {packets, bytes, last_seen}
ZERO = bytes(4)
NOP_OPTIONS = b"\x01\x01\x01\x00"  # 4 bytes of IP options (NOP NOP NOP EOL): ihl 6
WINDOW_NS = 60 * 10**9


@pytest.fixture
def load() -> Iterator[Callable[..., BpfObject]]:
    """``load(example, rodata=None)``: the example's object, loaded; closed at teardown."""
    objects: list[BpfObject] = []

    def open_and_load(example: str, rodata: bytes | None = None) -> BpfObject:
        path = EXAMPLES / example / f"{example}.bpf.o"
        if not path.exists():
            pytest.fail(f"{path} is missing: run `make bpf`")
        obj = BpfObject.open(path)
        objects.append(obj)
        if rodata is not None:
            obj.map_spec(".rodata").set_initial_value(rodata)
        obj.load()
        return obj

    yield open_and_load
    for obj in objects:
        obj.close()


def current_window(window_ns: int, need_s: float) -> int:
    """The TAI window number, after waiting out the current window if fewer than ``need_s``
    seconds of it remain (a test reading counts must not straddle a window boundary)."""
    left = window_ns - tai_ns() % window_ns
    if left < need_s * 1e9:
        time.sleep(left / 1e9 + 0.01)
    return tai_ns() // window_ns


def test_rate_limit_counts_own_and_same_window_peers(load: Callable[..., BpfObject]) -> None:
    obj = load("dns_ratelimit", RL_CONFIG.pack(5, WINDOW_NS))
    prog = obj.program("dns_ratelimit")
    counts, peers, stats = obj.map("rl_counts"), obj.map("rl_peers"), obj.map("rl_stats")
    window = current_window(WINDOW_NS, need_s=5)
    a, b = "198.18.0.1", "198.18.0.2"
    query_a = udp_frame(a, "198.18.1.2", 5353, 53, b"q")
    query_b = udp_frame(b, "198.18.1.2", 5353, 53, b"q", ip_options=NOP_OPTIONS)

    def run(frame: bytes, n: int = 1) -> list[int]:
        return [prog.test_run(frame).retval for _ in range(n)]

    # alone: the limit per source, only admitted queries counted
    assert run(query_a, 7) == [XDP_PASS] * 5 + [XDP_DROP] * 2
    assert RL_VALUE.unpack(counts.lookup(ipv4(a)) or b"") == (window, 5)
    # another source (with IP options, found through ihl) has its own budget
    assert run(query_b) == [XDP_PASS]
    # the other nodes' count of the same window adds to ours: 1 own + 3 peers -> one more
    peers.update(ipv4(b), RL_VALUE.pack(window, 3))
    assert run(query_b, 2) == [XDP_PASS, XDP_DROP]
    # a companion entry of another window is not this window's count
    peers.update(ipv4(b), RL_VALUE.pack(window - 1, 100))
    assert run(query_b) == [XDP_PASS]
    peers.update(ipv4(b), RL_VALUE.pack(window + 1, 100))
    assert run(query_b) == [XDP_PASS]
    assert RL_VALUE.unpack(counts.lookup(ipv4(b)) or b"") == (window, 4)
    # an own entry from an old window starts over
    counts.update(ipv4(a), RL_VALUE.pack(window - 1, 99))
    assert run(query_a) == [XDP_PASS]
    assert RL_VALUE.unpack(counts.lookup(ipv4(a)) or b"") == (window, 1)
    # not DNS queries: passed and not counted
    assert run(udp_frame(a, "198.18.1.2", 53, 54, b"q")) == [XDP_PASS]
    tcp = bytearray(query_a)
    tcp[14 + 9] = 6  # protocol TCP
    assert run(bytes(tcp)) == [XDP_PASS]
    assert STATS.unpack(stats.lookup(ZERO) or b"") == (5 + 1 + 1 + 1 + 1 + 1, 2 + 1)


def test_blocklist_drops_listed_sources(load: Callable[..., BpfObject]) -> None:
    obj = load("blocklist")
    prog = obj.program("blocklist_filter")
    blocklist, stats = obj.map("blocklist"), obj.map("bl_stats")
    bad, good = "198.18.0.66", "198.18.0.1"
    blocklist.update(ipv4(bad), BLOCK.pack(tai_ns(), 7, 0))
    assert prog.test_run(udp_frame(bad, "198.18.1.2", 1, 2, b"x")).retval == XDP_DROP
    assert prog.test_run(udp_frame(good, "198.18.1.2", 1, 2, b"x")).retval == XDP_PASS
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + bytes(28)
    assert prog.test_run(arp).retval == XDP_PASS  # not IPv4: not counted
    assert STATS.unpack(stats.lookup(ZERO) or b"") == (1, 1)
    blocklist.delete(ipv4(bad))
    assert prog.test_run(udp_frame(bad, "198.18.1.2", 1, 2, b"x")).retval == XDP_PASS


def test_conntrack_counts_flows_in_place(load: Callable[..., BpfObject]) -> None:
    obj = load("conntrack")
    prog = obj.program("conntrack")
    conns = obj.map("conns")
    src, dst = "198.18.0.1", "198.18.255.1"
    frame = udp_frame(src, dst, 40000, 53, b"p" * 10, ip_options=NOP_OPTIONS)
    before = tai_ns()
    for _ in range(3):
        assert prog.test_run(frame).retval == XDP_PASS
    after = tai_ns()
    # struct flow {saddr, daddr, sport, dport, proto, pad[3]}: network order, pad zero
    key = ipv4(src) + ipv4(dst) + struct.pack("!HHB3x", 40000, 53, 17)
    packets, nbytes, last_seen = CONN.unpack(conns.lookup(key) or b"")
    assert (packets, nbytes) == (3, 3 * len(frame))
    assert before <= last_seen <= after  # CLOCK_TAI, as user space reads it
    assert len(conns.dump().to_dict()) == 1
