"""A node's replica state on disk: one SQLite file, ``<state_dir>/bpfsync.db``.

It stores what the caller gives it as opaque blobs (frozen buckets, log entries, a packed
horizon stamp) and reads them all back at start; it knows nothing of their layout.

Layout (four tables):

  meta     (key, value)          format_version and node_id: whose file this is, in what format
  maps     (name, key_size, value_size, policy, map_id, boot_id, nbuckets, horizon)
                                 one row per map whose buckets were stored at least once: the
                                 shape the configuration gave it, the kernel map object the
                                 state is about, and the horizon stamp
  buckets  (map, bucket, sum, blob)  a map's state, split by digest bucket; sum is the bucket's
                                 uint64 digest sum, stored as the signed int64 of the same bits
  log      (seq, map, blob)      changes since the map's buckets were last stored, in order;
                                 seq never repeats (AUTOINCREMENT), even once rows are dropped

Durability rules:

  D1  Each write call is one transaction: it happens whole or not at all.
  D2  A committed write survives the process being killed at any instant (SIGKILL, OOM): a
      commit is a write() into the WAL, which the kernel's page cache holds once write()
      returns. The caller's thread never fsyncs (``synchronous=NORMAL``, no automatic
      checkpoints): a write costs a few microseconds, not a disk flush.
  D3  A power loss loses at most what was committed since the last checkpoint: the syncer
      thread checkpoints every ``interval_s``, which fsyncs the WAL and then the database.
  D4  A write that fails (full disk, I/O error) is rolled back and counted, never raised: the
      node keeps serving while its disk state falls behind, and says so in the log once.
  D5  A file this node cannot trust (not SQLite, damaged, another node's or format's, or a map
      whose shape changed) is renamed aside, never deleted, and the node starts as one without
      stored state (core/replica.py S1); the old file is kept for a post-mortem.

Why SQLite: it is in the standard library, its WAL mode gives atomic commits without an fsync
each (D2), and its recovery after a crash at any point is tested far beyond what a hand-made
log-plus-snapshot format would be.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from bpfsync.errors import ConfigError

__all__ = [
    "FILE_NAME", "FORMAT_VERSION", "MapIdentity", "MapShape", "Opened", "StateStore", "StoredMap",
    "inspect_store", "open_store",
]

log = logging.getLogger("bpfsync.agent")

FORMAT_VERSION = 1
FILE_NAME = "bpfsync.db"

_SIDE_FILES = ("-wal", "-shm")  # SQLite's files beside the database: they move with it
# The WAL is cut back to this after a checkpoint; a burst may grow it beyond until the next.
_JOURNAL_SIZE_LIMIT = 64 << 20
# How long a write waits for a lock held by another connection (a checkpoint's are brief):
# longer would stall the caller's thread.
_BUSY_TIMEOUT_S = 0.5
_U64 = 1 << 64
_REJECTED = "rejected"  # the reason word of a file the caller set aside

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE maps (name TEXT PRIMARY KEY, key_size INTEGER NOT NULL,"
    " value_size INTEGER NOT NULL, policy TEXT NOT NULL, map_id INTEGER NOT NULL,"
    " boot_id TEXT NOT NULL, nbuckets INTEGER NOT NULL, horizon BLOB)",
    "CREATE TABLE buckets (map TEXT NOT NULL, bucket INTEGER NOT NULL, sum INTEGER NOT NULL,"
    " blob BLOB NOT NULL, PRIMARY KEY (map, bucket))",
    "CREATE TABLE log (seq INTEGER PRIMARY KEY AUTOINCREMENT, map TEXT NOT NULL,"
    " blob BLOB NOT NULL)",
    "CREATE INDEX log_by_map ON log (map, seq)",  # a map's rows, for forget and drop_log_upto
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class MapShape:
    """What the configuration says of a synced map."""

    name: str
    key_size: int
    value_size: int
    policy: str  # compared as a string: another policy means other blobs


@dataclass(frozen=True, slots=True)
class MapIdentity:
    """Which kernel map object the stored state is about."""

    map_id: int  # the kernel's map id
    boot_id: str  # /proc/sys/kernel/random/boot_id when it was stored
    nbuckets: int  # digest buckets the bucket rows are split by


@dataclass(slots=True)
class StoredMap:
    """A map's rows as read at open."""

    shape: MapShape
    identity: MapIdentity
    horizon: bytes | None
    buckets: list[tuple[int, int, bytes]] = field(default_factory=list)  # (bucket, sum, blob)
    log: list[tuple[int, bytes]] = field(default_factory=list)  # (seq, blob) in seq order


