"""The quarantine: held messages, their decisions (released, discarded, expired), and
what the loop rule and the status need to know of them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from .messages import purge_messages


def hold_message(conn: sqlite3.Connection, message: int, reasons: Sequence[str], now: str) -> int:
    cursor = conn.execute(
        "INSERT INTO quarantine (message, reasons, held_at) VALUES (?, ?, ?)",
        (message, json.dumps(list(reasons)), now),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def held_message(conn: sqlite3.Connection, quarantine_id: int) -> dict[str, Any] | None:
    """A quarantine entry with its message's stored columns (and raw bytes: None once
    purged, when `purged_at` says since when)."""
    row = conn.execute(
        """
        SELECT q.id AS quarantine_id, q.reasons AS held_reasons, q.status, q.held_at,
               m.*, r.raw
        FROM quarantine q JOIN messages m ON m.id = q.message
        LEFT JOIN message_raw r ON r.message = m.id
        WHERE q.id = ?
        """,
        (quarantine_id,),
    ).fetchone()
    return None if row is None else dict(row)


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
    """Mark held entries older than `before` expired and purge their messages' content
    (raw bytes, text, attachments: nobody can release them any more, and unreleased mail
    is the least trusted we store); returns their ids. The rows stay, for the audit."""
    found = [
        (int(r["id"]), int(r["message"]))
        for r in conn.execute(
            "SELECT id, message FROM quarantine WHERE status = 'held' AND held_at < ? ORDER BY id",
            (before,),
        )
    ]
    for quarantine_id, _ in found:
        decide_held(conn, quarantine_id, status="expired", actor="gateway", now=now)
    purge_messages(conn, [message for _, message in found], now=now)
    return [quarantine_id for quarantine_id, _ in found]


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


def count_held(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT COUNT(*) FROM quarantine WHERE status = 'held'").fetchone()
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
