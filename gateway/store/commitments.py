"""Commitments: the promises of an update that a ticket waiting on us carries.

A ticket has at most one `open` commitment, and tickets.next_update_due mirrors its due
time (NULL when the ticket waits on nobody here: pending, solved, closed). Every promise
is a row, kept when it is met, missed or replaced, so `tickets show` tells its history.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

# --- set/close: the ticket actions' --------------------------------------------------------
# Written in the transaction of the ticket action that makes or keeps the promise (a new
# ticket, a client's reply, a public staff update, `tickets commit`, a status change).


@dataclass(frozen=True)
class Closed:
    """What closing a ticket's open commitment did."""

    id: int
    due: str
    state: str  # met, missed or replaced


def current_commitment(conn: sqlite3.Connection, ticket: int) -> sqlite3.Row | None:
    """The ticket's open commitment, if any."""
    row: sqlite3.Row | None = conn.execute(
        "SELECT id, due, set_by, note FROM commitments WHERE ticket = ? AND state = 'open' "
        "ORDER BY id DESC LIMIT 1",
        (ticket,),
    ).fetchone()
    return row


def set_commitment(
    conn: sqlite3.Connection,
    ticket: int,
    *,
    due: str,
    set_by: str,
    note: str | None,
    now: str,
) -> int:
    """A new promise: the open one (if any) is replaced, the ticket's due time follows."""
    conn.execute(
        "UPDATE commitments SET state = 'replaced', closed_at = ? "
        "WHERE ticket = ? AND state = 'open'",
        (now, ticket),
    )
    cursor = conn.execute(
        "INSERT INTO commitments (ticket, due, set_by, note, state, created_at) "
        "VALUES (?, ?, ?, ?, 'open', ?)",
        (ticket, due, set_by, note, now),
    )
    conn.execute("UPDATE tickets SET next_update_due = ? WHERE number = ?", (due, ticket))
    number = cursor.lastrowid
    assert number is not None
    return number


def close_commitment(
    conn: sqlite3.Connection, ticket: int, *, updated: bool, now: str
) -> Closed | None:
    """Close the ticket's open commitment, if any, and clear its due time.

    `updated`: a public update reached the client now. Then the promise is `met` if it was
    not yet due, else `missed`. Without one (the ticket stops waiting on us: pending,
    solved, closed) a promise not yet due is `replaced` (withdrawn), one already due is
    `missed` (the scheduler, had it run, would have marked it so)."""
    row = current_commitment(conn, ticket)
    conn.execute("UPDATE tickets SET next_update_due = NULL WHERE number = ?", (ticket,))
    if row is None:
        return None
    due = str(row["due"])
    if due >= now:
        state = "met" if updated else "replaced"
    else:
        state = "missed"
    conn.execute(
        "UPDATE commitments SET state = ?, closed_at = ? WHERE id = ?", (state, now, row["id"])
    )
    return Closed(int(row["id"]), due, state)


def list_commitments(conn: sqlite3.Connection, ticket: int) -> list[dict[str, Any]]:
    """A ticket's promises, oldest first, as the `tickets show --json` objects."""
    return [
        {
            "due": row["due"],
            "set_by": row["set_by"],
            "note": row["note"],
            "state": row["state"],
            "created_at": row["created_at"],
            "closed_at": row["closed_at"],
        }
        for row in conn.execute(
            "SELECT due, set_by, note, state, created_at, closed_at FROM commitments "
            "WHERE ticket = ? ORDER BY id",
            (ticket,),
        )
    ]
