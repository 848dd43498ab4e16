"""The state file on real files: round trips, untrusted files set aside, a SIGKILL mid-write,
a full disk (a small tmpfs), checkpoints."""

from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from bpfsync.agent.store import (
    FILE_NAME,
    FORMAT_VERSION,
    MapIdentity,
    MapShape,
    StoredMap,
    open_store,
)
from bpfsync.errors import ConfigError

M = MapShape("m", 8, 16, "lww")
C = MapShape("c", 4, 8, "counter")
SHAPES = [M, C]
IDENT = MapIdentity(map_id=7, boot_id="boot-a", nbuckets=4)


def query(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows read past the store, on a connection of our own."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, args).fetchall()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "bpfsync.agent" and r.levelno == logging.WARNING]


def test_round_trip(tmp_path: Path) -> None:
    other = MapShape("other", 2, 2, "lww")
    opened = open_store(tmp_path, "n1", [*SHAPES, other])
    assert (opened.set_aside, opened.why, opened.maps) == (None, None, {})
    st = opened.store
    s1, s2, s3 = (st.append("m", b"m%d" % i) for i in range(3))
    assert s1 is not None and s2 is not None and s3 is not None and s1 < s2 < s3
    rows = [(3, 2**64 - 1, b"b3"), (0, 0, b"b0"), (1, 2**63, b"b1"), (2, 2**63 - 1, b"b2")]
    assert st.put_buckets("m", rows, identity=IDENT, horizon=b"hz", drop_log_upto=s2)
    s4 = st.append("m", b"m3")
    assert st.put_buckets("m", [(1, 5, b"b1'")], horizon=b"hz2")  # the horizon alone changes
    # no maps row: its rows are not read back
    assert st.append("c", b"c0") is not None
    assert st.put_buckets("c", [(0, 1, b"c")])
    assert st.put_buckets("other", [(0, 9, b"o")], identity=MapIdentity(1, "boot-a", 1))
    assert st.append("other", b"o0") is not None
    st.close()

    opened = open_store(tmp_path, "n1", SHAPES)
    assert (opened.set_aside, opened.why) == (None, None)
    assert opened.maps == {"m": StoredMap(
        M, IDENT, b"hz2",
        [(0, 0, b"b0"), (1, 5, b"b1'"), (2, 2**63 - 1, b"b2"), (3, 2**64 - 1, b"b3")],
        [(s3, b"m2"), (s4, b"m3")])}
    opened.store.close()

    # a map left out of the configuration is left in the file, not dropped
    opened = open_store(tmp_path, "n1", [other])
    assert opened.maps["other"].buckets == [(0, 9, b"o")]
    assert [blob for _, blob in opened.maps["other"].log] == [b"o0"]
    opened.store.close()


def test_creates_a_private_directory_and_file(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "state"
    open_store(state_dir, "n1", SHAPES).store.close()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / FILE_NAME).stat().st_mode) == 0o600


def test_forget_removes_only_that_maps_rows(tmp_path: Path) -> None:
    st = open_store(tmp_path, "n1", SHAPES).store
    for shape in SHAPES:
        assert st.put_buckets(shape.name, [(0, 1, b"x"), (1, 2, b"y")], identity=IDENT)
        assert st.append(shape.name, b"entry") is not None
    assert st.forget("m")
    st.close()

    path = tmp_path / FILE_NAME
    for table, column in (("maps", "name"), ("buckets", "map"), ("log", "map")):
        assert query(path, f"SELECT count(*) FROM {table} WHERE {column} = 'm'") == [(0,)]
    opened = open_store(tmp_path, "n1", SHAPES)
    assert list(opened.maps) == ["c"]
    assert opened.maps["c"].buckets == [(0, 1, b"x"), (1, 2, b"y")]
    assert [blob for _, blob in opened.maps["c"].log] == [b"entry"]
    opened.store.close()


def _stored(state_dir: Path, node: str = "n1", rows: int = 1) -> None:
    st = open_store(state_dir, node, SHAPES).store
    assert st.put_buckets("m", [(i, i, os.urandom(2048)) for i in range(rows)], identity=IDENT)
    st.close()


def _random_bytes(d: Path) -> None:
    d.mkdir()
    (d / FILE_NAME).write_bytes(os.urandom(16384))


def _truncated(d: Path) -> None:
    _stored(d, rows=200)
    path = d / FILE_NAME
    os.truncate(path, path.stat().st_size // 2)


def _other_format(d: Path) -> None:
    _stored(d)
    with closing(sqlite3.connect(d / FILE_NAME)) as conn, conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'format_version'",
                     (str(FORMAT_VERSION + 98),))


