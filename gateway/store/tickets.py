"""Tickets: rows, participants, status, the reads threading needs (TicketQueries), the
reply-token secret, and the CLI's ticket views. (A note is a message: actions.tickets.)"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..model import Status, TicketRef
from .commitments import list_commitments


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


# The `reasons` stored with our staff notices (json of [MailKind value]).
STAFF_NOTICE_REASONS = ('["staff-new-ticket"]', '["staff-client-reply"]')


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
              AND NOT (direction = 'out' AND reasons IN (?, ?))
            ORDER BY id DESC LIMIT 20
            """,
            # Notices to staff are ours, never the client's thread: a reply to the
            # client must not cite them (In-Reply-To, References).
            (ticket, *STAFF_NOTICE_REASONS),
        )
    ]
    return {
        "requester": row["requester"],
        "mailbox": row["mailbox"],
        "subject": row["subject"],
        "status": row["status"],
        "message_ids": list(reversed(ids)),
    }


def ticket_desk_info(conn: sqlite3.Connection, ticket: int) -> dict[str, Any] | None:
    """What the desk knows of a ticket: status, unit, owner, requester, organisation name,
    next_update_due (None for no ticket)."""
    row = conn.execute(
        """
        SELECT t.status, t.unit, t.owner, t.requester, t.next_update_due, o.name AS org
        FROM tickets t LEFT JOIN organisations o ON o.id = t.organisation
        WHERE t.number = ?
        """,
        (ticket,),
    ).fetchone()
    if row is None:
        return None
    return {
        "status": row["status"],
        "unit": row["unit"],
        "owner": row["owner"],
        "requester": row["requester"],
        "organisation": row["org"],
        "next_update_due": row["next_update_due"],
    }


def set_ticket_owner(conn: sqlite3.Connection, number: int, owner: str | None) -> str | None:
    """Set (or with None clear) a ticket's owner; returns the old one."""
    row = conn.execute("SELECT owner FROM tickets WHERE number = ?", (number,)).fetchone()
    conn.execute("UPDATE tickets SET owner = ? WHERE number = ?", (owner, number))
    return None if row is None else row["owner"]


def ticket_priority(conn: sqlite3.Connection, number: int) -> tuple[str, list[str]] | None:
    """(priority, urgency reasons) of a ticket; None for no ticket."""
    row = conn.execute(
        "SELECT priority, urgency_reasons FROM tickets WHERE number = ?", (number,)
    ).fetchone()
    if row is None:
        return None
    return str(row["priority"]), list(json.loads(row["urgency_reasons"]))


def set_ticket_priority(
    conn: sqlite3.Connection, number: int, priority: str, reasons: Sequence[str]
) -> None:
    conn.execute(
        "UPDATE tickets SET priority = ?, urgency_reasons = ? WHERE number = ?",
        (priority, json.dumps(list(reasons), ensure_ascii=False), number),
    )


def set_last_public_update(conn: sqlite3.Connection, number: int, now: str) -> None:
    """The client heard from a person here (a public staff reply) at `now`."""
    conn.execute("UPDATE tickets SET last_public_update_at = ? WHERE number = ?", (now, number))


# --- upset clients (issue 12 item 5) --------------------------------------------------------


@dataclass(frozen=True)
class UpsetState:
    """What the upset rules need from a ticket when a client's mail arrives (read before
    the mail is stored): whether the client already wrote since our last public update,
    the due time of our promise, and the day its account manager was last told."""

    chasing: bool
    next_update_due: str | None
    notified_on: str | None


def upset_state(conn: sqlite3.Connection, number: int) -> UpsetState | None:
    row = conn.execute(
        """
        SELECT t.next_update_due, t.upset_notified_on,
          EXISTS (
            SELECT 1 FROM messages m
            WHERE m.ticket = t.number AND m.direction = 'in' AND m.kind = 'client'
              AND (t.last_public_update_at IS NULL OR m.received_at > t.last_public_update_at)
          ) AS chasing
        FROM tickets t WHERE t.number = ?
        """,
        (number,),
    ).fetchone()
    if row is None:
        return None
    return UpsetState(bool(row["chasing"]), row["next_update_due"], row["upset_notified_on"])


def ticket_account_manager(conn: sqlite3.Connection, number: int) -> str | None:
    """The account manager of the ticket's organisation, if it has one."""
    row = conn.execute(
        "SELECT o.account_manager FROM tickets t JOIN organisations o ON o.id = t.organisation "
        "WHERE t.number = ?",
        (number,),
    ).fetchone()
    return None if row is None else row["account_manager"]


def ticket_participants(conn: sqlite3.Connection, number: int) -> list[str]:
    return [
        str(r[0])
        for r in conn.execute("SELECT address FROM participants WHERE ticket = ?", (number,))
    ]


def mark_upset(conn: sqlite3.Connection, number: int, reasons: Sequence[str]) -> None:
    """Mark a ticket upset, appending `reasons` to the ones it already has."""
    row = conn.execute("SELECT upset_reasons FROM tickets WHERE number = ?", (number,)).fetchone()
    kept = json.loads(row["upset_reasons"]) if row is not None else []
    conn.execute(
        "UPDATE tickets SET upset = 1, upset_reasons = ? WHERE number = ?",
        (json.dumps([*kept, *reasons], ensure_ascii=False), number),
    )


def set_upset_notified(conn: sqlite3.Connection, number: int, day: str) -> None:
    conn.execute("UPDATE tickets SET upset_notified_on = ? WHERE number = ?", (day, number))


