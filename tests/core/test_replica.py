from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfsync.core.digest import bucket_of
from bpfsync.core.hlc import MAX_LOGICAL, ClockDriftError
from bpfsync.core.lww_table import LwwTable
from bpfsync.core.membership import Membership
from bpfsync.core.messages import Digest, MapSchema, Pull, Record, Stamp
from bpfsync.core.policy import LWW, FieldPolicy, FieldRule
from bpfsync.core.register import Packed
from bpfsync.core.replica import ApplyResult, Replica, is_seed, seed_stamp
from bpfsync.errors import (
    ConfigError,
    MalformedMessageError,
    NotMemberError,
    SizeMismatchError,
    UnknownMapError,
)

T = 1_700_000_000 * 10**9
SECOND = 10**9
TTL = 60 * SECOND
M = MapSchema("blocklist", 4, 8)
C = MapSchema("ratelimit", 4, 8, "counter")


def k(i: int) -> bytes:
    return i.to_bytes(4, "little")


def v(i: int) -> bytes:
    return i.to_bytes(8, "little")


def replica(node: str = "a", max_drift_ns: int = 10**9) -> Replica:
    return Replica(node, (M, C), TTL, digest_buckets=16, max_drift_ns=max_drift_ns)


def remote(key: int, value: int | None, wall: int, node: str = "b", map: str = M.name) -> Record:
    return Record(map, k(key), None if value is None else v(value), Stamp(wall, 0, node))


# --- local changes and echoes ---------------------------------------------------------------


def test_a_local_change_gets_a_fresh_stamp_and_is_merged() -> None:
    r = replica()
    rec = r.local_change("blocklist", k(1), v(7), T)
    assert rec == Record("blocklist", k(1), v(7), Stamp(T, 0, "a"))
    assert r.content("blocklist") == {k(1): v(7)}
    assert r.local_change("blocklist", k(1), v(7), T + 1) is None  # no change


def test_our_kernel_write_reported_back_is_an_echo_but_a_later_data_plane_write_is_not() -> None:
    r = replica()
    res = r.receive([remote(1, 5, T)], T, "b")
    assert res.writes == [("blocklist", k(1), v(5))]
    assert r.local_change("blocklist", k(1), v(5), T + 1) is None  # the poll watcher saw our write
    assert r.stats["local.echo"] == 1
    again = r.local_change("blocklist", k(1), v(6), T + 2)  # the data plane wrote the key
    assert again is not None and again.stamp > Stamp(T, 0, "b") and again.value == v(6)
    # deleting what we wrote, then the echo of a delete we applied
    r.receive([remote(1, None, T + 5 * SECOND)], T + 5 * SECOND, "b")
    assert r.local_change("blocklist", k(1), None, T + 6 * SECOND) is None


def test_a_failed_write_is_noted_so_the_kernel_view_stays_true() -> None:
    r = replica()
    res = r.receive([remote(1, 5, T)], T, "b")
    assert res.writes
    r.note_kernel("blocklist", k(1), None)  # E2BIG: the map was full
    assert r.kernel_view("blocklist", k(1)) is None
    assert r.local_change("blocklist", k(1), None, T) is None  # not a local delete
    assert r.desired("blocklist", k(1)) == v(5)  # what a retry writes
    r.note_kernel("blocklist", k(1), v(5))
    assert r.local_change("blocklist", k(1), v(5), T) is None


def test_local_misuse_is_a_value_error_not_a_peer_error() -> None:
    r = replica()
    with pytest.raises(ValueError, match="not synced"):
        r.local_change("nope", k(1), v(1), T)
    with pytest.raises(ValueError, match="4-byte keys"):
        r.local_change("blocklist", b"\x01", v(1), T)


# --- validation -------------------------------------------------------------------------------


def test_bad_records_are_refused_one_by_one_and_counted_by_reason() -> None:
    r = replica(max_drift_ns=SECOND)
    good = remote(1, 1, T)
    batch = [
        Record("other", k(1), v(1), Stamp(T, 0, "b")),
        Record("blocklist", b"\x01\x02", v(1), Stamp(T, 0, "b")),
        Record("blocklist", k(2), b"\x00", Stamp(T, 0, "b")),
        good,
        Record("blocklist", k(3), v(1), Stamp(T + 2 * SECOND, 0, "c")),
        Record("blocklist", k(4), v(1), Stamp(-1, 0, "b")),
        Record("blocklist", k(5), v(1), Stamp(T, 0, "")),
        remote(6, None, T),  # a tombstone is the right size whatever the value size
    ]
    res = r.receive(batch, T, "b")
    # malformed ones first: they are refused before the rest is packed
    errors = [type(e) for _, e in res.rejected]
    assert errors == [
        MalformedMessageError,
        MalformedMessageError,
        UnknownMapError,
        SizeMismatchError,
        SizeMismatchError,
        ClockDriftError,
    ]
    assert all(e.peer == "b" for _, e in res.rejected)
    assert [rec for rec, _ in res.rejected] == [batch[i] for i in (5, 6, 0, 1, 2, 4)]
    assert res.forward == [good, batch[7]]
    assert r.content("blocklist") == {k(1): v(1)}
    assert {key: n for key, n in r.stats.items() if key.startswith("rejected.")} == {
        "rejected.unknown_map": 1,
        "rejected.size_mismatch": 2,
        "rejected.clock_drift": 1,
        "rejected.malformed": 2,
    }


