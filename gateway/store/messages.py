"""Stored messages: incoming and outgoing rows, their raw bytes and attachments, how
each was filed (ticket, kind, via), duplicates, and the CLI's message list."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

import aiosqlite

from ..model import MessageKind, Via
from . import search


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


@dataclass(frozen=True, init=False)
class Filing:
    """Where a stored message went: its ticket, its kind, how it was threaded.

    `kind` and `via` are always the enums. Their stored strings are taken too and turned
    into the enum here (so a value outside the set fails before anything is written):
    callers that still pass "outgoing" keep working while they move to `Via.OUTGOING`.
    """

    ticket: int | None
    kind: MessageKind | None
    via: Via
    duplicate_of: int | None = None

    def __init__(
        self,
        ticket: int | None,
        kind: MessageKind | str | None,
        via: Via | str,
        duplicate_of: int | None = None,
    ) -> None:
        object.__setattr__(self, "ticket", ticket)
        object.__setattr__(self, "kind", None if kind is None else MessageKind(kind))
        object.__setattr__(self, "via", Via(via))
        object.__setattr__(self, "duplicate_of", duplicate_of)


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
    if filing is not None and filing.ticket is not None:
        search.index_message(conn, row_id)  # searchable once committed (issue 14)
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


def set_filing(conn: sqlite3.Connection, message: int, filing: Filing) -> None:
    """File a message stored earlier (a release from the quarantine)."""
    conn.execute(
        """
        UPDATE messages SET ticket = ?, kind = ?, threaded_via = ?, duplicate_of = ?
        WHERE id = ?
        """,
        (filing.ticket, filing.kind, filing.via, filing.duplicate_of, message),
    )
    if filing.ticket is not None:
        search.index_released(conn, message)


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


_MAIL_SPEC_SQL = "SELECT spec FROM mail_specs WHERE message = ?"


async def fetch_mail_spec(db: aiosqlite.Connection, message: int) -> str | None:
    """The spec a planned mail is built from (the outbox worker's read)."""
    for row in await db.execute_fetchall(_MAIL_SPEC_SQL, (message,)):
        return str(row["spec"])
    return None


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


# One query, two callers: the CLI and the writer's units (sync), the outbox worker (async).
_READ_RAW_SQL = "SELECT raw FROM message_raw WHERE message = ?"


def read_raw(conn: sqlite3.Connection, message: int) -> bytes | None:
    row = conn.execute(_READ_RAW_SQL, (message,)).fetchone()
    return None if row is None else bytes(row["raw"])


async def fetch_raw(db: aiosqlite.Connection, message: int) -> bytes | None:
    """`read_raw` on the daemon's aiosqlite reader."""
    for row in await db.execute_fetchall(_READ_RAW_SQL, (message,)):
        return bytes(row["raw"])
    return None


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


# --- retention (issue 13) -----------------------------------------------------------------
#
# Purging a message removes what it said (raw bytes, readable text, the spec of a planned
# mail, its attachments' rows) and keeps what the audit needs: the messages row (who sent
# it, when, to whom, its subject, size and sha256, how it was filed) with purged_at set, and
# every event about it. Attachment bytes are content-addressed blobs shared between
# messages, so a blob goes only when no attachment row refers to it any more.


@dataclass(frozen=True)
class Purged:
    messages: int = 0
    attachments: int = 0
    blobs: int = 0


def purgeable_messages(conn: sqlite3.Connection, *, before: str, limit: int) -> list[int]:
    """Up to `limit` messages received before `before` and not purged yet, oldest first.

    Never one still needed: mail held in the quarantine (an admin may release it; its own
    expiry purges it) or outgoing mail the outbox has not finished with (its bytes are
    what is being sent).
    """
    return [
        int(row["id"])
        for row in conn.execute(
            """
            SELECT m.id FROM messages m INDEXED BY messages_unpurged
            WHERE m.received_at < ? AND m.purged_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM quarantine q
                              WHERE q.message = m.id AND q.status = 'held')
              AND NOT EXISTS (SELECT 1 FROM outbox o
                              WHERE o.message = m.id AND o.status = 'queued')
            ORDER BY m.received_at LIMIT ?
            """,
            (before, limit),
        )
    ]


def purge_messages(conn: sqlite3.Connection, ids: list[int], *, now: str) -> Purged:
    """Remove the content of these messages (see above); a unit inside a transaction."""
    attachments = 0
    shas: set[str] = set()
    for message in ids:
        conn.execute("DELETE FROM message_raw WHERE message = ?", (message,))
        conn.execute("DELETE FROM mail_specs WHERE message = ?", (message,))
        shas.update(
            str(row["sha256"])
            for row in conn.execute("SELECT sha256 FROM attachments WHERE message = ?", (message,))
        )
        attachments += conn.execute(
            "DELETE FROM attachments WHERE message = ?", (message,)
        ).rowcount
        conn.execute(
            "UPDATE messages SET text = NULL, purged_at = ? WHERE id = ? AND purged_at IS NULL",
            (now, message),
        )
    # The blobs this purge left without a reference go now (one indexed look-up each);
    # `purge_orphan_blobs` sweeps the whole table for any other.
    blobs = 0
    for sha in sorted(shas):
        blobs += conn.execute(
            """
            DELETE FROM blobs WHERE sha256 = ?
              AND NOT EXISTS (SELECT 1 FROM attachments WHERE sha256 = ?)
            """,
            (sha, sha),
        ).rowcount
    return Purged(messages=len(ids), attachments=attachments, blobs=blobs)


def purge_orphan_blobs(conn: sqlite3.Connection, *, limit: int) -> int:
    """Delete up to `limit` attachment blobs no attachment row refers to.

    No age margin is needed here, unlike for files on a disk: a blob and the attachment
    row that refers to it are written in one transaction (`insert_message`), and this runs
    in a write transaction too, so SQLite's one writer at a time means no transaction can
    be between writing a blob (or finding it already there) and referring to it.
    """
    return conn.execute(
        """
        DELETE FROM blobs WHERE rowid IN (
            SELECT b.rowid FROM blobs b
            WHERE NOT EXISTS (SELECT 1 FROM attachments a WHERE a.sha256 = b.sha256)
            LIMIT ?
        )
        """,
        (limit,),
    ).rowcount


def purged_at(conn: sqlite3.Connection, message: int) -> str | None:
    """When this message's content was purged (None: it was not, or no such message)."""
    row = conn.execute("SELECT purged_at FROM messages WHERE id = ?", (message,)).fetchone()
    return None if row is None else row["purged_at"]
