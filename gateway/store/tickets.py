"""Tickets: rows, participants, status, the reads threading needs (TicketQueries), the
reply-token secret, and the CLI's ticket views. (A note is a message: actions.tickets.)"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Sequence
from typing import Any

from ..model import Status, TicketRef


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


def set_ticket_organisation(conn: sqlite3.Connection, number: int, organisation: int) -> None:
    conn.execute(
        "UPDATE tickets SET organisation = ? WHERE number = ? AND organisation IS NULL",
        (organisation, number),
    )


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
