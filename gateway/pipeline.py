"""The flow of one message, on one screen: check -> parse -> classify -> thread -> store.

`Pipeline.receive` runs the stages in order and returns an `IntakeResult`; the SMTP edge
turns that into a reply. Threading and every ticket change happen inside the one
transaction that stores the message (`_file`, run by the writer), so a message is filed
exactly when it is stored. It must never report ACCEPTED for a message whose transaction
is not committed, and never let an exception escape: a fault becomes TEMPFAIL (451).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial

from . import store
from .address import match_mailbox, normalise_address
from .classify import Classification, DeliveryReport, Kind, OwnIdentity, classify
from .config import Config
from .inbound import InboundMessage, ParserPool, scan_header_block
from .logs import event
from .readable import sanitise_filename
from .store import Filing, StoredAttachment, StoredMessage, StoreFull, TicketQueries, Writer
from .tickets import Kind as MessageKind
from .tickets import (
    Status,
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
}

# A client writing again to a ticket that waits on them, or was solved, reopens it.
_REOPENS = {Status.PENDING, Status.SOLVED}


class IntakeStatus(StrEnum):
    ACCEPTED = "accepted"
    TEMPFAIL = "tempfail"  # 451 4.3.0: the sender retries
    DISK_FULL = "disk-full"  # 452 4.3.1
    TOO_MANY_HOPS = "too-many-hops"  # 554 5.4.6: more Received: lines than allowed
    LOOP = "loop"  # 554 5.4.6: our own mail came back
    BAD_HEADER = "bad-header"  # 554 5.6.0: NUL or bare CR/LF in the header block


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


def utc_now() -> datetime:
    return datetime.now(UTC)


class Pipeline:
    """Stages of the intake path, with their resources passed in (no globals)."""

    def __init__(
        self,
        config: Config,
        parser: ParserPool,
        writer: Writer,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        self.parser = parser
        self.writer = writer
        self.now = now
        self.tag = SubjectTag(config.tickets.tag)
        self.own = OwnIdentity(
            hostname=config.smtp.hostname,
            addresses=tuple(m.address for m in config.mailboxes),
        )
        # Set by start(): the key of reply-token macs, kept in the database.
        self.token_secret = b""

    async def start(self) -> None:
        self.token_secret = await self.writer.write(store.token_secret)

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
        verdict = classify(
            headers=parsed.headers,
            subject=parsed.subject,
            from_addresses=parsed.from_addresses,
            mail_from=envelope.mail_from,
            content_type=parsed.content_type,
            report=parsed.report,
            own=self.own,
            text=parsed.text,
        )
        if verdict.kind is Kind.LOOP:
            event("message.refused", queue_id=queue_id, reason="loop", hits=verdict.reasons)
            return IntakeResult(IntakeStatus.LOOP, queue_id, "loop")

        # thread + store: one transaction, group-committed and synced before we answer.
        record = await self._record(queue_id, envelope, raw, parsed, verdict)
        facts = self._thread_facts(envelope, parsed, record.sender)
        unit = self._unit(envelope)
        filing_unit = partial(
            _file,
            record=record,
            facts=facts,
            kind=_KIND_OF[verdict.kind],
            report=parsed.report,
            unit=unit,
        )
        try:
            row_id, filing = await self.writer.write(filing_unit)
        except StoreFull:
            event("message.tempfail", logging.ERROR, queue_id=queue_id, reason="disk-full")
            return IntakeResult(IntakeStatus.DISK_FULL, queue_id, "disk-full")
        except store.StoreError as exc:
            event("message.tempfail", logging.ERROR, queue_id=queue_id, reason="store", error=exc)
            return IntakeResult(IntakeStatus.TEMPFAIL, queue_id, "store")

        event(
            "message.stored",
            queue_id=queue_id,
            id=row_id,
            message_id=parsed.message_id,
            classification=verdict.kind,
            reasons=",".join(verdict.reasons) or None,
            ticket=filing.ticket,
            kind=filing.kind,
            via=filing.via,
            duplicate_of=filing.duplicate_of,
            malformed=parsed.malformed,
        )
        return IntakeResult(IntakeStatus.ACCEPTED, queue_id, ticket=filing.ticket)

    def _thread_facts(
        self, envelope: Envelope, parsed: InboundMessage, sender: str | None
    ) -> ThreadFacts:
        token_ticket = None
        for rcpt in envelope.rcpt_to:
            recipient = match_mailbox(rcpt, self.config.mailboxes)
            if recipient is not None:
                token_ticket = verify_token(self.token_secret, recipient.tag)
                if token_ticket is not None:
                    break
        return ThreadFacts(
            sender=sender,
            token_ticket=token_ticket,
            references=reference_order(parsed.in_reply_to, parsed.references),
            tagged=tuple(self.tag.find(parsed.subject)),
        )

    def _unit(self, envelope: Envelope) -> str:
        """The desk unit of the first mailbox the message was sent to."""
        for rcpt in envelope.rcpt_to:
            recipient = match_mailbox(rcpt, self.config.mailboxes)
            if recipient is not None:
                return recipient.mailbox.unit
        return self.config.mailboxes[0].unit

    async def _record(
        self,
        queue_id: str,
        envelope: Envelope,
        raw: bytes,
        parsed: InboundMessage,
        verdict: Classification,
    ) -> StoredMessage:
        if len(raw) >= _HASH_IN_THREAD:
            digest = await asyncio.to_thread(lambda: hashlib.sha256(raw).hexdigest())
        else:
            digest = hashlib.sha256(raw).hexdigest()
        sender = None
        if parsed.from_addresses:
            sender = normalise_address(parsed.from_addresses[0][1])
        return StoredMessage(
            queue_id=queue_id,
            received_at=self.now().isoformat(timespec="microseconds"),
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


def _file(
    conn: sqlite3.Connection,
    *,
    record: StoredMessage,
    facts: ThreadFacts,
    kind: MessageKind,
    report: DeliveryReport | None,
    unit: str,
) -> tuple[int, Filing]:
    """On the writer thread, inside the message's transaction: thread, store, audit."""
    now = record.received_at
    actor = record.sender or record.mail_from or "<>"

    # The same message delivered twice (a crash before our 250, the sender retried) is
    # stored again, as received, but filed once.
    if record.message_id:
        original = store.find_duplicate(conn, record.message_id, record.sha256)
        if original is not None:
            filing = Filing(None, kind, Via.DUPLICATE, duplicate_of=original)
            return store.insert_message(conn, record, filing), filing

    queries = TicketQueries(conn)
    if kind is not MessageKind.CLIENT:
        return _file_event(conn, queries, record, facts, kind, report, actor)

    decision = thread_message(facts, queries)
    if decision.ticket is not None:
        number = decision.ticket.number
        reopen = decision.ticket.status in _REOPENS
        store.update_ticket(conn, number, now=now, status=Status.OPEN if reopen else None)
        if record.sender:
            store.add_participant(conn, number, record.sender)
        if reopen:
            store.record_event(
                conn,
                time=now,
                actor=actor,
                action="ticket.reopened",
                subject=f"ticket:{number}",
                ticket=number,
                detail={"from": decision.ticket.status.value, "to": Status.OPEN.value},
            )
        filing = Filing(number, kind, decision.via)
        return store.insert_message(conn, record, filing), filing

    number = store.create_ticket(
        conn,
        unit=unit,
        requester=record.sender or record.mail_from or "",
        subject=(record.subject or "").strip() or "(no subject)",
        now=now,
        follows=decision.follows,
    )
    filing = Filing(number, kind, decision.via)
    row_id = store.insert_message(conn, record, filing)
    store.record_event(
        conn,
        time=now,
        actor=actor,
        action="ticket.created",
        subject=f"ticket:{number}",
        ticket=number,
        detail={"message": row_id, "unit": unit, "follows": decision.follows},
    )
    return row_id, filing