@dataclass(slots=True)
class Opened:
    """What ``open_store`` found."""

    store: StateStore
    maps: dict[str, StoredMap]  # the configured maps that have a maps row
    set_aside: Path | None  # where an untrusted file was moved, if one was
    why: str | None  # one line saying why it was


class _BadFile(Exception):
    """The file is not one this node can trust (D5)."""

    def __init__(self, word: str, why: str) -> None:
        super().__init__(why)
        self.word = word  # goes into the set-aside file's name
        self.why = why


def open_store(state_dir: Path, node_id: str, shapes: Sequence[MapShape]) -> Opened:
    """Open (or create) the state file in ``state_dir`` and read the rows of ``shapes``' maps.

    Rows of maps that are not in ``shapes`` stay in the file, unread. A file that cannot be
    trusted is set aside (D5). Raises ConfigError when ``state_dir`` or the file cannot be
    created or written.
    """
    path = state_dir / FILE_NAME
    _create_file(path)
    aside: Path | None = None
    why: str | None = None
    try:
        maps = _read(path, node_id, shapes)
        try:
            conn = _connect(path, node_id)
        except sqlite3.DatabaseError as err:
            raise _BadFile("unreadable", f"cannot open it for writing: {err}") from err
    except _BadFile as bad:
        aside, why = _move_aside(path, bad.word), bad.why
        log.warning("state file %s set aside as %s: %s; starting from an empty store",
                    path, aside, why)
        maps = {}
        conn = _fresh(path, node_id)
    return Opened(StateStore(path, node_id, shapes, conn), maps, aside, why)


