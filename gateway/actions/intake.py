"""Filing a received message: the one transaction input, and the transaction script.

`intake_of` builds what the transaction needs from a parsed message: what the message
says (`policy.MessageFacts`), how it threads, what it files as. The intake path
(`pipeline.Pipeline`, on the event loop) and a quarantine release
(`actions.quarantine.release`) both use it, so a release files exactly as intake would,
by construction.

`store_intake` is the one store transaction of a message (run by the writer), as one
script: look up (the sender list, the loop rate, our own mail) -> decide (policy) ->
thread -> plan -> write. Planning (notify.Planner) only returns mail; the actions write
it. Every limit it applies comes in as an argument (`PolicyConfig`), never through a
collaborator.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypedDict

from .. import store
from ..address import match_mailbox, parse_sender
from ..authn import AuthVerdict
from ..bounce import DeliveryReport
from ..classify import Classification, Kind, OwnIdentity, classify
from ..config import Config, MailboxConfig, PolicyConfig
from ..inbound import InboundMessage
from ..lookalike import skeleton
from ..notify import MailKind, Plan, Planner
from ..policy import Disposition, MessageFacts, PolicyFacts, Reason, Verdict, decide
from ..store import Filing, StoredMessage, TicketQueries
from ..store.events import EventAction
from ..tickets import Kind as MessageKind
from ..tickets import (
    SubjectTag,
    ThreadFacts,
    Via,
    reference_order,
    thread_message,
    verify_token,
)
from ..urgency import UrgencyFacts, assess, phrase_table
from . import mail, paging
from . import tickets as ticket_actions

# What each classification files as. Auto-replies, notices and bounces are events on a
# ticket: they never open, reopen or count as a client's reply.
_KIND_OF = {
    Kind.NORMAL: MessageKind.CLIENT,
    Kind.AUTO_REPLY: MessageKind.AUTO_REPLY,
    Kind.NOTICE: MessageKind.AUTO_REPLY,
    Kind.BOUNCE: MessageKind.BOUNCE,
    Kind.LOOP: MessageKind.AUTO_REPLY,
}

# RFC 5322 group syntax in From ("Undisclosed recipients: ;") names no mailbox.
_GROUP_SYNTAX = re.compile(r":[^<>\"]*;")


@dataclass(frozen=True)
class Intake:
    """One message, prepared for the store transaction (built by `intake_of` alone)."""

    record: StoredMessage
    said: MessageFacts  # what the message says; the sender list is looked up in the transaction
    thread: ThreadFacts
    kind: MessageKind
    report: DeliveryReport | None
    mailbox: MailboxConfig
    skeleton: str | None
    references: tuple[str, ...] = ()  # the message's own References header, in order
    released: bool = False  # an admin released it from the quarantine: they vouch for it
    # Why a client's mail is urgent (urgency.assess reasons; () when it is not, and always
    # for staff and automatic mail).
    urgency: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    row_id: int | None = None
    filing: Filing | None = None
    quarantine: int | None = None
    flags: tuple[str, ...] = ()  # e.g. "reused-message-id": kept, logged, audited


def intake_of(
    config: Config,
    secret: bytes,
    record: StoredMessage,
    parsed: InboundMessage,
    classification: Classification,
    sender: str | None,
    from_problem: str | None,
    auth: AuthVerdict | None,
    *,
    released: bool = False,
) -> Intake:
    """What the store transaction needs to file `record` (parsed as `parsed`; `sender` and
    `from_problem` from `sender_identity`, `auth` from authentication, None if not asked)."""
    said = MessageFacts(
        sender=sender,
        from_problem=from_problem,
        malformed=parsed.malformed,
        classification=classification.kind,
        staff=config.is_staff(sender),
        forged=auth.reason if auth is not None and auth.forged else None,
        auth_temperror=auth.temperror if auth is not None else False,
        lookalike_of=own_lookalike(config, sender),
    )
    return Intake(
        record=record,
        said=said,
        thread=thread_facts(
            config, secret, SubjectTag(config.tickets.tag), record.rcpt_to, parsed, sender
        ),
        kind=_KIND_OF[classification.kind],
        report=parsed.report,
        mailbox=mailbox_of(config, record.rcpt_to),
        skeleton=skeleton(sender) if sender else None,
        references=parsed.references,
        released=released,
        urgency=urgency_of(config, parsed, classification, said.staff),
    )


def urgency_of(
    config: Config, parsed: InboundMessage, classification: Classification, staff: bool
) -> tuple[str, ...]:
    """[urgency] the reasons a client's mail is urgent. Staff mail is not a client's report
    (staff set urgency with "#urgent"); automatic mail never is (urgency.assess). The text
    is the reply text: quoted history and the signature never count."""
    if staff:
        return ()
    facts = UrgencyFacts.of(parsed.subject, parsed.reply_text, parsed.headers, classification.kind)
    return assess(facts, phrase_table(config.urgency.phrases)).reasons


def own_identity(config: Config) -> OwnIdentity:
    """What marks mail as our own: the hostname in our Message-IDs, our mailboxes."""
    return OwnIdentity(
        hostname=config.smtp.hostname, addresses=tuple(m.address for m in config.mailboxes)
    )


def classify_message(parsed: InboundMessage, mail_from: str, own: OwnIdentity) -> Classification:
    """[classify] a parsed message with its envelope sender."""
    return classify(
        headers=parsed.headers,
        subject=parsed.subject,
        from_addresses=parsed.from_addresses,
        mail_from=mail_from,
        content_type=parsed.content_type,
        report=parsed.report,
        own=own,
        text=parsed.text,
    )


def sender_identity(parsed: InboundMessage) -> tuple[str | None, str | None]:
    """(the normalised From address, or why there is none we can use).

    Identity is the From header alone: never Reply-To or Sender, which anyone may set
    without affecting what the recipient sees as the author. It is strict: RFC 5322
    section 3.6 allows exactly one From field, and a From that a parser had to repair
    ("alice@client.example <mallory@evil.example>", "a@x;b@y") is read differently by
    different programs, so the address we would file under may not be the one a mail
    program shows, nor the one an upstream verifier checked.
    """
    fields = sum(1 for name, _value in parsed.headers if name.lower() == "from")
    if fields > 1:
        return None, "several-fields"
    if not parsed.from_header and not parsed.from_addresses:
        return None, "missing"
    if parsed.from_header and _GROUP_SYNTAX.search(parsed.from_header):
        return None, "group"
    if len(parsed.from_addresses) > 1:
        return None, "several"
    if not parsed.from_addresses:
        return None, "unparseable"
    if any(_is_from_defect(defect) for defect in parsed.defects):
        return None, "defects"
    sender = parse_sender(parsed.from_addresses[0][1])
    return (sender, None) if sender else (None, "unparseable")


def _is_from_defect(defect: str) -> bool:
    """A parser defect that makes From ambiguous (gateway.inbound writes them as
    "header From: <defect class>" and "From addresses: ...").

    Obsolete syntax (RFC 5322 section 4: "Dr. Alice <alice@x>", which must be accepted)
    and non-ASCII bytes (an RFC 6532 address) name the address unambiguously; an invalid
    header, or one the parser could not read at all, does not.
    """
    text = defect.lower()
    if text.startswith("from addresses:"):
        return True
    if not text.startswith("header from:"):
        return False
    return any(
        marker in text
        for marker in ("invalidheaderdefect", "headermissingrequiredvalue", "compat32")
    )


def thread_facts(
    config: Config,
    secret: bytes,
    tag: SubjectTag,
    rcpt_to: tuple[str, ...],
    parsed: InboundMessage,
    sender: str | None,
) -> ThreadFacts:
    token_ticket = None
    for rcpt in rcpt_to:
        recipient = match_mailbox(rcpt, config.mailboxes)
        if recipient is not None:
            token_ticket = verify_token(secret, recipient.tag)
            if token_ticket is not None:
                break
    return ThreadFacts(
        sender=sender,
        token_ticket=token_ticket,
        references=reference_order(parsed.in_reply_to, parsed.references),
        tagged=tuple(tag.find(parsed.subject)),
        staff=config.is_staff(sender),
    )


def mailbox_of(config: Config, rcpt_to: tuple[str, ...]) -> MailboxConfig:
    """The first of our mailboxes the message was sent to: its unit owns the ticket, and
    our mail about it comes from its address."""
    for rcpt in rcpt_to:
        recipient = match_mailbox(rcpt, config.mailboxes)
        if recipient is not None:
            return recipient.mailbox
    return config.mailboxes[0]


def own_lookalike(config: Config, sender: str | None) -> str | None:
    """A staff address or mailbox of ours that `sender` imitates, if any."""
    if not sender:
        return None
    key = skeleton(sender)
    for ours in (*config.staff.addresses, *(m.address for m in config.mailboxes)):
        if ours != sender and skeleton(ours) == key:
            return ours
    return None


# --- inside the store transaction (the writer thread) ----------------------------------


class QuarantineHeld(TypedDict):
    message: int
    reasons: list[str]


def detail_quarantine_held(message: int, verdict: Verdict) -> QuarantineHeld:
    return {"message": message, "reasons": list(verdict.reasons)}


class MessageFlagged(TypedDict):
    message: int
    reason: str
    message_id: str | None


def detail_message_flagged(message: int, flag: str, message_id: str | None) -> MessageFlagged:
    return {"message": message, "reason": flag, "message_id": message_id}


class RecipientUndeliverable(TypedDict):
    message: int  # the bounce that said so
    status: list[str]


def detail_recipient_undeliverable(message: int, status: Sequence[str]) -> RecipientUndeliverable:
    return {"message": message, "status": list(status)}


def store_intake(
    conn: sqlite3.Connection, *, intake: Intake, planner: Planner, policy: PolicyConfig
) -> Outcome:
    """Decide with the sender list as it is now, then refuse, hold or file the message."""
    record = intake.record
    now = record.received_at

    # look up: the sender list, the sender's rate, our own mail an automatic reply is about.
    found = look_up(conn, intake, policy)

    # decide
    verdict = decide(found.facts)
    if verdict.disposition in (Disposition.REJECT, Disposition.TEMPFAIL):
        return Outcome(verdict)  # nothing stored, nothing sent: no backscatter

    # The same message delivered twice (a crash before our 250, the sender retried) is
    # stored again, as received, but filed once, wherever the first copy went.
    if record.message_id:
        original = store.find_duplicate(conn, record.message_id, record.sha256)
        if original is not None:
            filing = Filing(None, intake.kind, Via.DUPLICATE, duplicate_of=original)
            duplicate = Verdict(Disposition.FILE, Reason.DUPLICATE, verdict.hits)
            return Outcome(duplicate, store.insert_message(conn, record, filing), filing)
    flags = _flags(conn, record, found.facts)
    record = dataclasses.replace(record, reasons=(*record.reasons, *verdict.reasons, *flags))

    if verdict.disposition is Disposition.QUARANTINE:
        # write the held message, then plan and write the admins' notice.
        row_id = store.insert_message(conn, record, None)
        quarantine_id = store.hold_message(conn, row_id, verdict.reasons, now)
        store.record_event(
            conn,
            time=now,
            actor=found.facts.sender or record.mail_from or "<>",
            action=EventAction.QUARANTINE_HELD,
            subject=f"quarantine:{quarantine_id}",
            detail=dict(detail_quarantine_held(row_id, verdict)),
        )
        _record_flags(conn, record, row_id, flags, now)
        mail.write(
            conn, _admin_notice(conn, planner, policy, record, found, verdict, quarantine_id)
        )
        return Outcome(verdict, row_id, quarantine=quarantine_id, flags=flags)

    # thread, write, plan and write the mail it earns (the ticket actions).
    row_id, filing = file_message(
        conn, intake, record, planner, organisation=found.organisation, event=found.event
    )
    _record_flags(conn, record, row_id, flags, now)
    return Outcome(verdict, row_id, filing, flags=flags)


def _flags(conn: sqlite3.Connection, record: StoredMessage, facts: PolicyFacts) -> tuple[str, ...]:
    """What is suspicious about a message without deciding its fate: a Message-ID that
    another sender's mail was stored with first (RFC 5322 section 3.6.4 makes it unique
    to one message; a second sender using it is a collision or an attempt to capture the
    first one's replies). Threading only ever follows the first row (store.TicketQueries),
    so the reusing mail is kept apart; the flag makes the attempt visible."""
    if not record.message_id:
        return ()
    first = store.first_inbound_with_message_id(conn, record.message_id)
    if first is not None and first[1] != facts.sender:
        return (Reason.REUSED_MESSAGE_ID,)
    return ()


def _record_flags(
    conn: sqlite3.Connection, record: StoredMessage, row_id: int, flags: tuple[str, ...], now: str
) -> None:
    for flag in flags:
        store.record_event(
            conn,
            time=now,
            actor=record.sender or record.mail_from or "<>",
            action=EventAction.MESSAGE_FLAGGED,
            subject=f"message:{row_id}",
            detail=dict(detail_message_flagged(row_id, flag, record.message_id)),
        )


def _admin_notice(
    conn: sqlite3.Connection,
    planner: Planner,
    policy: PolicyConfig,
    record: StoredMessage,
    found: Lookups,
    verdict: Verdict,
    quarantine_id: int,
) -> Plan:
    """New quarantine entries, and a tripped loop rule (once), are news for the admins.
    Nothing about held mail is ever sent to its sender."""
    now = record.received_at
    facts = found.facts
    if facts.loop_reason == "rate":
        threshold = policy.loop_threshold_per_hour
        # The first message held over the threshold trips the rule: tell the admins then
        # only (held mail is not counted, so the count stays at the threshold).
        if not facts.sender or found.loop_held_before:
            return Plan()
        loop_context = {"sender": facts.sender, "count": threshold + 1, "threshold": threshold}
        return planner.tell_admins(
            conn,
            MailKind.LOOP_NOTICE,
            lambda: loop_context,
            now,
            about=f"sender:{facts.sender}",
        )

    def quarantine_context() -> dict[str, object]:
        # Counting the held entries reads the whole quarantine: only for a notice that
        # is really sent (the hourly cap holds most of them back in a flood).
        return {
            "entry": {
                "id": quarantine_id,
                "sender": facts.sender or record.mail_from or "<>",
                "subject": record.subject or "",
                "reasons": list(verdict.reasons),
                "received_at": record.received_at,
            },
            "held_count": store.count_held(conn),
            "cli": f"gateway quarantine show {quarantine_id}",
        }

    return planner.tell_admins(
        conn,
        MailKind.QUARANTINE_NOTICE,
        quarantine_context,
        now,
        reasons=verdict.reasons,
        about=f"quarantine:{quarantine_id}",
    )


@dataclass(frozen=True)
class EventTicket:
    """The ticket an auto-reply or bounce belongs to, if any, how it was found, and the
    recipients of our own mail that it bounced."""

    ticket: int | None
    via: Via
    bounced_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class Lookups:
    """What the store transaction looked up once, for the decision and for the filing."""

    facts: PolicyFacts  # completed from the sender list
    organisation: int | None  # the sender's, if it is authorised
    recent: int  # its filed messages of the last hour before this one (capped), for the loop rule
    event: EventTicket | None  # for automatic mail (auto-replies, bounces): its ticket
    loop_held_before: bool = False  # the loop rule already held its mail this hour


def look_up(conn: sqlite3.Connection, intake: Intake, policy: PolicyConfig) -> Lookups:
    """What the sender list and the store say about the message: with what it says
    itself, the facts the policy decides on (built once, here)."""
    said = intake.said
    blocked = authorised = False
    lookalike_of = said.lookalike_of
    loop_reason = None
    organisation = None
    recent = 0
    loop_held_before = False
    # A release is the admin's word on mail the rate rule may itself have held: the rule
    # is not asked again.
    if said.sender and not intake.released:
        # More than loop_threshold_per_hour messages from one From in an hour: a mail
        # loop with a machine that does not mark its mail (RELIABILITY 40).
        threshold = policy.loop_threshold_per_hour
        since = (datetime.fromisoformat(intake.record.received_at) - timedelta(hours=1)).isoformat()
        recent = store.count_inbound_from(conn, said.sender, since=since, cap=threshold + 2)
        if recent >= threshold:
            loop_reason = "rate"
            loop_held_before = store.held_for_loop_since(conn, said.sender, since=since)
    if said.sender:
        found = store.sender_record(conn, said.sender)
        if found is not None:
            blocked = found.blocked
            authorised = found.authorised
            organisation = found.organisation if found.authorised else None
        if lookalike_of is None and intake.skeleton and not authorised:
            lookalike_of = store.find_lookalike(conn, said.sender, intake.skeleton)
    event = None
    if intake.kind is not MessageKind.CLIENT:
        event = _event_ticket(conn, TicketQueries(conn), intake)
    facts = PolicyFacts(
        sender=said.sender,
        from_problem=said.from_problem,
        malformed=said.malformed,
        classification=said.classification,
        loop_reason=loop_reason,
        blocked=blocked,
        authorised=authorised,
        staff=said.staff,
        forged=said.forged,
        auth_temperror=said.auth_temperror,
        lookalike_of=lookalike_of,
        known_ticket=event is not None and event.ticket is not None,
        released=intake.released,
        unknown_sender=policy.unknown_sender,
    )
    return Lookups(facts, organisation, recent, event, loop_held_before)


def file_message(
    conn: sqlite3.Connection,
    intake: Intake,
    record: StoredMessage,
    planner: Planner,
    *,
    organisation: int | None = None,
    row: int | None = None,
    now: str | None = None,
    event: EventTicket | None = None,
) -> tuple[int, Filing]:
    """Thread a message into its ticket (or a new one) and store or update its row.

    `row` is the id of a message stored earlier (released from the quarantine, at `now`);
    without it the message is inserted now, at its time of receipt. `event` is the ticket
    of automatic mail if the caller has looked it up in this transaction already.
    """
    now = now or record.received_at
    actor = record.sender or record.mail_from or "<>"
    queries = TicketQueries(conn)

    def save(filing: Filing) -> int:
        if row is None:
            return store.insert_message(conn, record, filing)
        store.set_filing(conn, row, filing)
        return row

    if intake.kind is not MessageKind.CLIENT:
        if event is None:
            event = _event_ticket(conn, queries, intake)
        filing = Filing(event.ticket, intake.kind, event.via)
        row_id = save(filing)
        _mark_bounced(conn, intake, row_id, event, actor, now)
        return row_id, filing

    decision = thread_message(intake.thread, queries)
    if decision.ticket is not None and intake.said.staff:
        # A reply to a page (issue 12) acknowledges it, and is an internal note: what the
        # person on call writes back to a page is not meant for the client.
        page_reply = not intake.released and paging.replies_to_page(
            conn, decision.ticket.number, intake.thread.references, record.sender
        )
        if page_reply:
            assert record.sender is not None
            paging.acknowledge(
                conn,
                ticket=decision.ticket.number,
                by=record.sender,
                how="reply",
                actor=record.sender,
                now=now,
            )
        wrote = ticket_actions.staff_wrote(
            conn,
            planner,
            ticket=decision.ticket.number,
            text=(record.text or "").lstrip(),
            staff=record.sender,
            actor=record.sender or "<>",
            now=now,
            save=save,
            via=decision.via,
            released=intake.released,
            as_note=page_reply,
        )
        return wrote.message, wrote.filing
    if decision.ticket is not None:
        # What makes the client upset is read before this mail changes the ticket.
        upset = ticket_actions.upset_facts(conn, decision.ticket.number, record, now)
        ticket_actions.client_wrote(
            conn,
            planner,
            decision.ticket,
            sender=record.sender,
            actor=actor,
            now=now,
            urgency=intake.urgency,
        )
        filing = Filing(decision.ticket.number, intake.kind, decision.via)
        row_id = save(filing)
        paging.page_at_intake(conn, planner, ticket=decision.ticket.number, record=record, now=now)
        _tell_staff(conn, planner, MailKind.STAFF_CLIENT_REPLY, decision.ticket.number, record, now)
        ticket_actions.client_upset(
            conn,
            planner,
            ticket=decision.ticket.number,
            message=row_id,
            record=record,
            facts=upset,
            actor=actor,
            now=now,
        )
        return row_id, filing

    unit = store.organisation_unit(conn, organisation) if organisation else None
    opened = ticket_actions.open_ticket(
        conn,
        planner,
        unit=unit or intake.mailbox.unit,
        mailbox=intake.mailbox.address,
        requester=record.sender or record.mail_from or "",
        subject=(record.subject or "").strip() or "(no subject)",
        organisation=organisation,
        follows=decision.follows,
        via=decision.via,
        kind=intake.kind,
        save=save,
        actor=actor,
        now=now,
        urgency=intake.urgency,
    )
    # Paged first: the acknowledgement says truthfully whether someone was alerted.
    alerted = paging.page_at_intake(conn, planner, ticket=opened.ticket, record=record, now=now)
    mail.write(
        conn,
        planner.acknowledge(conn, opened.ticket, record, now, intake.references, alerted=alerted),
    )
    _tell_staff(conn, planner, MailKind.STAFF_NEW_TICKET, opened.ticket, record, now)
    ticket_actions.client_upset(
        conn,
        planner,
        ticket=opened.ticket,
        message=opened.message,
        record=record,
        facts=ticket_actions.upset_facts(conn, None, record, now),
        actor=actor,
        now=now,
    )
    return opened.message, Filing(opened.ticket, intake.kind, decision.via)


def _tell_staff(
    conn: sqlite3.Connection,
    planner: Planner,
    kind: MailKind,
    ticket: int,
    record: StoredMessage,
    now: str,
) -> None:
    """A client's mail filed on a ticket that waits on us is news for its owner or unit's
    staff (notify.Planner.staff_notice has the guards). Only the notices that go are
    written: a unit with no staff (or an author who is its only staff) is no audit
    matter, the ticket itself shows the mail."""
    status = store.ticket_desk_info(conn, ticket)
    if status is None or status["status"] not in ticket_actions.WAITS_ON_US:
        return
    for planned in planner.staff_notice(conn, kind, ticket, record, now).mail:
        mail.queue(conn, planned)


def _event_ticket(conn: sqlite3.Connection, queries: TicketQueries, intake: Intake) -> EventTicket:
    """The ticket an auto-reply or bounce belongs to, if it clearly belongs to one.

    Only by what our own mail carried: the report's original Message-ID or a cited one
    being one we sent, or our reply token. "Automatic" is the sender's own claim, so the
    subject tag or a client's Message-ID (which anyone may cite) never makes it an event
    on a ticket, nor lets it pass the rules about the sender (policy.py).
    """
    report = intake.report
    if report is not None and report.original_message_id:
        ours = store.outgoing_message(conn, report.original_message_id)
        if ours is not None:
            return EventTicket(ours[0], Via.REFERENCES, tuple(ours[1]))
    thread = intake.thread
    if thread.token_ticket is not None and queries.ticket(thread.token_ticket) is not None:
        return EventTicket(thread.token_ticket, Via.TOKEN)
    found = queries.ticket_for_message_ids(thread.references, None)
    if found is not None:
        return EventTicket(found.number, Via.REFERENCES)
    return EventTicket(None, Via.NONE)


def _mark_bounced(
    conn: sqlite3.Connection,
    intake: Intake,
    row_id: int,
    event: EventTicket,
    actor: str,
    now: str,
) -> None:
    report = intake.report
    if intake.kind is not MessageKind.BOUNCE or report is None:
        return
    # Only a bounce of mail we really sent marks an address undeliverable, and only for
    # that mail's recipients: a forged report must not silence anyone else.
    for address in report.failed_recipients:
        address = address.lower()
        if address not in event.bounced_to:
            continue
        store.mark_undeliverable(
            conn,
            address=address,
            ticket=event.ticket,
            message=row_id,
            status=next(iter(report.status_codes), None),
            reason=report.reason,
            now=now,
        )
        store.record_event(
            conn,
            time=now,
            actor=actor,
            action=EventAction.RECIPIENT_UNDELIVERABLE,
            subject=f"address:{address}",
            ticket=event.ticket,
            detail=dict(detail_recipient_undeliverable(row_id, report.status_codes)),
        )
