"""The poll watcher on real maps: in-place counter increments from packets (veth + netns and
BPF_PROG_TEST_RUN), BPF-program updates and deletes, user-space deletes, LRU evictions,
per-CPU values, and the events() loop."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from bpfsync.demo.cluster import wait_for
from bpfsync.kernel.btf import map_layouts
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject
from bpfsync.model import Change, Seen
from bpfsync.watch.base import Watcher
from bpfsync.watch.poll import MapPoller, PollWatcher

if TYPE_CHECKING:
    from conftest import VethNetns  # tests/watch/conftest.py (tests are not a package)


def packets_of(m: Map, ip: str) -> int:
    raw = m.lookup(socket.inet_aton(ip))
    return 0 if raw is None else int(struct.unpack_from("<Q", raw)[0])


def by_key(changes: list[Change]) -> dict[bytes, bytes | None]:
    result = {c.key: c.value for c in changes}
    assert len(result) == len(changes), "a key was reported twice in one poll"
    return result


def test_in_place_counters_from_real_packets(
    load_object: Callable[..., BpfObject], veth_netns: VethNetns
) -> None:
    obj = load_object("xdp_count")
    with (
        obj.map("src_counts") as counts,
        obj.program("count_sources").attach_xdp(veth_netns.ifindex),
    ):
        _, value_layout = map_layouts(counts.info)
        # first packet (and ARP) creates the key through bpf_map_update_elem
        veth_netns.send_udp(1)
        assert wait_for(lambda: packets_of(counts, veth_netns.peer_ip) == 1, 5, every=0.01)
        watcher = PollWatcher({"src_counts": counts}, interval=0.05)
        assert watcher.poll_once() == []  # baseline
        before = counts.lookup(socket.inet_aton(veth_netns.peer_ip))
        assert before is not None

        veth_netns.send_udp(40)
        assert wait_for(lambda: packets_of(counts, veth_netns.peer_ip) == 41, 5, every=0.01)
        changes = watcher.poll_once()
        assert watcher.poll_once() == []  # nothing moved since

    assert len(changes) == 1
    change = changes[0]
    assert (change.map, change.key, change.seen) == (
        "src_counts",
        socket.inet_aton(veth_netns.peer_ip),
        Seen.POLL,
    )
    assert change.value is not None
    old, new = value_layout.decode(before), value_layout.decode(change.value)
    assert new["packets"] == 41 and isinstance(old["bytes"], int)
    assert new["bytes"] > old["bytes"]


def test_in_place_counters_from_test_run(load_object: Callable[..., BpfObject]) -> None:
    obj = load_object("xdp_count")
    prog = obj.program("count_sources")
    with obj.map("src_counts") as counts:
        poller = MapPoller("src_counts", counts)
        assert poller.poll() == []
        a, b = bytes([198, 18, 0, 5]), bytes([198, 18, 0, 6])
        prog.test_run(udp(a), repeat=10)
        first = by_key(poller.poll())
        assert set(first) == {a}
        prog.test_run(udp(a), repeat=5)  # in place: no map-update hook sees these
        prog.test_run(udp(b), repeat=3)
        second = by_key(poller.poll())
    assert set(second) == {a, b}
    assert struct.unpack_from("<Q", second[a] or b"")[0] == 15
    assert struct.unpack_from("<Q", second[b] or b"")[0] == 3


def test_bpf_program_updates_and_deletes(load_object: Callable[..., BpfObject]) -> None:
    obj = load_object("map_ops")
    prog = obj.program("apply_op")
    with obj.map("bpf_written") as m:
        m.update_batch([struct.pack("<I", i) for i in range(100)], [bytes(8)] * 100)
        watcher = PollWatcher({"w": m})
        watcher.poll_once()
        prog.test_run(struct.pack("<IIQ", 1, 7, 77))  # update existing (moves in its bucket)
        prog.test_run(struct.pack("<IIQ", 1, 500, 5))  # new key
        prog.test_run(struct.pack("<IIQ", 2, 9, 0))  # delete
        changes = by_key(watcher.poll_once())
    assert changes == {
        struct.pack("<I", 7): struct.pack("<Q", 77),
        struct.pack("<I", 500): struct.pack("<Q", 5),
        struct.pack("<I", 9): None,
    }


def test_user_space_deletes_and_updates(make_map: Callable[..., Map]) -> None:
    m = make_map("hash", 8, 8, 10_000)
    keys = np.arange(5000, dtype=np.uint64)
    m.update_batch(keys, keys)
    poller = MapPoller("m", m)
    poller.poll()
    m.delete_batch(keys[:10])
    m.update_batch(keys[100:110], keys[100:110] + 1)
    changes = by_key(poller.poll())
    expected: dict[bytes, bytes | None] = {k.tobytes(): None for k in keys[:10]}
    expected.update({k.tobytes(): (k + 1).tobytes() for k in keys[100:110]})
    assert changes == expected


def test_lru_evictions_are_reported_as_deletions(make_map: Callable[..., Map]) -> None:
    m = make_map("lru_hash", 8, 8, 512)
    first = np.arange(400, dtype=np.uint64)
    m.update_batch(first, first)
    poller = MapPoller("lru", m)
    poller.poll()
    baseline = poller.baseline
    assert baseline is not None
    before = set(baseline.dump.to_dict())
    newer = np.arange(10_000, 11_000, dtype=np.uint64)
    m.update_batch(newer, newer)  # no explicit delete: only evictions remove keys
    changes = by_key(poller.poll())
    after = m.dump().to_dict()
    deleted = {k for k, v in changes.items() if v is None}
    assert deleted, "inserting 1000 keys into a 512-entry LRU must evict"
    assert deleted == before - set(after)
    assert {k for k, v in changes.items() if v is not None} == set(after) - before


def test_per_cpu_values_are_reported_raw(make_map: Callable[..., Map]) -> None:
    m = make_map("percpu_hash", 4, 4, 64)
    stride = m.value_stride
    assert stride == 8 * m.ncpus
    m.update(b"key1", bytes(stride))
    poller = MapPoller("pc", m, emit_initial=True)
    assert poller.poll() == [Change("pc", b"key1", bytes(stride), Seen.POLL)]
    changed = bytearray(stride)
    changed[8 * (m.ncpus - 1)] = 42  # only the last CPU's slot
    m.update(b"key1", bytes(changed))
    assert poller.poll() == [Change("pc", b"key1", bytes(changed), Seen.POLL)]


def test_rescan_leaves_the_baseline(make_map: Callable[..., Map]) -> None:
    m = make_map("hash", 4, 4, 16)
    m.update(b"aaaa", b"1111")
    watcher = PollWatcher({"m": m})
    watcher.poll_once()
    m.update(b"bbbb", b"2222")
    snap = watcher.rescan("m")
    assert snap.to_dict() == {b"aaaa": b"1111", b"bbbb": b"2222"}
    assert snap.get(b"bbbb") == b"2222" and snap.get(b"cccc") is None
    baseline = watcher.snapshot("m")
    assert baseline is not None and baseline.to_dict() == {b"aaaa": b"1111"}
    assert watcher.poll_once() == [Change("m", b"bbbb", b"2222", Seen.POLL)]


def test_events_loop_until_close(make_map: Callable[..., Map]) -> None:
    m = make_map("array", 4, 8, 4)
    watcher = PollWatcher({"arr": m}, interval=0.02)
    assert isinstance(watcher, Watcher)
    seen: list[Change] = []
    done = threading.Event()

    def consume() -> None:
        for event in watcher.events():
            assert isinstance(event, Change)
            seen.append(event)
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        time.sleep(0.1)  # let the baseline scan happen
        m.update(struct.pack("<I", 2), struct.pack("<Q", 5))
        assert wait_for(lambda: len(seen) == 1, 5, every=0.01)
    finally:
        watcher.close()
        thread.join(timeout=5)
    assert done.is_set()
    assert seen == [Change("arr", struct.pack("<I", 2), struct.pack("<Q", 5), Seen.POLL)]


def udp(src: bytes) -> bytes:
    payload = b"p" * 18
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0, 64, 17, 0, src, bytes([198, 18, 0, 1])
    )
    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    return eth + ip + struct.pack("!HHHH", 1, 9, 26, 0) + payload