def test_a_record_at_the_top_of_the_logical_range_cannot_stop_local_stamping() -> None:
    """The one-record crash: a stamp within the drift bound whose logical part was 2^64 - 1
    made every clock of the cluster overflow, and the next local write failed to pack."""
    r = replica()
    bomb = Record(M.name, k(1), v(1), Stamp(T, 2**64 - 1, "b"))
    res = r.receive([bomb], T, "b")
    assert [type(e) for _, e in res.rejected] == [MalformedMessageError]
    top = Record(M.name, k(2), v(2), Stamp(T, MAX_LOGICAL, "b"))  # legal, the highest
    assert not r.receive(Packed.of([top]), T, "b").rejected
    packed, changed = r.local_changes(M.name, [k(2), k(3)], [v(9), v(9)], T)
    assert changed == [0, 1]
    assert [rec.stamp for rec in packed] == [Stamp(T + 1, 1, "a"), Stamp(T + 1, 2, "a")]
    assert r.content(M.name)[k(2)] == v(9)


def test_records_of_origins_outside_the_cluster_are_refused_and_counted() -> None:
    r = Replica("a", (M, C), TTL, digest_buckets=16,
                members=Membership("a", ["a", "b", "c"]))
    batch = Packed.of([remote(i, i, T, node=n) for i, n in enumerate("bcebvb")])
    for records in (batch, list(batch)):  # off the wire, and as Records
        res = r.receive(records, T, "b")
        assert [rec.stamp.node for rec, _ in res.rejected] == ["e", "v"]
        assert all(type(e) is NotMemberError and e.peer == "b" for _, e in res.rejected)
        assert sorted(r.content(M.name)) == [k(0), k(1), k(3), k(5)]
    assert r.stats["rejected.not_member"] == 4
    # the fast path for a batch of members only is unchanged
    ok = Packed.of([remote(i, i, T + 1, node="c") for i in range(100, 200)])
    assert not r.receive(ok, T + 1, "c").rejected and len(r.content(M.name)) == 104


def test_drift_rejected_records_are_taken_once_the_clock_catches_up() -> None:
    r = replica(max_drift_ns=SECOND)
    future = remote(1, 1, T + 5 * SECOND)
    assert r.receive([future], T, "b").rejected
    assert not r.receive([future], T + 4 * SECOND, "b").rejected
    assert r.content("blocklist") == {k(1): v(1)}


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="twice"):
        Replica("a", [M, M], TTL)
    with pytest.raises(ConfigError, match="TTL"):
        Replica("a", [M], 0)
    with pytest.raises(ConfigError, match="not synced"):
        Replica("a", [M], TTL, policies={"x": LWW})
    wide = FieldPolicy(16, [FieldRule(0, 8, "max")])
    with pytest.raises(ConfigError, match="16-byte values"):
        Replica("a", [MapSchema("m", 4, 8, wide.name)], TTL, policies={"m": wide})
    with pytest.raises(ConfigError, match="schema says"):
        Replica("a", [M], TTL, policies={"blocklist": FieldPolicy(8, [FieldRule(0, 8, "max")])})
    stats = FieldPolicy(16, [FieldRule(0, 8, "counter"), FieldRule(8, 8, "max")])
    assert stats.name == "fields:counter@0+8,max@8+8"
    r = Replica("a", [M, MapSchema("s", 4, 16, stats.name)], TTL, policies={"s": stats})
    assert r.per_origin_maps == {"s"}


# --- merge, writes, forward, reply ---------------------------------------------------------------


def test_writes_are_coalesced_per_key_and_only_winners_are_forwarded() -> None:
    r = replica()
    old, new = remote(1, 1, T), remote(1, 2, T + 1, "c")
    res = r.receive([old, new, remote(2, 3, T)], T, "b")
    assert res.writes == [("blocklist", k(1), v(2)), ("blocklist", k(2), v(3))]
    assert res.forward == [old, new, remote(2, 3, T)]
    res = r.receive([new, old], T, "b")  # nothing new: nothing to write or forward
    assert (res.writes, res.forward) == ([], [])
    assert res.reply == [new]  # the sender offered an older record than ours: it gets ours


