"""Commitments: the promises of an update made to a ticket's client (migration 7).

A ticket that waits on us has at most one `open` commitment, whose due time is mirrored
in tickets.next_update_due (NULL when the ticket waits on nobody here: pending, solved,
closed). Every promise is a row, kept when it is met, missed or replaced, so `tickets
show` tells its history. The ticket actions set and close them (the top of this module);
the scheduler's queries find what falls due and mark what it did, so that each reminder
and escalation happens once per promise, across restarts: the mark is written in the
transaction that queues the mail.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
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


# --- scheduler's queries ----------------------------------------------------------------

# Tickets that wait on us: the only ones whose promises are reminded of or escalated.
WAITING_ON_US = ("new", "open")


@dataclass(frozen=True)
class DueCommitment:
    """An open promise and what a reminder or an escalation about it needs to say."""

    id: int
    ticket: int
    due: str  # UTC ISO
    set_by: str
    note: str | None
    created_at: str
    unit: str
    owner: str | None
    requester: str
    last_public_update_at: str | None

    @property
    def answered(self) -> bool:
        """A public update came after the promise was made: it is kept, whatever its
        state says (the setting side marks it met in the update's own transaction)."""
        return self.last_public_update_at is not None and self.last_public_update_at > (
            self.created_at
        )


# CROSS JOIN keeps the commitments as the outer loop (SQLite does not reorder it): the
# range over the partial index of open promises by due time, whatever the unit's size.
_DUE = """
    SELECT c.id, c.ticket, c.due, c.set_by, c.note, c.created_at,
           t.unit, t.owner, t.requester, t.last_public_update_at
    FROM commitments c CROSS JOIN tickets t ON t.number = c.ticket
    WHERE c.state = 'open' AND t.status IN ('new', 'open')
"""


def _due(row: sqlite3.Row) -> DueCommitment:
    return DueCommitment(
        id=row["id"],
        ticket=row["ticket"],
        due=row["due"],
        set_by=row["set_by"],
        note=row["note"],
        created_at=row["created_at"],
        unit=row["unit"],
        owner=row["owner"],
        requester=row["requester"],
        last_public_update_at=row["last_public_update_at"],
    )


def _unit_filter(units: Sequence[str] | None, other_than: Sequence[str]) -> tuple[str, list[str]]:
    if units is not None:
        marks = ",".join("?" * len(units))
        return f" AND t.unit IN ({marks})", list(units)
    if other_than:
        marks = ",".join("?" * len(other_than))
        return f" AND t.unit NOT IN ({marks})", list(other_than)
    return "", []


def due_for_reminder(
    conn: sqlite3.Connection,
    *,
    now: str,
    horizon: str,
    units: Sequence[str] | None = None,
    other_than: Sequence[str] = (),
) -> list[DueCommitment]:
    """Open promises not yet reminded of that fall due after `now` and by `horizon` (now
    plus the unit's remind_before, in business time), of `units` (or of every unit but
    `other_than`). A promise already due is escalated instead. Ranges over
    commitments_open_by_due."""
    where, params = _unit_filter(units, other_than)
    cursor = conn.execute(
        _DUE
        + " AND c.reminded_at IS NULL AND c.due > ? AND c.due <= ?"
        + where
        # The partial index: its WHERE must be implied by the query's.
        + " ORDER BY c.due, c.id",
        (now, horizon, *params),
    )
    return [_due(row) for row in cursor]


def due_for_escalation(conn: sqlite3.Connection, *, now: str) -> list[DueCommitment]:
    """Open promises whose due time has come and that were never escalated."""
    cursor = conn.execute(
        _DUE + " AND c.escalated_at IS NULL AND c.due <= ? ORDER BY c.due, c.id", (now,)
    )
    return [_due(row) for row in cursor]


def open_commitment(conn: sqlite3.Connection, commitment: int) -> DueCommitment | None:
    """One open promise of a ticket that waits on us (None once it is met, missed or
    replaced, or its ticket no longer waits on us): re-read in the marking transaction."""
    row = conn.execute(_DUE + " AND c.id = ?", (commitment,)).fetchone()
    return None if row is None else _due(row)


def mark_reminded(conn: sqlite3.Connection, commitment: int, *, now: str) -> bool:
    """Record the reminder; False if it was already recorded (or the promise closed)."""
    cursor = conn.execute(
        "UPDATE commitments SET reminded_at = ?"
        " WHERE id = ? AND state = 'open' AND reminded_at IS NULL",
        (now, commitment),
    )
    return cursor.rowcount == 1


def mark_missed(conn: sqlite3.Connection, commitment: int, *, now: str) -> bool:
    """The promise is missed and escalated (the ticket is overdue until a public update);
    False if it was already escalated or closed."""
    cursor = conn.execute(
        "UPDATE commitments SET state = 'missed', escalated_at = ?, closed_at = ?"
        " WHERE id = ? AND state = 'open' AND escalated_at IS NULL",
        (now, now, commitment),
    )
    return cursor.rowcount == 1


# The digest: per unit, what the staff should look at first. The lists are capped (the
# counts are not); tickets_by_unit narrows each to the unit.


@dataclass(frozen=True)
class DigestTicket:
    number: int
    subject: str
    status: str
    owner: str | None
    due: str | None  # UTC ISO: the open promise, or the missed one


_DIGEST_COLUMNS = "t.number, t.subject, t.status, t.owner"


def _digest_tickets(
    conn: sqlite3.Connection, sql: str, params: Sequence[object], limit: int
) -> tuple[int, list[DigestTicket]]:
    found = [
        DigestTicket(r["number"], r["subject"], r["status"], r["owner"], r["due"])
        for r in conn.execute(sql, params)
    ]
    return len(found), found[:limit]


def overdue_tickets(
    conn: sqlite3.Connection, unit: str, *, limit: int
) -> tuple[int, list[DigestTicket]]:
    """Tickets of `unit` that wait on us and whose latest promise was missed, with no
    public update since it was due; their count and the first `limit`, most late first."""
    return _digest_tickets(
        conn,
        f"""
        SELECT {_DIGEST_COLUMNS}, c.due FROM tickets t JOIN commitments c ON c.ticket = t.number
        WHERE t.unit = ? AND t.status IN ('new', 'open') AND c.state = 'missed'
          AND c.id = (SELECT max(id) FROM commitments WHERE ticket = t.number)
          AND (t.last_public_update_at IS NULL OR t.last_public_update_at <= c.due)
        ORDER BY c.due, t.number
        """,
        (unit,),
        limit,
    )


def due_between(
    conn: sqlite3.Connection, unit: str, *, start: str, end: str, limit: int
) -> tuple[int, list[DigestTicket]]:
    """Tickets of `unit` whose open promise falls due in [start, end), soonest first."""
    return _digest_tickets(
        conn,
        f"""
        SELECT {_DIGEST_COLUMNS}, c.due FROM commitments c JOIN tickets t ON t.number = c.ticket
        WHERE c.state = 'open' AND c.due >= ? AND c.due < ? AND t.unit = ?
          AND t.status IN ('new', 'open')
        ORDER BY c.due, t.number
        """,
        (start, end, unit),
        limit,
    )


def new_tickets(
    conn: sqlite3.Connection, unit: str, *, limit: int
) -> tuple[int, list[DigestTicket]]:
    """Tickets of `unit` nobody has answered yet (status new), oldest first."""
    return _digest_tickets(
        conn,
        f"""
        SELECT {_DIGEST_COLUMNS}, t.next_update_due AS due FROM tickets t
        WHERE t.unit = ? AND t.status = 'new' ORDER BY t.created_at, t.number
        """,
        (unit,),
        limit,
    )


def unassigned_tickets(
    conn: sqlite3.Connection, unit: str, *, limit: int
) -> tuple[int, list[DigestTicket]]:
    """Tickets of `unit` that wait on us and have no owner, soonest due first."""
    return _digest_tickets(
        conn,
        f"""
        SELECT {_DIGEST_COLUMNS}, t.next_update_due AS due FROM tickets t
        WHERE t.unit = ? AND t.status IN ('new', 'open') AND t.owner IS NULL
        ORDER BY t.next_update_due IS NULL, t.next_update_due, t.number
        """,
        (unit,),
        limit,
    )


def digest_sent_on(conn: sqlite3.Connection, unit: str) -> str | None:
    """The local date (YYYY-MM-DD) of the unit's last digest, or None."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_digest_key(unit),)).fetchone()
    return None if row is None else str(row["value"])


def mark_digest_sent(conn: sqlite3.Connection, unit: str, day: str) -> bool:
    """Record the unit's digest of `day`; False if that day's was already recorded."""
    if digest_sent_on(conn, unit) == day:
        return False
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (_digest_key(unit), day),
    )
    return True


def _digest_key(unit: str) -> str:
    return f"digest_sent:{unit}"