class StateStore:
    """The open state file. Writes come from one thread at a time (the caller's); the syncer
    thread only checkpoints, on its own connection."""

    def __init__(self, path: Path, node_id: str, shapes: Sequence[MapShape],
                 conn: sqlite3.Connection) -> None:
        self.path = path
        self.errors: collections.Counter[str] = collections.Counter()  # "disk_full", "io"
        self._node_id = node_id
        self._shapes = {s.name: s for s in shapes}
        self._conn: sqlite3.Connection | None = conn
        self._failing = 0  # failed writes in the current streak (the caller's thread only)
        self._sync_failing = 0  # failed checkpoints in a row (the syncer's thread only)
        self._count_lock = threading.Lock()  # errors is counted from both threads
        # Held while a checkpoint runs and while the files are closed or moved: a checkpoint
        # connection left as the last one would delete the WAL by name when it closes.
        self._files_lock = threading.Lock()
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None

    def read_map(self, shape: MapShape) -> StoredMap | None:
        """Take ``shape``'s map in from now on (a map first found after the store was opened)
        and read its rows, as ``open_store`` reads those of the maps it is given: None when it
        has none. ValueError says why the file cannot be trusted (D5; the caller sets it
        aside)."""
        self._shapes[shape.name] = shape
        conn = self._conn
        if conn is None:
            return None
        try:
            return _read_rows(conn, self._node_id, [shape]).get(shape.name)
        except _BadFile as bad:
            raise ValueError(bad.why) from bad
        except sqlite3.DatabaseError as err:
            raise ValueError(f"unreadable: {err}") from err

    def append(self, map: str, blob: bytes) -> int | None:
        """Add a row to ``map``'s log; its seq, or None when the write failed."""

        def body(conn: sqlite3.Connection) -> int | None:
            return conn.execute("INSERT INTO log (map, blob) VALUES (?, ?)", (map, blob)).lastrowid

        return self._write(f"appending to the log of {map!r}", body)

    def put_buckets(self, map: str, rows: Sequence[tuple[int, int, bytes]], *,
                    identity: MapIdentity | None = None, horizon: bytes | None = None,
                    drop_log_upto: int | None = None) -> bool:
        """Store ``rows`` (bucket, uint64 sum, blob) of ``map`` in one transaction, with
        ``identity`` and ``horizon`` (the maps row, written whole when identity is given, else
        only its horizon when that is given), and drop the map's log rows up to
        ``drop_log_upto``. False when the write failed: then none of it was done.

        ``identity`` for a map that was not in the shapes given at open is the caller's bug:
        ValueError.
        """
        shape = self._shapes.get(map)
        if identity is not None and shape is None:
            raise ValueError(f"map {map!r} was not among the shapes the store was opened with")

        def body(conn: sqlite3.Connection) -> bool:
            conn.executemany(
                "INSERT OR REPLACE INTO buckets (map, bucket, sum, blob) VALUES (?, ?, ?, ?)",
                [(map, bucket, _signed(s), blob) for bucket, s, blob in rows])
            if identity is not None and shape is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO maps (name, key_size, value_size, policy, map_id,"
                    " boot_id, nbuckets, horizon) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (map, shape.key_size, shape.value_size, shape.policy, identity.map_id,
                     identity.boot_id, identity.nbuckets, horizon))
            elif horizon is not None:
                conn.execute("UPDATE maps SET horizon = ? WHERE name = ?", (horizon, map))
            if drop_log_upto is not None:
                conn.execute("DELETE FROM log WHERE map = ? AND seq <= ?", (map, drop_log_upto))
            return True

        return self._write(f"storing buckets of {map!r}", body) is not None

    def forget(self, map: str) -> bool:
        """Delete every row of ``map``; False when the write failed."""

        def body(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM maps WHERE name = ?", (map,))
            conn.execute("DELETE FROM buckets WHERE map = ?", (map,))
            conn.execute("DELETE FROM log WHERE map = ?", (map,))
            return True

        return self._write(f"forgetting {map!r}", body) is not None

    def set_aside(self, why: str) -> Path:
        """Move the file aside (D5) and go on with a fresh, empty one; where it went.

        Raises ConfigError when the file cannot be moved or recreated; the store then fails
        every write (counted) until the node restarts.
        """
        with self._files_lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
            aside = _move_aside(self.path, _REJECTED)
            log.warning("state file %s set aside as %s: %s; starting from an empty store",
                        self.path, aside, why)
            self._conn = _fresh(self.path, self._node_id)
        return aside

    def checkpoint(self) -> None:
        """Copy the WAL into the database without waiting for the writer (D3). Failures are
        logged and counted, not raised."""
        with self._files_lock:
            if self._conn is None:
                return  # closed: close() checkpointed already
            try:
                # sqlite3 connections belong to one thread; this one to whichever checkpoints
                with closing(sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S,
                                             isolation_level=None)) as conn:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except (sqlite3.Error, OSError) as err:
                self._checkpoint_failed(err)
                return
        if self._sync_failing:
            log.info("state store %s: checkpoints succeed again after %d failed",
                     self.path, self._sync_failing)
            self._sync_failing = 0

    def start_syncer(self, interval_s: float) -> None:
        """Checkpoint every ``interval_s`` in a daemon thread until close()."""
        if self._syncer is not None:
            raise RuntimeError("the store's syncer is already running")
        self._stop.clear()
        self._syncer = threading.Thread(target=self._sync_every, args=(interval_s,),
                                        name="bpfsync-store-sync", daemon=True)
        self._syncer.start()

    def close(self) -> None:
        """Stop the syncer, checkpoint everything into the database and close. Idempotent."""
        if self._syncer is not None:
            self._stop.set()
            self._syncer.join()
            self._syncer = None
        with self._files_lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as err:
                self._checkpoint_failed(err)
            finally:
                conn.close()

    def _write(self, what: str, body: Callable[[sqlite3.Connection], _T]) -> _T | None:
        """Run ``body`` in one transaction (D1); None when it failed (D4)."""
        conn = self._conn
        if conn is None:
            self._failed(what, sqlite3.ProgrammingError("the store is closed"))
            return None
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = body(conn)
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as err:
            _roll_back(conn)
            self._failed(what, err)
            return None
        except BaseException:
            _roll_back(conn)  # a bad argument (a bug): leave no transaction open behind it
            raise
        if self._failing:
            log.info("state store %s: writes succeed again after %d failed",
                     self.path, self._failing)
            self._failing = 0
        return result

    def _failed(self, what: str, err: sqlite3.Error) -> None:
        kind = _error_kind(err)
        with self._count_lock:
            self.errors[kind] += 1
        self._failing += 1
        if self._failing == 1:  # once a streak: a full disk fails every write
            fix = "free space on" if kind == "disk_full" else "check the disk under"
            log.warning("state store %s: %s failed (%s: %s); the state on disk falls behind"
                        " until writes succeed again: %s %s", self.path, what, kind, err,
                        fix, self.path.parent)

    def _checkpoint_failed(self, err: BaseException) -> None:
        kind = _error_kind(err)
        with self._count_lock:
            self.errors[kind] += 1
        self._sync_failing += 1
        if self._sync_failing == 1:
            log.warning("state store %s: checkpoint failed (%s: %s); a power loss may lose"
                        " more until one succeeds", self.path, kind, err)

    def _sync_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.checkpoint()
            except Exception as err:  # the syncer must outlive a bug in one round
                self._checkpoint_failed(err)


