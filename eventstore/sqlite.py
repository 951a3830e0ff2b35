"""SQLite backend: the embedded default for one machine (`ucloud up`).

Writes go through one connection on one thread, batched by the GroupCommitter into
one ``BEGIN IMMEDIATE`` transaction with a savepoint per request, so a conflicting
request is rolled back alone. ``BEGIN IMMEDIATE`` also serialises writers in other
processes, which keeps positions gap-free across processes. Reads use their own
connection (WAL mode lets them run beside the writer).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .errors import DataError, EventStoreError, StreamConflict, TrackingConflict, UnavailableError
from .group_commit import GroupCommitter, PendingAppend
from .interface import EventStore
from .notify import Notifier
from .records import (
    RECORD_DECODER,
    RECORD_ENCODER,
    SNAPSHOT_DECODER,
    EventRecord,
    Snapshot,
    StreamAppend,
    Tracking,
    slice_entries,
    to_record,
    utcnow,
    validate_append,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY,
    stream   TEXT    NOT NULL,
    version  INTEGER NOT NULL,
    type     TEXT    NOT NULL,
    record   BLOB    NOT NULL,
    UNIQUE (stream, version)
);
CREATE INDEX IF NOT EXISTS events_by_type ON events (type, position);
CREATE TABLE IF NOT EXISTS tracking (
    consumer TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    stream  TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    snapshot BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS slices (
    slice    TEXT    NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (slice, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


def _make_private(path: Path) -> None:
    """The log says who did what: only the service may read it. A new file (and its
    directory) is created 0600 (0700), and SQLite gives its -wal and -shm files the
    database file's mode; an older file of ours that others could read is tightened."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    except OSError:
        return  # not creatable here (read-only place, say): sqlite3 reports it in its own words
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = file.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(file, stat.S_IMODE(st.st_mode) & 0o600)


