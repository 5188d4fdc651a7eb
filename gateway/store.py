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
import functools
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .lookalike import domain_skeleton, skeleton
from .tickets import Status, TicketRef

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
    # 2: tickets, threading, attachments, the audit trail.
    """
    CREATE TABLE tickets (
        number      INTEGER PRIMARY KEY AUTOINCREMENT,
        unit        TEXT NOT NULL,
        requester   TEXT NOT NULL,               -- normalised address
        subject     TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT 'new',
        priority    TEXT NOT NULL DEFAULT 'normal',
        follows     INTEGER REFERENCES tickets (number),  -- the closed ticket it follows up
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL
    );
    CREATE INDEX tickets_by_status ON tickets (status, updated_at);
    CREATE INDEX tickets_by_unit ON tickets (unit, updated_at);
    CREATE INDEX tickets_by_updated_at ON tickets (updated_at);
    -- Who may write to a ticket by its subject tag: its requester and every address
    -- that has written to it.
    CREATE TABLE participants (
        ticket   INTEGER NOT NULL REFERENCES tickets (number),
        address  TEXT NOT NULL,
        PRIMARY KEY (ticket, address)
    ) WITHOUT ROWID;
    ALTER TABLE messages ADD COLUMN direction TEXT NOT NULL DEFAULT 'in';
    ALTER TABLE messages ADD COLUMN sender TEXT;          -- normalised From address
    ALTER TABLE messages ADD COLUMN classification TEXT NOT NULL DEFAULT 'normal';
    ALTER TABLE messages ADD COLUMN reasons TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE messages ADD COLUMN kind TEXT;            -- client, staff, auto-reply, ...
    ALTER TABLE messages ADD COLUMN ticket INTEGER REFERENCES tickets (number);
    ALTER TABLE messages ADD COLUMN threaded_via TEXT;
    ALTER TABLE messages ADD COLUMN duplicate_of INTEGER REFERENCES messages (id);
    ALTER TABLE messages ADD COLUMN text TEXT;            -- readable, quotes stripped
    CREATE INDEX messages_by_ticket ON messages (ticket, id);
    -- Attachment bytes, content-addressed: the same file sent twice is stored once, and
    -- no file name from a mail ever becomes a path.
    CREATE TABLE blobs (
        sha256  TEXT PRIMARY KEY,
        size    INTEGER NOT NULL,
        data    BLOB NOT NULL
    );
    CREATE TABLE attachments (
        message       INTEGER NOT NULL REFERENCES messages (id),
        position      INTEGER NOT NULL,
        name          TEXT NOT NULL,            -- sanitised display name
        content_type  TEXT NOT NULL,
        size          INTEGER NOT NULL,
        sha256        TEXT NOT NULL REFERENCES blobs (sha256),
        PRIMARY KEY (message, position)
    );
    CREATE TABLE undeliverable (
        address     TEXT PRIMARY KEY,
        ticket      INTEGER REFERENCES tickets (number),
        message     INTEGER REFERENCES messages (id),   -- the bounce that said so
        status      TEXT,
        reason      TEXT NOT NULL,
        updated_at  TEXT NOT NULL
    );
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY,
        time     TEXT NOT NULL,
        actor    TEXT NOT NULL,        -- the OS user for the CLI, the sender for mail
        action   TEXT NOT NULL,        -- e.g. ticket.created, message.filed
        subject  TEXT NOT NULL,        -- what it is about, e.g. ticket:12
        ticket   INTEGER,
        detail   TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_ticket ON events (ticket, id);
    """,
    # 3: organisations, authorised senders, the quarantine.
    """
    CREATE TABLE organisations (
        id               INTEGER PRIMARY KEY,
        name             TEXT NOT NULL UNIQUE COLLATE NOCASE,
        unit             TEXT,                 -- NULL: the unit of the mailbox written to
        account_manager  TEXT,
        created_at       TEXT NOT NULL
    );
    -- An organisation's mail domains identify it; they authorise nobody by themselves.
    CREATE TABLE org_domains (
        domain        TEXT PRIMARY KEY,         -- lower-case A-label
        organisation  INTEGER NOT NULL REFERENCES organisations (id) ON DELETE CASCADE
    );
    -- One row per authorised address, or per whole domain ("@example.com") an admin
    -- authorised explicitly, or per blocked address (organisation may then be NULL).
    CREATE TABLE senders (
        address       TEXT PRIMARY KEY,         -- normalised; "@domain" for a domain
        organisation  INTEGER REFERENCES organisations (id) ON DELETE CASCADE,
        name          TEXT,
        blocked       INTEGER NOT NULL DEFAULT 0,
        skeleton      TEXT NOT NULL,            -- look-alike key (confusables folded)
        created_at    TEXT NOT NULL
    );
    CREATE INDEX senders_by_organisation ON senders (organisation);
    CREATE INDEX senders_by_skeleton ON senders (skeleton);
    ALTER TABLE tickets ADD COLUMN organisation INTEGER REFERENCES organisations (id);
    CREATE TABLE quarantine (
        id          INTEGER PRIMARY KEY,
        message     INTEGER NOT NULL UNIQUE REFERENCES messages (id),
        reasons     TEXT NOT NULL,              -- JSON list of kebab-case reasons
        status      TEXT NOT NULL DEFAULT 'held',  -- held, released, discarded, expired
        held_at     TEXT NOT NULL,
        decided_at  TEXT,
        decided_by  TEXT
    );
    CREATE INDEX quarantine_by_status ON quarantine (status, held_at);
    CREATE INDEX messages_by_sender ON messages (sender, received_at);
    """,
    # 4: outgoing mail. Every mail we send is a messages row (direction 'out', raw bytes
    # in message_raw, so replies thread by its Message-ID) plus one outbox row per
    # recipient that the delivery worker works through.
    """
    ALTER TABLE tickets ADD COLUMN mailbox TEXT;      -- the address it came to: our From
    ALTER TABLE tickets ADD COLUMN acknowledged INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE outbox (
        id               INTEGER PRIMARY KEY,
        message          INTEGER NOT NULL REFERENCES messages (id),
        ticket           INTEGER REFERENCES tickets (number),
        kind             TEXT NOT NULL,     -- acknowledgement, staff-reply, status-change, ...
        automatic        INTEGER NOT NULL,  -- 1: counts against the per-recipient caps
        mail_from        TEXT NOT NULL,     -- envelope sender; '' for automatic mail
        rcpt_to          TEXT NOT NULL,     -- one recipient per row
        subject          TEXT NOT NULL,
        message_id       TEXT NOT NULL,
        status           TEXT NOT NULL DEFAULT 'queued',  -- queued, sent, failed
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  TEXT NOT NULL,
        last_error       TEXT,
        created_at       TEXT NOT NULL,
        sent_at          TEXT
    );
    CREATE INDEX outbox_due ON outbox (status, next_attempt_at);
    CREATE INDEX outbox_by_recipient ON outbox (rcpt_to, automatic, created_at);
    CREATE INDEX outbox_by_ticket ON outbox (ticket, kind);
    """,
    # 5: mail is built by the delivery worker, not in the intake transaction: planning
    # keeps what to build (template, context, headers) and the worker stores the bytes
    # it built before it sends them.
    """
    CREATE TABLE mail_specs (
        message  INTEGER PRIMARY KEY REFERENCES messages (id),
        spec     TEXT NOT NULL           -- JSON: template, context and header values
    );
    """,
    # 6: look-alike skeletons from Unicode's confusables data (UTS #39) instead of a
    # hand-picked table: every stored skeleton is recomputed (gateway_skeleton() is
    # gateway.lookalike.skeleton, registered by migrate()).
    """
    UPDATE senders SET skeleton = gateway_skeleton(address);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

# "GWAY": marks the file as this gateway's database in the SQLite header
# (https://www.sqlite.org/fileformat.html#application_id), so that the file of another
# application is refused, never migrated into. Files made before it was set carry 0 and
# are recognised by their schema version and tables instead (`_check_identity`).
APPLICATION_ID = 0x47574159

# The size of an SQLite 3 database header (fileformat.html, section 1.3): no database is
# shorter.
SQLITE_HEADER_SIZE = 100

# SQLite primary result codes (https://www.sqlite.org/rescode.html).
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26
SQLITE_IOERR_FSYNC = SQLITE_IOERR | (4 << 8)

# Most problems `PRAGMA quick_check` lists before it stops: enough to say what is wrong.
QUICK_CHECK_ERRORS = 5


class StoreError(Exception):
    """A unit of work could not be committed; nothing of it is stored."""


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full."""


