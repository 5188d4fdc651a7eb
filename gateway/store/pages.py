"""Pages sent for urgent tickets out of hours (migration 10's `pages` table, issue 12).

One row per ticket and step (0: the person on call, 1: the secondary, 2: the unit's
lead). The row is written in the transaction that queues the page, and UNIQUE (ticket,
step) makes each step happen once, across restarts. A step skipped because nobody is
configured for it is a row with address "" (so it is skipped once, not every minute).
Several people on call at once are paged together: one step-0 row whose address lists
them, comma-separated.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

# The last step: the unit's lead. Nothing is paged after it.
LAST_STEP = 2
# The outbox kind of a page's webhook POST: its stored bytes are the JSON document, and
# the outbox worker POSTs them instead of relaying mail (outbox.py).
WEBHOOK_KIND = "page-webhook"


@dataclass(frozen=True)
class Page:
    id: int
    ticket: int
    step: int
    address: str  # "" for a step skipped (nobody to page); "a, b" for several
    reasons: tuple[str, ...]
    sent_at: str
    ack_due: str
    acknowledged_at: str | None
    acknowledged_by: str | None

    @property
    def addresses(self) -> list[str]:
        return [a.strip() for a in self.address.split(",") if a.strip()]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Page:
        return cls(
            id=row["id"],
            ticket=row["ticket"],
            step=row["step"],
            address=row["address"],
            reasons=tuple(json.loads(row["reasons"])),
            sent_at=row["sent_at"],
            ack_due=row["ack_due"],
            acknowledged_at=row["acknowledged_at"],
            acknowledged_by=row["acknowledged_by"],
        )


_COLUMNS = "id, ticket, step, address, reasons, sent_at, ack_due, acknowledged_at, acknowledged_by"


def insert_page(
    conn: sqlite3.Connection,
    *,
    ticket: int,
    step: int,
    addresses: Sequence[str],
    reasons: Sequence[str],
    now: str,
    ack_due: str,
) -> int | None:
    """The row of one step; None when that step of the ticket was already paged (the
    caller then queues nothing)."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO pages (ticket, step, address, reasons, sent_at, ack_due) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (ticket, step, ", ".join(addresses), json.dumps(list(reasons)), now, ack_due),
    )
    return cursor.lastrowid if cursor.rowcount == 1 else None


def ticket_pages(conn: sqlite3.Connection, ticket: int) -> list[Page]:
    """A ticket's pages, first step first."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM pages WHERE ticket = ? ORDER BY step", (ticket,)
    ).fetchall()
    return [Page.from_row(r) for r in rows]


def acknowledge_pages(conn: sqlite3.Connection, ticket: int, *, by: str, now: str) -> list[int]:
    """Mark the ticket's open pages acknowledged; returns the steps that were open."""
    rows = conn.execute(
        "SELECT step FROM pages WHERE ticket = ? AND acknowledged_at IS NULL ORDER BY step",
        (ticket,),
    ).fetchall()
    conn.execute(
        "UPDATE pages SET acknowledged_at = ?, acknowledged_by = ? "
        "WHERE ticket = ? AND acknowledged_at IS NULL",
        (now, by, ticket),
    )
    return [int(r["step"]) for r in rows]


def due_for_escalation(conn: sqlite3.Connection, *, now: str) -> list[int]:
    """Tickets whose latest page is not acknowledged by its due time and has a next step
    (pages_waiting index); none of a ticket once any of its pages is acknowledged."""
    rows = conn.execute(
        """
        SELECT p.ticket FROM pages p
        WHERE p.acknowledged_at IS NULL AND p.ack_due <= ? AND p.step < ?
          AND p.step = (SELECT MAX(step) FROM pages q WHERE q.ticket = p.ticket)
          AND NOT EXISTS (SELECT 1 FROM pages a WHERE a.ticket = p.ticket
                          AND a.acknowledged_at IS NOT NULL)
        ORDER BY p.ack_due, p.ticket
        """,
        (now, LAST_STEP),
    ).fetchall()
    return [int(r["ticket"]) for r in rows]


def page_message(
    conn: sqlite3.Connection, ticket: int, message_ids: Sequence[str]
) -> list[str] | None:
    """The recipients of our page mail on `ticket` that one of `message_ids` names (a reply
    to a page cites it in In-Reply-To or References), or None if none does."""
    for message_id in message_ids:
        row = conn.execute(
            """
            SELECT m.rcpt_to FROM messages m JOIN outbox o ON o.message = m.id
            WHERE m.message_id = ? AND m.direction = 'out' AND m.ticket = ? AND o.kind = 'page'
            LIMIT 1
            """,
            (message_id, ticket),
        ).fetchone()
        if row is not None:
            return [str(a).lower() for a in json.loads(row["rcpt_to"])]
    return None


def organisation_out_of_hours(conn: sqlite3.Connection, ticket: int) -> bool:
    """The ticket's organisation has out-of-hours cover (`orgs --out-of-hours`)."""
    row = conn.execute(
        "SELECT o.out_of_hours FROM tickets t JOIN organisations o ON o.id = t.organisation "
        "WHERE t.number = ?",
        (ticket,),
    ).fetchone()
    return row is not None and bool(row["out_of_hours"])
