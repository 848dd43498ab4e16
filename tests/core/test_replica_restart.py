"""replica.py's persisted-state and restart rules (P1, P2, S4-S6, H1), on the pure core."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfsync.core.frozen import seal
from bpfsync.core.messages import MapSchema, Record, Stamp
from bpfsync.core.register import Packed
from bpfsync.core.replica import Replica
from bpfsync.core.restart import Content, _differences_by_key, differences
from bpfsync.core.table import records_layout
from bpfsync.errors import ConfigError

T = 1_700_000_000 * 10**9
SECOND = 10**9
TTL = 60 * SECOND
M = MapSchema("blocklist", 4, 8)
C = MapSchema("ratelimit", 4, 8, "counter")
BUCKETS = 16


def k(i: int) -> bytes:
    return i.to_bytes(4, "little")


def v(i: int) -> bytes:
    return i.to_bytes(8, "little")


def replica(node: str = "a") -> Replica:
    return Replica(node, (M, C), TTL, digest_buckets=BUCKETS)


def remote(key: int, value: int | None, wall: int, node: str = "b", map: str = M.name) -> Record:
    return Record(map, k(key), None if value is None else v(value), Stamp(wall, 0, node))


def content(items: Iterable[tuple[bytes, bytes]]) -> Content:
    return Content.of(list(items), 4, 8)


def logged(records: Packed) -> list[bytes]:
    """Records as the agent logs them: per map, sealed in FrozenRegs' layout."""
    out = []
    for name in dict.fromkeys(records.maps):
        at = [i for i, m in enumerate(records.maps) if m == name]
        layout = records_layout([records.keys[i] for i in at], [records.packed[i] for i in at], 4)
        out.append(seal(layout, 0))
    return out


def busy() -> Replica:
    """A replica with frozen and thawed buckets, tombstones and origins of several id lengths."""
    r = replica()
    r.receive([remote(i, i, T - 2 * SECOND, "node-10") for i in range(0, 3000, 3)], T, "node-10")
    for i in range(3000):
        if i % 3:
            r.local_change(M.name, k(i), v(i + 1), T - SECOND + i)
    for i in range(5, 3000, 17):
        r.local_change(M.name, k(i), None, T)
    r.settle(BUCKETS, quiet=0)
    r.local_change(M.name, k(1), v(77), T + 1)  # thaws one bucket again
    for node in ("a", "b", "node-10"):
        r.receive([remote(7, 3, T, node, C.name)], T, node) if node != "a" else r.local_change(
            C.name, k(7), v(5), T)  # fmt: skip
    return r


def reloaded(source: Replica, log: Sequence[bytes] = ()) -> Replica:
    fresh = replica()
    for schema in (M, C):
        rows = source.snapshot(schema.name, range(BUCKETS))
        fresh.load(schema.name, [(b, blob) for b, _, blob in rows], log if schema is M else [],
                   nbuckets=BUCKETS, horizon=None, now_ns=T + SECOND)  # fmt: skip
    return fresh


def test_stored_buckets_load_back_as_they_were() -> None:
    """P2: registers, digests, tombstones (they still expire), frozen buckets, the clock."""
    source = busy()
    back = reloaded(source)
    for schema in (M, C):
        assert sorted(back.records(schema.name)) == sorted(source.records(schema.name))
        assert back.digest(schema.name) == source.digest(schema.name)
        assert back.content(schema.name) == source.content(schema.name)
    assert back.buckets_at_rest(M.name) == BUCKETS  # stored frozen: taken in frozen
    assert back.clock.last >= Stamp(T + 1, 0, "a")  # P2: above this node's stored stamps
    assert back.expire(T + TTL) == source.expire(T + TTL) > 0


def test_a_log_replays_over_older_snapshots_in_any_order() -> None:
    """P1: the store's content is the join of snapshots and log: repeats and order do not
    matter."""
    source = replica()
    for i in range(200):
        source.local_change(M.name, k(i), v(i), T + i)
    old = source.snapshot(M.name, range(BUCKETS))
    later = Packed.empty()
    for i in range(0, 200, 2):
        rec = source.local_change(M.name, k(i), None if i % 4 else v(1000 + i), T + SECOND + i)
        assert rec is not None
        later.extend(Packed.of([rec]))
    log = logged(later)
    back = replica()
    back.load(M.name, [(b, blob) for b, _, blob in old], log + log[::-1], nbuckets=BUCKETS,
              horizon=None, now_ns=T + 2 * SECOND)  # fmt: skip
    assert sorted(back.records(M.name)) == sorted(source.records(M.name))
    assert back.digest(M.name) == source.digest(M.name)


