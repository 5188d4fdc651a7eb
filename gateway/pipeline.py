"""The flow of one message, on one screen: check -> parse -> classify -> authenticate ->
decide -> thread -> store.

`Pipeline.receive` runs the stages in order and returns an `IntakeResult`; the SMTP edge
turns that into a reply. The decision, threading and every ticket change happen inside the
one transaction that stores the message (`store_intake`, run by the writer), so a message
is filed, held or refused exactly as it is stored. It must never report ACCEPTED for a
message whose transaction is not committed, and never let an exception escape: a fault
becomes TEMPFAIL (451).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial

from . import authn, store
from .actions import mail
from .actions import tickets as ticket_actions
from .address import match_mailbox, parse_sender
from .bounce import DeliveryReport
from .classify import Classification, Kind, OwnIdentity, classify
from .clock import Clock
from .config import Config, MailboxConfig, config_warnings
from .inbound import InboundMessage, scan_header_block
from .logs import event
from .lookalike import skeleton
from .notify import MailKind, Planner
from .parserpool import ParserPool
from .policy import Disposition, PolicyFacts, Reason, Verdict, decide
from .readable import sanitise_filename
from .render import Templates
from .store import Filing, StoredAttachment, StoredMessage, StoreFull, TicketQueries, Writer
from .store.events import EventAction
from .tickets import Kind as MessageKind
from .tickets import (
    SubjectTag,
    ThreadFacts,
    Via,
    reference_order,
    thread_message,
    verify_token,
)

# Hashing a large message off the event loop keeps other sessions responsive; hashlib
# releases the GIL for big buffers. Below this size it is cheaper to hash inline.
_HASH_IN_THREAD = 1 << 20

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


class IntakeStatus(StrEnum):
    ACCEPTED = "accepted"
    TEMPFAIL = "tempfail"  # 451 4.3.0: the sender retries
    AUTH_TEMPFAIL = "auth-tempfail"  # 451 4.7.0: authentication could not be checked now
    DISK_FULL = "disk-full"  # 452 4.3.1
    TOO_MANY_HOPS = "too-many-hops"  # 554 5.4.6: more Received: lines than allowed
    LOOP = "loop"  # 554 5.4.6: our own mail came back
    BAD_HEADER = "bad-header"  # 554 5.6.0: NUL or bare CR/LF in the header block
    REFUSED = "refused"  # 550 5.7.1: the sender is not authorised (or blocked)


@dataclass(frozen=True)
class Envelope:
    mail_from: str  # "" for the null reverse-path
    rcpt_to: tuple[str, ...]
    peer: str
    helo: str


@dataclass(frozen=True)
class IntakeResult:
    status: IntakeStatus
    queue_id: str
    reason: str | None = None
    ticket: int | None = None


def new_queue_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Intake:
    """One message, prepared on the event loop for the store transaction."""

    record: StoredMessage
    thread: ThreadFacts
    kind: MessageKind
    report: DeliveryReport | None
    mailbox: MailboxConfig
    facts: PolicyFacts  # the sender-list facts are filled in inside the transaction
    skeleton: str | None
    planner: Planner | None = None  # plans the mail this message earns; None: send none
    references: tuple[str, ...] = ()  # the message's own References header, in order


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    row_id: int | None = None
    filing: Filing | None = None
    quarantine: int | None = None
    flags: tuple[str, ...] = ()  # e.g. "reused-message-id": kept, logged, audited


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
    envelope: Envelope,
    parsed: InboundMessage,
    sender: str | None,
) -> ThreadFacts:
    token_ticket = None
    for rcpt in envelope.rcpt_to:
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


def mailbox_of(config: Config, envelope: Envelope) -> MailboxConfig:
    """The first of our mailboxes the message was sent to: its unit owns the ticket, and
    our mail about it comes from its address."""
    for rcpt in envelope.rcpt_to:
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


class Pipeline:
    """Stages of the intake path, with their resources passed in (no globals)."""

    def __init__(
        self,
        config: Config,
        parser: ParserPool,
        writer: Writer,
        clock: Clock,
        dnsfunc: authn.DnsFunc | None = None,
    ) -> None:
        self.config = config
        self.parser = parser
        self.writer = writer
        self.clock = clock
        self.dnsfunc = dnsfunc
        self.tag = SubjectTag(config.tickets.tag)
        self.own = own_identity(config)
        # Set by start(): the key of reply-token macs, kept in the database, and the
        # planner of outgoing mail that uses it.
        self.token_secret = b""
        self.planner: Planner | None = None
        # Called after a commit that may have queued mail (the outbox worker's wake()).
        self.mail_queued: Callable[[], None] = lambda: None

    async def start(self) -> None:
        self.token_secret = await self.writer.write(store.token_secret)
        templates = Templates(self.config.templates_path)
        # A broken template stops the daemon now, not at the first client's mail.
        templates.check()
        self.planner = Planner(self.config, templates, self.token_secret)
        for warning in config_warnings(self.config):
            event("config.warning", logging.WARNING, detail=warning)

    async def receive(self, envelope: Envelope, raw: bytes) -> IntakeResult:
        queue_id = new_queue_id()
        try:
            return await self._receive(queue_id, envelope, raw)
        except asyncio.CancelledError:
            event("message.cancelled", logging.WARNING, queue_id=queue_id)
            raise
        except Exception:
            # Invariant 5: a bug in a stage is a 451 and a log line, never a lost session.
            logging.getLogger("gateway").exception(
                "event=message.failed queue_id=%s stage=pipeline", queue_id
            )
            return IntakeResult(IntakeStatus.TEMPFAIL, queue_id, "internal-error")

    async def _receive(self, queue_id: str, envelope: Envelope, raw: bytes) -> IntakeResult:
        event(
            "message.received",
            queue_id=queue_id,
            peer=envelope.peer,
            mail_from=envelope.mail_from or "<>",
            rcpt_to=",".join(envelope.rcpt_to),
            size=len(raw),
        )

        # check: cheap header-block scan, before any parser sees the bytes.
        scan = scan_header_block(raw)
        if scan.violation is not None:
            event("message.refused", queue_id=queue_id, reason=scan.violation)
            return IntakeResult(IntakeStatus.BAD_HEADER, queue_id, scan.violation)
        if scan.received_count > self.config.smtp.max_hops:
            event(
                "message.refused",
                queue_id=queue_id,
                reason="too-many-hops",
                hops=scan.received_count,
            )
            return IntakeResult(IntakeStatus.TOO_MANY_HOPS, queue_id, "too-many-hops")

        # parse: in a worker process, with limits; never raises.
        parsed = await self.parser.parse(raw)
        if parsed.malformed:
            event("message.malformed", logging.WARNING, queue_id=queue_id, reason=parsed.malformed)

        # classify: normal, auto-reply, notice, bounce or loop, with every reason.
        verdict = classify_message(parsed, envelope.mail_from, self.own)

        # authenticate: trusted Authentication-Results, and our own DKIM check if asked.
        sender, from_problem = sender_identity(parsed)
        auth = await self._authenticate(raw, parsed, sender)

        digest = await self._hash(raw)
        intake = self._prepare(
            queue_id, envelope, raw, digest, parsed, verdict, sender, from_problem, auth
        )

        # decide + thread + store: one transaction, group-committed and synced.
        try:
            outcome = await self.writer.write(partial(store_intake, intake=intake))
        except StoreFull:
            event("message.tempfail", logging.ERROR, queue_id=queue_id, reason="disk-full")
            return IntakeResult(IntakeStatus.DISK_FULL, queue_id, "disk-full")
        except store.StoreError as exc:
            event("message.tempfail", logging.ERROR, queue_id=queue_id, reason="store", error=exc)
            return IntakeResult(IntakeStatus.TEMPFAIL, queue_id, "store")
        if outcome.row_id is not None:
            self.mail_queued()  # the outbox worker looks now, not at its next poll
        return self._result(queue_id, parsed, verdict, outcome)

    async def _authenticate(
        self, raw: bytes, parsed: InboundMessage, sender: str | None
    ) -> authn.AuthVerdict | None:
        policy = self.config.policy
        if sender is None:
            return None
        results, _ignored = authn.trusted_results(
            parsed.headers, policy.trusted_authserv_ids, self.config.smtp.hostname
        )
        own_dkim = None
        if policy.verify_dkim:
            own_dkim = await asyncio.to_thread(
                authn.verify_dkim,
                raw,
                dnsfunc=self.dnsfunc,
                min_key_bits=policy.dkim_min_key_bits,
                timeout=policy.dns_timeout,
            )
        # A staff address must prove itself ([staff] require_authentication): without an
        # aligned pass it is "forged" here, and the forged_known_sender rule holds it.
        staff_proof = self.config.staff.require_authentication and self.config.is_staff(sender)
        return authn.judge(
            sender.rpartition("@")[2],
            results,
            require_authentication=policy.require_authentication or staff_proof,
            own_dkim=own_dkim,
        )

    def _prepare(
        self,
        queue_id: str,
        envelope: Envelope,
        raw: bytes,
        digest: str,
        parsed: InboundMessage,
        verdict: Classification,
        sender: str | None,
        from_problem: str | None,
        auth: authn.AuthVerdict | None,
    ) -> Intake:
        record = StoredMessage(
            queue_id=queue_id,
            received_at=self.clock.stamp(),
            mail_from=envelope.mail_from,
            rcpt_to=envelope.rcpt_to,
            peer=envelope.peer,
            helo=envelope.helo,
            raw=raw,
            sha256=digest,
            message_id=parsed.message_id,
            from_header=parsed.from_header,
            subject=parsed.subject,
            date_header=parsed.date,
            malformed=parsed.malformed,
            defects=parsed.defects,
            sender=sender,
            classification=verdict.kind.value,
            reasons=verdict.reasons,
            text=parsed.reply_text,
            attachments=tuple(
                StoredAttachment(
                    name=sanitise_filename(a.filename),
                    content_type=a.content_type,
                    data=a.data,
                    sha256=hashlib.sha256(a.data).hexdigest(),
                )
                for a in parsed.attachments
            ),
        )
        facts = PolicyFacts(
            sender=sender,
            from_problem=from_problem,
            malformed=parsed.malformed,
            classification=verdict.kind,
            loop_reason=None,
            blocked=False,
            authorised=False,
            staff=self.config.is_staff(sender),
            forged=auth.reason if auth is not None and auth.forged else None,
            auth_temperror=auth.temperror if auth is not None else False,
            lookalike_of=own_lookalike(self.config, sender),
            known_ticket=False,
            released=False,
            unknown_sender=self.config.policy.unknown_sender,
        )
        return Intake(
            record=record,
            thread=thread_facts(self.config, self.token_secret, self.tag, envelope, parsed, sender),
            kind=_KIND_OF[verdict.kind],
            report=parsed.report,
            mailbox=mailbox_of(self.config, envelope),
            planner=self.planner,
            references=parsed.references,
            facts=facts,
            skeleton=skeleton(sender) if sender else None,
        )

    async def _hash(self, raw: bytes) -> str:
        if len(raw) >= _HASH_IN_THREAD:
            return await asyncio.to_thread(lambda: hashlib.sha256(raw).hexdigest())
        return hashlib.sha256(raw).hexdigest()

    def _result(
        self, queue_id: str, parsed: InboundMessage, verdict: Classification, outcome: Outcome
    ) -> IntakeResult:
        decision = outcome.verdict
        fields: dict[str, object] = {
            "queue_id": queue_id,
            "message_id": parsed.message_id,
            "classification": verdict.kind,
            "disposition": decision.disposition,
            "reason": decision.reason,
            "hits": ",".join(decision.reasons),
            "flags": ",".join(outcome.flags) or None,
        }
        if decision.disposition is Disposition.REJECT:
            event("message.refused", **fields)
            status = IntakeStatus.LOOP if decision.reason == "loop" else IntakeStatus.REFUSED
            return IntakeResult(status, queue_id, decision.reason)
        if decision.disposition is Disposition.TEMPFAIL:
            event("message.tempfail", logging.WARNING, **fields)
            return IntakeResult(IntakeStatus.AUTH_TEMPFAIL, queue_id, decision.reason)
        if decision.disposition is Disposition.QUARANTINE:
            event("message.quarantined", id=outcome.row_id, quarantine=outcome.quarantine, **fields)
            return IntakeResult(IntakeStatus.ACCEPTED, queue_id, decision.reason)
        filing = outcome.filing
        assert filing is not None
        event(
            "message.stored",
            id=outcome.row_id,
            ticket=filing.ticket,
            kind=filing.kind,
            via=filing.via,
            duplicate_of=filing.duplicate_of,
            malformed=parsed.malformed,
            **fields,
        )
        return IntakeResult(IntakeStatus.ACCEPTED, queue_id, ticket=filing.ticket)


# --- inside the store transaction (the writer thread) ----------------------------------


def store_intake(conn: sqlite3.Connection, *, intake: Intake) -> Outcome:
    """Decide with the sender list as it is now, then refuse, hold or file the message."""
    record = intake.record
    now = record.received_at

    found = _look_up(conn, intake)
    facts = found.facts
    verdict = decide(facts)
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
    flags = _flags(conn, record, facts)
    record = dataclasses.replace(record, reasons=(*record.reasons, *verdict.reasons, *flags))
    if verdict.disposition is Disposition.QUARANTINE:
        row_id = store.insert_message(conn, record, None)
        quarantine_id = store.hold_message(conn, row_id, verdict.reasons, now)
        store.record_event(
            conn,
            time=now,
            actor=facts.sender or record.mail_from or "<>",
            action=EventAction.QUARANTINE_HELD,
            subject=f"quarantine:{quarantine_id}",
            detail={"message": row_id, "reasons": list(verdict.reasons)},
        )
        _record_flags(conn, record, row_id, flags, now)
        _tell_admins(conn, intake, found, verdict, quarantine_id, now)
        return Outcome(verdict, row_id, quarantine=quarantine_id, flags=flags)
    row_id, filing = file_message(
        conn, intake, record, organisation=found.organisation, event=found.event
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
            detail={"message": row_id, "reason": flag, "message_id": record.message_id},
        )


def _tell_admins(
    conn: sqlite3.Connection,
    intake: Intake,
    found: Lookups,
    verdict: Verdict,
    quarantine_id: int,
    now: str,
) -> None:
    """New quarantine entries, and a tripped loop rule (once), are news for the admins.
    Nothing about held mail is ever sent to its sender."""
    planner = intake.planner
    if planner is None:
        return
    record = intake.record
    facts = found.facts
    if facts.loop_reason == "rate":
        threshold = planner.config.policy.loop_threshold_per_hour
        # The first message held over the threshold trips the rule: tell the admins then
        # only (held mail is not counted, so the count stays at the threshold).
        if facts.sender and not found.loop_held_before:
            loop_context = {"sender": facts.sender, "count": threshold + 1, "threshold": threshold}
            plan = planner.tell_admins(
                conn,
                MailKind.LOOP_NOTICE,
                lambda: loop_context,
                now,
                about=f"sender:{facts.sender}",
            )
            mail.write(conn, plan)
        return

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

    plan = planner.tell_admins(
        conn,
        MailKind.QUARANTINE_NOTICE,
        quarantine_context,
        now,
        reasons=verdict.reasons,
        about=f"quarantine:{quarantine_id}",
    )
    mail.write(conn, plan)


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


def _look_up(conn: sqlite3.Connection, intake: Intake) -> Lookups:
    facts = intake.facts
    updates: dict[str, object] = {}
    organisation = None
    recent = 0
    loop_held_before = False
    if facts.sender and intake.planner is not None:
        # More than loop_threshold_per_hour messages from one From in an hour: a mail
        # loop with a machine that does not mark its mail (RELIABILITY 40).
        policy = intake.planner.config.policy
        threshold = policy.loop_threshold_per_hour
        since = (datetime.fromisoformat(intake.record.received_at) - timedelta(hours=1)).isoformat()
        recent = store.count_inbound_from(conn, facts.sender, since=since, cap=threshold + 2)
        if recent >= threshold:
            updates["loop_reason"] = "rate"
            loop_held_before = store.held_for_loop_since(conn, facts.sender, since=since)
    if facts.sender:
        found = store.sender_record(conn, facts.sender)
        if found is not None:
            updates["blocked"] = found.blocked
            updates["authorised"] = found.authorised
            organisation = found.organisation if found.authorised else None
        if facts.lookalike_of is None and intake.skeleton and not (found and found.authorised):
            updates["lookalike_of"] = store.find_lookalike(conn, facts.sender, intake.skeleton)
    event = None
    if intake.kind is not MessageKind.CLIENT:
        event = _event_ticket(conn, TicketQueries(conn), intake)
        updates["known_ticket"] = event.ticket is not None
    facts = dataclasses.replace(facts, **updates)  # type: ignore[arg-type]
    return Lookups(facts, organisation, recent, event, loop_held_before)


def file_message(
    conn: sqlite3.Connection,
    intake: Intake,
    record: StoredMessage,
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
    if decision.ticket is not None and intake.facts.staff:
        assert intake.planner is not None  # set by Pipeline.start() before any mail
        wrote = ticket_actions.staff_wrote(
            conn,
            intake.planner,
            ticket=decision.ticket.number,
            text=(record.text or "").lstrip(),
            staff=record.sender,
            actor=record.sender or "<>",
            now=now,
            save=save,
            via=decision.via,
            released=intake.facts.released,
        )
        return wrote.message, wrote.filing
    if decision.ticket is not None:
        ticket_actions.client_wrote(
            conn, decision.ticket, sender=record.sender, actor=actor, now=now
        )
        filing = Filing(decision.ticket.number, intake.kind, decision.via)
        return save(filing), filing

    unit = store.organisation_unit(conn, organisation) if organisation else None
    opened = ticket_actions.open_ticket(
        conn,
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
    )
    if intake.planner is not None:
        plan = intake.planner.acknowledge(conn, opened.ticket, record, now, intake.references)
        mail.write(conn, plan)
    return opened.message, Filing(opened.ticket, intake.kind, decision.via)


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
            detail={"message": row_id, "status": list(report.status_codes)},
        )
