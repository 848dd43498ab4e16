"""Generated frames from an authenticated member against a real agent: none may crash it, exhaust
it, or get anything invalid into a kernel map.

The frames (Hypothesis) cover the boundary values of every field of every message: ids and names
(the member's own, other members', strangers', malformed), incarnations, protocol versions, map
schemas, sequence numbers around the window, records with keys and values of every wrong size,
unknown maps, stamps at and past the drift bound and the logical bound, origins inside and
outside the cluster, digests and pulls with every bucket count, and raw bytes: truncated or
corrupted frames. Every record that must be refused uses a key in a marked range
(``_MARKED``), so "nothing invalid applied" is exact: no node's map may hold such a key.

``make test`` sends a quick slice; ``make fuzz`` the full run (BPFSYNC_FUZZ_EXAMPLES examples of
up to 6 concurrent streams; BPFSYNC_FUZZ_MIN_FRAMES, what it must at least have sent).
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rogue import Rogue, counter, metrics, rss_mb

from bpfsync.core.hlc import MAX_LOGICAL
from bpfsync.core.messages import Ack, Answered, Digest, Hello, MapSchema, Pull, Stamp
from bpfsync.core.register import pack
from bpfsync.core.session import MAX_SEQ_STEP
from bpfsync.demo.cluster import KEY, MAP_NAME, VALUE, Cluster, session, wait_for
from bpfsync.transport import codec
from bpfsync.transport._proto import bpfsync_pb2 as pb
from bpfsync.transport.rpc import METHOD

EXAMPLES = int(os.environ.get("BPFSYNC_FUZZ_EXAMPLES", "400"))
MIN_FRAMES = int(os.environ.get("BPFSYNC_FUZZ_MIN_FRAMES", "0"))
RSS_BOUND_MB = 120  # growth of the agent under fuzzing, gRPC's buffers and the member's queue
_MARKED = 0xE000_0000  # keys of records that must be refused
U64 = 2**64 - 1
DRIFT = 10**9  # the agents' default max_clock_drift_ms, in ns

frames_sent = 0


def _now() -> int:
    return time.time_ns()


# --- strategies --------------------------------------------------------------------------------

member_ids = st.sampled_from(["m", "a", "b", "c"])
bad_ids = st.sampled_from(["", "evil", "x" * 64, "-lead", "a b", "n\u00e9", "m\x00", "M"])
ids = member_ids | bad_ids
u64s = st.sampled_from([0, 1, 2, 255, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, U64])
ok_names = st.sampled_from([MAP_NAME, "other", MAP_NAME.upper()])  # one synced, two not
map_names = ok_names | st.sampled_from(["", "s" * 300])
schemas = st.builds(MapSchema, name=map_names, key_size=st.sampled_from([0, 4, 5, 1 << 16]),
                    value_size=st.sampled_from([0, VALUE.size, 1 << 24]),
                    policy=st.sampled_from(["lww", "counter", "", "weird"]))
hellos = st.builds(Hello, node=ids | st.just("m"), incarnation=u64s | st.integers(1, 2**63 - 1),
                   maps=st.lists(schemas, max_size=3).map(tuple),
                   protocol=st.sampled_from([0, 1, 2, 3, 2**32 - 1]))


@st.composite
def good_record(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
    """A record every rule admits (it may still lose the merge)."""
    key = KEY.pack(draw(st.integers(0, 0xFFFF)))
    value = None if draw(st.booleans()) and draw(st.booleans()) else session(draw(
        st.integers(0, 10**6)))
    wall = _now() + draw(st.sampled_from([-(10**12), -1, 0, DRIFT // 2]))
    logical = draw(st.sampled_from([0, 1, MAX_LOGICAL]))
    origin = draw(member_ids)
    return MAP_NAME, key, pack(Stamp(wall, logical, origin), value)


@st.composite
def bad_record(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
    """A record some rule refuses, keyed in the marked range when its key has the right size."""
    key = KEY.pack(_MARKED + draw(st.integers(0, 0xFFFF)))
    value: bytes | None = session(1)
    wall, logical, origin, name = _now(), 0, "m", MAP_NAME
    flaw = draw(st.sampled_from(["map", "key", "value", "drift", "logical", "origin"]))
    if flaw == "map":
        name = draw(st.sampled_from(["other", MAP_NAME.upper(), "x" * 64]))
    elif flaw == "key":
        key = draw(st.sampled_from([b"", b"\x01", key + b"\x00", bytes(1 << 16)]))
    elif flaw == "value":
        value = draw(st.sampled_from([b"", b"v" * (VALUE.size - 1), b"v" * (VALUE.size + 1)]))
    elif flaw == "drift":
        wall = draw(st.sampled_from([wall + 2 * DRIFT, wall + 10**15, 2**63, U64]))
    elif flaw == "logical":
        logical = draw(st.sampled_from([MAX_LOGICAL + 1, 2**48, U64]))
    else:
        origin = draw(st.sampled_from(["evil", "fake-1", "n\u00e9"]))
    return name, key, pack(Stamp(wall, logical, origin), value)


def _batch(sender: str, seq: int, rows: list[tuple[str, bytes, bytes]]) -> bytes:
    """A Batch frame as the wire has it, built field by field (encode refuses invalid ones)."""
    frame = pb.Frame()
    frame.batch.sender = sender
    frame.batch.seq = seq
    maps: dict[str, int] = {}
    frame.batch.map_index.extend([maps.setdefault(r[0], len(maps)) for r in rows])
    frame.batch.maps.extend(maps)
    frame.batch.keys.extend(r[1] for r in rows)
    frame.batch.records.extend(r[2] for r in rows)
    return bytes(frame.SerializeToString())


records = st.lists(good_record() | bad_record(), max_size=12)
# batches a member may send on its stream: numbered within the window, or repairs (seq 0)
member_batches = st.builds(_batch, st.just("m"), st.integers(0, 60), records)
# ... and what ends the stream: another sender, a seq far beyond the window or out of range
bad_batches = st.builds(
    _batch, ids, st.sampled_from([MAX_SEQ_STEP + 100, 10**6, 2**63 - 1, 2**63, U64]), records)


def _encoded(msg: object) -> bytes:
    """A message as the wire has it, built field by field (encode refuses invalid ones)."""
    frame = pb.Frame()
    if isinstance(msg, Hello):
        frame.hello.node, frame.hello.incarnation = msg.node, msg.incarnation
        frame.hello.protocol = msg.protocol
        for m in msg.maps:
            frame.hello.maps.add(name=m.name, key_size=m.key_size, value_size=m.value_size,
                                 policy=m.policy)
    elif isinstance(msg, Ack):
        frame.ack.seq = msg.seq
    elif isinstance(msg, Digest):
        frame.digest.map = msg.map
        frame.digest.buckets.extend(msg.buckets)
        frame.digest.linked.extend(msg.linked)
        frame.digest.urgent = msg.urgent
    elif isinstance(msg, Pull):
        frame.pull.map = msg.map
        frame.pull.buckets.extend(msg.buckets)
    elif isinstance(msg, Answered):
        frame.answered.map, frame.answered.differing = msg.map, msg.differing
    return bytes(frame.SerializeToString())


def _hashes(n: int, seed: int) -> tuple[int, ...]:
    return struct.unpack(f"<{n}Q", random.Random(seed).randbytes(8 * n))


def _digests(counts: list[int], names: st.SearchStrategy[str]) -> st.SearchStrategy[Digest]:
    # bucket hashes expanded from one drawn seed: a thousand draws of a number each would make
    # the generator, not the agent, the bound of the run
    return st.builds(
        Digest, map=names,
        buckets=st.builds(_hashes, st.sampled_from(counts), st.integers(0, 2**32)),
        linked=st.lists(ids, max_size=4).map(tuple), urgent=st.booleans())


# messages a member's stream survives (its digests and pulls of buckets that exist, answers and
# acks of any value, the map this node syncs or one it does not), ...
survivable = st.one_of(
    member_batches,
    _digests([1, 2, 512, 1024], ok_names).map(_encoded),
    st.builds(Pull, map=ok_names, buckets=st.lists(st.integers(0, 1023), max_size=8,
                                                   unique=True).map(tuple)).map(_encoded),
    st.builds(Answered, map=ok_names, differing=st.sampled_from([0, 1, 1024, 2**20])
              ).map(_encoded),
    st.builds(Ack, seq=u64s).map(_encoded),
)
# ... and what ends it: a second Hello, bucket counts and indexes that do not fit, names and
# values beyond the codec's bounds, bad batches, raw bytes
terminal = st.one_of(
    hellos.map(_encoded),
    st.builds(Answered, map=map_names, differing=st.just(0)).map(_encoded),
    _digests([0, 3, 1025, 2048, 4096], map_names).map(_encoded),
    st.builds(Pull, map=map_names, buckets=st.lists(st.sampled_from(
        [1024, 2**20 - 1, 2**20, 2**32 - 1, 5, 5]), min_size=1, max_size=8).map(tuple)
              ).map(_encoded),
    st.builds(Answered, map=map_names, differing=st.sampled_from([2**20 + 1, 2**32 - 1])
              ).map(_encoded),
    bad_batches,
)


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(survivable | terminal))
    how = draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if how == "garbage" or not frame:
        return draw(st.binary(max_size=64))
    if how == "truncate":
        return bytes(frame[: draw(st.integers(0, len(frame) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame)


# a stream: mostly the member's own Hello first, as a real peer does, then frames it survives,
# then perhaps one that ends it
streams = st.tuples(
    st.sampled_from(["m"] * 8 + ["evil", ""]),  # the member; a stranger; no Hello at all
    st.lists(survivable, min_size=4, max_size=24),
    st.none() | terminal | corrupted(),
).map(lambda s: (s[0], s[1] + ([s[2]] if s[2] is not None else [])))


# --- the run -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    d = tmp_path_factory.mktemp("fuzz")
    with Cluster(tag="fuzz", tls=True) as cl:
        for node in cl:
            cfg = d / f"{node.name}.yaml"
            # penalties short, so the member fuzzing is refused for milliseconds, not a minute
            cfg.write_text(yaml.safe_dump({
                "node_id": node.name, "maps": [{"path": str(node.pin)}],
                "sync": {"penalty_base_s": 0.001, "penalty_cap_s": 0.01}}))
            node.start(["--config", str(cfg), "--allow-node", "m"])
        assert cl.wait_ready(30) and cl.wait_linked(30)
        yield cl


class _Sender:
    """One TLS channel of member m, kept across examples; one stream per example."""

    def __init__(self, cl: Cluster) -> None:
        assert cl.pki is not None
        self.loop = asyncio.new_event_loop()
        self.sending = 0.0  # seconds spent sending, not generating
        self.hung: list[str] = []  # streams the agent neither read to the end nor ended
        rogue = Rogue(cl["a"].address, (cl.pki / "ca.pem", cl.issue("m")))

        async def open_channel() -> grpc.aio.Channel:  # a channel belongs to the loop it is made on
            return rogue.channel()

        self.channel = self.loop.run_until_complete(open_channel())

    def send(self, streams: list[tuple[str, list[bytes]]]) -> None:
        """The streams at once (an agent serves several), each to its end."""
        async def all_of() -> None:
            await asyncio.gather(*(self._send(*s) for s in streams))

        started = time.monotonic()
        self.loop.run_until_complete(all_of())
        self.sending += time.monotonic() - started

    async def _send(self, first: str, frames: list[bytes]) -> None:
        global frames_sent
        call = self.channel.stream_stream(METHOD)()
        stage = "hello"
        try:
            async with asyncio.timeout(10):  # the agent read it all, or ended the stream
                if first:
                    await call.write(codec.encode(Hello(first, 1 + frames_sent, (
                        MapSchema(MAP_NAME, KEY.size, VALUE.size),))))
                for i, frame in enumerate(frames):
                    stage = f"frame {i} of {len(frames)}"
                    await call.write(frame)
                    frames_sent += 1
                stage = "done_writing"
                await call.done_writing()
                stage = "reading"
                while await call.read() is not grpc.aio.EOF:
                    pass
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        except TimeoutError:
            self.hung.append(f"{stage}: {call.done()}")
        finally:
            call.cancel()

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()


def test_generated_frames_crash_nothing_and_apply_nothing_invalid(fuzzed: Cluster) -> None:
    a = fuzzed["a"]
    before = rss_mb(a)
    sender = _Sender(fuzzed)
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(streams, min_size=1, max_size=6))
    def some_streams(batch: list[tuple[str, list[bytes]]]) -> None:
        sender.send(batch)
        assert a.running, a.log()[-3000:]

    try:
        some_streams()
    finally:
        sender.close()
    took = time.monotonic() - started
    grown = rss_mb(a) - before
    print(f"\nfuzz: {frames_sent} frames in {EXAMPLES} examples, {took:.0f} s "
          f"({frames_sent / took:.0f} frames/s, {sender.sending:.0f} s of it sending); RSS of a "
          f"{before:.0f} MB, grew {grown:.1f} MB")
    assert not sender.hung, sender.hung[:10]
    assert frames_sent >= max(EXAMPLES, MIN_FRAMES)  # the frames went out
    assert all(n.running for n in fuzzed)
    page = metrics(a)
    assert counter(page, "bpfsync_rejected_total", reason="internal_error") == 0
    assert "Traceback" not in a.log()
    assert grown < RSS_BOUND_MB, f"RSS grew {grown:.1f} MB"
    for node in fuzzed:
        marked = [k for k in node.content() if KEY.unpack(k)[0] >= _MARKED]
        assert not marked, f"{node.name} holds refused records' keys {marked[:5]}"
    # what the fuzzing exercised: refusals of every kind were counted
    status = a.status()
    assert status is not None
    seen = {**status["replica"], **status["transport"]}
    for reason in ("rejected.size_mismatch", "rejected.clock_drift", "rejected.not_member",
                   "rejected.unknown_map", "frames_malformed", "rejected_unauthenticated"):
        assert seen.get(reason, 0) > 0, (reason, seen)
    # and a change made elsewhere still arrives everywhere
    fuzzed["b"].put(0xBEEF, session(7))
    fuzzed["a"].put(0xCAFE, session(8))
    assert wait_for(lambda: all(KEY.pack(k) in n.content() for n in fuzzed
                                for k in (0xBEEF, 0xCAFE)), 30)


def test_the_fuzz_targets_exist() -> None:
    """make fuzz runs this file with more examples (a typo there would fuzz nothing)."""
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    assert "BPFSYNC_FUZZ_EXAMPLES" in makefile and "tests/agent/test_fuzz.py" in makefile
