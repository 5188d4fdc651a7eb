"""The only SQL in gateway: schema and migrations, the group-commit writer, and queries.

Every write of the intake path goes through one `Writer`: a single thread that owns the
write connection and commits whatever units of work are queued in one transaction
(group commit), synced to disk (WAL, ``synchronous=FULL``) before any caller is told it
succeeded. It must never acknowledge a unit that is not durable, and a caller that goes
away mid-commit must never wedge it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("gateway")

T = TypeVar("T")
Unit = Callable[[sqlite3.Connection], Any]

# Most units a batch takes: bounds how long one commit holds the write lock.
MAX_BATCH = 128

# Each entry moves the schema from version N to N+1 (PRAGMA user_version). Never edit an
# entry that has shipped; append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE messages (
        id           INTEGER PRIMARY KEY,
        queue_id     TEXT NOT NULL UNIQUE,
        received_at  TEXT NOT NULL,          -- ISO 8601, UTC
        mail_from    TEXT NOT NULL,          -- '' for the null reverse-path
        rcpt_to      TEXT NOT NULL,          -- JSON list of addresses
        peer         TEXT NOT NULL,
        helo         TEXT NOT NULL,
        size         INTEGER NOT NULL,
        sha256       TEXT NOT NULL,
        message_id   TEXT,                   -- the header as written, brackets included
        from_header  TEXT,
        subject      TEXT,
        date_header  TEXT,
        malformed    TEXT,                   -- NULL, or why it could not be parsed
        defects      TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX messages_by_message_id ON messages (message_id);
    CREATE INDEX messages_by_received_at ON messages (received_at);
    -- Raw bytes live apart so that listing messages never reads them.
    CREATE TABLE message_raw (
        message INTEGER PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
        raw     BLOB NOT NULL
    );
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

# SQLite primary result codes (https://www.sqlite.org/rescode.html).
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_IOERR = 10
SQLITE_FULL = 13


class StoreError(Exception):
    """A unit of work could not be committed; nothing of it is stored."""


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full."""