class SqliteEventStore(EventStore):
    def __init__(self, path: str | Path, *, max_events_per_txn: int = 10_000) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            _make_private(Path(self.path))
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._local = threading.local()
        self._committer = GroupCommitter(
            self._commit_batch, max_cost=max_events_per_txn, max_bytes=64 * 1024 * 1024
        )
        self._appended = Notifier()
        self._schema_ready = False

    # -- plumbing ---------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            if not self._schema_ready:
                conn.executescript(SCHEMA)
                self._schema_ready = True
            self._local.conn = conn
        return conn

    async def _run(self, executor: ThreadPoolExecutor, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return fn(self._connection())
            except EventStoreError:
                raise
            except sqlite3.OperationalError as error:
                raise UnavailableError(f"sqlite {self.path}: {error}") from error
            except sqlite3.Error as error:
                raise DataError(f"sqlite {self.path}: {error}") from error

        return await asyncio.get_running_loop().run_in_executor(executor, call)

    # -- writes -----------------------------------------------------------------

    async def append(self, *appends: StreamAppend, tracking: Tracking | None = None) -> list[int]:
        count = validate_append(appends, tracking) + slice_entries(appends)
        positions = await self._committer.submit(appends, tracking, count)
        self._appended.notify()
        return positions

    async def _commit_batch(self, batch: list[PendingAppend]) -> None:
        outcomes = await self._run(self._writer_thread, lambda conn: _commit(conn, batch))
        for request, outcome in zip(batch, outcomes, strict=True):
            request.resolve(outcome)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        blob = RECORD_ENCODER.encode(snapshot)

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO snapshots (stream, version, snapshot) VALUES (?, ?, ?) "
                "ON CONFLICT (stream) DO UPDATE SET version = excluded.version, "
                "snapshot = excluded.snapshot WHERE excluded.version > snapshots.version",
                (snapshot.stream, snapshot.version, blob),
            )

        await self._run(self._writer_thread, save)

    # -- reads ------------------------------------------------------------------

    async def read_stream(
        self,
        stream: str,
        *,
        after_version: int = 0,
        up_to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[EventRecord]:
        sql = "SELECT record FROM events WHERE stream = ? AND version > ?"
        args: list[Any] = [stream, after_version]
        if up_to_version is not None:
            sql += " AND version <= ?"
            args.append(up_to_version)
        sql += " ORDER BY version DESC" if backwards else " ORDER BY version"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return await self._run(self._reader_thread, lambda conn: _decode_rows(conn.execute(sql, args)))

    async def stream_version(self, stream: str) -> int:
        def version(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT max(version) FROM events WHERE stream = ?", (stream,)).fetchone()
            return row[0] or 0

        return await self._run(self._reader_thread, version)

    async def read_all(
        self,
        after: int = 0,
        *,
        up_to: int | None = None,
        limit: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[EventRecord]:
        sql = "SELECT record FROM events WHERE position > ?"
        args: list[Any] = [after]
        if up_to is not None:
            sql += " AND position <= ?"
            args.append(up_to)
        if types is not None:
            wanted = sorted(types)
            if not wanted:
                return []
            sql += f" AND type IN ({','.join('?' * len(wanted))})"
            args.extend(wanted)
        sql += " ORDER BY position"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return await self._run(self._reader_thread, lambda conn: _decode_rows(conn.execute(sql, args)))

    async def read_slice(self, slice: str, after: int = 0, *, up_to: int | None = None,
                         limit: int | None = None) -> list[EventRecord]:
        sql = ("SELECT events.record FROM slices JOIN events ON events.position = slices.position "
               "WHERE slices.slice = ? AND slices.position > ?")
        args: list[Any] = [slice, after]
        if up_to is not None:
            sql += " AND slices.position <= ?"
            args.append(up_to)
        sql += " ORDER BY slices.position"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return await self._run(self._reader_thread, lambda conn: _decode_rows(conn.execute(sql, args)))

    async def slices_from(self) -> int | None:
        def marker(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT value FROM meta WHERE key = 'slices_from'").fetchone()
            return row[0] if row else None

        return await self._run(self._reader_thread, marker)

    async def head(self) -> int:
        return await self._run(self._reader_thread, _head)

    async def wait_for_events(self, after: int, timeout: float) -> int:
        # Appends from this process wake us at once; appends from other processes
        # sharing the file are noticed by polling the head.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            head = await self.head()
            remaining = deadline - loop.time()
            if head > after or remaining <= 0:
                return head
            await self._appended.wait(min(0.1, remaining))

    async def tracked_position(self, consumer: str) -> int:
        def tracked(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT position FROM tracking WHERE consumer = ?", (consumer,)).fetchone()
            return row[0] if row else 0

        return await self._run(self._reader_thread, tracked)

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        def load(conn: sqlite3.Connection) -> Snapshot | None:
            row = conn.execute("SELECT snapshot FROM snapshots WHERE stream = ?", (stream,)).fetchone()
            return SNAPSHOT_DECODER.decode(row[0]) if row else None

        return await self._run(self._reader_thread, load)

    async def close(self) -> None:
        await self._committer.close()
        for executor in (self._writer_thread, self._reader_thread):
            executor.submit(self._close_connection).result()
            executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _head(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT max(position) FROM events").fetchone()[0] or 0


def _decode_rows(cursor: sqlite3.Cursor) -> list[EventRecord]:
    decode = RECORD_DECODER.decode
    try:
        return [decode(row[0]) for row in cursor]
    except Exception as error:
        raise DataError(f"an event in the log does not decode: {error}") from error


def _commit(conn: sqlite3.Connection, batch: list[PendingAppend]) -> list[list[int] | Exception]:
    """Runs on the writer thread: one transaction, one savepoint per request."""
    outcomes: list[list[int] | Exception] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        position = _head(conn)
        now = utcnow()
        for request in batch:
            conn.execute("SAVEPOINT request")
            start = position
            try:
                rows = []
                slice_rows: list[tuple[str, int]] = []
                positions = []
                for append in request.appends:
                    row = conn.execute(
                        "SELECT max(version) FROM events WHERE stream = ?", (append.stream,)
                    ).fetchone()
                    actual = row[0] or 0
                    if actual != append.expected_version:
                        raise StreamConflict(append.stream, append.expected_version, actual)
                    for offset, event in enumerate(append.events, start=1):
                        position += 1
                        version = append.expected_version + offset
                        record = to_record(event, append.stream, version, position, now)
                        rows.append((position, append.stream, version, event.type, RECORD_ENCODER.encode(record)))
                        slice_rows.extend((name, position) for name in event.slices)
                        positions.append(position)
                if request.tracking is not None:
                    _record_tracking(conn, request.tracking)
                conn.executemany(
                    "INSERT INTO events (position, stream, version, type, record) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                if slice_rows:
                    # The first sliced append marks where slices begin (older events have none).
                    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('slices_from', ?)", (start,))
                    conn.executemany("INSERT INTO slices (slice, position) VALUES (?, ?)", slice_rows)
                conn.execute("RELEASE request")
                outcomes.append(positions)
            except (StreamConflict, TrackingConflict) as conflict:
                conn.execute("ROLLBACK TO request")
                conn.execute("RELEASE request")
                position = start
                outcomes.append(conflict)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return outcomes


def _record_tracking(conn: sqlite3.Connection, tracking: Tracking) -> None:
    row = conn.execute("SELECT position FROM tracking WHERE consumer = ?", (tracking.consumer,)).fetchone()
    recorded = row[0] if row else 0
    if tracking.position <= recorded:
        raise TrackingConflict(tracking.consumer, tracking.position, recorded)
    conn.execute(
        "INSERT INTO tracking (consumer, position) VALUES (?, ?) "
        "ON CONFLICT (consumer) DO UPDATE SET position = excluded.position",
        (tracking.consumer, tracking.position),
    )