def test_other_bucket_counts_load_record_by_record() -> None:
    source = busy()
    back = Replica("a", (M, C), TTL, digest_buckets=4)
    rows = source.snapshot(M.name, range(BUCKETS))
    back.load(M.name, [(b, blob) for b, _, blob in rows], [], nbuckets=BUCKETS, horizon=None,
              now_ns=T)  # fmt: skip
    assert back.content(M.name) == source.content(M.name)


@pytest.mark.parametrize("damage", ["flip", "cut", "size"])
def test_a_damaged_blob_is_refused_and_nothing_is_taken(damage: str) -> None:
    source = busy()
    rows = source.snapshot(M.name, range(BUCKETS))
    b, _, blob = rows[3]
    if damage == "flip":
        blob = blob[:40] + bytes([blob[40] ^ 1]) + blob[41:]
    elif damage == "cut":
        blob = blob[: len(blob) // 2]
    else:  # a record for values of another size, sealed properly: the map's sizes changed
        blob = seal(records_layout([k(1)], [bytes(16) + b"a\x00\x00" + b"123"], 4), 0)
    rows[3] = (b, 0, blob)
    back = replica()
    with pytest.raises(ValueError):
        back.load(M.name, [(b, blob) for b, _, blob in rows], [], nbuckets=BUCKETS,
                  horizon=None, now_ns=T)  # fmt: skip
    assert back.registers(M.name) == 0


def test_restart_on_the_same_map_holds_back_what_the_data_plane_changed_while_down() -> None:
    """S4, H1: equal entries keep their stamps; changed, new and deleted ones are held back
    during the catch-up (peer records write nothing to them), then stamped above every peer
    stamp seen, with the kernel's value."""
    source = replica()
    for i in range(100):
        source.local_change(M.name, k(i), v(i), T + i)
    back = reloaded(source)
    kernel = source.content(M.name)
    kernel[k(1)] = v(111)  # updated while down
    kernel[k(500)] = v(500)  # created while down
    del kernel[k(2)]  # deleted while down
    got = back.restart(M.name, content(kernel.items()), same_object=True)
    assert (got.case, got.held, got.deleted) == ("resumed", 3, 1)
    assert back.kernel_view(M.name, k(1)) == v(111) and back.kernel_view(M.name, k(2)) is None
    # the catch-up: a peer wrote k(1) and k(2) later than our stored records, and k(3)
    peer = [remote(1, 9, T + 50 * SECOND), remote(2, 9, T + 50 * SECOND),
            remote(3, 9, T + 50 * SECOND)]  # fmt: skip
    res = back.receive(peer, T + 51 * SECOND, "b")
    assert res.writes == [(M.name, k(3), v(9))]  # only the key that was not held
    assert set(back.held_keys()[M.name]) == {k(1), k(2), k(500)}
    records, writes = back.take_held(T + 52 * SECOND, {M.name: {k(1): v(112)}})
    assert writes == []
    stamped = {rec.key: rec for rec in records}
    assert set(stamped) == {k(1), k(2), k(500)}
    assert stamped[k(1)].value == v(112)  # re-read: the value now, not the one at restart
    assert stamped[k(2)].value is None and stamped[k(500)].value == v(500)
    assert all(rec.stamp > Stamp(T + 50 * SECOND, 0, "b") for rec in records)
    assert back.content(M.name)[k(1)] == v(112) and k(2) not in back.content(M.name)
    assert back.held_keys() == {} and back.take_held(T + 53 * SECOND, {}) == (Packed.empty(), [])


def test_counter_increments_counted_while_down_join_this_nodes_slot() -> None:
    """H1 for a per-origin map: what the kernel counted beyond the other origins' stored slots
    is ours; the peers' increments during the catch-up stay theirs."""
    source = replica()
    source.local_change(C.name, k(7), v(5), T)  # our slot: 5
    source.receive([remote(7, 3, T, "b", C.name)], T, "b")  # b's: 3; the kernel holds 8
    back = reloaded(source)
    got = back.restart(C.name, content([(k(7), v(10))]), same_object=True)  # counted 2 while down
    assert got.held == 1
    assert back.receive([remote(7, 7, T + SECOND, "b", C.name)], T + SECOND, "b").writes == []
    records, writes = back.take_held(T + 2 * SECOND, {C.name: {k(7): v(11)}})  # 1 more since
    assert [rec.value for rec in records] == [v(8)]  # 5 + 2 + 1
    assert writes == [(C.name, k(7), v(15))]  # b's 7 + our 8
    assert back.content(C.name) == {k(7): v(15)}


def test_a_new_map_object_is_no_delete_and_restore_refills_an_empty_one() -> None:
    """S5: the stored registers are dropped, the kernel's entries seeded; S6: restore writes
    the stored content into a new, empty map object."""
    source = busy()
    dropped = reloaded(source)
    got = dropped.restart(M.name, content([(k(1), v(1))]), same_object=False, restore=True)
    assert (got.case, got.seeded, got.fills) == ("new map", 1, [])  # not empty: seeded
    assert dropped.content(M.name) == {k(1): v(1)}
    restored = reloaded(source)
    got = restored.restart(M.name, content([]), same_object=False, restore=True)
    assert got.case == "restored" and len(got.fills) == 1
    fill, want = got.fills[0], source.content(M.name)
    assert fill.entries == len(want)
    pairs = {fill.keys[4 * i : 4 * i + 4]: fill.values[8 * i : 8 * i + 8]
             for i in range(fill.entries)}  # fmt: skip
    assert pairs == want
    plain = reloaded(source)
    assert plain.restart(M.name, content([]), same_object=False).case == "new map"
    assert plain.content(M.name) == {}


def test_a_new_map_object_found_while_running_takes_the_same_rule() -> None:
    """S5 on the running replica's registers (the agent follows its pin): dropped, the new
    object's entries seeded, keys held back for the old object forgotten; S6 writes them into
    an empty one. A map added while running starts empty and takes seeds as at start."""
    r = replica()
    for i in range(10):
        r.local_change(M.name, k(i), v(i), T + i)
    r.restart(M.name, content([(k(i), v(i)) for i in range(10) if i != 4]), same_object=True)
    assert r.held_keys() == {M.name: [k(4)]}
    got = r.restart(M.name, content([(k(900), v(900))]), same_object=False)
    assert (got.case, got.seeded) == ("new map", 1)
    assert r.content(M.name) == {k(900): v(900)} and r.held_keys() == {}
    peer = r.receive([remote(900, 1, T + SECOND)], T + SECOND, "b")  # a real stamp beats it
    assert peer.writes == [(M.name, k(900), v(1))]
    r.local_change(M.name, k(1), v(1), T + 2 * SECOND)
    got = r.restart(M.name, content([]), same_object=False, restore=True)
    assert got.case == "restored" and got.fills[0].entries == 2

    n = MapSchema("late", 4, 8)
    r.add_map(n)
    assert r.registers("late") == 0 and r.seed("late", [(k(1), v(1))]) == 1
    with pytest.raises(ConfigError):
        r.add_map(n)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.integers(0, 300), st.none() | st.integers(0, 3), max_size=120),
       st.dictionaries(st.integers(0, 300), st.integers(0, 3), max_size=120),
       st.booleans())  # fmt: skip