def inspect_store(
    state_dir: Path, node_id: str, shapes: Sequence[MapShape]
) -> tuple[dict[str, StoredMap], str | None]:
    """What ``open_store`` would find, read-only (``bpfsync check``): the stored maps, and why
    the file would be set aside, if it would. Nothing is made, moved or written (SQLite may
    add its -wal and -shm files beside a database it reads)."""
    path = state_dir / FILE_NAME
    if not path.exists():
        return {}, None
    try:
        return _read(path, node_id, shapes), None
    except _BadFile as bad:
        return {}, bad.why


def _create_file(path: Path) -> None:
    """Make ``path``'s directory (0700) and the file (0600) if missing; ConfigError if not."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as err:
        raise ConfigError(
            f"cannot create or write the state file {path}: {err.strerror or err}; check"
            " state_dir: it must be a directory this user can create and write") from err


def _read(path: Path, node_id: str, shapes: Sequence[MapShape]) -> dict[str, StoredMap]:
    """The rows of ``shapes``' maps; _BadFile when the file cannot be trusted."""
    # read-only, so that a file set aside keeps its bytes (a writer would checkpoint on close)
    uri = path.absolute().as_uri() + "?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as conn:
            return _read_rows(conn, node_id, shapes)
    except sqlite3.DatabaseError as err:
        if _error_code(err) == sqlite3.SQLITE_CORRUPT:
            raise _BadFile("corrupt", f"damaged: {err}") from err
        raise _BadFile("unreadable", f"not a readable SQLite database: {err}") from err