def _file_event(
    conn: sqlite3.Connection,
    queries: TicketQueries,
    record: StoredMessage,
    facts: ThreadFacts,
    kind: MessageKind,
    report: DeliveryReport | None,
    actor: str,
) -> tuple[int, Filing]:
    """Auto-replies and bounces join a ticket they clearly belong to, or none: they never
    open, reopen or touch the status of one."""
    ticket = None
    via = Via.NONE
    bounced_to: list[str] = []
    if report is not None and report.original_message_id:
        ours = store.outgoing_message(conn, report.original_message_id)
        if ours is not None:
            ticket, bounced_to = ours
            via = Via.REFERENCES
        else:
            found = queries.ticket_for_message_ids([report.original_message_id])
            if found is not None:
                ticket, via = found.number, Via.REFERENCES
    if ticket is None:
        decision = thread_message(facts, queries)
        if decision.ticket is not None:
            ticket, via = decision.ticket.number, decision.via
        elif decision.follows is not None:
            ticket, via = decision.follows, Via.REFERENCES
    filing = Filing(ticket, kind, via)
    row_id = store.insert_message(conn, record, filing)
    if kind is not MessageKind.BOUNCE or report is None:
        return row_id, filing
    # Only a bounce of mail we really sent marks an address undeliverable, and only for
    # that mail's recipients: a forged report must not silence anyone else.
    for address in report.failed_recipients:
        if address.lower() not in bounced_to:
            continue
        store.mark_undeliverable(
            conn,
            address=address.lower(),
            ticket=ticket,
            message=row_id,
            status=next(iter(report.status_codes), None),
            reason=report.reason,
            now=record.received_at,
        )
        store.record_event(
            conn,
            time=record.received_at,
            actor=actor,
            action="recipient.undeliverable",
            subject=f"address:{address.lower()}",
            ticket=ticket,
            detail={"message": row_id, "status": list(report.status_codes)},
        )
    return row_id, filing
