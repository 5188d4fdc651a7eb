"""Store helpers used only by the tests and the benches (moved out of gateway.store).

The daemon plans outgoing mail through notify (a spec, built later by the delivery
worker); tests and benches that exercise the outbox alone need a mail that is already
built and queued, which this writes with the store's own functions.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Sequence

from gateway.model import MessageKind, Via
from gateway.store.messages import Filing, StoredMessage, insert_message
from gateway.store.outbox import queue_mail


def store_outgoing(
    conn: sqlite3.Connection,
    *,
    raw: bytes,
    message_id: str,
    ticket: int | None,
    kind: str,
    automatic: bool,
    mail_from: str,
    recipients: Sequence[str],
    subject: str,
    now: str,
    from_header: str | None = None,
    text: str | None = None,
) -> tuple[int, list[int]]:
    """Store a built outgoing mail (a messages row, direction 'out') and queue it per recipient.

    Returns the messages row id and the outbox row ids, in the order of `recipients`.
    """
    record = StoredMessage(
        queue_id=f"out-{secrets.token_hex(8)}",
        received_at=now,
        mail_from=mail_from,
        rcpt_to=tuple(recipients),
        peer="",
        helo="",
        raw=raw,
        sha256=hashlib.sha256(raw).hexdigest(),
        message_id=message_id,
        from_header=from_header,
        subject=subject,
        date_header=None,
        malformed=None,
        defects=(),
        direction="out",
        text=text,
    )
    # The messages row's kind is what the mail is to its ticket, as notify files it (the
    # outbox row's `kind` is the kind of mail: "acknowledgement", "staff-reply"...).
    message_kind = MessageKind.AUTO_REPLY if automatic else MessageKind.STAFF
    message_row = insert_message(conn, record, Filing(ticket, message_kind, Via.OUTGOING))
    rows = [
        queue_mail(
            conn,
            message_row=message_row,
            ticket=ticket,
            kind=kind,
            automatic=automatic,
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            subject=subject,
            message_id=message_id,
            now=now,
        )
        for rcpt_to in recipients
    ]
    return message_row, rows
