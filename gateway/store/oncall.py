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
