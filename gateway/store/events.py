"""The audit trail: one row per thing a person or the daemon did."""

from __future__ import annotations

import json
import sqlite3
from typing import Any


def record_event(
    conn: sqlite3.Connection,
    *,
    time: str,
    actor: str,
    action: str,
    subject: str,
    ticket: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        "INSERT INTO events (time, actor, action, subject, ticket, detail) VALUES (?,?,?,?,?,?)",
        (time, actor, action, subject, ticket, json.dumps(detail or {}, ensure_ascii=False)),
    )


def list_events(
    conn: sqlite3.Connection, *, ticket: int | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Audit events, newest first, as the `events --json` objects."""
    sql = "SELECT id, time, actor, action, subject, ticket, detail FROM events"
    params: list[Any] = []
    if ticket is not None:
        sql += " WHERE ticket = ?"
        params.append(ticket)
    sql += " ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [
        {
            "id": row["id"],
            "time": row["time"],
            "actor": row["actor"],
            "action": row["action"],
            "subject": row["subject"],
            "ticket": row["ticket"],
            "detail": json.loads(row["detail"]),
        }
        for row in conn.execute(sql, params)
    ]