def _read_rows(conn: sqlite3.Connection, node_id: str,
               shapes: Sequence[MapShape]) -> dict[str, StoredMap]:
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    check = [row[0] for row in conn.execute("PRAGMA quick_check")]
    if check != ["ok"]:
        raise _BadFile("corrupt", f"damaged: {'; '.join(map(str, check[:3]))}")
    if not tables:
        return {}  # new: its first transaction (the schema) never committed
    if "meta" not in tables:
        raise _BadFile("nometa", "no meta table: not a bpfsync state file")
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    version, owner = meta.get("format_version"), meta.get("node_id")
    if version is None or owner is None:
        raise _BadFile("nometa", "the meta table lacks format_version or node_id")
    if version != str(FORMAT_VERSION):
        raise _BadFile("format", f"format version {version}, this bpfsync reads version"
                                 f" {FORMAT_VERSION}")
    if owner != node_id:
        raise _BadFile("node", f"written by node {owner!r}, this node is {node_id!r}")

    wanted = {s.name: s for s in shapes}
    found: dict[str, StoredMap] = {}
    rows = conn.execute(
        "SELECT name, key_size, value_size, policy, map_id, boot_id, nbuckets, horizon"
        f" FROM maps WHERE name IN ({_marks(len(wanted))})", list(wanted)).fetchall()
    for name, key_size, value_size, policy, map_id, boot_id, nbuckets, horizon in rows:
        shape = wanted[name]
        for what, stored, configured in (("key_size", key_size, shape.key_size),
                                          ("value_size", value_size, shape.value_size),
                                          ("policy", policy, shape.policy)):
            if stored != configured:
                raise _BadFile("shape", f"map {name!r} has {what} {stored!r} in the file,"
                                        f" {configured!r} in the configuration")
        found[name] = StoredMap(shape, MapIdentity(map_id, boot_id, nbuckets), horizon)

    names = list(found)
    # one query each: a million-entry map is about a thousand bucket rows of ~40 KB
    for name, bucket, s, blob in conn.execute(
            f"SELECT map, bucket, sum, blob FROM buckets WHERE map IN ({_marks(len(names))})"
            " ORDER BY map, bucket", names):
        found[name].buckets.append((bucket, s % _U64, blob))
    for name, seq, blob in conn.execute(
            f"SELECT map, seq, blob FROM log WHERE map IN ({_marks(len(names))})"
            " ORDER BY map, seq", names):
        found[name].log.append((seq, blob))
    return found


def _connect(path: Path, node_id: str) -> sqlite3.Connection:
    """The write connection, with the schema made if the file has none."""
    # isolation_level=None: each write call says BEGIN and COMMIT itself (D1).
    # check_same_thread=False: the caller may open the store in one thread and write from
    # another; one thread at a time uses it.
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)
    try:
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL was refused")
        conn.execute("PRAGMA synchronous = NORMAL")  # fsync at checkpoints only (D2, D3)
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints are the syncer's (D2)
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                             [("format_version", str(FORMAT_VERSION)), ("node_id", node_id)])
            conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def _fresh(path: Path, node_id: str) -> sqlite3.Connection:
    """A new, empty store at ``path`` (the old file was moved); ConfigError if it cannot be."""
    _create_file(path)
    try:
        return _connect(path, node_id)
    except sqlite3.DatabaseError as err:
        raise ConfigError(f"cannot create the state file {path}: {err}; check state_dir and"
                          " the free space of its filesystem") from err


def _move_aside(path: Path, word: str) -> Path:
    """Rename ``path`` and its side files to ``<name>.bad-<UTC time>-<word>``; the new path."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = f"{path.name}.bad-{stamp}-{word}"
    target, n = path.with_name(base), 2
    while target.exists():  # a second one within the same second: never replace a kept file
        target, n = path.with_name(f"{base}-{n}"), n + 1
    try:
        # the side files first: a WAL left beside the fresh file would be replayed into it
        for suffix in _SIDE_FILES:
            with suppress(FileNotFoundError):
                os.rename(f"{path}{suffix}", f"{target}{suffix}")
        os.rename(path, target)
    except OSError as err:
        raise ConfigError(f"cannot move the state file {path} aside to {target}:"
                          f" {err.strerror or err}; check state_dir's permissions") from err
    return target


def _roll_back(conn: sqlite3.Connection) -> None:
    # SQLite may have ended the transaction itself (a full disk or an I/O error roll it back);
    # a rollback that fails leaves nothing more to undo.
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _error_kind(err: BaseException) -> str:
    """ "disk_full" for SQLITE_FULL, else "io"."""
    code = _error_code(err)
    if code is not None:
        return "disk_full" if code == sqlite3.SQLITE_FULL else "io"
    return "disk_full" if "database or disk is full" in str(err) else "io"


def _error_code(err: BaseException) -> int | None:
    """SQLite's primary result code of ``err``, when it carries one."""
    code = getattr(err, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _signed(s: int) -> int:
    """A uint64 as the int64 of the same bits (SQLite's integers are signed)."""
    return s - _U64 if s >= 1 << 63 else s


def _marks(n: int) -> str:
    return ", ".join("?" * n)
