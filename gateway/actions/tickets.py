"""Ticket actions: a staff reply or note, a status change, a client writing again, a new
ticket. Mail (the pipeline) and the CLI call the same function; each writes its audit
event with one shape of detail (the `detail_*` builders below).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from ..model import MessageKind, Status, TicketRef, Via
from ..notify import Planner
from ..store.events import EventAction, record_event
from ..store.messages import Filing, StoredMessage, insert_message
from ..store.tickets import (
    add_participant,
    create_ticket,
    set_ticket_organisation,
    set_ticket_status,
    ticket_mail_info,
    update_ticket,
)
from . import mail
from .errors import ActionError

# How a caller stores the message an action files (inserts it, or files a stored row).
Save = Callable[[Filing], int]

# A client writing again to a ticket that waits on them, or was solved, reopens it.
REOPENS = frozenset({Status.PENDING, Status.SOLVED})


def is_note(text: str) -> bool:
    """Staff text whose first line starts "#note" is an internal note, never sent."""
    return text.lstrip().lower().startswith("#note")


# --- the audit details, one shape per action ---------------------------------------------


# "message" is the stored reply (the staff's mail, or the mail the CLI sent the client);
# "from" the staff address (the event's actor is who did it: that address for mail,
# cli:<user> for the CLI). "from" is a keyword, hence the functional TypedDicts.
TicketReplied = TypedDict(
    "TicketReplied",
    {"message": int, "from": str | None, "from_status": str | None, "to_status": str},
)


def detail_ticket_replied(
    message: int, staff: str | None, old: str | None, new: str
) -> TicketReplied:
    return {"message": message, "from": staff, "from_status": old, "to_status": new}


class TicketNoted(TypedDict):
    message: int
    released: bool  # released from the quarantine (so filed as a note, never sent)


def detail_ticket_noted(message: int, released: bool) -> TicketNoted:
    return {"message": message, "released": released}


TicketStatusChanged = TypedDict(
    "TicketStatusChanged", {"from": str, "to": str, "reason": str | None}
)


def detail_ticket_status(old: str, new: str, reason: str | None) -> TicketStatusChanged:
    return {"from": old, "to": new, "reason": reason}


TicketReopened = TypedDict("TicketReopened", {"from": str, "to": str})


def detail_ticket_reopened(old: Status) -> TicketReopened:
    return {"from": old.value, "to": Status.OPEN.value}


class TicketCreated(TypedDict):
    message: int
    unit: str
    follows: int | None


def detail_ticket_created(message: int, unit: str, follows: int | None) -> TicketCreated:
    return {"message": message, "unit": unit, "follows": follows}


# --- staff write into a ticket -------------------------------------------------------------


@dataclass(frozen=True)
class StaffWrote:
    kind: MessageKind  # NOTE or STAFF
    message: int  # the stored note or reply
    filing: Filing  # how it was filed
    status: str | None  # the ticket's status afterwards (a reply sets it)


def staff_wrote(
    conn: sqlite3.Connection,
    planner: Planner,
    *,
    ticket: int,
    text: str,
    staff: str | None,
    actor: str,
    now: str,
    status: str = Status.PENDING.value,
    save: Save | None = None,
    via: Via = Via.CLI,
    released: bool = False,
) -> StaffWrote:
    """Staff writing into a ticket, by mail or with `gateway tickets reply`: a public reply
    the client receives (the ticket then waits on them), or, with "#note" as its first line,
    an internal note.

    `save` stores the staff's own mail (filed with `via`); without it (the CLI) a note is
    stored as a note of its own and a reply exists only as the mail to the client, so it
    is refused (ActionError) when that mail cannot go. Mail already accepted cannot be
    refused: a reply that cannot go is audited as withheld.

    Mail an admin released from the quarantine (`released`) is always a note: it was held
    because nothing proved a staff member wrote it, and a release vouches that it may be
    filed, not that its text may go to the client in the desk's name.
    """
    if ticket_mail_info(conn, ticket) is None:
        raise ActionError(f"no ticket #{ticket}")
    if released or is_note(text):
        author = staff or "<>"
        if save is None:
            save = note_saver(conn, text, author, now)
        filing = Filing(ticket, MessageKind.NOTE, via)
        update_ticket(conn, ticket, now=now)
        row = save(filing)
        # A note is the staff member's own words: they are its actor, by mail or CLI.
        record_event(
            conn,
            time=now,
            actor=author,
            action=EventAction.TICKET_NOTED,
            subject=f"ticket:{ticket}",
            ticket=ticket,
            detail=dict(detail_ticket_noted(row, released)),
        )
        return StaffWrote(MessageKind.NOTE, row, filing, None)
    if save is None:
        # Typed at the CLI: nothing is stored unless the mail to the client can go.
        plan = planner.staff_reply(conn, ticket, text, staff, now)
        if plan.why_not is not None:
            raise ActionError(f"cannot send the reply to #{ticket}: {plan.why_not}")
        [row] = mail.write(conn, plan)
        old = set_ticket_status(conn, ticket, status, now)
        _replied(conn, ticket, row, staff, actor, old, status, now)
        return StaffWrote(MessageKind.STAFF, row, plan.mail[0].filing, status)
    filing = Filing(ticket, MessageKind.STAFF, via)
    row = save(filing)
    old = set_ticket_status(conn, ticket, status, now)
    _replied(conn, ticket, row, staff, actor, old, status, now)
    mail.write(conn, planner.staff_reply(conn, ticket, text, staff, now))
    return StaffWrote(MessageKind.STAFF, row, filing, status)


def _replied(
    conn: sqlite3.Connection,
    ticket: int,
    row: int,
    staff: str | None,
    actor: str,
    old: str | None,
    new: str,
    now: str,
) -> None:
    record_event(
        conn,
        time=now,
        actor=actor,
        action=EventAction.TICKET_REPLIED,
        subject=f"ticket:{ticket}",
        ticket=ticket,
        detail=dict(detail_ticket_replied(row, staff, old, new)),
    )


def note_saver(conn: sqlite3.Connection, text: str, author: str, now: str) -> Save:
    """How a note written with the CLI is stored: a message of its own, never sent."""
    raw = text.encode("utf-8")
    record = StoredMessage(
        queue_id=f"note-{secrets.token_hex(8)}",
        received_at=now,
        mail_from=author,
        rcpt_to=(),
        peer="cli",
        helo="",
        raw=raw,
        sha256=hashlib.sha256(raw).hexdigest(),
        message_id=None,
        from_header=author,
        subject=None,
        date_header=None,
        malformed=None,
        defects=(),
        sender=author,
        text=text,
    )
    return lambda filing: insert_message(conn, record, filing)


# --- status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusChanged:
    old: str
    new: str
    changed: bool
    why_not: str | None  # why the client is not told (None: a mail is queued)


def set_status(
    conn: sqlite3.Connection,
    planner: Planner,
    *,
    ticket: int,
    status: str,
    actor: str,
    now: str,
    reason: str | None = None,
) -> StatusChanged:
    """Change a ticket's status; a solved or reopened ticket tells its client."""
    old = set_ticket_status(conn, ticket, status, now)
    if old is None:
        raise ActionError(f"no ticket #{ticket}")
    if old == status:
        return StatusChanged(old, status, False, None)
    record_event(
        conn,
        time=now,
        actor=actor,
        action=EventAction.TICKET_STATUS,
        subject=f"ticket:{ticket}",
        ticket=ticket,
        detail=dict(detail_ticket_status(old, status, reason)),
    )
    plan = planner.status_change(conn, ticket, old, status, now)
    # A status change the client is not told about is said on the command line, not
    # audited as withheld mail.
    for planned in plan.mail:
        mail.queue(conn, planned)
    return StatusChanged(old, status, True, plan.why_not)


