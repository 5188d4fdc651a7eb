"""Writing what a plan returns: the mail it queues and the mail it withholds.

`notify.Planner` decides and builds (reading the caps, the ticket, undeliverable
addresses); this writes, in the caller's transaction, so a mail is queued exactly when the
change that earned it commits (transactional outbox). Every queued mail leaves a
`mail.queued` event and every withheld one a `mail.withheld` event.
"""

from __future__ import annotations

import sqlite3
from typing import NotRequired, TypedDict

from ..notify import Plan, PlannedMail, Withheld
from ..store.events import EventAction, record_event
from ..store.messages import insert_planned_mail
from ..store.outbox import queue_mail
from ..store.tickets import set_acknowledged


class MailQueuedDetail(TypedDict):
    kind: str
    to: str
    message_id: str


def detail_mail_queued(mail: PlannedMail) -> MailQueuedDetail:
    return {"kind": mail.kind.value, "to": mail.spec.to, "message_id": mail.spec.message_id}


class MailWithheldDetail(TypedDict):
    kind: str
    # Admin notices name the admins a cap held back (one event for all of them).
    to: NotRequired[list[str]]
    why: str
    cap: NotRequired[int | None]
    reasons: NotRequired[list[str]]


def detail_mail_withheld(withheld: Withheld) -> MailWithheldDetail:
    if withheld.to is None:
        return {"kind": withheld.kind.value, "why": withheld.why}
    return {
        "kind": withheld.kind.value,
        "to": list(withheld.to),
        "why": withheld.why,
        "cap": withheld.cap,
        "reasons": list(withheld.reasons),
    }


def write(conn: sqlite3.Connection, plan: Plan) -> list[int]:
    """Queue a plan's mail and audit what it withholds; returns the mail's message rows."""
    rows = [queue(conn, mail) for mail in plan.mail]
    if plan.withheld is not None:
        withhold(conn, plan.withheld)
    return rows


def queue(conn: sqlite3.Connection, mail: PlannedMail) -> int:
    """One planned mail: its outgoing message row, its outbox row, its event."""
    now = mail.record.received_at
    row = insert_planned_mail(conn, mail.record, mail.filing, mail.spec.to_json())
    queue_mail(
        conn,
        message_row=row,
        ticket=mail.ticket,
        kind=mail.kind.value,
        automatic=mail.automatic,
        mail_from=mail.record.mail_from,
        rcpt_to=mail.spec.to,
        subject=mail.spec.subject,
        message_id=mail.spec.message_id,
        now=now,
    )
    record_event(
        conn,
        time=now,
        actor="gateway",
        action=EventAction.MAIL_QUEUED,
        subject=f"message:{row}",
        ticket=mail.ticket,
        detail=dict(detail_mail_queued(mail)),
    )
    if mail.acknowledges and mail.ticket is not None:
        set_acknowledged(conn, mail.ticket)
    return row


def withhold(conn: sqlite3.Connection, withheld: Withheld) -> None:
    record_event(
        conn,
        time=withheld.time,
        actor="gateway",
        action=EventAction.MAIL_WITHHELD,
        subject=withheld.subject,
        ticket=withheld.ticket,
        detail=dict(detail_mail_withheld(withheld)),
    )