def connect(path: Path, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """Open the database in WAL mode with full sync, migrated to the current schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL syncs the WAL on every commit: survives power loss, not only kill -9.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database has not seen; returns the schema version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database schema version {version} is newer than this gateway "
                f"({SCHEMA_VERSION}); upgrade gateway"
            )
        for number in range(version, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


def _statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT our transaction; split on complete statements instead.
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer
            buffer = ""


def classify_error(exc: BaseException) -> StoreError:
    """Map a sqlite3 (or OS) error to what the SMTP edge needs to know."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == SQLITE_FULL:
        return StoreFull("database or disk is full")
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        return StoreFull("disk is full")
    if isinstance(exc, StoreError):
        return exc
    return StoreError(f"{type(exc).__name__}: {exc}")


@dataclass
class _Pending:
    unit: Unit
    future: asyncio.Future[Any]


class Writer:
    """The single writer: queued units of work, committed together.

    `write()` returns only after the unit's transaction is committed and synced. A
    unit that raises is rolled back alone (a savepoint each) and its caller gets the
    error; the other units of the batch still commit.
    """

    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gateway-writer"
        )
        self._conn: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.units = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._thread, self._open)
        self._task = asyncio.create_task(self._run(), name="gateway-writer")

    def _open(self) -> sqlite3.Connection:
        return connect(self._path, self._busy_timeout_ms)

    async def write(self, unit: Callable[[sqlite3.Connection], T]) -> T:
        """Run `unit(conn)` inside the next group commit; return its result once durable."""
        if self._task is None or self._task.done():
            raise StoreError("writer is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # If the caller is cancelled (the client hung up), nobody reads the outcome:
        # retrieve it here so asyncio does not log "exception was never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.put_nowait(_Pending(unit, future))
        # shield: cancelling the session must not cancel a commit already under way.
        result: T = await asyncio.shield(future)
        return result

    async def close(self) -> None:
        """Commit everything queued so far, then close the connection."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            await loop.run_in_executor(self._thread, self._conn.close)
            self._conn = None
        self._thread.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            units = [p.unit for p in batch]
            try:
                outcomes = await loop.run_in_executor(self._thread, self._commit, units)
            except BaseException as exc:  # the executor itself failed: fail the batch
                outcomes = [(False, classify_error(exc))] * len(batch)
                if isinstance(exc, asyncio.CancelledError):
                    stopping = True
            self.batches += 1
            self.units += len(batch)
            for pending, (ok, value) in zip(batch, outcomes, strict=True):
                if pending.future.done():
                    continue
                if ok:
                    pending.future.set_result(value)
                else:
                    pending.future.set_exception(value)

    def _commit(self, units: list[Unit]) -> list[tuple[bool, Any]]:
        """On the writer thread: one transaction, a savepoint per unit, one synced commit."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._open()
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for unit in units:
                conn.execute("SAVEPOINT unit")
                try:
                    outcomes.append((True, unit(conn)))
                except Exception as exc:
                    conn.execute("ROLLBACK TO unit")
                    outcomes.append((False, classify_error(exc)))
                conn.execute("RELEASE unit")
            conn.execute("COMMIT")
            return outcomes
        except Exception as exc:
            error = classify_error(exc)
            log.error("event=store.commit_failed units=%d error=%s", len(units), _quote(error))
            with contextlib.suppress(Exception):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            code = getattr(exc, "sqlite_errorcode", 0) or 0
            if code & 0xFF == SQLITE_IOERR:
                # After an I/O error SQLite's view of the file may be wrong: start afresh
                # on the next batch rather than trust this connection again.
                with contextlib.suppress(Exception):
                    conn.close()
                self._conn = None
            return [(False, error)] * len(units)


def _quote(value: object) -> str:
    return json.dumps(str(value), ensure_ascii=False)


# --- records and queries ------------------------------------------------------------


@dataclass(frozen=True)
class StoredMessage:
    """What the intake path stores for one accepted message."""

    queue_id: str
    received_at: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    peer: str
    helo: str
    raw: bytes
    sha256: str
    message_id: str | None
    from_header: str | None
    subject: str | None
    date_header: str | None
    malformed: str | None
    defects: tuple[str, ...]


def insert_message(conn: sqlite3.Connection, message: StoredMessage) -> int:
    cursor = conn.execute(
        """
        INSERT INTO messages (queue_id, received_at, mail_from, rcpt_to, peer, helo, size,
                              sha256, message_id, from_header, subject, date_header,
                              malformed, defects)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        """,
        (
            message.queue_id,
            message.received_at,
            message.mail_from,
            json.dumps(list(message.rcpt_to)),
            message.peer,
            message.helo,
            len(message.raw),
            message.sha256,
            message.message_id,
            message.from_header,
            message.subject,
            message.date_header,
            message.malformed,
            json.dumps(list(message.defects)),
        ),
    )
    row_id = cursor.lastrowid
    assert row_id is not None
    conn.execute("INSERT INTO message_raw (message, raw) VALUES (?, ?)", (row_id, message.raw))
    return row_id


def list_messages(conn: sqlite3.Connection, limit: int | None = None) -> list[dict[str, Any]]:
    """Every stored message, newest first, as the `messages list --json` objects."""
    sql = """
        SELECT id, queue_id, message_id, mail_from, rcpt_to, from_header, subject, size,
               received_at, malformed, peer, helo, sha256
        FROM messages ORDER BY received_at DESC, id DESC
    """
    params: tuple[Any, ...] = ()
    if limit is not None:
        sql += " LIMIT ?"
        params = (limit,)
    return [
        {
            "id": row["id"],
            "queue_id": row["queue_id"],
            "message_id": row["message_id"],
            "mail_from": row["mail_from"],
            "rcpt_to": json.loads(row["rcpt_to"]),
            "from": row["from_header"],
            "subject": row["subject"],
            "size": row["size"],
            "received_at": row["received_at"],
            "malformed": row["malformed"],
            "peer": row["peer"],
            "helo": row["helo"],
            "sha256": row["sha256"],
        }
        for row in conn.execute(sql, params)
    ]


def read_raw(conn: sqlite3.Connection, message: int) -> bytes | None:
    row = conn.execute("SELECT raw FROM message_raw WHERE message = ?", (message,)).fetchone()
    return None if row is None else bytes(row["raw"])
