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
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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

    def ticket_for_message_ids(self, message_ids: Sequence[str]) -> TicketRef | None:
        # One indexed lookup per id, in the caller's order of preference.
        for message_id in message_ids:
            row = self.conn.execute(
                """
                SELECT t.number, t.status FROM messages m JOIN tickets t ON t.number = m.ticket
                WHERE m.message_id = ? ORDER BY m.id DESC LIMIT 1
                """,
                (message_id,),
            ).fetchone()
            if row is not None:
                return TicketRef(row["number"], Status(row["status"]))
        return None

    def may_write(self, number: int, address: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM participants WHERE ticket = ? AND address = ?", (number, address)
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
) -> int:
    cursor = conn.execute(
        """
        INSERT INTO tickets (unit, requester, subject, status, follows, created_at, updated_at)
        VALUES (?, ?, ?, 'new', ?, ?, ?)
        """,
        (unit, requester, subject, follows, now, now),
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


# --- reading for the CLI --------------------------------------------------------------


def list_messages(conn: sqlite3.Connection, limit: int | None = None) -> list[dict[str, Any]]:
    """Every stored message, newest first, as the `messages list --json` objects."""
    sql = """
        SELECT id, queue_id, message_id, mail_from, rcpt_to, from_header, subject, size,
               received_at, malformed, peer, helo, sha256, ticket, kind, classification,
               reasons, direction, duplicate_of
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
