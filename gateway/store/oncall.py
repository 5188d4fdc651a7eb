"""The on-call rota and the pages sent (migration 10, issue 12).

A shift says who answers pages from `starts_at` until `ends_at` (UTC ISO times, the end
excluded), for one unit or, with unit NULL, for the whole desk. A unit's own shifts come
first: the desk-wide rota is who covers a unit that has nobody of its own at that time.
The rota is kept by `gateway oncall add/remove/import` (gateway/actions/oncall.py); the
pages are written by intake and the scheduler in the transaction that queues them.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True)
class Shift:
    id: int
    address: str
    unit: str | None  # None: desk-wide
    starts_at: str
    ends_at: str
    source: str
    created_by: str
    created_at: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Shift:
        return cls(
            id=row["id"],
            address=row["address"],
            unit=row["unit"],
            starts_at=row["starts_at"],
            ends_at=row["ends_at"],
            source=row["source"],
            created_by=row["created_by"],
            created_at=row["created_at"],
        )


_SHIFT_COLUMNS = "id, address, unit, starts_at, ends_at, source, created_by, created_at"


def on_call(conn: sqlite3.Connection, unit: str | None, at: str) -> list[Shift]:
    """The shifts covering `unit` at UTC time `at` (ISO, as the clock writes it): the
    unit's own if it has any then, else the desk-wide ones; earliest start first. With
    unit None, only the desk-wide rota."""
    rows = conn.execute(
        f"SELECT {_SHIFT_COLUMNS} FROM oncall_shifts "
        "WHERE starts_at <= ? AND ends_at > ? AND (unit IS ? OR unit IS NULL) "
        "ORDER BY unit IS NULL, starts_at, id",
        (at, at, unit),
    ).fetchall()
    shifts = [Shift.from_row(r) for r in rows]
    own = [s for s in shifts if s.unit is not None]
    return own or shifts


def add_shift(
    conn: sqlite3.Connection,
    *,
    address: str,
    unit: str | None,
    starts_at: str,
    ends_at: str,
    source: str,
    created_by: str,
    created_at: str,
) -> Shift:
    """A new shift; the caller has checked its address, unit and span."""
    cursor = conn.execute(
        "INSERT INTO oncall_shifts (address, unit, starts_at, ends_at, source, created_by, "
        "created_at) VALUES (?,?,?,?,?,?,?)",
        (address, unit, starts_at, ends_at, source, created_by, created_at),
    )
    shift_id = cursor.lastrowid
    assert shift_id is not None
    return Shift(shift_id, address, unit, starts_at, ends_at, source, created_by, created_at)


def find_shift(conn: sqlite3.Connection, shift_id: int) -> Shift | None:
    row = conn.execute(
        f"SELECT {_SHIFT_COLUMNS} FROM oncall_shifts WHERE id = ?", (shift_id,)
    ).fetchone()
    return None if row is None else Shift.from_row(row)


def remove_shift(conn: sqlite3.Connection, shift_id: int) -> bool:
    return conn.execute("DELETE FROM oncall_shifts WHERE id = ?", (shift_id,)).rowcount > 0


def list_shifts(
    conn: sqlite3.Connection, *, ending_after: str | None, unit: str | None = None
) -> list[Shift]:
    """Shifts by start time: those that end after `ending_after` (None: all, past ones
    too); with `unit`, only that unit's own."""
    clauses, params = [], []
    if ending_after is not None:
        clauses.append("ends_at > ?")
        params.append(ending_after)
    if unit is not None:
        clauses.append("unit = ?")
        params.append(unit)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT {_SHIFT_COLUMNS} FROM oncall_shifts {where} ORDER BY starts_at, id"
    return [Shift.from_row(r) for r in conn.execute(sql, params)]


def remove_shifts_from(conn: sqlite3.Connection, source: str, unit: str | None) -> int:
    """Delete the shifts one source (an imported event, 'ical:<UID>') made for `unit`
    (None: the desk-wide rota); returns how many. A re-import replaces them this way."""
    cursor = conn.execute(
        "DELETE FROM oncall_shifts WHERE source = ? AND unit IS ?", (source, unit)
    )
    return cursor.rowcount
