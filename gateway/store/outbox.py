"""The outbox (delivery worker and CLI), and the addresses we know mail cannot reach.

Outgoing mail is planned as rows here, inside the transaction of the event that causes it
(the transactional outbox). The delivery worker reads due rows (`due_mail`, async) through
the daemon's read-only aiosqlite connection (`reader.Reader`), which sees committed rows
only, and records each attempt's outcome as a tiny unit for the Writer. One recipient per row; every
timestamp is an ISO 8601 UTC string, compared as a string.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite


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


# The due rows, oldest due first; `limit` counts the excluded ids too (dropped after).
_DUE_MAIL_SQL = """
    SELECT id, message, ticket, kind, mail_from, rcpt_to, message_id, attempts, created_at
    FROM outbox WHERE status = 'queued' AND next_attempt_at <= ?
    ORDER BY next_attempt_at, id LIMIT ?
"""


async def due_mail(
    db: aiosqlite.Connection, *, now: str, limit: int, exclude: frozenset[int] = frozenset()
) -> list[OutboxMail]:
    """Queued rows whose next attempt is due, oldest due first, except the `exclude` ids."""
    found = await db.execute_fetchall(_DUE_MAIL_SQL, (now, limit + len(exclude)))
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