def test_the_array_comparison_is_the_key_by_key_one(
    registers: dict[int, int | None], kernel: dict[int, int], frozen: bool
) -> None:
    r = replica()
    r.receive([remote(i, x, T, "b" if i % 2 else "node-10") for i, x in registers.items()], T, "b")
    if frozen:
        r.settle(BUCKETS, quiet=0)
    table = r._tables[M.name]
    items = [(k(i), v(x)) for i, x in kernel.items()]
    assert sorted(differences(table, content(items)), key=repr) == sorted(
        _differences_by_key(table, items), key=repr)  # fmt: skip


def test_the_fingerprint_is_of_the_content_whatever_its_order() -> None:
    items = [(k(i), v(i * 7)) for i in range(500)]
    first = content(items)
    assert content(reversed(items)).fingerprint() == first.fingerprint()
    assert first.fingerprint()[0] == 500
    one_bit = [*items[:-1], (items[-1][0], bytes([items[-1][1][0] ^ 1]) + items[-1][1][1:])]
    swapped = [*items[:-2], (items[-2][0], items[-1][1]), (items[-1][0], items[-2][1])]
    for other in (one_bit, swapped, items[:-1], [*items, (k(9999), v(0))]):
        assert content(other).fingerprint() != first.fingerprint()


def test_the_live_rows_taken_at_load_give_the_restart_its_answer() -> None:
    r = busy()
    fresh = reloaded(r)
    live = fresh.live_rows(M.name)
    assert live is not None and fresh.live_rows(C.name) is None  # per-origin: key by key
    table = r._tables[M.name]
    held = sorted((key, value) for key in table.all_keys()
                  if (value := table.kernel_value(key)) is not None)  # fmt: skip
    kernel = content(held)
    assert live.fingerprint() == kernel.fingerprint()
    plan = fresh.restart(M.name, kernel, same_object=True, live=live)
    assert (plan.case, plan.held) == ("resumed", 0)
    changed = content([*held[1:], (k(4242), v(1))])  # one deleted while down, one new
    plan = reloaded(r).restart(M.name, changed, same_object=True, live=live)
    assert (plan.case, plan.held, plan.deleted) == ("resumed", 2, 1)