def test_a_batch_that_ends_where_the_kernel_already_is_writes_nothing() -> None:
    r = replica()
    r.local_change("blocklist", k(1), v(1), T)
    res = r.receive([remote(1, 1, T + 5)], T, "b")  # same value, newer stamp
    assert res.forward and res.writes == []


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Record], list[list[list[Record]]]]:
    recs = draw(
        st.lists(
            st.builds(
                remote,
                key=st.integers(0, 3),
                value=st.none() | st.integers(0, 2),
                wall=st.integers(T, T + 3),
                node=st.sampled_from(["b", "c", "d"]),
            ),
            min_size=1,
            max_size=20,
        )
    )
    deliveries = []
    for _ in range(2):
        order = draw(st.permutations(recs))
        extra = draw(st.lists(st.sampled_from(recs), max_size=5))  # duplicates
        cuts = draw(st.lists(st.integers(0, len(recs) + len(extra)), max_size=3))
        seq = list(order) + extra
        bounds = sorted({0, len(seq), *cuts})
        deliveries.append([seq[a:b] for a, b in itertools.pairwise(bounds)])
    return recs, deliveries


@settings(max_examples=80)
@given(histories())
def test_any_delivery_order_with_duplicates_gives_the_same_map(
    history: tuple[list[Record], list[list[list[Record]]]],
) -> None:
    _, deliveries = history
    results = []
    for batches in deliveries:
        r = replica()
        kernel: dict[bytes, bytes] = {}
        for batch in batches:
            for _, key, value in r.receive(batch, T + 10, "b").writes:
                if value is None:
                    kernel.pop(key, None)
                else:
                    kernel[key] = value
        assert kernel == r.content("blocklist")  # the writes keep the kernel in step
        results.append((r.content("blocklist"), r.digest("blocklist")))
    assert results[0] == results[1]


@settings(max_examples=60)
@given(histories())
def test_counter_maps_converge_in_any_order_too(
    history: tuple[list[Record], list[list[list[Record]]]],
) -> None:
    _, deliveries = history
    results = []
    for batches in deliveries:
        r = replica()
        for batch in batches:
            r.receive([Record("ratelimit", x.key, x.value, x.stamp) for x in batch], T + 10, "b")
        results.append((r.content("ratelimit"), r.digest("ratelimit")))
    assert results[0] == results[1]


# --- tombstones ---------------------------------------------------------------------------------


