"""The scan diff on synthetic dumps: every path (positions, sorted match, hashed keys, hash
collisions) must produce exactly the changes that turn one scan into the other."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfsync.kernel.dump import MapDump
from bpfsync.model import Change, Seen
from bpfsync.watch import snapshot
from bpfsync.watch.snapshot import Notes, Snapshot, diff, key_codes, take_rows


def snap(entries: list[tuple[bytes, bytes]], key_size: int, value_size: int) -> Snapshot:
    keys = b"".join(k for k, _ in entries)
    values = b"".join(v for _, v in entries)
    return Snapshot(MapDump.from_bytes(keys, values, key_size, value_size))


def apply(before: dict[bytes, bytes], changes: list[Change]) -> dict[bytes, bytes]:
    after = dict(before)
    for c in changes:
        assert c.seen is Seen.POLL and c.map == "m"
        if c.value is None:
            del after[c.key]
        else:
            after[c.key] = c.value
    return after


def check(
    prev: list[tuple[bytes, bytes]],
    cur: list[tuple[bytes, bytes]],
    ks: int,
    vs: int,
    told: dict[bytes, bytes | None] | None = None,
) -> list[Change]:
    changes = diff("m", snap(prev, ks, vs), snap(cur, ks, vs), told)
    keys = [c.key for c in changes]
    assert len(keys) == len(set(keys)), "a key was reported twice"
    before, after = dict(prev), dict(cur)
    for k, v in (told or {}).items():  # what the consumer already knows
        if v is None:
            before.pop(k, None)
        else:
            before[k] = v
    assert apply(before, changes) == after
    # minimal: nothing unchanged is reported
    assert all(before.get(c.key) != c.value for c in changes)
    return changes


@settings(max_examples=150, deadline=None)
@given(
    key_size=st.sampled_from([1, 4, 8, 12, 16]),
    value_size=st.sampled_from([1, 8, 12]),
    data=st.data(),
)
def test_diff_turns_prev_into_cur(key_size: int, value_size: int, data: st.DataObject) -> None:
    keys = st.binary(min_size=key_size, max_size=key_size)
    values = st.binary(min_size=value_size, max_size=value_size)
    prev = data.draw(st.dictionaries(keys, values, max_size=40))
    cur = dict(prev)
    for k in data.draw(
        st.lists(st.sampled_from(sorted(prev)), max_size=10) if prev else st.just([])
    ):
        cur.pop(k, None)
    cur.update(data.draw(st.dictionaries(keys, values, max_size=10)))
    prev_items = list(prev.items())
    cur_items = list(cur.items())
    if data.draw(st.booleans()):  # a dump's order is arbitrary
        random.Random(data.draw(st.integers())).shuffle(cur_items)
    check(prev_items, cur_items, key_size, value_size)


@settings(max_examples=150, deadline=None)
@given(key_size=st.sampled_from([4, 8, 16]), data=st.data())
def test_diff_against_what_the_consumer_was_told(key_size: int, data: st.DataObject) -> None:
    """Told values (a tracer's reports, the consumer's own writes) laid over ``prev``: the
    diff is exactly what turns that into ``cur`` — known changes are not repeated, and a told
    value the map no longer holds is corrected."""
    keys = st.binary(min_size=key_size, max_size=key_size)
    values = st.binary(min_size=8, max_size=8)
    prev = data.draw(st.dictionaries(keys, values, max_size=30))
    cur = dict(prev)
    cur.update(data.draw(st.dictionaries(keys, values, max_size=10)))
    for k in data.draw(st.lists(st.sampled_from(sorted(cur)), max_size=5) if cur else st.just([])):
        cur.pop(k, None)
    # the consumer was told some of the real changes and some values since overwritten
    told: dict[bytes, bytes | None] = {}
    for k in set(prev) | set(cur):
        choice = data.draw(st.sampled_from(["none", "true", "stale"]))
        if choice == "true":
            told[k] = cur.get(k)
        elif choice == "stale":
            told[k] = data.draw(st.one_of(st.none(), values))
    told.update(data.draw(st.dictionaries(keys, st.one_of(st.none(), values), max_size=5)))
    check(list(prev.items()), list(cur.items()), key_size, 8, told)


@settings(max_examples=100, deadline=None)
@given(key_size=st.sampled_from([4, 16]), data=st.data())
def test_skipped_keys_are_never_reported(key_size: int, data: st.DataObject) -> None:
    keys = st.binary(min_size=key_size, max_size=key_size)
    values = st.binary(min_size=8, max_size=8)
    prev = data.draw(st.dictionaries(keys, values, max_size=20))
    cur = data.draw(st.dictionaries(keys, values, max_size=20))
    told = data.draw(st.dictionaries(keys, st.one_of(st.none(), values), max_size=5))
    everything = set(prev) | set(cur) | set(told)
    skip = set(data.draw(st.lists(st.sampled_from(sorted(everything)), max_size=8))
               if everything else set())  # fmt: skip
    full = diff("m", snap(list(prev.items()), key_size, 8), snap(list(cur.items()), key_size, 8),
                told)  # fmt: skip
    some = diff("m", snap(list(prev.items()), key_size, 8), snap(list(cur.items()), key_size, 8),
                told, skip)  # fmt: skip
    assert sorted(some, key=lambda c: c.key) == sorted(
        (c for c in full if c.key not in skip), key=lambda c: c.key)
    # as the auto watcher gives them: the notes of what the tracer reported during the scan
    reported = Notes.of({k: cur.get(k) for k in skip}).copy()
    assert diff("m", snap(list(prev.items()), key_size, 8), snap(list(cur.items()), key_size, 8),
                told, reported) == some  # fmt: skip


def test_told_values_hide_known_changes_and_correct_stale_ones() -> None:
    k = [bytes([i]) * 16 for i in range(4)]  # 16-byte keys: hashed codes, checked by bytes
    prev = [(k[0], b"a"), (k[1], b"b"), (k[2], b"c")]
    cur = [(k[0], b"A"), (k[1], b"b"), (k[3], b"d")]
    told = {k[0]: b"A", k[2]: None, k[1]: b"x"}  # two known changes, one stale report
    changes = check(prev, cur, 16, 1, told)
    assert sorted(changes, key=lambda c: c.key) == [
        Change("m", k[1], b"b", Seen.POLL), Change("m", k[3], b"d", Seen.POLL)
    ]


def test_positional_path_reports_in_place_changes() -> None:
    n = 10_000
    keys = np.arange(n, dtype=np.uint64)
    vals = keys * 2
    new_vals = vals.copy()
    new_vals[[3, 500, 9999]] += 1
    prev = Snapshot(MapDump(keys.view(np.uint8).reshape(n, 8), vals.view(np.uint8).reshape(n, 8)))
    cur = Snapshot(
        MapDump(keys.view(np.uint8).reshape(n, 8), new_vals.view(np.uint8).reshape(n, 8))
    )
    changes = diff("m", prev, cur)
    assert [int.from_bytes(c.key, "little") for c in changes] == [3, 500, 9999]
    assert changes[0].value == int(new_vals[3]).to_bytes(8, "little")


def test_reordered_buckets_and_shifted_positions() -> None:
    entries = [(i.to_bytes(4, "little"), bytes([i % 256])) for i in range(2000)]
    # swap neighbours (an update moving a key to its bucket's head) and change one value
    cur = list(entries)
    cur[10], cur[11] = cur[11], cur[10]
    cur[500] = (cur[500][0], b"\xff")
    check(entries, cur, 4, 1)
    # a deletion near the start shifts every later position: the sorted path
    changes = check(entries, entries[:5] + entries[6:] + [(b"zzzz", b"!")], 4, 1)
    assert {c.key: c.value for c in changes} == {entries[5][0]: None, b"zzzz": b"!"}


def test_long_keys_are_hashed_and_verified() -> None:
    entries = [(bytes([i % 251]) * 20 + i.to_bytes(4, "little"), b"v") for i in range(3000)]
    cur = [*entries[1:], (b"\x07" * 24, b"w")]
    cur.reverse()
    check(entries, cur, 24, 1)


def test_hash_collisions_fall_back_to_an_exact_diff(monkeypatch: pytest.MonkeyPatch) -> None:
    # every key gets the same code: the sorted match must notice and match exactly instead
    monkeypatch.setattr(
        snapshot, "key_codes", lambda keys: np.zeros(keys.shape[0], dtype=np.uint64)
    )
    entries = [(bytes([i]) * 12, bytes([i])) for i in range(50)]
    cur = [*entries[10:], (b"\xaa" * 12, b"\x01")]
    cur[0] = (cur[0][0], b"\x00")
    cur.reverse()
    check(entries, cur, 12, 1)
    check(entries, cur, 12, 1, {entries[0][0]: None, entries[20][0]: b"\x05"})


def test_key_codes_are_injective_for_short_keys() -> None:
    keys = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=np.uint8)
    assert len(set(key_codes(keys).tolist())) == 4


def test_take_rows_matches_fancy_indexing() -> None:
    rows = np.arange(60, dtype=np.uint8).reshape(6, 10)
    idx = np.array([5, 0, 3], dtype=np.intp)
    assert np.array_equal(take_rows(rows, idx), rows[idx])
    assert np.array_equal(take_rows(rows[:, :7], idx), rows[idx, :7])


def test_snapshot_get() -> None:
    s = snap([(b"ab", b"1"), (b"cd", b"2")], 2, 1)
    assert s.get(b"cd") == b"2" and s.get(b"xx") is None
    with pytest.raises(ValueError):
        s.get(b"abc")


@settings(max_examples=200)
@given(st.sampled_from([4, 8, 16]), st.data())
def test_notes_keep_the_last_word_per_key(key_size: int, data: st.DataObject) -> None:
    """Notes (told values kept as joined bytes) say what a dict of the same notes says."""
    keys = st.binary(min_size=key_size, max_size=key_size)
    value = st.none() | st.binary(min_size=3, max_size=3)
    calls = data.draw(st.lists(st.lists(st.tuples(keys, value), max_size=6), max_size=5))
    notes, want = snapshot.Notes(), {}
    for pairs in calls:
        if all(v is not None for _, v in pairs) and data.draw(st.booleans()):  # as columns
            values = b"".join(v for _, v in pairs if v is not None)
            notes.add_joined(b"".join(k for k, _ in pairs), values, len(pairs))
        else:
            notes.add(pairs)
        want.update(pairs)
    assert len(notes) == sum(map(len, calls)) and notes.to_dict() == want
    assert all(k in notes for k in want) and b"\xff" * (key_size + 1) not in notes
    if want:
        codes, rows, values, present = notes.rows(key_size, 3)
        got = {r.tobytes(): v.tobytes() if p else None
               for r, v, p in zip(rows, values, present, strict=True)}  # fmt: skip
        assert got == want
        assert (codes == snapshot.key_codes(rows)).all() and (np.diff(codes) > 0).all()


def test_notes_of_another_size_are_refused() -> None:
    notes = snapshot.Notes()
    notes.add([(b"k" * 4, b"v" * 3)])
    with pytest.raises(ValueError, match="sizes"):
        notes.rows(4, 8)


def test_notes_with_colliding_codes_keep_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        snapshot, "key_codes", lambda keys: np.zeros(keys.shape[0], dtype=np.uint64)
    )
    notes = snapshot.Notes()
    notes.add([(b"a" * 12, b"1"), (b"b" * 12, b"2")])
    notes.add([(b"a" * 12, None)])
    codes, rows, values, present = notes.rows(12, 1)
    assert codes.tolist() == [0, 0]
    got = {r.tobytes(): v.tobytes() if p else None
           for r, v, p in zip(rows, values, present, strict=True)}  # fmt: skip
    assert got == {b"a" * 12: None, b"b" * 12: b"2"}
