"""Bad input from a peer is refused, counted, and never reaches the kernel; the agent lives on."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import grpc

from bpfsync.core.messages import Batch, Hello, MapSchema, Record, Stamp
from bpfsync.demo.cluster import KEY, MAP_NAME, VALUE, Cluster, session
from bpfsync.transport import codec

METHOD = "/bpfsync.v1.Sync/Stream"


def _stream(address: str, frames: list[bytes], wait: float = 1.0) -> grpc.StatusCode | None:
    """Open one raw stream, send ``frames`` as they are, and return how the agent ended it."""
    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(address, options=opts) as ch:
        call = ch.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        q: queue.Queue[bytes | None] = queue.Queue()
        for f in frames:
            q.put(f)

        def requests() -> Iterator[bytes]:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    return
                yield item

        try:
            for _ in call(requests(), timeout=wait + 5):
                pass
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return None


def _rec(map_: str, key: bytes, value: bytes | None) -> Record:
    return Record(map_, key, value, Stamp(time.time_ns(), 0, "mallory"))


def test_bad_peer_input_is_refused_and_counted(cluster: Cluster) -> None:
    cluster.start()
    assert cluster.wait_ready(30)
    a = cluster["a"]
    a.put(1, session(1))
    assert cluster.wait_converged(30)
    before = a.content()
    schema = MapSchema(MAP_NAME, KEY.size, VALUE.size)
    hello = codec.encode(Hello("mallory", 1, (schema,)))
    records = (
        _rec("no-such-map", KEY.pack(5), session(5)),  # unknown map
        _rec(MAP_NAME, b"\x05\x00", session(5)),  # 2-byte key for a 4-byte-key map
        _rec(MAP_NAME, KEY.pack(6), b"\x00" * 3),  # 3-byte value for a 16-byte-value map
    )
    bad_batch = codec.encode(Batch("mallory", 1, records))
    _stream(a.address, [hello, bad_batch])
    assert _stream(a.address, [b"\xff\x00garbage, not a frame"]) is not None
    assert _stream(a.address, [hello, b"\x12\x05\x0a\x03abc" + b"\xff" * 7]) is not None
    assert _stream(a.address, [hello, b"\x12" + b"\xff" * (17 << 20)]) is not None  # > 16 MiB
    assert _stream(a.address, [codec.encode(Batch("mallory", 1, records))]) is not None

    def counted() -> dict[str, int] | None:
        st = a.status()
        if st is None:
            return None
        seen = {**st["replica"], **st["transport"]}
        ok = (
            seen.get("rejected.unknown_map", 0) >= 1
            and seen.get("rejected.size_mismatch", 0) >= 2
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
