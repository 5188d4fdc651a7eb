"""The flow of one message, on one screen: check -> parse -> classify -> authenticate ->
decide -> thread -> store.

`Pipeline.receive` runs the stages in order and returns an `IntakeResult`; the SMTP edge
turns that into a reply. The decision, threading and every ticket change happen inside the
one transaction that stores the message (`actions.intake.store_intake`, run by the
writer, from the input `actions.intake.intake_of` builds), so a message is filed, held or
refused exactly as it is stored. It must never report ACCEPTED for a
message whose transaction is not committed, and never let an exception escape: a fault
becomes TEMPFAIL (451).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial

from . import authn, metrics, store
from .actions.intake import (
    Outcome,
    classify_message,
    intake_of,
    own_identity,
    sender_identity,
    store_intake,
)
from .classify import Classification
from .clock import Clock
from .config import Config, config_warnings
from .inbound import InboundMessage, scan_header_block
from .logs import event
from .notify import Planner
from .parserpool import ParserPool
from .policy import Disposition
from .readable import sanitise_filename
from .render import Templates
from .store import StoredAttachment, StoredMessage, StoreFull, Writer

# Hashing a large message off the event loop keeps other sessions responsive; hashlib
# releases the GIL for big buffers. Below this size it is cheaper to hash inline.
_HASH_IN_THREAD = 1 << 20


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
            with metrics.INTAKE_SECONDS.time():
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
        record = self._record(queue_id, envelope, raw, digest, parsed, verdict, sender)
        intake = intake_of(
            self.config, self.token_secret, record, parsed, verdict, sender, from_problem, auth
        )

        # decide + thread + store: one transaction, group-committed and synced.
        assert self.planner is not None, "start() first"
        script = partial(
            store_intake, intake=intake, planner=self.planner, policy=self.config.policy
        )
        try:
            outcome = await self.writer.write(script)
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

    def _record(
        self,
        queue_id: str,
        envelope: Envelope,
        raw: bytes,
        digest: str,
        parsed: InboundMessage,
        verdict: Classification,
        sender: str | None,
    ) -> StoredMessage:
        return StoredMessage(
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

    async def _hash(self, raw: bytes) -> str:
        if len(raw) >= _HASH_IN_THREAD:
            return await asyncio.to_thread(lambda: hashlib.sha256(raw).hexdigest())
        return hashlib.sha256(raw).hexdigest()

    def _result(
        self, queue_id: str, parsed: InboundMessage, verdict: Classification, outcome: Outcome
    ) -> IntakeResult:
        decision = outcome.verdict
        metrics.MESSAGES.labels(decision.disposition.value, decision.reason).inc()
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
            # A flood (reason loop) is a warning: `journalctl -p warning` must show it.
            level = logging.WARNING if decision.reason == "loop" else logging.INFO
            event(
                "message.quarantined",
                level,
                id=outcome.row_id,
                quarantine=outcome.quarantine,
                **fields,
            )
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