BAD_FILES: dict[str, tuple[Callable[[Path], None], list[MapShape], str, str]] = {
    # case: (make the file, shapes to open with, reason word, in why)
    "random bytes": (_random_bytes, SHAPES, "unreadable", "not a database"),
    "truncated": (_truncated, SHAPES, "corrupt", "damaged"),
    "other node": (lambda d: _stored(d, node="n2"), SHAPES, "node", "'n2'"),
    "other format": (_other_format, SHAPES, "format", f"version {FORMAT_VERSION + 98}"),
    "key size": (_stored, [MapShape("m", 4, 16, "lww"), C], "shape", "key_size 8"),
    "value size": (_stored, [MapShape("m", 8, 32, "lww"), C], "shape", "value_size 16"),
    "policy": (_stored, [MapShape("m", 8, 16, "counter"), C], "shape", "policy 'lww'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_an_untrusted_file_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str,
) -> None:
    make, shapes, word, cause = BAD_FILES[case]
    state_dir = tmp_path / "state"
    make(state_dir)
    assert not (state_dir / f"{FILE_NAME}-wal").exists()  # the bytes below are all of it
    original = (state_dir / FILE_NAME).read_bytes()

    with caplog.at_level(logging.WARNING, logger="bpfsync.agent"):
        opened = open_store(state_dir, "n1", shapes)
    try:
        aside = opened.set_aside
        assert aside is not None and opened.why is not None
        assert re.fullmatch(rf"{FILE_NAME}\.bad-\d{{8}}T\d{{6}}Z-{word}", aside.name)
        assert aside.parent == state_dir
        assert aside.read_bytes() == original
        assert cause in opened.why and "\n" not in opened.why
        [warning] = warnings(caplog)
        assert str(aside) in warning and opened.why in warning
        # a fresh store took its place
        assert opened.maps == {}
        assert opened.store.put_buckets("m", [(0, 1, b"x")], identity=IDENT)
    finally:
        opened.store.close()
    again = open_store(state_dir, "n1", shapes)
    again.store.close()
    assert again.set_aside is None and list(again.maps) == ["m"]


def test_set_aside_by_the_caller_keeps_the_store_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    st = open_store(tmp_path, "n1", SHAPES).store
    assert st.put_buckets("m", [(0, 1, b"x")], identity=IDENT)
    with caplog.at_level(logging.WARNING, logger="bpfsync.agent"):
        aside = st.set_aside("digests disagree with the kernel map")
    assert aside.name.startswith(f"{FILE_NAME}.bad-") and aside.name.endswith("-rejected")
    assert query(aside, "SELECT name FROM maps") == [("m",)]
    [warning] = warnings(caplog)
    assert str(aside) in warning and "digests disagree" in warning
    assert st.append("c", b"after") is not None  # the same object, on a fresh file
    assert st.put_buckets("c", [], identity=IDENT)
    st.close()
    opened = open_store(tmp_path, "n1", SHAPES)
    opened.store.close()
    assert opened.set_aside is None and list(opened.maps) == ["c"]


CHILD = """
import sys, time
from pathlib import Path
from bpfsync.agent.store import MapIdentity, MapShape, open_store
store = open_store(Path(sys.argv[1]), "n1", [MapShape("m", 8, 16, "lww")]).store
assert store.put_buckets("m", [], identity=MapIdentity(1, "boot", 1))
end = time.monotonic() + 20
for i in range(100_000):
    if time.monotonic() > end:
        break
    print(store.append("m", b"%d" % i * 10), flush=True)
"""


def test_every_append_returned_survives_sigkill(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        printed = [child.stdout.readline() for _ in range(300)]
    finally:
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err
    seqs = [int(line) for line in printed]  # a None or a short line fails here

    opened = open_store(tmp_path, "n1", [M])
    opened.store.close()
    assert opened.set_aside is None, opened.why
    stored = dict(opened.maps["m"].log)
    assert not set(seqs) - set(stored)
    assert all(stored[seq] == b"%d" % i * 10 for i, seq in enumerate(seqs))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, unmounted at teardown."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_fails_writes_without_raising(
    tmpfs: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    filler = tmpfs / "filler"
    filler.write_bytes(b"\xff" * (128 << 10))
    opened = open_store(tmpfs / "state", "n1", SHAPES)
    st = opened.store
    try:
        assert st.put_buckets("m", [], identity=IDENT, horizon=b"h0")
        blob = os.urandom(64 << 10)
        caplog.set_level(logging.INFO, logger="bpfsync.agent")
        stored: list[int] = []
        for _ in range(20):
            seq = st.append("m", blob)
            if seq is None:
                break
            stored.append(seq)
        assert stored and seq is None
        # still full: a transaction that would drop the log is undone whole
        assert not st.put_buckets("m", [(0, 1, blob)], horizon=b"h1", drop_log_upto=stored[-1])
        assert st.append("m", blob) is None
        assert st.errors["disk_full"] == 3 and st.errors["io"] == 0
        assert len(warnings(caplog)) == 1 and "disk_full" in warnings(caplog)[0]

        filler.unlink()
        again = st.append("m", blob)
        assert again is not None and again > stored[-1]
        assert any("succeed again" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.INFO)
        path = tmpfs / "state" / FILE_NAME
        assert [seq for (seq,) in query(path, "SELECT seq FROM log")] == [*stored, again]
        assert query(path, "SELECT horizon FROM maps") == [(b"h0",)]
        assert query(path, "SELECT count(*) FROM buckets") == [(0,)]
    finally:
        st.close()


def _db_size(path: Path) -> int:
    return (path / FILE_NAME).stat().st_size


def test_only_the_syncer_checkpoints(tmp_path: Path) -> None:
    st = open_store(tmp_path, "n1", SHAPES).store
    try:
        before = _db_size(tmp_path)
        # more pages than SQLite's default automatic checkpoint (1000): none may happen
        for _ in range(1100):
            assert st.append("m", b"\x01" * 4096) is not None
        assert _db_size(tmp_path) == before

        st.start_syncer(0.05)
        deadline = time.monotonic() + 10
        while _db_size(tmp_path) < before + 1100 * 4096 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _db_size(tmp_path) >= before + 1100 * 4096
        assert not st.errors
    finally:
        st.close()


def test_close_checkpoints_everything_and_is_idempotent(tmp_path: Path) -> None:
    st = open_store(tmp_path, "n1", SHAPES).store
    assert st.put_buckets("m", [(0, 1, b"x" * 10000)], identity=IDENT)
    st.start_syncer(10.0)
    # another connection (an operator's sqlite3 shell): the store's is not the last to close,
    # which would have checkpointed on its own
    with closing(sqlite3.connect(tmp_path / FILE_NAME)) as other:
        other.execute("SELECT count(*) FROM log").fetchall()
        st.close()
        st.close()
        assert (tmp_path / f"{FILE_NAME}-wal").stat().st_size == 0
    assert query(tmp_path / FILE_NAME, "SELECT bucket, sum FROM buckets") == [(0, 1)]


def test_a_failed_write_is_undone_whole(tmp_path: Path) -> None:
    st = open_store(tmp_path, "n1", SHAPES).store
    assert st.put_buckets("m", [], identity=IDENT, horizon=b"h0")
    seq = st.append("m", b"entry")
    bad_rows: list[Any] = [(0, 1, b"stored first"), (1, 2, None)]  # NOT NULL fails the second
    assert not st.put_buckets("m", bad_rows, horizon=b"h1", drop_log_upto=seq)
    assert st.errors["io"] == 1
    assert st.append("m", b"next") is not None  # no transaction was left open
    st.close()
    opened = open_store(tmp_path, "n1", SHAPES)
    opened.store.close()
    [stored] = opened.maps.values()
    assert stored.buckets == [] and stored.horizon == b"h0"
    assert [blob for _, blob in stored.log] == [b"entry", b"next"]


def test_a_wal_goes_aside_with_its_file(tmp_path: Path) -> None:
    # a node killed with its last writes in the WAL only: both files are its state
    st = open_store(tmp_path / "live", "n2", SHAPES).store
    assert st.put_buckets("m", [(0, 1, b"x")], identity=IDENT)
    crashed = tmp_path / "state"
    crashed.mkdir()
    for name in (FILE_NAME, f"{FILE_NAME}-wal"):
        (crashed / name).write_bytes((tmp_path / "live" / name).read_bytes())
    st.close()
    wal = (crashed / f"{FILE_NAME}-wal").read_bytes()
    assert wal

    opened = open_store(crashed, "n1", SHAPES)
    opened.store.close()
    assert opened.set_aside is not None and opened.maps == {}
    assert Path(f"{opened.set_aside}-wal").read_bytes() == wal
    assert query(opened.set_aside, "SELECT name FROM maps") == [("m",)]
    again = open_store(crashed, "n1", SHAPES)
    again.store.close()
    assert (again.set_aside, again.maps) == (None, {})


def test_a_state_dir_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    state_dir = tmp_path / "file" / "state"
    with pytest.raises(ConfigError, match=re.escape(str(state_dir))) as caught:
        open_store(state_dir, "n1", SHAPES)
    assert "state_dir" in str(caught.value)
