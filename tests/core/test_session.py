from __future__ import annotations

import pytest

from bpfsync.core.messages import Ack, Batch, Hello, MapSchema, Record, Stamp
from bpfsync.core.outbox import Outbox
from bpfsync.core.session import MAX_SEQ_STEP, PeerSession, map_mismatches
from bpfsync.errors import MalformedMessageError, UnauthenticatedPeerError

M = MapSchema("m", 1, 1)


def hello(incarnation: int = 7, node: str = "b") -> Hello:
    return Hello(node, incarnation, (M,))


def rec(i: int) -> Record:
    return Record("m", bytes([i]), b"v", Stamp(i, 0, "a"))


def up(s: PeerSession, incarnation: int = 7) -> None:
    assert s.link_up(hello(incarnation)) == []
    s.on_hello(hello(incarnation))


def test_batches_are_numbered_held_until_acked_and_resent_after_a_reconnect() -> None:
    s = PeerSession("a", "b")
    up(s)
    assert s.take_repair()  # first contact: catch up by digest
    b1, b2, b3 = (s.send([rec(i)]) for i in (1, 2, 3))
    assert b1 is not None and b2 is not None and b3 is not None
    assert (b1.seq, b2.seq, b3.seq) == (1, 2, 3) and b1.sender == "a"
    s.on_ack(Ack(1))
    assert s.unacked == 2
    s.link_down()
    assert s.send([rec(4)]) is None  # held for the resume
    assert [b.seq for b in s.link_up(hello())] == [2, 3, 4]
    assert not s.take_repair()  # resend covers everything
    s.on_ack(Ack(4))
    assert s.unacked == 0


def test_the_window_bounds_held_batches_and_a_dropped_unacked_one_means_repair() -> None:
    s = PeerSession("a", "b", max_unacked=2)
    up(s)
    s.take_repair()
    s.send([rec(1)])
    s.send([rec(2)])
    assert not s.window_open
    s.send([rec(3)])  # the agent ignored the window: batch 1 is dropped
    s.link_down()
    assert [b.seq for b in s.link_up(hello())] == [2, 3]
    assert s.take_repair()  # the peer may never have got batch 1


def test_next_batch_drains_the_outbox_only_while_up_and_the_window_is_open() -> None:
    s = PeerSession("a", "b", max_unacked=1, outbox=Outbox())
    s.outbox.add([rec(1), rec(2), rec(3)])
    assert s.next_batch(2, 10_000) is None  # down
    up(s)
    batch = s.next_batch(2, 10_000)
    assert batch is not None and batch.records == (rec(1), rec(2))
    assert s.next_batch(2, 10_000) is None  # window full
    s.on_ack(Ack(1))
    batch = s.next_batch(2, 10_000)
    assert batch is not None and batch.seq == 2 and batch.records == (rec(3),)


def test_the_window_also_closes_on_records_in_flight_however_few_the_batches() -> None:
    s = PeerSession("a", "b", max_unacked=100, max_unacked_records=4, outbox=Outbox())
    s.outbox.add([rec(i) for i in range(1, 9)])
    up(s)
    s.take_repair()
    assert s.next_batch(3, 10_000) is not None and s.window_open  # 3 records held
    assert s.next_batch(3, 10_000) is not None  # 6 held: past the limit, the window closes
    assert not s.window_open and s.next_batch(3, 10_000) is None
    s.on_ack(Ack(1))  # 3 held
    batch = s.next_batch(3, 10_000)
    assert batch is not None and batch.seq == 3 and s.unacked == 2
    with pytest.raises(ValueError, match="max_unacked"):
        PeerSession("a", "b", max_unacked_records=0)


def test_receiving_skips_duplicates_and_flags_gaps() -> None:
    s = PeerSession("a", "b")
    assert s.on_hello(hello()) == Ack(0)
    s.take_repair()
    assert s.on_batch(Batch("b", 5, ()), 7)  # first batch of this peer incarnation: the baseline
    assert s.ack() == Ack(5)
    assert not s.take_repair()
    assert not s.on_batch(Batch("b", 5, ()), 7)  # resend of a batch already applied
    assert s.duplicates == 1
    assert s.on_batch(Batch("b", 6, ()), 7)
    assert s.on_batch(Batch("b", 9, ()), 7)  # gap: applied, acked, repaired
    assert s.ack() == Ack(9) and s.take_repair()
    assert s.on_batch(Batch("b", 0, ()), 7)  # repair batches are never numbered
    assert s.ack() == Ack(9)


