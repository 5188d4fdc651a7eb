"""The audit trail: one row per thing a person or the daemon did."""

from __future__ import annotations

import json
import sqlite3
from enum import StrEnum
from typing import Any


class EventAction(StrEnum):
    """Every action the audit trail records: who did what, to which ticket, sender,
    organisation, quarantine entry or mail. The stored value is the dotted name."""

    COMMITMENT_MET = "commitment.met"
    COMMITMENT_MISSED = "commitment.missed"
    COMMITMENT_REMINDED = "commitment.reminded"
    COMMITMENT_SET = "commitment.set"
    # The scheduler's (issue 11): a promise reminded of, missed (and escalated), a unit's
    # digest of the day sent.
    # Issue 13: `gateway restore` put a backup in place of the database (who, from where).
    DATABASE_RESTORED = "database.restored"
    DIGEST_SENT = "digest.sent"
    MAIL_QUEUED = "mail.queued"
    MAIL_WITHHELD = "mail.withheld"
    MESSAGE_FLAGGED = "message.flagged"
    # Issue 13: one event per retention pass that purged something (counts, the cut-off).
    MESSAGES_PURGED = "messages.purged"
    # Issue 12: the on-call rota (a shift added, removed, a calendar imported) and pages:
    # a page sent, acknowledged (by reply, #take or `oncall ack`), escalated to the next step.
    ONCALL_ACKNOWLEDGED = "oncall.acknowledged"
    ONCALL_ADDED = "oncall.added"
    ONCALL_ESCALATED = "oncall.escalated"
    ONCALL_IMPORTED = "oncall.imported"
    ONCALL_PAGED = "oncall.paged"
    ONCALL_REMOVED = "oncall.removed"
    ORG_ADDED = "org.added"
    ORG_REMOVED = "org.removed"
    ORG_UPDATED = "org.updated"
    OUTBOX_FAILED = "outbox.failed"
    OUTBOX_RETRIED = "outbox.retried"
    QUARANTINE_DISCARDED = "quarantine.discarded"
    QUARANTINE_EXPIRED = "quarantine.expired"
    QUARANTINE_HELD = "quarantine.held"
    QUARANTINE_RELEASED = "quarantine.released"
    RECIPIENT_UNDELIVERABLE = "recipient.undeliverable"
    SENDER_ADDED = "sender.added"
    SENDER_BLOCKED = "sender.blocked"
    SENDER_REMOVED = "sender.removed"
    SENDER_UPDATED = "sender.updated"
    SENDERS_IMPORTED = "senders.imported"
    TICKET_ASSIGNED = "ticket.assigned"
    # Issue 12 item 5: a client's mail read as upset (the rule table's reasons), and staff
    # clearing the mark (`gateway tickets calm`).
    TICKET_CALMED = "ticket.calmed"
    TICKET_CREATED = "ticket.created"
    TICKET_NOTED = "ticket.noted"
    # Issue 12: a ticket became urgent (by its mail's urgency rules or by staff), once per
    # change; staff set its priority back to normal.
    TICKET_PRIORITY = "ticket.priority"
    TICKET_REOPENED = "ticket.reopened"
    TICKET_REPLIED = "ticket.replied"
    TICKET_STATUS = "ticket.status"
    TICKET_URGENT = "ticket.urgent"
    TICKET_UPSET = "ticket.upset"


def record_event(
    conn: sqlite3.Connection,
    *,
    time: str,
    actor: str,
    action: EventAction,
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
