"""Paging (issue 12 items 3 and 4): an urgent ticket out of hours wakes someone up.

- **At intake** (`page_at_intake`, from `actions/intake.py` in the message's transaction):
  client mail that makes (or finds) its ticket urgent, arriving outside its unit's
  business hours, from an organisation with out-of-hours cover (`organisations.
  out_of_hours`), pages step 0 at once: everyone on the rota for the unit then
  (`store.oncall.on_call`), else the unit's `secondary` (else `[oncall] secondary`),
  else its `lead`.
- **Escalation** (`escalate`, a scheduler job): a page not acknowledged by its `ack_due`
  (`[oncall] ack_within` of wall-clock time after it was sent) pages step 1 (the
  secondary), then step 2 (the lead). A step with nobody (left) to page is skipped and
  audited as withheld mail (`no-recipient`), once.
- **Acknowledgement** (`acknowledge`): a reply to the page by one it was sent to (proven
  staff mail, like any staff action; filed as a note, never sent on to the client),
  `#take` on the ticket, or `gateway oncall ack NUMBER`. Nothing is paged after it.

Every page is one `pages` row (UNIQUE per ticket and step: once, across restarts), its
mail (notify.Planner.page: never a client, never our own mailbox), an `oncall.paged` (step
0) or `oncall.escalated` event, and with `[oncall] webhook` set an outbox row of kind
`page-webhook` whose stored bytes are the JSON document the outbox POSTs (outbox.py).
All written in the one transaction that decided to page.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict

from ..classify import Kind as Classification
from ..clock import iso
from ..notify import Planner, new_message_id
from ..store.events import EventAction, record_event
from ..store.messages import StoredMessage, insert_message
from ..store.oncall import on_call
from ..store.outbox import queue_mail
from ..store.pages import (
    LAST_STEP,
    WEBHOOK_KIND,
    acknowledge_pages,
    insert_page,
    organisation_out_of_hours,
    page_message,
    ticket_pages,
)
from ..store.tickets import ticket_desk_info, ticket_priority
from . import mail

log = logging.getLogger("gateway")

STEP_NAMES = {0: "on-call", 1: "secondary", 2: "lead"}


class PageDetail(TypedDict):
    step: int
    to: list[str]
    reasons: list[str]
    ack_due: str
    webhook: bool


class AcknowledgedDetail(TypedDict):
    by: str
    how: str  # reply, take, cli
    steps: list[int]


class SkippedDetail(TypedDict):
    kind: str
    why: str
    step: int


@dataclass(frozen=True)
class Paged:
    """One step paged (or skipped: `to` empty)."""

    ticket: int
    unit: str
    step: int
    to: tuple[str, ...]
    ack_due: str


def step_addresses(
    planner: Planner, unit_name: str, step: int, conn: sqlite3.Connection, at: str
) -> list[str]:
    """Who a step pages: 0 the rota (else the secondary, else the lead), 1 the secondary,
    2 the lead ([]: nobody configured)."""
    unit = planner.config.unit(unit_name)
    secondary = unit.secondary or planner.config.oncall.secondary
    if step == 0:
        rota = list(dict.fromkeys(s.address for s in on_call(conn, unit_name, at)))
        return rota or [a for a in (secondary or unit.lead,) if a]
    if step == 1:
        return [secondary] if secondary else []
    return [unit.lead] if unit.lead else []


def page_at_intake(
    conn: sqlite3.Connection,
    planner: Planner,
    *,
    ticket: int,
    record: StoredMessage,
    now: str,
) -> bool:
    """Page step 0 for a client's mail just filed on `ticket`, when it should be; True when
    someone is (or already was) paged for the ticket: what the acknowledgement may say."""
    if record.classification != Classification.NORMAL or not record.sender:
        return False  # automatic mail never pages (it is never urgent either)
    if planner.config.is_staff(record.sender):
        return False
    found = ticket_priority(conn, ticket)
    info = ticket_desk_info(conn, ticket)
    if found is None or found[0] != "urgent" or info is None:
        return False
    if planner.config.unit(info["unit"]).hours.is_open(datetime.fromisoformat(now)):
        return False  # the desk is open: the urgent promise is the staff's to keep
    if not organisation_out_of_hours(conn, ticket):
        return False
    pages = ticket_pages(conn, ticket)
    if pages:
        return any(p.address for p in pages)  # step 0 happens once per ticket
    addresses = step_addresses(planner, info["unit"], 0, conn, now)
    if not addresses:
        log.warning("event=oncall.nobody ticket=%d unit=%s step=0", ticket, info["unit"])
        return False
    paged = _page(conn, planner, ticket, info["unit"], 0, addresses, found[1], now)
    return bool(paged.to)


def _page(
    conn: sqlite3.Connection,
    planner: Planner,
    ticket: int,
    unit: str,
    step: int,
    addresses: Sequence[str],
    reasons: Sequence[str],
    now: str,
) -> Paged:
    """Page one step (plan, row, mail, webhook, event); a step nobody can be paged for is
    written as skipped (address "") and audited as withheld."""
    ack_due = iso(datetime.fromisoformat(now) + planner.config.oncall.ack_within_wall)
    plan = planner.page(
        conn, ticket, addresses, step=step, reasons=reasons, ack_due=ack_due, now=now
    )
    to = [m.spec.to for m in plan.mail]
    if (
        insert_page(
            conn, ticket=ticket, step=step, addresses=to, reasons=reasons, now=now, ack_due=ack_due
        )
        is None
    ):
        return Paged(ticket, unit, step, (), ack_due)  # this step was paged already
    if not to:
        log.warning("event=oncall.nobody ticket=%d unit=%s step=%d", ticket, unit, step)
        detail: SkippedDetail = {"kind": "page", "why": "no-recipient", "step": step}
        record_event(
            conn,
            time=now,
            actor="gateway",
            action=EventAction.MAIL_WITHHELD,
            subject=f"ticket:{ticket}",
            ticket=ticket,
            detail=dict(detail),
        )
        return Paged(ticket, unit, step, (), ack_due)
    mail.write(conn, plan)
    webhook = planner.config.oncall.webhook
    if webhook:
        _queue_webhook(conn, planner, ticket, step, to, reasons, ack_due, now, webhook)
    page_detail: PageDetail = {
        "step": step,
        "to": to,
        "reasons": list(reasons),
        "ack_due": ack_due,
        "webhook": bool(webhook),
    }
    record_event(
        conn,
        time=now,
        actor="gateway",
        action=EventAction.ONCALL_PAGED if step == 0 else EventAction.ONCALL_ESCALATED,
        subject=f"ticket:{ticket}",
        ticket=ticket,
        detail=dict(page_detail),
    )
    return Paged(ticket, unit, step, tuple(to), ack_due)


def webhook_document(
    conn: sqlite3.Connection,
    ticket: int,
    step: int,
    to: Sequence[str],
    reasons: Sequence[str],
    ack_due: str,
) -> dict[str, object]:
    """The JSON a page POSTs: what it is about, whom it paged, by when to acknowledge. No
    client words beyond the subject, no client address."""
    info = ticket_desk_info(conn, ticket) or {}
    subject = conn.execute("SELECT subject FROM tickets WHERE number = ?", (ticket,)).fetchone()
    return {
        "ticket": ticket,
        "organisation": info.get("organisation") or "",
        "subject": subject["subject"] if subject is not None else "",
        "reasons": list(reasons),
        "step": step,
        "address": ", ".join(to),
        "ack_due": ack_due,
    }


def _queue_webhook(
    conn: sqlite3.Connection,
    planner: Planner,
    ticket: int,
    step: int,
    to: Sequence[str],
    reasons: Sequence[str],
    ack_due: str,
    now: str,
    url: str,
) -> None:
    """The page's POST as an outbox row of its own: the body is stored as the row's
    message bytes (not filed on the ticket: it is no mail), so the outbox retries it like
    any mail and the admin can read exactly what was sent."""
    body = json.dumps(webhook_document(conn, ticket, step, to, reasons, ack_due)).encode()
    message_id = new_message_id(planner.config.smtp.hostname, ticket)
    record = StoredMessage(
        queue_id=f"out-{secrets.token_hex(8)}",
        received_at=now,
        mail_from="",
        rcpt_to=(url,),
        peer="",
        helo="",
        raw=body,
        sha256=hashlib.sha256(body).hexdigest(),
        message_id=message_id,
        from_header=None,
        subject=f"page {ticket} step {step}",
        date_header=None,
        malformed=None,
        defects=(),
        direction="out",
        classification="auto-reply",
        reasons=(WEBHOOK_KIND,),
    )
    row = insert_message(conn, record, None)
    queue_mail(
        conn,
        message_row=row,
        ticket=ticket,
        kind=WEBHOOK_KIND,
        automatic=False,
        mail_from="",
        rcpt_to=url,
        subject=record.subject or "",
        message_id=message_id,
        now=now,
    )


def escalate(conn: sqlite3.Connection, planner: Planner, ticket: int, now: str) -> Paged | None:
    """Page the next step of a ticket whose latest page is past its ack_due with no
    acknowledgement (re-read here, in the job's transaction); None if nothing is due. A
    step with nobody to page, or only people already paged, is skipped to the next."""
    pages = ticket_pages(conn, ticket)
    if not pages or any(p.acknowledged_at for p in pages):
        return None
    latest = pages[-1]
    if latest.step >= LAST_STEP or latest.ack_due > now:
        return None
    info = ticket_desk_info(conn, ticket)
    if info is None:
        return None
    already = {a for p in pages for a in p.addresses}
    for step in range(latest.step + 1, LAST_STEP + 1):
        wanted = [
            a for a in step_addresses(planner, info["unit"], step, conn, now) if a not in already
        ]
        paged = _page(conn, planner, ticket, info["unit"], step, wanted, latest.reasons, now)
        if paged.to:
            return paged
    return None  # every later step skipped (audited): nobody left to page


def acknowledge(
    conn: sqlite3.Connection, *, ticket: int, by: str, how: str, actor: str, now: str
) -> list[int]:
    """Acknowledge the ticket's open pages (`how`: reply, take, cli); the steps it
    acknowledged ([] when none was waiting: nothing is audited)."""
    steps = acknowledge_pages(conn, ticket, by=by, now=now)
    if steps:
        detail: AcknowledgedDetail = {"by": by, "how": how, "steps": steps}
        record_event(
            conn,
            time=now,
            actor=actor,
            action=EventAction.ONCALL_ACKNOWLEDGED,
            subject=f"ticket:{ticket}",
            ticket=ticket,
            detail=dict(detail),
        )
    return steps


def replies_to_page(
    conn: sqlite3.Connection, ticket: int, references: Sequence[str], sender: str | None
) -> bool:
    """Staff mail on `ticket` that cites one of our page Message-IDs, from one it was sent
    to: a reply to the page (its acknowledgement)."""
    if not sender:
        return False
    recipients = page_message(conn, ticket, references)
    return recipients is not None and sender.lower() in recipients
