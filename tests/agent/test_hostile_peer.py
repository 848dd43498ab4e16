"""Bad input from a member is refused, counted, and never reaches the kernel; the agent lives.

The sender is an authenticated member (a certificate of the cluster's CA, on the member list):
a buggy or compromised node is still only one node.
"""

from __future__ import annotations

import time

import grpc
from rogue import Rogue, hello

from bpfsync.core.messages import Batch, Record, Stamp
from bpfsync.demo.cluster import KEY, MAP_NAME, Cluster, session
from bpfsync.transport import codec


def _rec(map_: str, key: bytes, value: bytes | None) -> Record:
    return Record(map_, key, value, Stamp(time.time_ns(), 0, "m"))


def test_bad_member_input_is_refused_and_counted() -> None:
    with Cluster(tag="hostile", tls=True) as cluster:
        cluster.start(["--allow-node", "m"])
        assert cluster.wait_ready(30)
        a = cluster["a"]
        a.put(1, session(1))
        assert cluster.wait_converged(30)
        before = a.content()
        assert cluster.pki is not None
        m = Rogue(a.address, (cluster.pki / "ca.pem", cluster.issue("m")))
        records = (
            _rec("no-such-map", KEY.pack(5), session(5)),  # unknown map
            _rec(MAP_NAME, b"\x05\x00", session(5)),  # 2-byte key for a 4-byte-key map
            _rec(MAP_NAME, KEY.pack(6), b"\x00" * 3),  # 3-byte value for a 16-byte-value map
            Record(MAP_NAME, KEY.pack(7), session(7), Stamp(time.time_ns(), 0, "evil")),
            Record(MAP_NAME, KEY.pack(8), session(8), Stamp(time.time_ns() + 10**11, 0, "m")),
        )
        code, _ = m.send(hello("m"), codec.encode(Batch("m", 1, records)))
        assert code is None  # refused one by one, the stream goes on
        assert m.send(b"\xff\x00garbage, not a frame")[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert m.send(hello("m"), b"\x12\x05\x0a\x03abc" + b"\xff" * 7)[0] is not None
        assert m.send(hello("m"), b"\x12" + b"\xff" * (17 << 20))[0] is not None  # > 16 MiB
        assert m.send(codec.encode(Batch("m", 1, records)))[0] is not None  # no Hello first

        def counted() -> dict[str, int] | None:
            st = a.status()
            if st is None:
                return None
            seen = {**st["replica"], **st["transport"]}
            ok = (
                seen.get("rejected.unknown_map", 0) >= 1
                and seen.get("rejected.size_mismatch", 0) >= 2
                and seen.get("rejected.not_member", 0) >= 1
                and seen.get("rejected.clock_drift", 0) >= 1
                and seen.get("frames_malformed", 0) >= 2
                and seen.get("frames_oversized", 0) + seen.get("frames_malformed", 0) >= 3
                and seen.get("rejected_no_hello", 0) >= 1
            )
            return seen if ok else None

        assert cluster.wait(lambda: counted() is not None, 15), a.status()
        assert a.running
        assert a.content() == before  # nothing reached the kernel
        # and the node still syncs
        cluster["b"].put(2, session(2))
        assert cluster.wait_converged(30)
        assert KEY.pack(2) in a.content()
