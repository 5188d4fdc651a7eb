"""Outgoing mail an admin acts on: make a failed or waiting mail due now.

`retry` only changes the row (and records who asked); the running daemon sends it at its
next poll, within [delivery] poll_interval seconds. (The delivery worker's own attempts
and failures are `gateway/outbox.py`'s.)
"""

from __future__ import annotations

import sqlite3
from typing import Any, NotRequired, TypedDict

from ..store.events import EventAction, record_event
from ..store.outbox import find_outbox, retry_outbox
from .errors import ActionError


class OutboxRetried(TypedDict):
    to: str
    status: str
    attempts: int
    last_error: str | None
    reason: NotRequired[str]  # only when one was given


def detail_outbox_retried(row: dict[str, Any], reason: str | None) -> OutboxRetried:
    detail: OutboxRetried = {
        "to": row["to"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
    }
    if reason:
        detail["reason"] = reason
    return detail


def retry(
    conn: sqlite3.Connection, outbox_id: int, *, actor: str, now: str, reason: str | None = None
) -> dict[str, Any]:
    """Make an outbox row due now (its attempts so far are kept); returns the row as it was."""
    row = find_outbox(conn, outbox_id)
    if row is None:
        raise ActionError(f"no outbox row {outbox_id}")
    if row["status"] == "sent":
        raise ActionError(f"outbox row {outbox_id} was already sent")
    retry_outbox(conn, outbox_id, now=now)
    record_event(
        conn,
        time=now,
        actor=actor,
        action=EventAction.OUTBOX_RETRIED,
        subject=f"outbox:{outbox_id}",
        ticket=row["ticket"],
        detail=dict(detail_outbox_retried(row, reason)),
    )
    return row