class DatabaseRefused(StoreError):
    """The database file is not one we may use: empty, truncated, corrupt, another
    application's, or of a newer schema. The message names the file and the fault."""


def connect(path: Path, busy_timeout_ms: int = 5000, *, create: bool = True) -> sqlite3.Connection:
    """Open our database in WAL mode with full sync, checked and migrated.

    A new database is created only where no file exists (and only with `create`). An
    existing file must be ours and pass `PRAGMA quick_check`, or `DatabaseRefused` says
    why: an empty file is not a new database (it would silently reset tickets, senders
    and the reply-token secret).
    """
    if not os.path.lexists(path):
        if not create:
            raise DatabaseRefused(f"{path}: the database file is gone (moved or deleted)")
        _create(path)
    _check_file(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    except sqlite3.Error as exc:
        raise DatabaseRefused(f"{path}: cannot open the database: {exc}") from None
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # Every check before the first write: a refused file is left exactly as it was.
        _check_identity(conn, path)
        _check_integrity(conn, path)
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL syncs the WAL on every commit: survives power loss, not only kill -9.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        if code == SQLITE_NOTADB:  # no SQLite header: "file is not a database"
            raise DatabaseRefused(_refusal(path, "it is not an SQLite database")) from None
        if code == SQLITE_CORRUPT:
            # Among others, a file shorter than its header says: SQLite refuses it so.
            size = path.stat().st_size
            problem = f"it is corrupt or truncated ({exc}; the file has {size} bytes)"
            raise DatabaseRefused(_refusal(path, problem)) from None
        raise
    except BaseException:
        conn.close()
        raise
    return conn


def _refusal(path: Path, problem: str) -> str:
    return (
        f"{path}: refusing to use this database: {problem}. Restore it from a backup, or "
        "point [storage] database at a path where no file exists to start an empty desk"
    )


def _create(path: Path) -> None:
    """Make a new, migrated database at `path`, which did not exist: all or nothing.

    It is built under a temporary name and linked into place only when complete, so a
    crash half-way never leaves an empty or half-made file at `path` (which the next
    start would rightly refuse), and a file another process put there meanwhile (the
    daemon and a CLI command starting at once) is used, never replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.new")
    try:
        # 0644 less the umask: what SQLite itself gives a file it creates.
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        conn = sqlite3.connect(temporary, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            migrate(conn)
        finally:
            conn.close()  # the last connection: checkpoints and removes the -wal file
        _fsync(temporary)
        try:
            os.link(temporary, path)  # fails, rather than replaces, if `path` exists now
        except FileExistsError:
            pass
        _fsync(path.parent)  # the new directory entry survives power loss too
    finally:
        for leftover in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{temporary}{leftover}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_file(path: Path) -> None:
    """What the file's metadata tells, before SQLite may write anything to it.

    Never open() the file here to read its header: closing any descriptor of a file
    drops every POSIX lock this process holds on it, SQLite's included (the daemon's
    other connections, when the writer reopens), so the header is left to SQLite.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise DatabaseRefused(f"{path}: cannot read the database: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DatabaseRefused(_refusal(path, "it is not a regular file"))
    if info.st_size == 0:
        raise DatabaseRefused(
            _refusal(
                path,
                "the file is empty (0 bytes), and a new database is only made where no file exists",
            )
        )
    if info.st_size < SQLITE_HEADER_SIZE:
        raise DatabaseRefused(
            _refusal(path, f"it is truncated ({info.st_size} bytes, less than an SQLite header)")
        )


def _check_identity(conn: sqlite3.Connection, path: Path) -> None:
    """Ours, by application_id, or made before it by its schema version and tables."""
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if application_id not in (0, APPLICATION_ID):
        raise DatabaseRefused(
            _refusal(
                path,
                f"it belongs to another application (application_id {application_id:#010x}, "
                f"gateway's is {APPLICATION_ID:#010x})",
            )
        )
    if version > SCHEMA_VERSION:
        if application_id == APPLICATION_ID:
            raise DatabaseRefused(
                f"{path}: the database has schema version {version}, newer than this "
                f"gateway knows ({SCHEMA_VERSION}): it was written by a newer gateway; "
                "upgrade gateway (a downgrade cannot read it)"
            )
        raise DatabaseRefused(
            _refusal(path, f"it is not a gateway database (schema version {version})")
        )
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    if application_id == APPLICATION_ID:
        missing = _tables_of_version(version) - tables
        if version == 0 or missing:
            names = ", ".join(sorted(missing)) or "all"
            raise DatabaseRefused(
                _refusal(path, f"it is a damaged gateway database (tables missing: {names})")
            )
        return
    if version == 0:
        what = (
            "it has no tables" if not tables else f"its tables are {', '.join(sorted(tables)[:5])}"
        )
        raise DatabaseRefused(_refusal(path, f"it is not a gateway database ({what})"))
    missing = _tables_of_version(version) - tables
    if missing:
        raise DatabaseRefused(
            _refusal(
                path,
                f"it is not a gateway database (schema version {version}, but no "
                f"{', '.join(sorted(missing)[:5])} table)",
            )
        )


@functools.cache
def _tables_of_version(version: int) -> frozenset[str]:
    """The tables a database of this schema version has: the migrations, run in memory."""
    with contextlib.closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        add_sql_functions(conn)
        for number in range(version):
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
        names = conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
        return frozenset(row[0] for row in names if not row[0].startswith("sqlite_"))


def _check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """`PRAGMA quick_check`: every page and record well-formed (not the index contents,
    which integrity_check adds at twice the cost). About 0.2 s for 400 MB in the page
    cache, and as long as reading the file from disk when cold."""
    problems = [row[0] for row in conn.execute(f"PRAGMA quick_check({QUICK_CHECK_ERRORS})")]
    if problems != ["ok"]:
        raise DatabaseRefused(
            _refusal(path, "it is corrupt (quick_check: " + "; ".join(problems) + ")")
        )


def add_sql_functions(conn: sqlite3.Connection) -> None:
    # Migrations that recompute look-alike keys call the same function as the code.
    conn.create_function("gateway_skeleton", 1, skeleton, deterministic=True)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database has not seen, and mark the file as ours, in one
    transaction; returns the schema version."""
    add_sql_functions(conn)
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
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
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
        # Set once the database, opened again after an I/O error, is refused (corrupt):
        # nothing can be stored any more, and answering 451 forever would hide it.
        self.failed: DatabaseRefused | None = None
        # Called once, on the event loop, when `failed` is set: the daemon stops and
        # exits non-zero, so systemd shows the fault (and the next start names it).
        self.on_failure: Callable[[DatabaseRefused], None] | None = None
        self._failure_reported = False
        # Test hook (`inject_commit_faults`): commits still to fail as a failed sync would.
        self._faults = 0
        self._faults_lock = threading.Lock()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._thread, self._open)
        except BaseException:
            self._thread.shutdown(wait=False)  # refused at start: nothing to close
            raise
        self._task = asyncio.create_task(self._run(), name="gateway-writer")

    def _open(self, create: bool = True) -> sqlite3.Connection:
        return connect(self._path, self._busy_timeout_ms, create=create)

    def inject_commit_faults(self, count: int) -> None:
        """Test hook: make the next `count` commits fail as a failed fsync does, with
        SQLITE_IOERR_FSYNC ("disk I/O error") after the units ran and before COMMIT.
        The daemon arms it only with GATEWAY_TEST_HOOKS=1 (see app.py)."""
        with self._faults_lock:
            self._faults += count

    def _take_fault(self) -> bool:
        with self._faults_lock:
            if self._faults <= 0:
                return False
            self._faults -= 1
            return True

    async def write(self, unit: Callable[[sqlite3.Connection], T]) -> T:
        """Run `unit(conn)` inside the next group commit; return its result once durable."""
        if self._task is None or self._task.done():
            raise StoreError("writer is not running")
        if self.failed is not None:
            raise self.failed
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
            if self.failed is not None and not self._failure_reported:
                self._failure_reported = True
                if self.on_failure is not None:
                    self.on_failure(self.failed)
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
            try:
                # Never a new database here: the daemon's tickets, and the reply-token
                # secret it has handed out, are in the file it started with.
                conn = self._conn = self._open(create=False)
            except DatabaseRefused as exc:
                # Opened again after an I/O error, the file no longer passes the checks.
                log.error("event=store.refused error=%s", _quote(exc))
                self.failed = exc
                return [(False, exc)] * len(units)
            except Exception as exc:
                error = classify_error(exc)
                log.error("event=store.reopen_failed error=%s", _quote(error))
                return [(False, error)] * len(units)
            log.warning("event=store.reopened database=%s", _quote(self._path))
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for unit in units:
                conn.execute("SAVEPOINT unit")
                try:
                    outcomes.append((True, unit(conn)))
                except Exception as exc:
                    if _is_file_fault(exc):
                        raise  # not this unit's fault: the whole batch fails, see below
                    conn.execute("ROLLBACK TO unit")
                    outcomes.append((False, classify_error(exc)))
                conn.execute("RELEASE unit")
            if self._take_fault():
                raise _injected_sync_error()
            conn.execute("COMMIT")
            return outcomes
        except Exception as exc:
            error = classify_error(exc)
            log.error("event=store.commit_failed units=%d error=%s", len(units), _quote(error))
            with contextlib.suppress(Exception):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if _is_file_fault(exc):
                # After an I/O error SQLite's view of the file may be wrong (a failed
                # fsync may have dropped pages the kernel then calls clean): start afresh
                # on the next batch, with the start-up checks, rather than trust this
                # connection again. A file found corrupt then stops the daemon.
                with contextlib.suppress(Exception):
                    conn.close()
                self._conn = None
            return [(False, error)] * len(units)


def _is_file_fault(exc: BaseException) -> bool:
    """An I/O error or a corrupt page: the file, not the unit of work, is at fault."""
    code = getattr(exc, "sqlite_errorcode", 0) or 0
    return code & 0xFF in (SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_NOTADB)


def _injected_sync_error() -> sqlite3.OperationalError:
    """What sqlite3 raises when the WAL's fsync fails (SQLITE_IOERR_FSYNC)."""
    exc = sqlite3.OperationalError("disk I/O error")
    exc.sqlite_errorcode = SQLITE_IOERR_FSYNC
    exc.sqlite_errorname = "SQLITE_IOERR_FSYNC"
    return exc


def _quote(value: object) -> str:
    return json.dumps(str(value), ensure_ascii=False)


# --- records and queries ------------------------------------------------------------


@dataclass(frozen=True)
class StoredAttachment:
    name: str  # sanitised display name
    content_type: str
    data: bytes
    sha256: str


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
    direction: str = "in"
    sender: str | None = None
    classification: str = "normal"
    reasons: tuple[str, ...] = ()
    text: str | None = None
    attachments: tuple[StoredAttachment, ...] = ()


@dataclass(frozen=True)
class Filing:
    """Where a stored message went: its ticket, its kind, how it was threaded."""

    ticket: int | None
    kind: str | None
    via: str
    duplicate_of: int | None = None


def insert_message(
    conn: sqlite3.Connection, message: StoredMessage, filing: Filing | None = None
) -> int:
    cursor = conn.execute(
        """
        INSERT INTO messages (queue_id, received_at, mail_from, rcpt_to, peer, helo, size,
                              sha256, message_id, from_header, subject, date_header,
                              malformed, defects, direction, sender, classification, reasons,
                              text, ticket, kind, threaded_via, duplicate_of)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
            message.direction,
            message.sender,
            message.classification,
            json.dumps(list(message.reasons)),
            message.text,
            filing.ticket if filing else None,
            filing.kind if filing else None,
            filing.via if filing else None,
            filing.duplicate_of if filing else None,
        ),
    )
    row_id = cursor.lastrowid
    assert row_id is not None
    conn.execute("INSERT INTO message_raw (message, raw) VALUES (?, ?)", (row_id, message.raw))
    for position, attachment in enumerate(message.attachments):
        conn.execute(
            "INSERT OR IGNORE INTO blobs (sha256, size, data) VALUES (?, ?, ?)",
            (attachment.sha256, len(attachment.data), attachment.data),
        )
        conn.execute(
            """
            INSERT INTO attachments (message, position, name, content_type, size, sha256)
            VALUES (?, ?, ?, ?, ?, ?)
            """,
            (
                row_id,
                position,
                attachment.name,
                attachment.content_type,
                len(attachment.data),
                attachment.sha256,
            ),
        )
    return row_id


def find_duplicate(conn: sqlite3.Connection, message_id: str, sha256: str) -> int | None:
    """The first filed message with this Message-ID and these exact bytes, if any."""
    row = conn.execute(
        """
        SELECT id FROM messages
        WHERE message_id = ? AND sha256 = ? AND duplicate_of IS NULL AND direction = 'in'
        ORDER BY id LIMIT 1
        """,
        (message_id, sha256),
    ).fetchone()
    return None if row is None else int(row["id"])


def token_secret(conn: sqlite3.Connection) -> bytes:
    """The key of reply-token macs: made at first start, kept in the database."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'token_secret'").fetchone()
    if row is not None:
        return bytes.fromhex(row["value"])
    secret = secrets.token_bytes(32)
    conn.execute("INSERT INTO meta (key, value) VALUES ('token_secret', ?)", (secret.hex(),))
    return secret


class TicketQueries:
    """The reads threading needs (tickets.TicketLookup), inside the filing transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def ticket(self, number: int) -> TicketRef | None:
        row = self.conn.execute(
            "SELECT number, status FROM tickets WHERE number = ?", (number,)
        ).fetchone()
        return None if row is None else TicketRef(row["number"], Status(row["status"]))

    def ticket_for_message_ids(
        self, message_ids: Sequence[str], sender: str | None
    ) -> TicketRef | None:
        """tickets.TicketLookup.ticket_for_message_ids: our own outgoing IDs for anyone;
        a client's ID only for `sender` who may write to its ticket, and only the first
        row stored with it (a later mail reusing the ID is kept apart)."""
        # One or two indexed lookups per id, in the caller's order of preference.
        for message_id in message_ids:
            row = self.conn.execute(
                """
                SELECT t.number, t.status FROM messages m JOIN tickets t ON t.number = m.ticket
                WHERE m.message_id = ? AND m.direction = 'out' ORDER BY m.id LIMIT 1
                """,
                (message_id,),
            ).fetchone()
            if row is None and sender is not None:
                row = self.conn.execute(
                    """
                    SELECT t.number, t.status FROM tickets t JOIN (
                        SELECT ticket FROM messages
                        WHERE message_id = ? AND direction = 'in' AND duplicate_of IS NULL
                        ORDER BY id LIMIT 1
                    ) first ON t.number = first.ticket
                    """,
                    (message_id,),
                ).fetchone()
                if row is not None and not self.may_write(row["number"], sender):
                    row = None
            if row is not None:
                return TicketRef(row["number"], Status(row["status"]))
        return None

    def may_write(self, number: int, address: str) -> bool:
        """A participant of the ticket, or an authorised sender of its organisation."""
        row = self.conn.execute(
            "SELECT 1 FROM participants WHERE ticket = ? AND address = ?", (number, address)
        ).fetchone()
        if row is not None:
            return True
        domain = address.rpartition("@")[2]
        row = self.conn.execute(
            """
            SELECT 1 FROM tickets t JOIN senders s ON s.organisation = t.organisation
            WHERE t.number = ? AND s.address IN (?, ?) AND s.blocked = 0
            """,
            (number, address, f"@{domain}"),
        ).fetchone()
        return row is not None


def outgoing_message(
    conn: sqlite3.Connection, message_id: str
) -> tuple[int | None, list[str]] | None:
    """Our outgoing mail with this Message-ID: (its ticket, its recipients), if we sent it."""
    row = conn.execute(
        """
        SELECT ticket, rcpt_to FROM messages
        WHERE message_id = ? AND direction = 'out' ORDER BY id DESC LIMIT 1
        """,
        (message_id,),
    ).fetchone()
    if row is None:
        return None
    return row["ticket"], [str(a).lower() for a in json.loads(row["rcpt_to"])]


def create_ticket(
    conn: sqlite3.Connection,
    *,
    unit: str,
    requester: str,
    subject: str,
    now: str,
    follows: int | None = None,
    mailbox: str | None = None,
) -> int:
    cursor = conn.execute(
        """
        INSERT INTO tickets (unit, requester, subject, status, follows, mailbox, created_at,
                             updated_at)
        VALUES (?, ?, ?, 'new', ?, ?, ?, ?)
        """,
        (unit, requester, subject, follows, mailbox, now, now),
    )
    number = cursor.lastrowid
    assert number is not None
    add_participant(conn, number, requester)
    return number


def update_ticket(
    conn: sqlite3.Connection, number: int, *, now: str, status: str | None = None
) -> None:
    if status is None:
        conn.execute("UPDATE tickets SET updated_at = ? WHERE number = ?", (now, number))
    else:
        conn.execute(
            "UPDATE tickets SET updated_at = ?, status = ? WHERE number = ?",
            (now, status, number),
        )


def add_participant(conn: sqlite3.Connection, ticket: int, address: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO participants (ticket, address) VALUES (?, ?)", (ticket, address)
    )


def mark_undeliverable(
    conn: sqlite3.Connection,
    *,
    address: str,
    ticket: int | None,
    message: int,
    status: str | None,
    reason: str,
    now: str,
) -> None:
    conn.execute(
        """
        INSERT INTO undeliverable (address, ticket, message, status, reason, updated_at)
        VALUES (?, ?, ?, ?, ?, ?)
        ON CONFLICT (address) DO UPDATE SET ticket = excluded.ticket,
            message = excluded.message, status = excluded.status, reason = excluded.reason,
            updated_at = excluded.updated_at
        """,
        (address, ticket, message, status, reason, now),
    )


def is_undeliverable(conn: sqlite3.Connection, address: str) -> bool:
    row = conn.execute("SELECT 1 FROM undeliverable WHERE address = ?", (address,)).fetchone()
    return row is not None


def record_event(
    conn: sqlite3.Connection,
    *,
    time: str,
    actor: str,
    action: str,
    subject: str,
    ticket: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        "INSERT INTO events (time, actor, action, subject, ticket, detail) VALUES (?,?,?,?,?,?)",
        (time, actor, action, subject, ticket, json.dumps(detail or {}, ensure_ascii=False)),
    )


# --- the sender policy and the quarantine (intake path) ---------------------------------


@dataclass(frozen=True)
class SenderRecord:
    """What the sender list says of one address (its own row, or its domain's grant)."""

    address: str  # the row that matched: the address, or "@domain"
    organisation: int | None
    organisation_name: str | None
    blocked: bool

    @property
    def authorised(self) -> bool:
        return self.organisation is not None and not self.blocked


def sender_record(conn: sqlite3.Connection, address: str) -> SenderRecord | None:
    """The sender list's word on `address`: its own row first, else its domain's grant."""
    domain = address.rpartition("@")[2]
    rows = conn.execute(
        """
        SELECT s.address, s.organisation, o.name, s.blocked
        FROM senders s LEFT JOIN organisations o ON o.id = s.organisation
        WHERE s.address IN (?, ?)
        """,
        (address, f"@{domain}"),
    ).fetchall()
    if not rows:
        return None
    # A block on the address itself always wins; otherwise the address's own row.
    rows.sort(key=lambda r: (not r["blocked"], r["address"] != address))
    row = rows[0]
    return SenderRecord(row["address"], row["organisation"], row[2], bool(row["blocked"]))


def find_lookalike(conn: sqlite3.Connection, address: str, skeleton: str) -> str | None:
    """An authorised address, or a domain granted whole ("@domain"), that renders like
    `address` (or like its domain) but is not it, if any.

    Both are one lookup on the skeleton index: a domain grant's skeleton is "@" and the
    skeleton of its domain, which is the domain part of the skeleton of every address
    at a look-alike domain. Intake never scans the sender list.
    """
    own_domain = "@" + address.rpartition("@")[2]
    row = conn.execute(
        """
        SELECT address FROM senders
        WHERE skeleton IN (?, ?) AND address NOT IN (?, ?)
            AND blocked = 0 AND organisation IS NOT NULL
        ORDER BY skeleton = ? DESC, address
        LIMIT 1
        """,
        (skeleton, domain_skeleton(skeleton), address, own_domain, skeleton),
    ).fetchone()
    return None if row is None else str(row["address"])


def organisation_unit(conn: sqlite3.Connection, organisation: int) -> str | None:
    """The desk unit an organisation's tickets go to, if it has one of its own."""
    row = conn.execute("SELECT unit FROM organisations WHERE id = ?", (organisation,)).fetchone()
    return None if row is None or not row["unit"] else str(row["unit"])


def set_ticket_organisation(conn: sqlite3.Connection, number: int, organisation: int) -> None:
    conn.execute(
        "UPDATE tickets SET organisation = ? WHERE number = ? AND organisation IS NULL",
        (organisation, number),
    )


def set_filing(conn: sqlite3.Connection, message: int, filing: Filing) -> None:
    """File a message stored earlier (a release from the quarantine)."""
    conn.execute(
        """
        UPDATE messages SET ticket = ?, kind = ?, threaded_via = ?, duplicate_of = ?
        WHERE id = ?
        """,
        (filing.ticket, filing.kind, filing.via, filing.duplicate_of, message),
    )


def hold_message(conn: sqlite3.Connection, message: int, reasons: Sequence[str], now: str) -> int:
    cursor = conn.execute(
        "INSERT INTO quarantine (message, reasons, held_at) VALUES (?, ?, ?)",
        (message, json.dumps(list(reasons)), now),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def held_message(conn: sqlite3.Connection, quarantine_id: int) -> dict[str, Any] | None:
    """A quarantine entry with its message's stored columns (and raw bytes)."""
    row = conn.execute(
        """
        SELECT q.id AS quarantine_id, q.reasons AS held_reasons, q.status, q.held_at,
               m.*, r.raw
        FROM quarantine q JOIN messages m ON m.id = q.message
        JOIN message_raw r ON r.message = m.id
        WHERE q.id = ?
        """,
        (quarantine_id,),
    ).fetchone()
    return None if row is None else dict(row)


def stored_message_from_row(row: dict[str, Any]) -> StoredMessage:
    """Rebuild the StoredMessage of a stored row (for filing it later)."""
    return StoredMessage(
        queue_id=row["queue_id"],
        received_at=row["received_at"],
        mail_from=row["mail_from"],
        rcpt_to=tuple(json.loads(row["rcpt_to"])),
        peer=row["peer"],
        helo=row["helo"],
        raw=bytes(row["raw"]),
        sha256=row["sha256"],
        message_id=row["message_id"],
        from_header=row["from_header"],
        subject=row["subject"],
        date_header=row["date_header"],
        malformed=row["malformed"],
        defects=tuple(json.loads(row["defects"])),
        direction=row["direction"],
        sender=row["sender"],
        classification=row["classification"],
        reasons=tuple(json.loads(row["reasons"])),
        text=row["text"],
    )


def decide_held(
    conn: sqlite3.Connection, quarantine_id: int, *, status: str, actor: str, now: str
) -> None:
    conn.execute(
        """
        UPDATE quarantine SET status = ?, decided_at = ?, decided_by = ?
        WHERE id = ? AND status = 'held'
        """,
        (status, now, actor, quarantine_id),
    )


def expire_held(conn: sqlite3.Connection, *, before: str, now: str) -> list[int]:
    """Mark held entries older than `before` expired; returns their ids."""
    ids = [
        int(r["id"])
        for r in conn.execute(
            "SELECT id FROM quarantine WHERE status = 'held' AND held_at < ? ORDER BY id",
            (before,),
        )
    ]
    for quarantine_id in ids:
        decide_held(conn, quarantine_id, status="expired", actor="gateway", now=now)
    return ids


def list_quarantine(conn: sqlite3.Connection, status: str | None = "held") -> list[dict[str, Any]]:
    """Quarantine entries, newest first, as the `quarantine list --json` objects."""
    where = "WHERE q.status = ?" if status else ""
    params = (status,) if status else ()
    return [
        {
            "id": row["id"],
            "message_id": row["message_id"],
            "sender": row["sender"] or row["from_header"] or row["mail_from"],
            "mail_from": row["mail_from"],
            "recipients": json.loads(row["rcpt_to"]),
            "subject": row["subject"],
            "reasons": json.loads(row["reasons"]),
            "received_at": row["received_at"],
            "status": row["status"],
            "message": row["message"],
        }
        for row in conn.execute(
            f"""
            SELECT q.id, q.reasons, q.status, q.message, m.message_id, m.sender,
                   m.from_header, m.mail_from, m.rcpt_to, m.subject, m.received_at
            FROM quarantine q JOIN messages m ON m.id = q.message
            {where} ORDER BY q.id DESC
            """,
            params,
        )
    ]


# --- planning outgoing mail (intake path) ---------------------------------------------


def count_automatic_mail(conn: sqlite3.Connection, to: str, *, since: str) -> int:
    """Automatic mail queued to `to` since a time (the per-recipient caps)."""
    row = conn.execute(
        "SELECT COUNT(*) FROM outbox WHERE rcpt_to = ? AND automatic = 1 AND created_at >= ?",
        (to, since),
    ).fetchone()
    return int(row[0])


def count_admin_notices(
    conn: sqlite3.Connection, to: str, kinds: Sequence[str], *, since: str
) -> int:
    """Notices of these outbox kinds queued to one admin since a time (the per-kind caps).
    Few rows: the caps themselves bound what an admin gets in an hour."""
    marks = ", ".join("?" for _ in kinds)
    row = conn.execute(
        f"SELECT COUNT(*) FROM outbox WHERE rcpt_to = ? AND automatic = 1 AND created_at >= ?"
        f" AND kind IN ({marks})",
        (to, since, *kinds),
    ).fetchone()
    return int(row[0])


def count_inbound_from(conn: sqlite3.Connection, sender: str, *, since: str, cap: int) -> int:
    """Messages a From address really sent since a time (the loop rule), counted up to
    `cap` only: the rule needs to know "over the threshold", and a full count would grow
    with a busy sender's history on every message.

    Only filed mail counts (`kind` is set when a message is filed, on receipt or on its
    release), and not second copies: held mail in someone's name (forged, a look-alike,
    unknown) is anyone's word, and counting it would let a forger mute the real sender.
    """
    row = conn.execute(
        """
        SELECT COUNT(*) FROM (
            SELECT 1 FROM messages
            WHERE sender = ? AND received_at >= ? AND direction = 'in'
              AND kind IS NOT NULL AND duplicate_of IS NULL
            LIMIT ?
        )
        """,
        (sender, since, cap),
    ).fetchone()
    return int(row[0])


def held_for_loop_since(conn: sqlite3.Connection, sender: str, *, since: str) -> bool:
    """Whether the loop rule (reason "loop") held mail from this address since a time."""
    row = conn.execute(
        """
        SELECT 1 FROM messages m JOIN quarantine q ON q.message = m.id
        WHERE m.sender = ? AND m.received_at >= ? AND m.direction = 'in'
          AND q.reasons LIKE '["loop"%'
        LIMIT 1
        """,
        (sender, since),
    ).fetchone()
    return row is not None


def first_inbound_with_message_id(
    conn: sqlite3.Connection, message_id: str
) -> tuple[int, str | None] | None:
    """(id, sender) of the first incoming row stored with this Message-ID, if any."""
    row = conn.execute(
        """
        SELECT id, sender FROM messages
        WHERE message_id = ? AND direction = 'in' ORDER BY id LIMIT 1
        """,
        (message_id,),
    ).fetchone()
    return None if row is None else (int(row["id"]), row["sender"])


def add_note(conn: sqlite3.Connection, ticket: int, *, text: str, author: str, now: str) -> int:
    """An internal note written with the CLI: kept on the ticket, never sent."""
    raw = text.encode("utf-8")
    record = StoredMessage(
        queue_id=f"note-{secrets.token_hex(8)}",
        received_at=now,
        mail_from=author,
        rcpt_to=(),
        peer="cli",
        helo="",
        raw=raw,
        sha256=hashlib.sha256(raw).hexdigest(),
        message_id=None,
        from_header=author,
        subject=None,
        date_header=None,
        malformed=None,
        defects=(),
        sender=author,
        text=text,
    )
    row = insert_message(conn, record, Filing(ticket, "note", "cli"))
    update_ticket(conn, ticket, now=now)
    record_event(
        conn,
        time=now,
        actor=author,
        action="ticket.noted",
        subject=f"ticket:{ticket}",
        ticket=ticket,
        detail={"message": row},
    )
    return row


def insert_planned_mail(
    conn: sqlite3.Connection, message: StoredMessage, filing: Filing, spec: str
) -> int:
    """An outgoing message whose bytes the delivery worker builds later from `spec`."""
    cursor = conn.execute(
        """
        INSERT INTO messages (queue_id, received_at, mail_from, rcpt_to, peer, helo, size,
                              sha256, message_id, from_header, subject, direction,
                              classification, reasons, ticket, kind, threaded_via)
        VALUES (?, ?, ?, ?, '', '', 0, '', ?, ?, ?, 'out', ?, ?, ?, ?, ?)
        """,
        (
            message.queue_id,
            message.received_at,
            message.mail_from,
            json.dumps(list(message.rcpt_to)),
            message.message_id,
            message.from_header,
            message.subject,
            message.classification,
            json.dumps(list(message.reasons)),
            filing.ticket,
            filing.kind,
            filing.via,
        ),
    )
    row_id = cursor.lastrowid
    assert row_id is not None
    conn.execute("INSERT INTO mail_specs (message, spec) VALUES (?, ?)", (row_id, spec))
    return row_id


def mail_spec(conn: sqlite3.Connection, message: int) -> str | None:
    row = conn.execute("SELECT spec FROM mail_specs WHERE message = ?", (message,)).fetchone()
    return None if row is None else str(row["spec"])


def store_built_mail(conn: sqlite3.Connection, message: int, raw: bytes, text: str) -> bytes:
    """Keep the bytes the worker built for a planned mail; if another attempt already
    kept some, those stand (the same mail is never sent with two different bodies)."""
    existing = read_raw(conn, message)
    if existing is not None:
        return existing
    conn.execute("INSERT INTO message_raw (message, raw) VALUES (?, ?)", (message, raw))
    conn.execute(
        "UPDATE messages SET size = ?, sha256 = ?, text = ? WHERE id = ?",
        (len(raw), hashlib.sha256(raw).hexdigest(), text, message),
    )
    return raw


def count_held(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT COUNT(*) FROM quarantine WHERE status = 'held'").fetchone()
    return int(row[0])


def ticket_acknowledged(conn: sqlite3.Connection, ticket: int) -> bool:
    row = conn.execute("SELECT acknowledged FROM tickets WHERE number = ?", (ticket,)).fetchone()
    return bool(row and row["acknowledged"])


def set_acknowledged(conn: sqlite3.Connection, ticket: int) -> None:
    conn.execute("UPDATE tickets SET acknowledged = 1 WHERE number = ?", (ticket,))


def ticket_mail_info(conn: sqlite3.Connection, ticket: int) -> dict[str, Any] | None:
    """What a mail about a ticket needs: requester, mailbox, subject, status, and the
    Message-IDs on it in order (for References)."""
    row = conn.execute(
        "SELECT requester, mailbox, subject, status FROM tickets WHERE number = ?", (ticket,)
    ).fetchone()
    if row is None:
        return None
    ids = [
        str(r["message_id"])
        for r in conn.execute(
            """
            SELECT message_id FROM messages
            WHERE ticket = ? AND message_id IS NOT NULL AND duplicate_of IS NULL
            ORDER BY id DESC LIMIT 20
            """,
            (ticket,),
        )
    ]
    return {
        "requester": row["requester"],
        "mailbox": row["mailbox"],
        "subject": row["subject"],
        "status": row["status"],
        "message_ids": list(reversed(ids)),
    }


def set_ticket_status(conn: sqlite3.Connection, number: int, status: str, now: str) -> str | None:
    """Set a ticket's status; returns the old one (None if there is no such ticket)."""
    row = conn.execute("SELECT status FROM tickets WHERE number = ?", (number,)).fetchone()
    if row is None:
        return None
    conn.execute(
        "UPDATE tickets SET status = ?, updated_at = ? WHERE number = ?", (status, now, number)
    )
    return str(row["status"])


# --- reading for the CLI --------------------------------------------------------------


def list_messages(conn: sqlite3.Connection, limit: int | None = None) -> list[dict[str, Any]]:
    """Every stored message, newest first, as the `messages list --json` objects."""
    sql = """
        SELECT id, queue_id, message_id, mail_from, rcpt_to, from_header, subject, size,
               received_at, malformed, peer, helo, sha256, ticket, kind, classification,
               reasons, direction, duplicate_of,
               (SELECT q.id FROM quarantine q WHERE q.message = messages.id
                AND q.status = 'held') AS quarantine
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
            "ticket": row["ticket"],
            "kind": row["kind"],
            "classification": row["classification"],
            "reasons": json.loads(row["reasons"]),
            "direction": row["direction"],
            "duplicate_of": row["duplicate_of"],
            "quarantine": row["quarantine"],
            "peer": row["peer"],
            "helo": row["helo"],
            "sha256": row["sha256"],
        }
        for row in conn.execute(sql, params)
    ]


def read_raw(conn: sqlite3.Connection, message: int) -> bytes | None:
    row = conn.execute("SELECT raw FROM message_raw WHERE message = ?", (message,)).fetchone()
    return None if row is None else bytes(row["raw"])


_TICKET_COLUMNS = """
    t.number, t.status, t.subject, t.requester, t.unit, t.priority, t.follows,
    t.created_at, t.updated_at,
    (SELECT COUNT(*) FROM messages m WHERE m.ticket = t.number) AS message_count
"""


def _ticket_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "number": row["number"],
        "status": row["status"],
        "subject": row["subject"],
        "requester": row["requester"],
        "unit": row["unit"],
        "priority": row["priority"],
        "follows": row["follows"],
        "message_count": row["message_count"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def list_tickets(
    conn: sqlite3.Connection, *, status: str | None = None, unit: str | None = None
) -> list[dict[str, Any]]:
    """Tickets, most recently updated first, as the `tickets list --json` objects."""
    clauses, params = [], []
    if status is not None:
        clauses.append("t.status = ?")
        params.append(status)
    if unit is not None:
        clauses.append("t.unit = ?")
        params.append(unit)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = (
        f"SELECT {_TICKET_COLUMNS} FROM tickets t {where} ORDER BY t.updated_at DESC, t.number DESC"
    )
    return [_ticket_dict(row) for row in conn.execute(sql, params)]


def show_ticket(conn: sqlite3.Connection, number: int) -> dict[str, Any] | None:
    """One ticket with its messages, oldest first, as the `tickets show --json` object."""
    row = conn.execute(
        f"SELECT {_TICKET_COLUMNS} FROM tickets t WHERE t.number = ?", (number,)
    ).fetchone()
    if row is None:
        return None
    ticket = _ticket_dict(row)
    messages = []
    for m in conn.execute(
        """
        SELECT id, message_id, direction, kind, from_header, date_header, received_at,
               subject, text, classification, reasons
        FROM messages WHERE ticket = ? ORDER BY id
        """,
        (number,),
    ):
        attachments = [
            {
                "name": a["name"],
                "size": a["size"],
                "sha256": a["sha256"],
                "content_type": a["content_type"],
            }
            for a in conn.execute(
                "SELECT name, size, sha256, content_type FROM attachments "
                "WHERE message = ? ORDER BY position",
                (m["id"],),
            )
        ]
        messages.append(
            {
                "id": m["id"],
                "message_id": m["message_id"],
                "direction": m["direction"],
                "kind": m["kind"],
                "from": m["from_header"],
                "date": m["date_header"] or m["received_at"],
                "received_at": m["received_at"],
                "subject": m["subject"],
                "text": m["text"] or "",
                "classification": m["classification"],
                "reasons": json.loads(m["reasons"]),
                "attachments": attachments,
            }
        )
    ticket["messages"] = messages
    return ticket


# --- organisations, senders and the audit trail (admin) ---
#
# The admin CLI's reads and writes. Its commands wrap their changes in `write_transaction`
# so that a change and its audit event commit together, and wait for (rather than fight)
# the daemon's writer. The intake path's own sender lookup is `sender_record`, not these.


@dataclass(frozen=True)
class Organisation:
    id: int
    name: str
    domains: tuple[str, ...]  # lower-case A-labels, sorted
    unit: str | None
    account_manager: str | None
    senders: int  # authorised (not blocked) sender rows, domain grants included
    created_at: str


@dataclass(frozen=True)
class SenderEntry:
    address: str  # normalised; "@domain" for a whole-domain grant
    organisation: str | None  # the organisation's name
    name: str | None
    blocked: bool
    created_at: str

    @property
    def is_domain(self) -> bool:
        return self.address.startswith("@")


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises.

    IMMEDIATE takes the write lock up front (waiting up to busy_timeout for the daemon's
    writer), so that reads made inside the block still hold when their changes commit.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


_ORGANISATION_SELECT = """
    SELECT o.id, o.name, o.unit, o.account_manager, o.created_at,
           (SELECT group_concat(d.domain, ' ') FROM
               (SELECT domain FROM org_domains WHERE organisation = o.id ORDER BY domain) d
           ) AS domains,
           (SELECT COUNT(*) FROM senders s WHERE s.organisation = o.id AND NOT s.blocked)
               AS sender_count
    FROM organisations o
"""


def _organisation(row: sqlite3.Row) -> Organisation:
    return Organisation(
        id=row["id"],
        name=row["name"],
        domains=tuple((row["domains"] or "").split()),
        unit=row["unit"],
        account_manager=row["account_manager"],
        senders=row["sender_count"],
        created_at=row["created_at"],
    )


def add_organisation(
    conn: sqlite3.Connection,
    *,
    name: str,
    domains: Sequence[str],
    unit: str | None,
    account_manager: str | None,
    now: str,
) -> int:
    """A new organisation; the caller has checked that its name and domains are free."""
    cursor = conn.execute(
        "INSERT INTO organisations (name, unit, account_manager, created_at) VALUES (?,?,?,?)",
        (name, unit, account_manager, now),
    )
    org_id = cursor.lastrowid
    assert org_id is not None
    for domain in domains:
        add_org_domain(conn, org_id, domain)
    return org_id


def find_organisation(conn: sqlite3.Connection, name: str) -> Organisation | None:
    """The organisation with this name, compared case-insensitively."""
    row = conn.execute(f"{_ORGANISATION_SELECT} WHERE o.name = ?", (name,)).fetchone()
    return None if row is None else _organisation(row)


def list_organisations(conn: sqlite3.Connection) -> list[Organisation]:
    sql = f"{_ORGANISATION_SELECT} ORDER BY o.name"
    return [_organisation(row) for row in conn.execute(sql)]


def organisation_for_domain(conn: sqlite3.Connection, domain: str) -> Organisation | None:
    """The organisation owning this mail domain (lower-case A-label), if any."""
    row = conn.execute(
        f"{_ORGANISATION_SELECT} WHERE o.id = "
        "(SELECT organisation FROM org_domains WHERE domain = ?)",
        (domain,),
    ).fetchone()
    return None if row is None else _organisation(row)


def update_organisation(
    conn: sqlite3.Connection, org_id: int, *, unit: str | None, account_manager: str | None
) -> None:
    conn.execute(
        "UPDATE organisations SET unit = ?, account_manager = ? WHERE id = ?",
        (unit, account_manager, org_id),
    )


def add_org_domain(conn: sqlite3.Connection, org_id: int, domain: str) -> None:
    conn.execute("INSERT INTO org_domains (domain, organisation) VALUES (?, ?)", (domain, org_id))


def remove_org_domain(conn: sqlite3.Connection, org_id: int, domain: str) -> bool:
    cursor = conn.execute(
        "DELETE FROM org_domains WHERE domain = ? AND organisation = ?", (domain, org_id)
    )
    return cursor.rowcount > 0


def count_organisation_tickets(conn: sqlite3.Connection, org_id: int) -> int:
    row = conn.execute("SELECT COUNT(*) FROM tickets WHERE organisation = ?", (org_id,)).fetchone()
    return int(row[0])


def remove_organisation(conn: sqlite3.Connection, org_id: int) -> list[str]:
    """Delete an organisation, its domains and its authorised senders (returned).

    Blocked addresses stay blocked: they lose the organisation, not the block. The caller
    has checked that no ticket refers to the organisation.
    """
    conn.execute(
        "UPDATE senders SET organisation = NULL WHERE organisation = ? AND blocked", (org_id,)
    )
    removed = [
        str(row["address"])
        for row in conn.execute(
            "SELECT address FROM senders WHERE organisation = ? ORDER BY address", (org_id,)
        )
    ]
    conn.execute("DELETE FROM senders WHERE organisation = ?", (org_id,))
    conn.execute("DELETE FROM org_domains WHERE organisation = ?", (org_id,))
    conn.execute("DELETE FROM organisations WHERE id = ?", (org_id,))
    return removed


_SENDER_SELECT = """
    SELECT s.address, o.name AS organisation, s.name, s.blocked, s.created_at
    FROM senders s LEFT JOIN organisations o ON o.id = s.organisation
"""


def _sender(row: sqlite3.Row) -> SenderEntry:
    return SenderEntry(
        address=row["address"],
        organisation=row["organisation"],
        name=row["name"],
        blocked=bool(row["blocked"]),
        created_at=row["created_at"],
    )


def find_sender(conn: sqlite3.Connection, address: str) -> SenderEntry | None:
    """The senders row for a normalised address (or "@domain"), exactly as stored."""
    row = conn.execute(f"{_SENDER_SELECT} WHERE s.address = ?", (address,)).fetchone()
    return None if row is None else _sender(row)


def upsert_sender(
    conn: sqlite3.Connection,
    *,
    address: str,
    organisation: int,
    name: str | None,
    now: str,
) -> None:
    """Authorise an address (or "@domain") for an organisation; an existing row is updated.

    The caller has checked that the address is not blocked: this never lifts a block.
    """
    conn.execute(
        """
        INSERT INTO senders (address, organisation, name, blocked, skeleton, created_at)
        VALUES (?, ?, ?, 0, ?, ?)
        ON CONFLICT (address) DO UPDATE SET organisation = excluded.organisation,
            name = excluded.name
        """,
        (address, organisation, name, skeleton(address), now),
    )


def block_sender(conn: sqlite3.Connection, address: str, *, now: str) -> None:
    """Block an address; an existing row keeps its organisation and name."""
    conn.execute(
        """
        INSERT INTO senders (address, organisation, name, blocked, skeleton, created_at)
        VALUES (?, NULL, NULL, 1, ?, ?)
        ON CONFLICT (address) DO UPDATE SET blocked = 1
        """,
        (address, skeleton(address), now),
    )


def remove_sender(conn: sqlite3.Connection, address: str) -> bool:
    """Delete the row of an address (or "@domain"): no longer authorised, nor blocked."""
    cursor = conn.execute("DELETE FROM senders WHERE address = ?", (address,))
    return cursor.rowcount > 0


def list_senders(
    conn: sqlite3.Connection, *, organisation: int | None = None, include_blocked: bool = True
) -> list[SenderEntry]:
    """Sender rows by organisation name (unattached blocked addresses last), then address."""
    clauses, params = [], []
    if organisation is not None:
        clauses.append("s.organisation = ?")
        params.append(organisation)
    if not include_blocked:
        clauses.append("NOT s.blocked")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"{_SENDER_SELECT} {where} ORDER BY o.name IS NULL, o.name, s.address"
    return [_sender(row) for row in conn.execute(sql, params)]


def list_events(
    conn: sqlite3.Connection, *, ticket: int | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Audit events, newest first, as the `events --json` objects."""
    sql = "SELECT id, time, actor, action, subject, ticket, detail FROM events"
    params: list[Any] = []
    if ticket is not None:
        sql += " WHERE ticket = ?"
        params.append(ticket)
    sql += " ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [
        {
            "id": row["id"],
            "time": row["time"],
            "actor": row["actor"],
            "action": row["action"],
            "subject": row["subject"],
            "ticket": row["ticket"],
            "detail": json.loads(row["detail"]),
        }
        for row in conn.execute(sql, params)
    ]


# --- the outbox (delivery worker and CLI) ---
#
# Outgoing mail is planned as rows here, inside the transaction of the event that causes it
# (the transactional outbox). The delivery worker reads due rows through a read-only
# connection of its own (`open_outbox_reader`), which sees committed rows only, and records
# each attempt's outcome as a tiny unit for the Writer. One recipient per row; every
# timestamp is an ISO 8601 UTC string, compared as a string.

OUTBOX_STATUSES = ("queued", "sent", "failed")


@dataclass(frozen=True)
class OutboxMail:
    """One due outbox row, as the delivery worker needs it (its bytes are read apart)."""

    id: int
    message: int  # the messages row whose raw bytes are sent
    ticket: int | None
    kind: str
    mail_from: str  # envelope sender; '' is the null sender <>
    rcpt_to: str
    message_id: str
    attempts: int
    created_at: str


def queue_mail(
    conn: sqlite3.Connection,
    *,
    message_row: int,
    ticket: int | None,
    kind: str,
    automatic: bool,
    mail_from: str,
    rcpt_to: str,
    subject: str,
    message_id: str,
    now: str,
) -> int:
    """One outbox row for one recipient of a stored outgoing message, due at once."""
    cursor = conn.execute(
        """
        INSERT INTO outbox (message, ticket, kind, automatic, mail_from, rcpt_to, subject,
                            message_id, status, attempts, next_attempt_at, created_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?)
        """,
        (
            message_row,
            ticket,
            kind,
            int(automatic),
            mail_from,
            rcpt_to,
            subject,
            message_id,
            now,
            now,
        ),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def store_outgoing(
    conn: sqlite3.Connection,
    *,
    raw: bytes,
    message_id: str,
    ticket: int | None,
    kind: str,
    automatic: bool,
    mail_from: str,
    recipients: Sequence[str],
    subject: str,
    now: str,
    from_header: str | None = None,
    text: str | None = None,
) -> tuple[int, list[int]]:
    """Store an outgoing mail (a messages row, direction 'out') and queue it per recipient.

    Returns the messages row id and the outbox row ids, in the order of `recipients`.
    """
    record = StoredMessage(
        queue_id=f"out-{secrets.token_hex(8)}",
        received_at=now,
        mail_from=mail_from,
        rcpt_to=tuple(recipients),
        peer="",
        helo="",
        raw=raw,
        sha256=hashlib.sha256(raw).hexdigest(),
        message_id=message_id,
        from_header=from_header,
        subject=subject,
        date_header=None,
        malformed=None,
        defects=(),
        direction="out",
        text=text,
    )
    message_row = insert_message(conn, record, Filing(ticket, kind, "outgoing"))
    rows = [
        queue_mail(
            conn,
            message_row=message_row,
            ticket=ticket,
            kind=kind,
            automatic=automatic,
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            subject=subject,
            message_id=message_id,
            now=now,
        )
        for rcpt_to in recipients
    ]
    return message_row, rows


def open_outbox_reader(path: Path, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A read-only connection to an existing, migrated database (the worker's reads)."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=True)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return conn


def due_outbox(
    conn: sqlite3.Connection, *, now: str, limit: int, exclude: frozenset[int] = frozenset()
) -> list[OutboxMail]:
    """Queued rows whose next attempt is due, oldest due first, except the `exclude` ids."""
    found = conn.execute(
        """
        SELECT id, message, ticket, kind, mail_from, rcpt_to, message_id, attempts, created_at
        FROM outbox WHERE status = 'queued' AND next_attempt_at <= ?
        ORDER BY next_attempt_at, id LIMIT ?
        """,
        (now, limit + len(exclude)),
    ).fetchall()
    due = [
        OutboxMail(
            id=row["id"],
            message=row["message"],
            ticket=row["ticket"],
            kind=row["kind"],
            mail_from=row["mail_from"],
            rcpt_to=row["rcpt_to"],
            message_id=row["message_id"],
            attempts=row["attempts"],
            created_at=row["created_at"],
        )
        for row in found
        if row["id"] not in exclude
    ]
    return due[:limit]


def mark_outbox_sent(conn: sqlite3.Connection, row_id: int, *, attempts: int, now: str) -> None:
    """The relay took the mail (250 to DATA), or its file is written."""
    conn.execute(
        """
        UPDATE outbox SET status = 'sent', attempts = ?, sent_at = ?, last_error = NULL
        WHERE id = ?
        """,
        (attempts, now, row_id),
    )


def mark_outbox_retry(
    conn: sqlite3.Connection, row_id: int, *, attempts: int, error: str, next_attempt_at: str
) -> None:
    """A temporary failure: queued again, due at `next_attempt_at`."""
    conn.execute(
        """
        UPDATE outbox SET status = 'queued', attempts = ?, last_error = ?, next_attempt_at = ?
        WHERE id = ?
        """,
        (attempts, error, next_attempt_at, row_id),
    )


def mark_outbox_failed(conn: sqlite3.Connection, row_id: int, *, attempts: int, error: str) -> None:
    """A permanent failure, or a temporary one for too long: never tried again by itself."""
    conn.execute(
        "UPDATE outbox SET status = 'failed', attempts = ?, last_error = ? WHERE id = ?",
        (attempts, error, row_id),
    )


_OUTBOX_SELECT = """
    SELECT id, ticket, rcpt_to, subject, kind, status, attempts, last_error, created_at,
           message_id, next_attempt_at, sent_at
    FROM outbox
"""


def _outbox_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "ticket": row["ticket"],
        "to": row["rcpt_to"],
        "subject": row["subject"],
        "kind": row["kind"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "created_at": row["created_at"],
        "message_id": row["message_id"],
        "next_attempt_at": row["next_attempt_at"],
        "sent_at": row["sent_at"],
    }


def list_outbox(
    conn: sqlite3.Connection, *, status: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Outbox rows, newest first, as the `outbox list --json` objects."""
    sql = _OUTBOX_SELECT
    params: list[Any] = []
    if status is not None:
        sql += " WHERE status = ?"
        params.append(status)
    sql += " ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [_outbox_dict(row) for row in conn.execute(sql, params)]


def find_outbox(conn: sqlite3.Connection, row_id: int) -> dict[str, Any] | None:
    """One outbox row as a `list_outbox` object, if it exists."""
    row = conn.execute(f"{_OUTBOX_SELECT} WHERE id = ?", (row_id,)).fetchone()
    return None if row is None else _outbox_dict(row)


def retry_outbox(conn: sqlite3.Connection, row_id: int, *, now: str) -> None:
    """Make a queued or failed row due now; its attempts so far are kept."""
    conn.execute(
        """
        UPDATE outbox SET status = 'queued', next_attempt_at = ?
        WHERE id = ? AND status IN ('queued', 'failed')
        """,
        (now, row_id),
    )
