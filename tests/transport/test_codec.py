"""The codec: every message survives a round trip; whatever a peer sends that is not a valid
message is MalformedMessageError, never another exception."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfsync.core.messages import (
    PROTOCOL,
    Ack,
    Answered,
    Batch,
    Digest,
    Hello,
    MapSchema,
    Message,
    Pull,
    Record,
    Stamp,
)
from bpfsync.core.register import pack
from bpfsync.errors import MalformedMessageError
from bpfsync.transport import Limits, decode, encode
from bpfsync.transport._proto import bpfsync_pb2 as pb

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)  # no lone surrogates
few_names = st.sampled_from(["ratelimit", "backends", "m", "ünïcode"])

# node ids as the config allows them (messages.NODE_ID_RULE): the codec refuses any other
node_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True)
logicals = st.integers(0, 2**32 - 1)  # no clock issues more (hlc.MAX_LOGICAL)
stamps = st.builds(Stamp, wall=u64, logical=logicals, node=node_ids | st.sampled_from(["a", "b"]))
records = st.builds(Record, map=few_names | names, key=st.binary(max_size=64),
                    value=st.none() | st.binary(max_size=64), stamp=stamps)
schemas = st.builds(MapSchema, name=names, key_size=st.integers(0, 512),
                    value_size=st.integers(0, 1 << 16), policy=st.sampled_from(["lww", "counter"]))
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, node=node_ids, incarnation=st.integers(1, 2**63 - 1),
              maps=st.lists(schemas, max_size=5).map(tuple)),
    st.builds(Batch, sender=node_ids, seq=u64, records=st.lists(records, max_size=50).map(tuple)),
    st.builds(Ack, seq=u64),
    st.builds(Digest, map=names, buckets=st.lists(u64, max_size=100).map(tuple),
              linked=st.lists(node_ids, max_size=5).map(tuple)),
    st.builds(Pull, map=names, buckets=st.lists(st.integers(0, (1 << 20) - 1), max_size=100,
                                                unique=True).map(tuple)),
    st.builds(Answered, map=names, differing=st.integers(0, 1 << 20)),
)


@given(messages)
def test_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


def test_empty_value_and_delete_stay_distinct() -> None:
    s = Stamp(1, 0, "a")
    b = Batch("a", 1, (Record("m", b"k", b"", s), Record("m", b"k2", None, s)))
    assert decode(encode(b)) == b


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_are_malformed(data: bytes) -> None:
    try:
        msg = decode(data)
    except MalformedMessageError:
        return
    assert isinstance(msg, Hello | Batch | Ack | Digest | Pull | Answered)


@settings(max_examples=300)
@given(messages, st.data())
def test_corrupted_frames_decode_or_are_malformed(msg: Message, data: st.DataObject) -> None:
    frame = bytearray(encode(msg))
    if not frame:
        return
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(MalformedMessageError):
        decode(bytes(frame))


V1 = pack(Stamp(1, 0, "a"), b"v1")
DEL = pack(Stamp(2, 0, "a"), None)


def raw_batch(**fields: Any) -> bytes:
    """A Batch frame of two records built by hand, with ``fields`` overridden."""
    b: dict[str, Any] = dict(
        sender="a", seq=1, maps=["m"], map_index=[0, 0], keys=[b"k1", b"k2"], records=[V1, DEL])
    b.update(fields)
    return bytes(pb.Frame(batch=pb.Batch(**b)).SerializeToString())


def test_hand_built_batch_is_valid() -> None:
    batch = decode(raw_batch())
    assert isinstance(batch, Batch)
    assert [r.value for r in batch.records] == [b"v1", None]
    assert [r.stamp for r in batch.records] == [Stamp(1, 0, "a"), Stamp(2, 0, "a")]


@pytest.mark.parametrize(("fields", "why"), [
    (dict(sender=""), "Batch.sender '' is not a node id"),
    (dict(sender="a b"), "Batch.sender 'a b' is not a node id"),
    (dict(records=[V1, pack(Stamp(2, 0, "m\u00e9"), None)]), "origin 'm\u00e9' is not a node"),
    (dict(records=[V1, pack(Stamp(2, 2**32, "a"), None)]), "logical clock"),
    (dict(maps=[""]), "map name is empty"),
    (dict(records=[V1]), "different lengths"),
    (dict(keys=[], map_index=[]), "different lengths"),
    (dict(map_index=[0, 1]), "index beyond"),
    (dict(records=[V1, DEL[:-2]]), "bytes"),  # too short to hold a stamp
    (dict(records=[V1, bytes(16) + b"\x00\x00v"]), "node id"),  # empty node id
    (dict(records=[V1, bytes(16) + b"a" * 300 + b"\x00\x00"]), "node id"),
    (dict(records=[V1, bytes(16) + b"abc"]), "node id"),  # no end of node id
    (dict(records=[V1, DEL + b"v"]), "tombstone with a value"),
    (dict(records=[V1, bytes(16) + b"a\x00\x07"]), "unknown kind"),
    (dict(records=[V1, bytes(16) + b"\xff\xfe\x00\x01"]), "UTF-8"),
    (dict(keys=[b"k" * 70000, b"k"]), "key is longer"),
])
def test_malformed_batches(fields: dict[str, Any], why: str) -> None:
    with pytest.raises(MalformedMessageError, match=why):
        decode(raw_batch(**fields))


def test_limits_bound_what_a_peer_can_make_us_allocate() -> None:
    tight = Limits(max_records=1, max_buckets=4, max_maps=1)
    with pytest.raises(MalformedMessageError, match="records"):
        decode(raw_batch(), tight)
    with pytest.raises(MalformedMessageError, match="Digest buckets"):
        decode(encode(Digest("m", (1, 2, 3, 4, 5))), tight)
    with pytest.raises(MalformedMessageError, match="beyond"):
        decode(encode(Pull("m", (4,))), tight)
    two = Hello("a", 1, (MapSchema("m", 4, 4), MapSchema("n", 4, 4)))
    with pytest.raises(MalformedMessageError, match="maps in Hello"):
        decode(encode(two), tight)
    huge = pb.Frame(hello=pb.Hello(node="a", incarnation=1, maps=[
        pb.MapSchema(name="m", key_size=1 << 30, policy="lww")]))
    with pytest.raises(MalformedMessageError, match="key/value size"):
        decode(huge.SerializeToString())


@pytest.mark.parametrize(("frame", "why"), [
    (b"", "no message"),
    (b"\xff\xff\xff", "undecodable"),
    (pb.Frame(hello=pb.Hello(node="", incarnation=1)).SerializeToString(),
     "Hello.node '' is not a node id"),
    (pb.Frame(hello=pb.Hello(node="x" * 64, incarnation=1)).SerializeToString(), "not a node id"),
    (pb.Frame(hello=pb.Hello(node="a", incarnation=0)).SerializeToString(), "incarnation 0"),
    (pb.Frame(hello=pb.Hello(node="a", incarnation=1 << 63)).SerializeToString(), "incarnation"),
    (pb.Frame(hello=pb.Hello(node="a", incarnation=1, maps=[pb.MapSchema(name="m")]))
     .SerializeToString(), "policy is empty"),
    (pb.Frame(digest=pb.Digest(map="m", linked=["ok", "not ok"])).SerializeToString(),
     "Digest.linked 'not ok' is not a node id"),
    (pb.Frame(pull=pb.Pull(map="m", buckets=[3, 1, 3])).SerializeToString(), "more than once"),
    (pb.Frame(answered=pb.Answered(map="m", differing=1 << 21)).SerializeToString(),
     "differed"),
    (pb.Frame(digest=pb.Digest(map="")).SerializeToString(), "Digest.map is empty"),
    (pb.Frame(pull=pb.Pull(map="")).SerializeToString(), "Pull.map is empty"),
    (pb.Frame(answered=pb.Answered(map="")).SerializeToString(), "Answered.map is empty"),
    (b"\x0a\x03\x0a\x01\xff", "undecodable"),  # Hello.node that is not UTF-8
])
def test_malformed_frames(frame: bytes, why: str) -> None:
    with pytest.raises(MalformedMessageError, match=why):
        decode(frame)


def test_error_names_the_peer() -> None:
    with pytest.raises(MalformedMessageError) as info:
        decode(b"", peer="node-7")
    assert info.value.peer == "node-7" and "node-7" in str(info.value)


@pytest.mark.parametrize("msg", [
    Batch("a", -1, ()),  # seq is unsigned on the wire: a negative one is a local bug
    Batch("", 1, ()),
    Batch("a", 1, (Record("m", b"k", b"v", Stamp(1, 0, "")),)),
    Batch("a", 1, (Record("m", b"k", b"v", Stamp(-1, 0, "a")),)),
    Hello("", 1, ()),
    Digest("", ()),
])
def test_encode_refuses_invalid_local_values(msg: Message) -> None:
    with pytest.raises(ValueError):
        encode(msg)


def test_a_hello_without_a_protocol_is_from_version_1() -> None:
    frame = pb.Frame(hello=pb.Hello(node="old", incarnation=3)).SerializeToString()
    old = decode(frame)
    assert isinstance(old, Hello) and old.protocol == 1
    assert decode(encode(Hello("new", 3, ()))) == Hello("new", 3, (), PROTOCOL)