def test_a_tombstone_defeats_a_late_older_update_within_the_ttl() -> None:
    r = replica()
    r.receive([remote(1, 1, T)], T, "b")
    delete = r.local_change("blocklist", k(1), None, T + SECOND)
    assert delete is not None and delete.value is None
    res = r.receive([remote(1, 2, T + SECOND // 2, "c")], T + 2 * SECOND, "c")  # late, older
    assert (res.writes, res.forward, res.reply) == ([], [], [delete])
    assert r.content("blocklist") == {}
    assert r.records_in("blocklist", range(16)) == [delete]  # kept, and served to repairs
    r.expire(T + SECOND + TTL - 1)
    assert r.records_in("blocklist", range(16)) == [delete]


def test_after_the_ttl_a_purged_delete_still_refuses_older_records_by_the_horizon() -> None:
    r = replica()
    r.receive([remote(1, 1, T)], T, "b")
    r.receive([remote(1, None, T + SECOND)], T + SECOND, "b")
    r.receive([remote(2, 2, T + 2 * SECOND)], T + 2 * SECOND, "b")  # a live key is never purged
    assert r.expire(T + SECOND + TTL) == 1
    assert r.registers("blocklist") == 1
    late = remote(1, 1, T, "c")  # the old write, finally arriving from a partitioned node
    res = r.receive([late], T + TTL + 2 * SECOND, "c")
    tomb = Record("blocklist", k(1), None, late.stamp)
    assert (res.writes, res.forward, res.reply) == ([], [tomb], [tomb])
    assert r.content("blocklist") == {k(2): v(2)}
    assert r.stats["received.stale"] == 1
    # the tombstone of the same stamp wins over the stale write wherever it is still held
    other = replica("c")
    other.receive([late], T, "x")
    assert other.receive(res.forward, T, "a").writes == [("blocklist", k(1), None)]
    # a write newer than the horizon is an ordinary write
    fresh = remote(1, 9, T + TTL, "c")
    assert r.receive([fresh], T + TTL + 3 * SECOND, "c").writes == [("blocklist", k(1), v(9))]


def test_repair_records_get_no_r2_reply_but_stale_ones_get_their_tombstone() -> None:
    """R2 replies are for live batches: a repair's records come with a Pull of their buckets,
    which the receiver answers with its own records anyway. T3 answers stay."""
    for general in (False, True):
        r = replica()
        if general:
            r._receive_lww = lambda *args: False  # type: ignore[method-assign]
        r.receive([remote(5, 5, T)], T, "b")
        older = [remote(5, 4, T - SECOND, "c")]
        assert r.receive(older, T, "c", replies=False).reply == []
        assert r.receive(older, T, "c").reply == [remote(5, 5, T)]
    r.receive([remote(1, 1, T), remote(1, None, T + SECOND)], T + SECOND, "b")
    assert r.expire(T + SECOND + TTL) == 1
    late = remote(1, 1, T, "c")
    res = r.receive([late], T + TTL + 2 * SECOND, "c", replies=False)
    assert res.reply == [Record("blocklist", k(1), None, late.stamp)]


def test_a_stale_tombstone_is_dropped_silently() -> None:
    r = replica()
    r.receive([remote(1, None, T + SECOND)], T + SECOND, "b")
    r.expire(T + SECOND + TTL)
    res = r.receive([remote(1, None, T, "c")], T + TTL + 2 * SECOND, "c")
    assert (res.writes, res.forward, res.reply) == ([], [], [])
    assert r.registers("blocklist") == 0


# --- seeding ------------------------------------------------------------------------------------


def test_seeded_entries_lose_to_any_peer_record_so_missed_deletes_are_not_resurrected() -> None:
    r = replica()
    assert r.seed("blocklist", [(k(1), v(1)), (k(2), v(2)), (k(3), v(3))]) == 3
    seeded = r.records("blocklist")
    assert [x.stamp for x in seeded] == [seed_stamp("a")] * 3 and is_seed(seeded[0].stamp)
    assert r.local_change("blocklist", k(1), v(1), T) is None  # the kernel already holds it
    res = r.receive([remote(1, None, T - SECOND), remote(2, 20, T - 2 * SECOND)], T, "b")
    assert res.writes == [("blocklist", k(1), None), ("blocklist", k(2), v(20))]
    assert r.content("blocklist") == {k(2): v(20), k(3): v(3)}


def test_a_seeded_key_no_peer_has_is_replicated_with_its_seed_stamp_even_past_a_horizon() -> None:
    a = replica("a")
    a.seed("blocklist", [(k(3), v(3))])
    [rec] = a.records("blocklist")
    b = replica("b")
    b.receive([remote(9, None, T, "c")], T, "c")
    b.expire(T + TTL)  # b now has a horizon above... everything real before T
    res = b.receive([rec], T + TTL, "a")
    assert res.writes == [("blocklist", k(3), v(3))] and res.forward == [rec]
    # and any real write beats it everywhere
    assert a.receive([remote(3, 4, 1, "c")], T, "c").writes == [("blocklist", k(3), v(4))]


def test_a_local_change_after_seeding_is_a_real_write() -> None:
    r = replica()
    r.seed("blocklist", [(k(1), v(1))])
    rec = r.local_change("blocklist", k(1), v(2), T)
    assert rec is not None and not is_seed(rec.stamp)
    assert r.receive([remote(1, 5, T - SECOND)], T, "b").writes == []


def test_seed_comes_first() -> None:
    r = replica()
    r.local_change("blocklist", k(1), v(1), T)
    with pytest.raises(ValueError, match="before"):
        r.seed("blocklist", [(k(2), v(2))])


def test_a_full_map_seeds_in_bulk_into_frozen_buckets() -> None:
    """A node restarting on a full map seeds it as a catch-up fills one: frozen at once."""
    r = replica()
    items = [(k(i), v(i * 7)) for i in range(3000)]
    assert r.seed("blocklist", items) == 3000
    assert r.buckets_at_rest("blocklist") == 16 and r.registers("blocklist") == 3000
    want = LwwTable(M, LWW, 16)
    for key, value in items:
        want.offer(Record("blocklist", key, value, seed_stamp("a")))
    assert r.digest("blocklist").buckets == want.digest_buckets()
    assert r.content("blocklist") == dict(items)
    assert all(is_seed(rec.stamp) for rec in r.records("blocklist"))
    assert r.local_change("blocklist", k(5), v(35), T) is None  # the kernel holds it: an echo
    with pytest.raises(ValueError, match="4-byte keys and 8-byte values"):
        replica().seed("blocklist", [*items, (k(1) + b"x", v(1))])


def test_counters_are_not_seeded_as_our_slot() -> None:
    r = replica()
    assert r.seed("ratelimit", [(k(1), v(100))]) == 0
    assert r.kernel_view("ratelimit", k(1)) == v(100)
    assert r.local_change("ratelimit", k(1), v(100), T) is None


# --- counters -----------------------------------------------------------------------------------


def test_counter_slots_sum_and_local_increments_become_our_slot() -> None:
    r = replica()
    res = r.receive([remote(1, 40, T, "b", "ratelimit"), remote(1, 2, T, "c", "ratelimit")], T, "b")
    assert res.writes == [("ratelimit", k(1), v(42))]
    assert r.local_change("ratelimit", k(1), v(42), T) is None  # echo
    mine = r.local_change("ratelimit", k(1), v(45), T + 1)  # the program counted 3 packets
    assert mine is not None and mine.value == v(3) and mine.stamp.node == "a"
    res = r.receive([remote(1, 50, T + 2, "b", "ratelimit")], T + 2, "b")
    assert res.writes == [("ratelimit", k(1), v(55))]


# --- anti-entropy ---------------------------------------------------------------------------------


def test_digest_and_pull_repair_two_divergent_replicas_in_one_round_trip() -> None:
    a, b = replica("a"), replica("b")
    for i in range(40):
        a.local_change("blocklist", k(i), v(i), T + i)
    for i in range(30, 60):
        b.local_change("blocklist", k(i), v(100 + i), T + 100 + i)
    b.local_change("blocklist", k(59), None, T + 500)
    pull, parts = b.answer_digest(a.digest("blocklist"), "a", part=7)
    assert pull is not None
    from_b = list(parts)
    assert all(0 < len(p) <= 7 for p in from_b)
    # whole buckets per part: a receiver fills each bucket in one go
    in_part = [{bucket_of(key, 16) for key in p.keys} for p in from_b]
    assert sum(map(len, in_part)) == len(set().union(*in_part))
    assert sum(map(len, from_b)) == len(b.records_in("blocklist", pull.buckets)) == 30
    for part in from_b:
        a.receive(part, T + 600, "b")
    b.receive(a.answer_pull(pull, "b"), T + 600, "a")
    assert a.digest("blocklist") == b.digest("blocklist")
    assert a.content("blocklist") == b.content("blocklist")
    assert len(a.content("blocklist")) == 59
    pull, parts = b.answer_digest(a.digest("blocklist"), "a")
    assert pull is None and not list(parts)


def test_coarse_digests_fold_and_malformed_repair_messages_are_the_peers_fault() -> None:
    a = replica("a")
    mine = a.local_change("blocklist", k(1), v(1), T)
    coarse = a.digest("blocklist", 4)
    assert len(coarse.buckets) == 4
    pull, parts = replica("b").answer_digest(coarse, "a")
    assert pull is not None and len(pull.buckets) == 1 and not list(parts)
    assert a.answer_pull(pull, "b", nbuckets=4) == [mine]
    with pytest.raises(MalformedMessageError):
        a.answer_digest(Digest("blocklist", (0, 0, 0)), "b")
    with pytest.raises(MalformedMessageError):
        a.answer_pull(Pull("blocklist", (16,)), "b")
    with pytest.raises(UnknownMapError):
        a.answer_digest(Digest("nope", (0,)), "b")


def test_max_maps_keep_a_lower_data_plane_value_locally_until_the_next_remote_change() -> None:
    seen = MapSchema("seen", 4, 8, "max")
    r = Replica("a", [seen], TTL)
    assert r.receive([remote(1, 100, T, "b", "seen")], T, "b").writes == [("seen", k(1), v(100))]
    assert r.local_change("seen", k(1), v(100), T) is None
    mine = r.local_change("seen", k(1), v(150), T + 1)
    assert mine is not None and mine.value == v(150)
    assert r.receive([remote(1, 120, T + 2, "b", "seen")], T + 2, "b").writes == []
    lowered = r.local_change("seen", k(1), v(50), T + 3)  # the program reset it
    assert lowered is not None and lowered.value == v(50)
    assert r.kernel_view("seen", k(1)) == v(50) and r.desired("seen", k(1)) == v(120)
    res = r.receive([remote(1, 60, T + 4, "c", "seen")], T + 4, "c")
    assert res.writes == [("seen", k(1), v(120))]


def test_a_counter_value_that_leaves_our_slot_unchanged_is_not_a_change() -> None:
    r = replica()
    r.receive([remote(1, 40, T, "b", "ratelimit")], T, "b")
    r.local_change("ratelimit", k(1), v(45), T + 1)  # our slot: 5
    assert r.receive([remote(1, 50, T + 2, "b", "ratelimit")], T + 2, "b").writes == [
        ("ratelimit", k(1), v(55))
    ]
    r.note_kernel("ratelimit", k(1), v(45))  # that write failed
    assert r.local_change("ratelimit", k(1), v(55), T + 3) is None  # a retry landed: slot still 5
    assert r.kernel_view("ratelimit", k(1)) == v(55)


def test_a_full_snapshot_lists_every_register_tombstones_included() -> None:
    r = replica()
    r.local_change("blocklist", k(1), v(1), T)
    r.local_change("blocklist", k(2), v(2), T)
    r.local_change("blocklist", k(2), None, T + 1)
    assert sorted((x.key, x.value) for x in r.records("blocklist")) == [(k(1), v(1)), (k(2), None)]
    assert r.maps == (M, C) and r.registers("blocklist") == 2


# --- the bulk receive path ----------------------------------------------------------------------

batch_records = st.lists(st.builds(
    remote,
    key=st.integers(0, 6),
    value=st.none() | st.integers(0, 3),
    wall=st.sampled_from([T - 2 * SECOND, T - SECOND, T, T + 5 * SECOND]),  # the last: drift
    node=st.sampled_from(["a", "b", "c"]),
), max_size=12)  # fmt: skip


@settings(max_examples=300)
@given(st.lists(batch_records, min_size=1, max_size=4), st.data())
def test_the_bulk_path_merges_as_the_general_one(
    batches: list[list[Record]], data: st.DataObject
) -> None:
    """A one-map lww batch is merged in bulk (Replica._receive_lww); every result must be what
    the record-by-record path gives: writes, forwards, replies, refusals, state and clock, also
    when the bulk replica's buckets were frozen."""
    bulk, general = replica(), replica()
    general._receive_lww = lambda *args: False  # type: ignore[method-assign]
    for r in (bulk, general):
        r.local_change("blocklist", k(1), v(9), T - SECOND // 2)
        r.note_kernel("blocklist", k(2), v(5))  # a deviation
    for batch in batches:
        if data.draw(st.booleans()):  # a value of the wrong size, now and then
            batch = [*batch, Record("blocklist", k(3), b"\x01", Stamp(T, 0, "b"))]
        if data.draw(st.booleans()):  # buckets at rest (frozen.py) merge as live ones do
            bulk.settle(64, quiet=0)
        got, want = bulk.receive(batch, T, "b"), general.receive(batch, T, "b")
        assert got.writes == want.writes
        assert list(got.forward) == list(want.forward)
        assert sorted(got.reply) == sorted(want.reply)
        assert [(r, type(e)) for r, e in got.rejected] == [(r, type(e)) for r, e in want.rejected]
        assert bulk.content("blocklist") == general.content("blocklist")
        assert bulk.digest("blocklist") == general.digest("blocklist")
        assert bulk.clock.last == general.clock.last
        assert bulk.stats == general.stats


# --- filling buckets in bulk (a catch-up) -------------------------------------------------------


def written(res: ApplyResult) -> dict[tuple[str, bytes], bytes | None]:
    """Every kernel write a result asks for, from ``writes`` and ``fills`` (disjoint keys)."""
    out: dict[tuple[str, bytes], bytes | None] = {(m, key): val for m, key, val in res.writes}
    for fill in res.fills:
        assert len(fill.keys) == 4 * fill.entries and len(fill.values) == 8 * fill.entries
        for i in range(fill.entries):
            reg = (fill.map, fill.keys[4 * i : 4 * i + 4])
            assert reg not in out
            out[reg] = fill.values[8 * i : 8 * i + 8]
    return out


def test_a_fresh_replica_fills_whole_buckets_as_columns() -> None:
    source, fresh = replica("b"), replica()
    for i in range(2000):
        source.local_change("blocklist", k(i), v(i), T + i)
    source.local_change("blocklist", k(7), None, T + 5000)
    res = fresh.receive(source.records("blocklist"), T + 5000, "b")
    assert not res.writes and not res.rejected and res.fills
    assert written(res) == {("blocklist", k(i)): v(i) for i in range(2000) if i != 7}
    assert fresh.buckets_at_rest("blocklist") == 16  # filled buckets come out frozen
    assert fresh.digest("blocklist") == source.digest("blocklist")
    assert sorted(fresh.records("blocklist")) == sorted(source.records("blocklist"))
    assert fresh.stats["received.applied"] == 2000  # k(7) as its tombstone
    assert fresh.expire(T + 5000 + TTL) == source.expire(T + 5000 + TTL) == 1  # its tombstone


fill_blocks = st.lists(st.tuples(
    st.integers(0, 600),  # the first key
    st.integers(0, 250),  # how many keys from there
    st.sampled_from([T - 2 * SECOND, T - SECOND, T]),
    st.sampled_from(["b", "c", "b" * 9]),  # b*9's tombstones are as long as b's values
    st.integers(0, 4),  # every n-th key a tombstone (0: none)
), min_size=1, max_size=3)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.lists(fill_blocks, min_size=1, max_size=3), st.data())
def test_filling_buckets_in_bulk_merges_as_the_general_path(
    batches: list[list[tuple[int, int, int, str, int]]], data: st.DataObject
) -> None:
    """Buckets that receive many new keys at once are filled by array operations
    (LwwTable._fill); keys held already or twice in a batch, records of other sizes and buckets
    being written to fall back to the record-by-record path. The results must be the general
    path's, in writes, forwards, replies, state, clock, stats and purges."""
    bulk, general = (Replica(n, (M, C), TTL, digest_buckets=2) for n in ("a", "a"))
    general._receive_lww = lambda *args: False  # type: ignore[method-assign]
    if data.draw(st.booleans()):  # a bucket holding dict registers
        for r in (bulk, general):
            r.local_change("blocklist", k(1), v(9), T - SECOND // 2)
    for blocks in batches:
        batch = [remote(i, None if dead and i % dead == 0 else i, wall, node)
                 for first, n, wall, node, dead in blocks for i in range(first, first + n)]
        if data.draw(st.booleans()):
            bulk.settle(64, quiet=0)
        got, want = bulk.receive(batch, T, "b"), general.receive(batch, T, "b")
        assert not want.fills
        assert written(got) == written(want)
        assert list(got.forward) == list(want.forward)
        assert sorted(got.reply) == sorted(want.reply)
        assert got.rejected == want.rejected == []
        assert bulk.content("blocklist") == general.content("blocklist")
        assert sorted(bulk.records("blocklist")) == sorted(general.records("blocklist"))
        assert bulk.digest("blocklist") == general.digest("blocklist")
        assert bulk.clock.last == general.clock.last
        assert bulk.stats == general.stats
    assert bulk.expire(T + TTL) == general.expire(T + TTL)
    assert sorted(bulk.records("blocklist")) == sorted(general.records("blocklist"))


# --- local changes in batches ---------------------------------------------------------------------

local_batch = st.lists(st.tuples(st.integers(0, 40), st.none() | st.integers(0, 3)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(st.lists(local_batch, min_size=1, max_size=3), st.data())
def test_a_batch_of_local_changes_is_local_change_one_by_one(
    batches: list[list[tuple[int, int | None]]], data: st.DataObject
) -> None:
    """Replica.local_changes (one pass over an lww map) must stamp, store, count and return
    what ``local_change`` called for each in turn does: echoes, deletes of absent keys,
    deviations, repeated keys, registers of other nodes, buckets at rest."""
    batched, single = replica(), replica()
    seeded = [(k(i), v(i % 4)) for i in range(0, 41, 3)]
    incoming = [remote(i, i % 4 or None, T - SECOND) for i in range(1, 41, 4)]
    for r in (batched, single):
        r.seed("blocklist", seeded)
        r.receive(incoming, T, "b")
        r.note_kernel("blocklist", k(2), v(7))  # a deviation
    for batch in batches:
        if data.draw(st.booleans()):
            batched.settle(64, quiet=0)
        now = T + data.draw(st.sampled_from([-SECOND, 0, SECOND]))
        keys = [k(i) for i, _ in batch]
        values = [None if x is None else v(x) for _, x in batch]
        got, changed = batched.local_changes("blocklist", keys, values, now)
        want = [single.local_change("blocklist", key, value, now)
                for key, value in zip(keys, values, strict=True)]  # fmt: skip
        assert list(got) == [rec for rec in want if rec is not None]
        assert changed == [i for i, rec in enumerate(want) if rec is not None]
        assert batched.content("blocklist") == single.content("blocklist")
        assert batched.digest("blocklist") == single.digest("blocklist")
        assert batched.clock.last == single.clock.last
        assert batched.stats == single.stats
        for i in range(41):
            assert batched.kernel_view("blocklist", k(i)) == single.kernel_view("blocklist", k(i))
    assert batched.expire(T + 2 * TTL) == single.expire(T + 2 * TTL)
    assert sorted(batched.records("blocklist")) == sorted(single.records("blocklist"))


def test_local_changes_of_the_wrong_size_are_refused_before_any_is_taken() -> None:
    r = replica()
    with pytest.raises(ValueError, match="4-byte keys and 8-byte values"):
        r.local_changes("blocklist", [k(1), k(2)], [v(1), b"\x01"], T)
    assert r.content("blocklist") == {} and r.clock.last == Stamp(0, 0, "a")
    counted, changed = r.local_changes("ratelimit", [k(1), k(1)], [v(5), v(5)], T)  # per origin
    assert changed == [0] and [rec.value for rec in counted] == [v(5)]


def test_a_node_restarting_on_its_full_map_merges_the_repair_in_bulk_as_the_general_path() -> None:
    """A restarted node seeds its map (seed stamps rank lowest) and is sent every record again:
    its frozen buckets merge them by array operations (LwwTable._merge_frozen): same writes,
    replies, forwards, state, digests and stats as record by record, and still frozen."""
    source = replica("b")
    for i in range(2000):
        source.local_change("blocklist", k(i), v(i), T - SECOND + i)
    items = [(k(i), v(i) if i % 7 else v(i + 1)) for i in range(200, 2300)]  # some differ
    bulk, general = replica(), replica()
    general._receive_lww = lambda *args: False  # type: ignore[method-assign]
    for r in (bulk, general):
        r.seed("blocklist", items)
        for i in range(200, 260):  # written here after the restart: newer than the source's
            r.local_change("blocklist", k(i), v(9000 + i), T)
    bulk.settle(64, quiet=0)  # the local changes thawed a few buckets: freeze them again
    assert bulk.buckets_at_rest("blocklist") == 16
    batch = source.records("blocklist")
    got, want = bulk.receive(batch, T, "b"), general.receive(batch, T, "b")
    differing = [i for i in range(260, 2000) if i % 7 == 0]  # seeded otherwise, not since
    assert written(got) == written(want) and len(written(got)) == 200 + len(differing)
    assert list(got.forward) == list(want.forward)
    assert sorted(got.reply) == sorted(want.reply) and len(got.reply) == 60
    assert bulk.content("blocklist") == general.content("blocklist")
    assert sorted(bulk.records("blocklist")) == sorted(general.records("blocklist"))
    assert bulk.digest("blocklist") == general.digest("blocklist")
    assert bulk.registers("blocklist") == general.registers("blocklist") == 2300
    assert bulk.stats == general.stats
    assert bulk.buckets_at_rest("blocklist") == 16
    got, want = bulk.receive(batch, T, "b"), general.receive(batch, T, "b")  # the same again
    assert list(got.forward) == list(want.forward) == [] and not written(got)
    assert bulk.stats == general.stats and bulk.digest("blocklist") == general.digest("blocklist")


def test_a_restarting_node_keeps_its_buckets_frozen_when_the_repair_mixes_record_sizes() -> None:
    """The records a restarted node is sent again hold tombstones and the ids of nodes whose
    names differ in length: records of several sizes. Its frozen buckets must still merge them
    as the general path does, and stay frozen (a cluster of node-1 ... node-10 otherwise
    thaws every bucket of every restarted node)."""
    source = replica("b")
    others = [remote(i, i, T - SECOND, "node-10") for i in range(0, 2000, 5)]
    source.receive(others, T, "node-10")
    for i in range(2000):
        if i % 5:
            source.local_change("blocklist", k(i), v(i), T - SECOND + i)
    for i in range(3, 2000, 11):
        source.local_change("blocklist", k(i), None, T)  # tombstones, written by b
    items = [(k(i), v(i) if i % 7 else v(i + 1)) for i in range(2000)]
    bulk, general = replica(), replica()
    general._receive_lww = lambda *args: False  # type: ignore[method-assign]
    for r in (bulk, general):
        r.seed("blocklist", items)
    assert bulk.buckets_at_rest("blocklist") == 16
    batch = source.records("blocklist")
    assert len({len(rec.value or b"") + len(rec.stamp.node) for rec in batch}) == 3
    got, want = bulk.receive(batch, T + SECOND, "b"), general.receive(batch, T + SECOND, "b")
    assert written(got) == written(want) and written(got)
    assert list(got.forward) == list(want.forward)
    assert sorted(got.reply) == sorted(want.reply)
    assert bulk.content("blocklist") == general.content("blocklist")
    assert sorted(bulk.records("blocklist")) == sorted(general.records("blocklist"))
    assert bulk.digest("blocklist") == general.digest("blocklist")
    assert bulk.stats == general.stats
    assert bulk.buckets_at_rest("blocklist") == 16
    assert bulk.expire(T + 2 * TTL) == general.expire(T + 2 * TTL) > 0
    assert sorted(bulk.records("blocklist")) == sorted(general.records("blocklist"))