def calm_ticket(conn: sqlite3.Connection, number: int) -> tuple[bool, list[str]] | None:
    """Clear a ticket's upset mark; returns whether it was upset and the reasons it had,
    None if there is no such ticket. The day of the last notice is kept: calming does not
    let a second notice go out the same day."""
    row = conn.execute(
        "SELECT upset, upset_reasons FROM tickets WHERE number = ?", (number,)
    ).fetchone()
    if row is None:
        return None
    if not row["upset"]:
        return False, []
    conn.execute("UPDATE tickets SET upset = 0, upset_reasons = '[]' WHERE number = ?", (number,))
    return True, list(json.loads(row["upset_reasons"]))


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
    t.number, t.status, t.subject, t.requester, t.unit, t.priority, t.urgency_reasons, t.follows,
    t.created_at, t.updated_at, t.owner, t.next_update_due, t.last_public_update_at,
    t.upset, t.upset_reasons,
    (SELECT COUNT(*) FROM messages m WHERE m.ticket = t.number) AS message_count
"""


def _ticket_dict(row: sqlite3.Row, now: str) -> dict[str, Any]:
    due = row["next_update_due"]
    return {
        "number": row["number"],
        "status": row["status"],
        "subject": row["subject"],
        "requester": row["requester"],
        "unit": row["unit"],
        "priority": row["priority"],
        "urgency_reasons": json.loads(row["urgency_reasons"]),
        "follows": row["follows"],
        "message_count": row["message_count"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "owner": row["owner"],
        "next_update_due": due,
        # Due and not yet answered by a public update (which moves or clears the due time).
        "overdue": due is not None and due <= now,
        "last_public_update_at": row["last_public_update_at"],
        # Issue 12 item 5: the client's mail reads as upset (until staff calm it), and why.
        "upset": bool(row["upset"]),
        "upset_reasons": json.loads(row["upset_reasons"]),
    }


def list_tickets(
    conn: sqlite3.Connection,
    *,
    now: str,
    status: str | None = None,
    unit: str | None = None,
    owner: str | None = None,
    unassigned: bool = False,
    overdue: bool = False,
    due_before: str | None = None,
    organisation: str | None = None,
    urgent: bool = False,
    upset: bool = False,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Tickets as the `tickets list --json` objects: most recently updated first, or by
    due time (soonest first) when a due filter (`overdue`, `due_before`) is given."""
    clauses: list[str] = []
    params: list[Any] = []
    if status is not None:
        clauses.append("t.status = ?")
        params.append(status)
    if unit is not None:
        clauses.append("t.unit = ?")
        params.append(unit)
    if owner is not None:
        clauses.append("t.owner = ?")
        params.append(owner)
    if unassigned:
        clauses.append("t.owner IS NULL AND t.status IN ('new', 'open')")
    if urgent:
        clauses.append("t.priority = 'urgent'")
    if overdue:
        clauses.append("t.next_update_due <= ?")
        params.append(now)
    if due_before is not None:
        clauses.append("t.next_update_due < ?")
        params.append(due_before)
    if organisation is not None:
        clauses.append(
            "t.organisation = (SELECT id FROM organisations WHERE name = ? COLLATE NOCASE)"
        )
        params.append(organisation)
    if upset:
        clauses.append("t.upset = 1")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    order = (
        "t.next_update_due, t.number"
        if overdue or due_before is not None
        else "t.updated_at DESC, t.number DESC"
    )
    sql = f"SELECT {_TICKET_COLUMNS} FROM tickets t {where} ORDER BY {order}"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [_ticket_dict(row, now) for row in conn.execute(sql, params)]


def desk_counts(
    conn: sqlite3.Connection, *, unit: str, now: str, end_of_today: str
) -> dict[str, int]:
    """One unit's desk: open (waiting on us), unassigned, overdue, due today (by the end of
    its business day, not yet overdue), waiting on the client; urgent and upset among
    the open ones."""
    row = conn.execute(
        """
        SELECT
          COUNT(*) FILTER (WHERE status IN ('new', 'open')) AS open,
          COUNT(*) FILTER (WHERE status IN ('new', 'open') AND owner IS NULL) AS unassigned,
          COUNT(*) FILTER (WHERE next_update_due <= ?) AS overdue,
          COUNT(*) FILTER (WHERE next_update_due > ? AND next_update_due <= ?) AS due_today,
          COUNT(*) FILTER (WHERE status = 'pending') AS waiting_on_client,
          COUNT(*) FILTER (WHERE status IN ('new', 'open') AND priority = 'urgent') AS urgent,
          COUNT(*) FILTER (WHERE status IN ('new', 'open') AND upset = 1) AS upset
        FROM tickets WHERE unit = ?
        """,
        (now, now, end_of_today, unit),
    ).fetchone()
    return {key: int(row[key] or 0) for key in row.keys()}


def ticket_units(conn: sqlite3.Connection) -> list[str]:
    return [str(r[0]) for r in conn.execute("SELECT DISTINCT unit FROM tickets ORDER BY unit")]


def show_ticket(conn: sqlite3.Connection, number: int, *, now: str) -> dict[str, Any] | None:
    """One ticket with its messages, oldest first, as the `tickets show --json` object."""
    row = conn.execute(
        f"SELECT {_TICKET_COLUMNS} FROM tickets t WHERE t.number = ?", (number,)
    ).fetchone()
    if row is None:
        return None
    ticket = _ticket_dict(row, now)
    ticket["commitments"] = list_commitments(conn, number)
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