# --- a client's mail -------------------------------------------------------------------------


def client_wrote(
    conn: sqlite3.Connection,
    ticket: TicketRef,
    *,
    sender: str | None,
    actor: str,
    now: str,
) -> None:
    """A client's mail threaded into a ticket: they take part, and a ticket that waits on
    them or was solved is open again."""
    reopen = ticket.status in REOPENS
    update_ticket(conn, ticket.number, now=now, status=Status.OPEN if reopen else None)
    if sender:
        add_participant(conn, ticket.number, sender)
    if reopen:
        record_event(
            conn,
            time=now,
            actor=actor,
            action=EventAction.TICKET_REOPENED,
            subject=f"ticket:{ticket.number}",
            ticket=ticket.number,
            detail=dict(detail_ticket_reopened(ticket.status)),
        )


@dataclass(frozen=True)
class Opened:
    ticket: int
    message: int


def open_ticket(
    conn: sqlite3.Connection,
    *,
    unit: str,
    mailbox: str,
    requester: str,
    subject: str,
    organisation: int | None,
    follows: int | None,
    via: Via,
    kind: MessageKind,
    save: Save,
    actor: str,
    now: str,
) -> Opened:
    """A new ticket for a message (its first), in its organisation's unit or the
    mailbox's. The acknowledgement is the caller's to plan (it knows the message)."""
    number = create_ticket(
        conn,
        unit=unit,
        mailbox=mailbox,
        requester=requester,
        subject=subject,
        now=now,
        follows=follows,
    )
    if organisation is not None:
        set_ticket_organisation(conn, number, organisation)
    row = save(Filing(number, kind, via))
    record_event(
        conn,
        time=now,
        actor=actor,
        action=EventAction.TICKET_CREATED,
        subject=f"ticket:{number}",
        ticket=number,
        detail=dict(detail_ticket_created(row, unit, follows)),
    )
    return Opened(number, row)
