"""The flow of one message, on one screen: check -> parse -> store, then the reply.

`Pipeline.receive` runs the stages in order and returns an `IntakeResult`; the SMTP edge
turns that into a reply. It must never report ACCEPTED for a message whose transaction is
not committed, and never let an exception escape: a fault becomes TEMPFAIL (451).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial

from . import store
from .config import Config
from .inbound import InboundMessage, ParserPool, scan_header_block
from .logs import event
from .store import StoredMessage, StoreFull, Writer

# Hashing a large message off the event loop keeps other sessions responsive; hashlib
# releases the GIL for big buffers. Below this size it is cheaper to hash inline.
_HASH_IN_THREAD = 1 << 20


class IntakeStatus(StrEnum):
    ACCEPTED = "accepted"
    TEMPFAIL = "tempfail"  # 451 4.3.0: the sender retries
    DISK_FULL = "disk-full"  # 452 4.3.1
    TOO_MANY_HOPS = "too-many-hops"  # 554 5.4.6: a mail loop
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

        # store: one transaction, group-committed and synced before we answer.
        record = await self._record(queue_id, envelope, raw, parsed)
        try:
            row_id = await self.writer.write(partial(store.insert_message, message=record))
        except StoreFull:
            event("message.tempfail", logging.ERROR, queue_id=queue_id, reason="disk-full")
            return IntakeResult(IntakeStatus.DISK_FULL, queue_id, "disk-full")
        except store.StoreError as exc:
            event(
                "message.tempfail", logging.ERROR, queue_id=queue_id, reason="store", error=str(exc)
            )
            return IntakeResult(IntakeStatus.TEMPFAIL, queue_id, "store")

        event(
            "message.stored",
            queue_id=queue_id,
            id=row_id,
            message_id=parsed.message_id,
            malformed=parsed.malformed,
        )
        return IntakeResult(IntakeStatus.ACCEPTED, queue_id)

    async def _record(
        self, queue_id: str, envelope: Envelope, raw: bytes, parsed: InboundMessage
    ) -> StoredMessage:
        if len(raw) >= _HASH_IN_THREAD:
            digest = await asyncio.to_thread(lambda: hashlib.sha256(raw).hexdigest())
        else:
            digest = hashlib.sha256(raw).hexdigest()
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
        )
