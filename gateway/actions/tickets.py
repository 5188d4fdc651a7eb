"""Ticket actions: a staff reply or note, a status change, a client writing again, a new
ticket. Mail (the pipeline) and the CLI call the same function; each writes its audit
event with one shape of detail (the `detail_*` builders below).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict

from ..businesstime import BusinessTimeError, when
from ..clock import iso
from ..model import MessageKind, Status, TicketRef, Via
from ..notify import Planner
from ..store.commitments import close_commitment, current_commitment, set_commitment
from ..store.events import EventAction, record_event
from ..store.messages import Filing, StoredMessage, insert_message
from ..store.tickets import (
    add_participant,
    calm_ticket,
    create_ticket,
    mark_upset,
    set_last_public_update,
    set_ticket_organisation,
    set_ticket_owner,
    set_ticket_priority,
    set_ticket_status,
    set_upset_notified,
    ticket_desk_info,
    ticket_mail_info,
    ticket_priority,
    update_ticket,
    upset_state,
)
from ..upset import UpsetFacts, UpsetVerdict
from ..upset import decide as decide_upset
from . import mail, paging
from .errors import ActionError

# How a caller stores the message an action files (inserts it, or files a stored row).
Save = Callable[[Filing], int]

# A client writing again to a ticket that waits on them, or was solved, reopens it.
REOPENS = frozenset({Status.PENDING, Status.SOLVED})


# A ticket in these statuses waits on us: it carries a promise (next_update_due).
WAITS_ON_US = frozenset({Status.NEW, Status.OPEN})


def _ticket_event(
    conn: sqlite3.Connection,
    action: EventAction,
    ticket: int,
    *,
    actor: str,
    now: str,
    detail: Mapping[str, Any],
) -> None:
    """Audit one action on a ticket: the event's subject is the ticket, and `events
    --ticket` lists it."""
    record_event(
        conn,
        time=now,
        actor=actor,
        action=action,
        subject=f"ticket:{ticket}",
        ticket=ticket,
        detail=dict(detail),
    )


def is_note(text: str) -> bool:
    """Staff text whose first line starts "#note" is an internal note, never sent."""
    return text.lstrip().lower().startswith("#note")


# "#next WHEN" on a line of its own, anywhere in the staff member's own text (quoted
# history is already gone from the readable text).
_NEXT_LINE = re.compile(r"[ \t]*#next(?:[ \t]+(.*?))?[ \t]*\r?", re.IGNORECASE)
# "#urgent" on a line of its own, anywhere: the writer marks the ticket urgent (issue 12).
_URGENT_LINE = re.compile(r"[ \t]*#urgent[ \t]*\r?", re.IGNORECASE)


@dataclass(frozen=True)
class StaffCommands:
    """The command lines of staff text, and the text without them (what a client gets)."""

    take: bool  # "#take" as the first line
    next: str | None  # the WHEN of the first "#next WHEN" line ("" when it names none)
    text: str
    urgent: bool = False  # an "#urgent" line


def staff_commands(text: str) -> StaffCommands:
    """Read "#take" (the first line), "#next WHEN" and "#urgent" (any line) from staff
    text. Only ever called for mail proven to be staff's (or the CLI): from a client they
    are text."""
    body = text.strip()
    first, _, rest = body.partition("\n")
    take = first.strip().lower() == "#take"
    if take:
        body = rest
    promise: str | None = None
    urgent = False
    kept = []
    for line in body.split("\n"):
        match = _NEXT_LINE.fullmatch(line)
        if _URGENT_LINE.fullmatch(line):
            urgent = True
        elif match is None:
            kept.append(line)
        elif promise is None:
            promise = (match.group(1) or "").strip()
    return StaffCommands(take, promise, "\n".join(kept).strip(), urgent)


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


TicketAssigned = TypedDict("TicketAssigned", {"from": str | None, "to": str | None})


def detail_ticket_assigned(old: str | None, new: str | None) -> TicketAssigned:
    return {"from": old, "to": new}


class CommitmentSet(TypedDict):
    due: str
    set_by: str
    note: str | None
    # first-response (a new ticket, a client's reply that reopens one), update-every
    # (after a public update that states no promise), stated (#next, --next, commit),
    # urgent-first-response (a first response to an urgent ticket, or a promise brought
    # forward when the ticket became urgent)
    rule: str


def detail_commitment_set(due: str, set_by: str, note: str | None, rule: str) -> CommitmentSet:
    return {"due": due, "set_by": set_by, "note": note, "rule": rule}


class CommitmentMet(TypedDict):
    due: str
    at: str  # the public update that met it


def detail_commitment_met(due: str, at: str) -> CommitmentMet:
    return {"due": due, "at": at}


class TicketUrgent(TypedDict):
    reasons: list[str]  # the hits that made it urgent (urgency.py reasons, or "staff")


def detail_ticket_urgent(reasons: list[str]) -> TicketUrgent:
    return {"reasons": reasons}


TicketPriority = TypedDict("TicketPriority", {"from": str, "to": str})


def detail_ticket_priority(old: str, new: str) -> TicketPriority:
    return {"from": old, "to": new}


# --- owners and promises -----------------------------------------------------------------


def assign(
    conn: sqlite3.Connection,
    planner: Planner,
    *,
    ticket: int,
    owner: str | None,
    actor: str,
    now: str,
) -> str | None:
    """Make `owner` (a staff address; None: nobody) the ticket's owner; returns the old one."""
    if owner is not None and not planner.config.is_staff(owner):
        raise ActionError(f"{owner} is not a staff address (only staff own tickets)")
    info = ticket_desk_info(conn, ticket)
    if info is None:
        raise ActionError(f"no ticket #{ticket}")
    old: str | None = info["owner"]
    if old == owner:
        return old
    set_ticket_owner(conn, ticket, owner)
    _ticket_event(
        conn,
        EventAction.TICKET_ASSIGNED,
        ticket,
        actor=actor,
        now=now,
        detail=detail_ticket_assigned(old, owner),
    )
    return old


def promise_due(planner: Planner, unit: str, text: str, now: str) -> str:
    """The stored due time of a promise written as WHEN, in the unit's business time;
    BusinessTimeError when it is not one."""
    hours = planner.config.unit(unit).hours
    return iso(when(text, datetime.fromisoformat(now), hours))


def _rule_due(planner: Planner, unit: str, rule: str, now: str) -> str:
    config = planner.config.unit(unit)
    duration = (
        config.first_response_duration if rule == "first-response" else config.update_every_duration
    )
    return iso(config.hours.add(datetime.fromisoformat(now), duration))


def _promise(
    conn: sqlite3.Connection,
    ticket: int,
    *,
    due: str,
    set_by: str,
    note: str | None,
    rule: str,
    actor: str,
    now: str,
) -> None:
    set_commitment(conn, ticket, due=due, set_by=set_by, note=note, now=now)
    _ticket_event(
        conn,
        EventAction.COMMITMENT_SET,
        ticket,
        actor=actor,
        now=now,
        detail=detail_commitment_set(due, set_by, note, rule),
    )


def _urgent_due(planner: Planner, unit: str, now: str) -> str:
    # Wall-clock time: an outage is answered at night and at weekends too (issue 12).
    return iso(datetime.fromisoformat(now) + planner.config.unit(unit).urgent_first_response_wall)


def _first_response(
    conn: sqlite3.Connection, planner: Planner, ticket: int, unit: str, actor: str, now: str
) -> None:
    """A ticket that (again) waits on us is due an answer `first_response` after now, an
    urgent one `urgent_first_response` (wall-clock)."""
    found = ticket_priority(conn, ticket)
    if found is not None and found[0] == "urgent":
        due, rule = _urgent_due(planner, unit, now), "urgent-first-response"
    else:
        due, rule = _rule_due(planner, unit, "first-response", now), "first-response"
    _promise(
        conn,
        ticket,
        due=due,
        set_by="gateway",
        note=None,
        rule=rule,
        actor=actor,
        now=now,
    )


def mark_urgent(
    conn: sqlite3.Connection,
    planner: Planner,
    ticket: int,
    reasons: Sequence[str],
    *,
    actor: str,
    now: str,
) -> bool:
    """Make a ticket urgent for `reasons` (appended to the ones it has); True when it
    became urgent now. Becoming urgent is audited once (ticket.urgent), and a ticket
    waiting on us whose promise is later than `urgent_first_response` from now has it
    brought forward: the client reports an outage, the 4 business hours no longer hold."""
    found = ticket_priority(conn, ticket)
    if found is None:
        raise ActionError(f"no ticket #{ticket}")
    priority, known = found
    merged = list(dict.fromkeys([*known, *reasons]))
    if priority == "urgent" and merged == known:
        return False
    set_ticket_priority(conn, ticket, "urgent", merged)
    if priority == "urgent":
        return False
    _ticket_event(
        conn,
        EventAction.TICKET_URGENT,
        ticket,
        actor=actor,
        now=now,
        detail=detail_ticket_urgent(list(reasons)),
    )
    info = ticket_desk_info(conn, ticket)
    if info is not None and info["status"] in WAITS_ON_US:
        due = _urgent_due(planner, info["unit"], now)
        if info["next_update_due"] is not None and info["next_update_due"] > due:
            _promise(
                conn,
                ticket,
                due=due,
                set_by="gateway",
                note=None,
                rule="urgent-first-response",
                actor=actor,
                now=now,
            )
    return True


def set_priority(
    conn: sqlite3.Connection, planner: Planner, *, ticket: int, priority: str, actor: str, now: str
) -> bool:
    """Staff set a ticket's priority (`gateway tickets priority`); True when it changed.
    Back to normal clears the reasons: later mail is assessed afresh."""
    found = ticket_priority(conn, ticket)
    if found is None:
        raise ActionError(f"no ticket #{ticket}")
    if priority == "urgent":
        if found[0] == "urgent":
            return False
        return mark_urgent(conn, planner, ticket, ["staff"], actor=actor, now=now)
    if priority != "normal":
        raise ActionError(f"priority must be urgent or normal, got {priority!r}")
    if found[0] == "normal":
        return False
    set_ticket_priority(conn, ticket, "normal", [])
    _ticket_event(
        conn,
        EventAction.TICKET_PRIORITY,
        ticket,
        actor=actor,
        now=now,
        detail=detail_ticket_priority(found[0], "normal"),
    )
    return True


def _public_update(
    conn: sqlite3.Connection,
    planner: Planner,
    ticket: int,
    staff: str | None,
    actor: str,
    now: str,
) -> None:
    """The client heard from a person here: the promise is met (or was missed), and an
    unowned ticket is the replying staff member's from now on."""
    closed = close_commitment(conn, ticket, updated=True, now=now)
    set_last_public_update(conn, ticket, now)
    if closed is not None and closed.state == "met":
        _ticket_event(
            conn,
            EventAction.COMMITMENT_MET,
            ticket,
            actor=actor,
            now=now,
            detail=detail_commitment_met(closed.due, now),
        )
    info = ticket_desk_info(conn, ticket)
    if staff and info is not None and info["owner"] is None and planner.config.is_staff(staff):
        assign(conn, planner, ticket=ticket, owner=staff, actor=actor, now=now)


def commit(
    conn: sqlite3.Connection,
    planner: Planner,
    *,
    ticket: int,
    when_text: str,
    note: str | None,
    set_by: str,
    actor: str,
    now: str,
) -> str:
    """A promise stated with `gateway tickets commit`; returns its due time (stored form)."""
    info = ticket_desk_info(conn, ticket)
    if info is None:
        raise ActionError(f"no ticket #{ticket}")
    if info["status"] not in WAITS_ON_US:
        raise ActionError(
            f"#{ticket} is {info['status']}: only a ticket that waits on us (new, open) "
            "carries a promise"
        )
    try:
        due = promise_due(planner, info["unit"], when_text, now)
    except BusinessTimeError as exc:
        raise ActionError(str(exc)) from None
    _promise(conn, ticket, due=due, set_by=set_by, note=note, rule="stated", actor=actor, now=now)
    return due


# --- staff write into a ticket -------------------------------------------------------------


@dataclass(frozen=True)
class StaffWrote:
    kind: MessageKind  # NOTE or STAFF
    message: int  # the stored note or reply
    filing: Filing  # how it was filed
    status: str | None  # the ticket's status afterwards (a reply sets it)
    due: str | None = None  # the promise it stated, if any (stored form)


def staff_wrote(
    conn: sqlite3.Connection,
    planner: Planner,
    *,
    ticket: int,
    text: str,
    staff: str | None,
    actor: str,
    now: str,
    status: str | None = None,
    save: Save | None = None,
    via: Via = Via.CLI,
    released: bool = False,
    next_when: str | None = None,
    as_note: bool = False,
) -> StaffWrote:
    """Staff writing into a ticket, by mail or with `gateway tickets reply`: a public reply
    the client receives (the ticket then waits on them), or, with "#note" as its first line,
    an internal note.

    `save` stores the staff's own mail (filed with `via`); without it (the CLI) a note is
    stored as a note of its own and a reply exists only as the mail to the client, so it
    is refused (ActionError) when that mail cannot go. Mail already accepted cannot be
    refused: a reply that cannot go is audited as withheld.

    Command lines (`staff_commands`): "#take" first makes the writer the owner; "#next
    WHEN" (or `next_when`, the CLI's --next) states the next promise, so the ticket stays
    open, waiting on us, instead of pending. Both are stripped from what the client gets;
    a mail with nothing else in it is filed as a note. A WHEN that is not one is refused
    at the CLI; in mail it is dropped (the reply still goes; the default promise applies)
    and named in the ticket.replied event.

    `as_note`: a reply to a page (issue 12), filed as a note whatever it says.

    Mail an admin released from the quarantine (`released`) is always a note, and its
    command lines do nothing: it was held because nothing proved a staff member wrote
    it, and a release vouches that it may be filed, not that its text may go to the
    client in the desk's name nor act as staff.
    """
    info = ticket_desk_info(conn, ticket)
    if info is None or ticket_mail_info(conn, ticket) is None:
        raise ActionError(f"no ticket #{ticket}")
    commands = StaffCommands(False, None, text) if released else staff_commands(text)
    text = commands.text
    promise = next_when if next_when is not None else commands.next
    due: str | None = None
    promise_error: str | None = None
    if promise is not None:
        try:
            due = promise_due(planner, info["unit"], promise, now)
        except BusinessTimeError as exc:
            if save is None:
                raise ActionError(str(exc)) from None
            promise_error = str(exc)
    if due is not None and status is not None and status not in WAITS_ON_US:
        raise ActionError(
            f"a promise (--next) keeps #{ticket} waiting on us: it cannot be {status}"
        )
    if commands.take and staff:
        assign(conn, planner, ticket=ticket, owner=staff, actor=actor, now=now)
        # Taking the ticket acknowledges its pages (issue 12): someone has it now.
        paging.acknowledge(conn, ticket=ticket, by=staff, how="take", actor=actor, now=now)
    if commands.urgent:
        mark_urgent(conn, planner, ticket, ["staff"], actor=actor, now=now)
    if released or as_note or is_note(text) or not text:
        author = staff or "<>"
        if save is None:
            save = note_saver(conn, text, author, now)
        filing = Filing(ticket, MessageKind.NOTE, via)
        update_ticket(conn, ticket, now=now)
        row = save(filing)
        # A note is the staff member's own words: they are its actor, by mail or CLI.
        _ticket_event(
            conn,
            EventAction.TICKET_NOTED,
            ticket,
            actor=author,
            now=now,
            detail=detail_ticket_noted(row, released),
        )
        # A promise in a note is kept (the staff member's word to the desk), while the
        # ticket waits on us; a note is no update to the client, so it meets none.
        if due is not None and info["status"] in WAITS_ON_US:
            _promise(
                conn,
                ticket,
                due=due,
                set_by=author,
                note=None,
                rule="stated",
                actor=actor,
                now=now,
            )
        return StaffWrote(MessageKind.NOTE, row, filing, None, due)
    # A reply waits on the client, unless it promises more from us.
    new_status = status or (Status.OPEN.value if due is not None else Status.PENDING.value)
    if save is None:
        # Typed at the CLI: nothing is stored unless the mail to the client can go.
        plan = planner.staff_reply(conn, ticket, text, staff, now)
        if plan.why_not is not None:
            raise ActionError(f"cannot send the reply to #{ticket}: {plan.why_not}")
        [row] = mail.write(conn, plan)
        filing = plan.mail[0].filing
        old = set_ticket_status(conn, ticket, new_status, now)
        _replied(conn, ticket, row, staff, actor, old, new_status, now, promise_error)
    else:
        filing = Filing(ticket, MessageKind.STAFF, via)
        row = save(filing)
        old = set_ticket_status(conn, ticket, new_status, now)
        _replied(conn, ticket, row, staff, actor, old, new_status, now, promise_error)
        plan = planner.staff_reply(conn, ticket, text, staff, now)
        mail.write(conn, plan)
    if plan.why_not is None:
        _public_update(conn, planner, ticket, staff, actor, now)
    _after_status(conn, planner, ticket, info["unit"], new_status, actor, now, due, staff)
    return StaffWrote(MessageKind.STAFF, row, filing, new_status, due)


def _after_status(
    conn: sqlite3.Connection,
    planner: Planner,
    ticket: int,
    unit: str,
    status: str,
    actor: str,
    now: str,
    due: str | None,
    staff: str | None,
) -> None:
    """The promise a staff reply leaves: the one it stated, else `update_every` while the
    ticket waits on us; none when it waits on the client or is done."""
    if status not in WAITS_ON_US:
        close_commitment(conn, ticket, updated=False, now=now)
        return
    rule = "stated" if due is not None else "update-every"
    due = due or _rule_due(planner, unit, "update-every", now)
    _promise(
        conn, ticket, due=due, set_by=staff or actor, note=None, rule=rule, actor=actor, now=now
    )


def _replied(
    conn: sqlite3.Connection,
    ticket: int,
    row: int,
    staff: str | None,
    actor: str,
    old: str | None,
    new: str,
    now: str,
    promise_error: str | None = None,
) -> None:
    detail: dict[str, object] = dict(detail_ticket_replied(row, staff, old, new))
    if promise_error is not None:
        detail["next_error"] = promise_error  # a "#next" in mail that named no time
    _ticket_event(conn, EventAction.TICKET_REPLIED, ticket, actor=actor, now=now, detail=detail)


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
    _ticket_event(
        conn,
        EventAction.TICKET_STATUS,
        ticket,
        actor=actor,
        now=now,
        detail=detail_ticket_status(old, status, reason),
    )
    unit = ticket_desk_info(conn, ticket)
    if status not in WAITS_ON_US:
        close_commitment(conn, ticket, updated=False, now=now)
    elif old not in WAITS_ON_US and unit is not None and current_commitment(conn, ticket) is None:
        _first_response(conn, planner, ticket, unit["unit"], actor, now)
    plan = planner.status_change(conn, ticket, old, status, now)
    # A status change the client is not told about is said on the command line, not
    # audited as withheld mail.
    for planned in plan.mail:
        mail.queue(conn, planned)
    return StatusChanged(old, status, True, plan.why_not)


# --- a client's mail -------------------------------------------------------------------------


def client_wrote(
    conn: sqlite3.Connection,
    planner: Planner,
    ticket: TicketRef,
    *,
    sender: str | None,
    actor: str,
    now: str,
    urgency: Sequence[str] = (),
) -> None:
    """A client's mail threaded into a ticket: they take part, and a ticket that waits on
    them or was solved is open again, due an answer `first_response` from now (a ticket
    already waiting on us keeps its promise). Nothing a client writes sets a promise or
    an owner: "#next" and "#take" from a client are text. `urgency`: the reasons its mail
    is urgent (urgency.assess), which make the ticket urgent (`mark_urgent`)."""
    reopen = ticket.status in REOPENS
    update_ticket(conn, ticket.number, now=now, status=Status.OPEN if reopen else None)
    if sender:
        add_participant(conn, ticket.number, sender)
    if reopen:
        _ticket_event(
            conn,
            EventAction.TICKET_REOPENED,
            ticket.number,
            actor=actor,
            now=now,
            detail=detail_ticket_reopened(ticket.status),
        )
    if urgency:
        mark_urgent(conn, planner, ticket.number, urgency, actor=actor, now=now)
    info = ticket_desk_info(conn, ticket.number)
    if (
        info is not None
        and info["status"] in WAITS_ON_US
        and (reopen or info["next_update_due"] is None)
    ):
        _first_response(conn, planner, ticket.number, info["unit"], actor, now)


@dataclass(frozen=True)
class Opened:
    ticket: int
    message: int


def open_ticket(
    conn: sqlite3.Connection,
    planner: Planner,
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
    urgency: Sequence[str] = (),
) -> Opened:
    """A new ticket for a message (its first), in its organisation's unit or the
    mailbox's, due a first answer `first_response` after now (`urgent_first_response`,
    wall-clock, when `urgency` names reasons its mail is urgent). The acknowledgement and
    the staff notice are the caller's to plan (it knows the message)."""
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
    _ticket_event(
        conn,
        EventAction.TICKET_CREATED,
        number,
        actor=actor,
        now=now,
        detail=detail_ticket_created(row, unit, follows),
    )
    if urgency:
        mark_urgent(conn, planner, number, urgency, actor=actor, now=now)
    _first_response(conn, planner, number, unit, actor, now)
    return Opened(number, row)


# --- upset clients (issue 12 item 5) ---------------------------------------------------------


class TicketUpset(TypedDict):
    message: int  # the client's mail that read as upset
    score: int
    threshold: int
    reasons: list[str]
    notified: list[str]  # who was told (nobody: already told today, or nobody to tell)


def detail_ticket_upset(
    message: int, verdict: UpsetVerdict, notified: Sequence[str]
) -> TicketUpset:
    return {
        "message": message,
        "score": verdict.score,
        "threshold": verdict.threshold,
        "reasons": list(verdict.reasons),
        "notified": list(notified),
    }


class TicketCalmed(TypedDict):
    reasons: list[str]  # the reasons it had


def upset_facts(
    conn: sqlite3.Connection, ticket: int | None, record: StoredMessage, now: str
) -> UpsetFacts:
    """What the upset rules look at for a client's mail about to be filed on `ticket` (None:
    it opens one). Read before the mail is stored and before the ticket changes: chasing is
    a client message on the ticket since our last public update, overdue is our promise
    (next_update_due) already past when this one arrived."""
    state = upset_state(conn, ticket) if ticket is not None else None
    return UpsetFacts(
        subject=record.subject or "",
        text=record.text or "",
        chasing=state is not None and state.chasing,
        overdue=state is not None
        and state.next_update_due is not None
        and state.next_update_due <= now,
    )


def client_upset(
    conn: sqlite3.Connection,
    planner: Planner,
    *,
    ticket: int,
    message: int,
    record: StoredMessage,
    facts: UpsetFacts,
    actor: str,
    now: str,
) -> UpsetVerdict:
    """Ask the upset rules ([upset] phrases and threshold) about a client's mail filed on
    `ticket` as `message`. Over the threshold the ticket is marked upset (the reasons kept
    with the ones it had), a `ticket.upset` event says why, and once per ticket per day
    (the unit's local date) its account manager and owner are told."""
    config = planner.config.upset
    verdict = decide_upset(facts, phrases=config.phrases, threshold=config.threshold)
    if not verdict.upset:
        return verdict
    mark_upset(conn, ticket, verdict.reasons)
    info = ticket_desk_info(conn, ticket)
    state = upset_state(conn, ticket)
    notified: list[str] = []
    if info is not None and state is not None:
        hours = planner.config.unit(info["unit"]).hours
        today = hours.local(datetime.fromisoformat(now)).date().isoformat()
        if state.notified_on != today:
            plan = planner.upset_notice(conn, ticket, record, verdict.reasons, now)
            mail.write(conn, plan)
            notified = [m.spec.to for m in plan.mail]
            if notified:
                set_upset_notified(conn, ticket, today)
    _ticket_event(
        conn,
        EventAction.TICKET_UPSET,
        ticket,
        actor=actor,
        now=now,
        detail=detail_ticket_upset(message, verdict, notified),
    )
    return verdict


def calm(conn: sqlite3.Connection, *, ticket: int, actor: str, now: str) -> bool:
    """Staff clear a ticket's upset mark (`gateway tickets calm`); False if it was not."""
    found = calm_ticket(conn, ticket)
    if found is None:
        raise ActionError(f"no ticket #{ticket}")
    was_upset, reasons = found
    if was_upset:
        _ticket_event(
            conn,
            EventAction.TICKET_CALMED,
            ticket,
            actor=actor,
            now=now,
            detail=TicketCalmed(reasons=reasons),
        )
    return was_upset