def test_a_restarted_peer_rebuilds_itself_and_we_start_a_new_baseline() -> None:
    s = PeerSession("a", "b")
    up(s)
    s.take_repair()
    s.on_batch(Batch("b", 1, ()), 7)
    s.on_batch(Batch("b", 2, ()), 7)
    s.send([rec(1)])
    s.link_down()
    assert s.link_up(hello(incarnation=8)) == []  # batches for its previous life are dropped
    assert not s.take_repair()  # it starts the repair: first contact on its side
    assert s.on_hello(hello(incarnation=8)) == Ack(0)
    assert s.on_batch(Batch("b", 1, ()), 8)  # not a duplicate: a new incarnation numbers afresh
    batch = s.send([rec(2)])
    assert batch is not None and batch.seq == 2  # our numbering continues
    s.on_ack(Ack(2))
    assert s.unacked == 0


def test_a_seq_far_beyond_the_last_is_refused_and_changes_nothing() -> None:
    """The sequence hijack: one frame numbered 10^12 made every real batch after it look like
    a resend, for as long as the session lived."""
    s = PeerSession("a", "b")
    up(s)
    s.take_repair()
    assert s.on_batch(Batch("b", 10, ()), 7)
    with pytest.raises(MalformedMessageError, match="beyond the last"):
        s.on_batch(Batch("b", 10 + MAX_SEQ_STEP + 1, ()), 7)
    with pytest.raises(MalformedMessageError, match="seq"):
        s.on_batch(Batch("b", 2**63, ()), 99)  # not even as a new incarnation's baseline
    assert s.on_batch(Batch("b", 10 + MAX_SEQ_STEP, ()), 7)  # the widest gap allowed
    assert s.ack() == Ack(10 + MAX_SEQ_STEP) and s.take_repair()


def test_a_second_incarnation_claiming_the_peer_cannot_silence_the_real_one() -> None:
    """Numbering is per incarnation of the stream's Hello: a spoofer's numbers (a plaintext
    link lets anyone claim a node id) never make the real peer's batches look like resends,
    and acks go to the incarnation our own stream reached."""
    s = PeerSession("a", "b")
    up(s, incarnation=7)
    s.take_repair()
    assert s.on_batch(Batch("b", 1, ()), 7)
    s.on_hello(hello(incarnation=666))  # the spoofer's stream
    assert s.on_batch(Batch("b", 1_000, ()), 666)
    assert s.on_batch(Batch("b", 2, ()), 7) and s.duplicates == 0
    assert s.ack() == Ack(2)
    for inc in range(1000, 1010):  # a spoofer cycling incarnations only re-baselines the real
        s.on_batch(Batch("b", 5, ()), inc)
    assert s.on_batch(Batch("b", 3, ()), 7) and s.ack() == Ack(3)
    assert len(s._recv) <= 4  # bounded


def test_acks_above_what_we_sent_are_ignored_and_counted() -> None:
    s = PeerSession("a", "b")
    up(s)
    s.send([rec(1)])
    s.on_ack(Ack(5))
    assert s.stale_acks == 1 and s.unacked == 1


def test_protocol_violations_are_the_peers_fault() -> None:
    s = PeerSession("a", "b")
    with pytest.raises(MalformedMessageError, match="before Hello"):
        s.on_batch(Batch("b", 1, ()), 7)
    with pytest.raises(UnauthenticatedPeerError):
        s.on_hello(hello(node="mallory"))
    s.on_hello(hello())
    with pytest.raises(MalformedMessageError, match="sender"):
        s.on_batch(Batch("c", 1, ()), 7)
    with pytest.raises(MalformedMessageError, match="seq"):
        s.on_batch(Batch("b", -1, ()), 7)
    with pytest.raises(ValueError):
        PeerSession("a", "b", max_unacked=0)


def test_outbox_overflow_asks_for_repair() -> None:
    s = PeerSession("a", "b", outbox=Outbox(max_records=1))
    s.outbox.add([rec(1), rec(2)])
    assert s.repair_needed and s.take_repair() and not s.repair_needed


def test_map_mismatches() -> None:
    mine = [M, MapSchema("n", 4, 8), MapSchema("o", 4, 8)]
    theirs = Hello("b", 1, (M, MapSchema("n", 4, 16)))
    got = map_mismatches(mine, theirs)
    assert set(got) == {"n", "o"}
    assert "4/16" in got["n"] and "does not sync" in got["o"]
