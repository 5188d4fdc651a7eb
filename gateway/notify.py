"""[plan] Outgoing mail: which events earn a mail, to whom, and the bytes of it.

Planning runs inside the transaction of the event that causes it, so a mail is queued
exactly when its ticket change commits (transactional outbox); delivery is the outbox
worker's job. The guards here are the last word on automatic mail: it must never go to
the null sender, an auto-reply, a bounce, a list, a loop, a held or refused sender, our own
addresses, an undeliverable address, or anyone more often than the configured caps; and no
header we write may carry a line break from the sender's words (CVE-2024-6923).
"""

from __future__ import annotations

import dataclasses
import email.charset
import email.policy
import json
import re
import secrets
import sqlite3
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email._policybase import Compat32
from email.header import Header
from email.headerregistry import Address
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr
from enum import StrEnum
from typing import Any

from . import store
from .classify import LOOP_HEADER
from .classify import Kind as Classification
from .config import Config, MailboxConfig
from .render import RenderedMail, Templates
from .store import Filing, StoredMessage
from .tickets import Kind as MessageKind
from .tickets import SubjectTag, make_token

# RELIABILITY 42: a generated subject is one line of at most 120 characters.
MAX_SUBJECT = 120
MAX_HEADER = 200
MAX_REFERENCES = 20
# Issue 9: what we quote of a client's subject (in our Subject and in the body of every
# mail that names the ticket), so that an acknowledgement cannot carry 16 KiB of anyone's
# words to whatever address they forged.
MAX_QUOTED_SUBJECT = 200

# Everything Python, mail programs or terminals may take for a line break, and the other
# C0/C1 controls, and lone surrogates (unencodable): none of them may reach a header we
# generate. Replaced by a space.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")
# Unicode format characters (category Cf), removed: the bidi embeddings, overrides and
# isolates (U+202A-202E, U+2066-2069), the marks U+200E/200F/061C, which can make a
# subject or name read as something else (Trojan Source, CVE-2021-42574), and the
# invisible ones (U+200B, U+2060, U+FEFF, tag characters). Only ZWNJ and ZWJ
# (U+200C/200D) stay: Persian, Indic scripts and emoji sequences need them, and they
# cannot reorder text. tests/test_security_outgoing.py checks this list against the
# Unicode database.
_FORMAT = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b"
    "\u200e-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]+"
)
_SPACES = re.compile(r"\s+")


class MailKind(StrEnum):
    ACKNOWLEDGEMENT = "acknowledgement"
    STAFF_REPLY = "staff-reply"
    STATUS_CHANGE = "status-change"
    QUARANTINE_NOTICE = "quarantine-notice"
    # A held message that claims an identity it could not prove, or imitates one
    # (reasons `unauthenticated`, `lookalike`): the quarantine notice's template, with a
    # cap of its own so that junk held mail can never use up the admins' attention.
    SECURITY_NOTICE = "security-notice"
    LOOP_NOTICE = "loop-notice"


# Quarantine reasons that make a held message's notice a security notice.
SECURITY_REASONS = frozenset({"unauthenticated", "lookalike"})


def sanitise_header(value: str, limit: int = MAX_HEADER) -> str:
    """One line, no control or format characters, at most `limit` characters (cut at a
    character boundary, with an ellipsis). The one sanitiser of every value we put in a
    header we generate, and of the client's words we quote in a body."""
    text = _SPACES.sub(" ", _UNSAFE.sub(" ", _FORMAT.sub("", value))).strip()
    if len(text) > limit:
        text = _cut(text, limit - 1).rstrip() + "…"
    return text


def quote_subject(subject: str) -> str:
    """A client's subject as our mail may quote it: one sanitised line, at most
    MAX_QUOTED_SUBJECT characters."""
    return sanitise_header(subject, MAX_QUOTED_SUBJECT)


def _cut(text: str, length: int) -> str:
    """text[:length], moved back so as not to split a character from the combining marks,
    variation selectors or joiners that belong to it (a user-perceived character)."""
    cut = length
    while 0 < cut < len(text) and (
        unicodedata.combining(text[cut])
        or unicodedata.category(text[cut]) in ("Mn", "Me", "Mc")
        or text[cut] in "\u200c\u200d"
        or "\ufe00" <= text[cut] <= "\ufe0f"
        or text[cut - 1] in "\u200c\u200d"
    ):
        cut -= 1
    return text[:cut] if cut > 0 else text[:length]


def new_message_id(hostname: str, ticket: int | None) -> str:
    """Our Message-IDs name the ticket (for people reading headers) and are unguessable;
    threading trusts only IDs we stored, never the number written in one."""
    where = f"t{ticket}" if ticket is not None else "n"
    return f"<gw.{where}.{secrets.token_hex(10)}@{hostname}>"


def build_mail(
    *,
    sender: Address,
    to: str,
    subject: str,
    rendered: RenderedMail,
    message_id: str,
    date: datetime,
    hostname: str,
    reply_to: str | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    auto_submitted: str | None = None,
) -> bytes:
    """The bytes of one outgoing mail, built by the email library from sanitised values
    (never by joining strings): 7-bit clean, so any relay takes it without 8BITMIME,
    except for an internationalised recipient (RFC 6530): then the To field carries the
    address in UTF-8 (RFC 6532 section 3.2) and the mail needs a relay that offers
    SMTPUTF8 (the outbox refuses to send it otherwise). An RFC 2047 encoded word is never
    used in an address: RFC 2047 section 5 forbids it in an addr-spec, and no server
    would deliver to one.

    It uses the library's compat32 classes: the modern EmailMessage API re-parses every
    header it is given and cost 2.8 ms a mail against 0.3 ms, for the same result.
    """
    # A random boundary no text can contain, so the generator need not search for one.
    boundary = f"=_gw_{secrets.token_hex(16)}"
    utf8 = not to.isascii()
    policy = _OUTGOING_UTF8 if utf8 else _OUTGOING
    message = MIMEMultipart("alternative", boundary, policy=policy)
    name = sanitise_header(sender.display_name, MAX_HEADER)
    message["From"] = formataddr((name, sender.addr_spec), charset="utf-8")
    # An address is never cut: 998 is the line limit (RFC 5322), far past any address.
    if utf8:
        message["To"] = sanitise_header(to, 998)
    else:
        _set(message, "To", _header(to, 998))
    if reply_to:
        _set(message, "Reply-To", _header(reply_to, MAX_HEADER))
    _set(message, "Subject", _header(subject, MAX_SUBJECT))
    message["Date"] = format_datetime(date)
    message["Message-ID"] = sanitise_header(message_id, 998)
    # A Message-ID is ASCII (RFC 5322); one that is not cannot be written without an
    # encoded word, which no client threads by: left out.
    if in_reply_to and in_reply_to.isascii():
        message["In-Reply-To"] = sanitise_header(in_reply_to, 998)
    ids = [sanitise_header(r, 998) for r in references if r.isascii()]
    if ids:
        message["References"] = " ".join(ids)
    if auto_submitted:
        # RFC 3834: mark what a machine wrote, and ask others' machines not to answer it.
        message["Auto-Submitted"] = auto_submitted
        message["X-Auto-Response-Suppress"] = "All"
        message["Precedence"] = "bulk"
    message[LOOP_HEADER] = sanitise_header(hostname)
    # MIMEMultipart starts with its MIME headers; people reading the mail expect From first.
    for name in ("MIME-Version", "Content-Type"):
        value = message[name]
        del message[name]
        message[name] = value
    message.attach(_text_part(rendered.text, "plain"))
    message.attach(_text_part(rendered.html, "html"))
    return message.as_bytes(policy=policy)


class _OutgoingPolicy(Compat32):
    """compat32 with CRLF line ends, as mail is sent, folding at 78 characters; a short
    ASCII value is written as it is instead of going through the Header class, which
    would give back the same line at ten times the cost."""

    def _fold(self, name: str, value: Any, sanitize: bool) -> str:
        if (
            isinstance(value, str)
            and value.isascii()
            and len(name) + len(value) + 2 <= _FOLD_AT
            and value.isprintable()
            and value == value.strip()
        ):
            return f"{name}: {value}{self.linesep}"
        folded: str = super()._fold(name, value, sanitize)  # type: ignore[misc]
        return folded


class _Utf8OutgoingPolicy(_OutgoingPolicy):
    """The same, for a message to an internationalised address (RFC 6532): a str value
    that is not ASCII (only ever the To address: every other value is given as an
    encoded Header) is written as UTF-8, unfolded (an address cannot be folded inside)."""

    def _fold(self, name: str, value: Any, sanitize: bool) -> str:
        if isinstance(value, str) and not value.isascii():
            return f"{name}: {value}{self.linesep}"
        return super()._fold(name, value, sanitize)

    def fold_binary(self, name: str, value: Any) -> bytes:
        return self._fold(name, value, sanitize=True).encode("utf-8")


_FOLD_AT = 78
_OUTGOING = _OutgoingPolicy(linesep="\r\n", max_line_length=_FOLD_AT)
_OUTGOING_UTF8 = _Utf8OutgoingPolicy(linesep="\r\n", max_line_length=_FOLD_AT)
_UTF8_QP = email.charset.Charset("utf-8")
_UTF8_QP.body_encoding = email.charset.QP
_MAX_7BIT_LINE = 998


def _header(value: str, limit: int = 998 * 20) -> str | Header:
    """One sanitised header value; RFC 2047 encoded words when it is not ASCII."""
    text = sanitise_header(value, limit)
    return text if text.isascii() else Header(text, "utf-8")


def _set(message: MIMEMultipart, name: str, value: str | Header) -> None:
    # compat32 takes a Header as a value (its documented use); the stubs say str only.
    message[name] = value  # type: ignore[assignment]


def _text_part(text: str, subtype: str) -> MIMEText:
    """A text part: 7bit when it is ASCII in short lines, else UTF-8 quoted-printable."""
    lines = text.splitlines()
    if text.isascii() and all(len(line) <= _MAX_7BIT_LINE for line in lines):
        return MIMEText(text, subtype, "us-ascii", policy=_OUTGOING)
    return MIMEText(text, subtype, _UTF8_QP, policy=_OUTGOING)  # type: ignore[arg-type]


class Planner:
    """Plans outgoing mail inside a store transaction (runs on the writer thread)."""

    def __init__(self, config: Config, templates: Templates, secret: bytes) -> None:
        self.config = config
        self.templates = templates
        self.secret = secret
        self.tag = SubjectTag(config.tickets.tag)
        self.own = {m.address for m in config.mailboxes} | set(config.staff.addresses)

    # --- guards --------------------------------------------------------------------------

    def refusal(self, conn: sqlite3.Connection, to: str | None, now: str) -> str | None:
        """Why automatic mail must not go to `to` now, or None if it may."""
        if not to:
            return "no-recipient"
        if to in self.own or self.config.is_staff(to):
            return "own-address"
        if store.is_undeliverable(conn, to):
            return "undeliverable"
        policy = self.config.policy
        hour = _before(now, hours=1)
        day = _before(now, hours=24)
        if store.count_automatic_mail(conn, to, since=hour) >= policy.max_auto_replies_per_hour:
            return "hourly-cap"
        if store.count_automatic_mail(conn, to, since=day) >= policy.max_auto_replies_per_day:
            return "daily-cap"
        return None

    @staticmethod
    def inbound_refusal(record: StoredMessage) -> str | None:
        """Why the message that caused an event must not be answered automatically."""
        if not record.mail_from:
            return "null-sender"  # RFC 3834 section 2: never answer a null reverse-path
        if record.classification != Classification.NORMAL:
            return record.classification  # auto-reply, notice, bounce, loop (and lists)
        return None

    # --- what to send --------------------------------------------------------------------

    def acknowledge(
        self,
        conn: sqlite3.Connection,
        ticket: int,
        record: StoredMessage,
        now: str,
        references: Sequence[str] = (),
    ) -> str | None:
        """Queue the acknowledgement of a new ticket; returns why not, if not."""
        why = self.inbound_refusal(record) or self.refusal(conn, record.sender, now)
        if why is None and store.ticket_acknowledged(conn, ticket):
            why = "already-acknowledged"  # RFC 3834 section 2: at most one per ticket
        if why is not None:
            return why
        assert record.sender is not None
        self._queue(
            conn,
            MailKind.ACKNOWLEDGEMENT,
            ticket,
            to=record.sender,
            now=now,
            in_reply_to=record.message_id,
            template="acknowledgement",
            extra={},
            # RFC 5322 section 3.6.4: the client's References, then its Message-ID.
            references=[*references, *([record.message_id] if record.message_id else [])],
        )
        store.set_acknowledged(conn, ticket)
        return None

    def staff_reply(
        self, conn: sqlite3.Connection, ticket: int, body: str, staff: str | None, now: str
    ) -> str | None:
        """Queue a staff member's public reply to the ticket's requester (human mail: no
        caps, but never to our own or an undeliverable address)."""
        info = store.ticket_mail_info(conn, ticket)
        to = info["requester"] if info else None
        if not to or to in self.own or self.config.is_staff(to):
            return "no-client"
        if store.is_undeliverable(conn, to):
            return "undeliverable"
        show = self.config.staff.show_staff_address and staff
        self._queue(
            conn,
            MailKind.STAFF_REPLY,
            ticket,
            to=to,
            now=now,
            in_reply_to=None,
            template="staff_reply",
            extra={"body": body, "staff_name": staff if show else ""},
            automatic=False,
        )
        return None

    def status_change(
        self, conn: sqlite3.Connection, ticket: int, old: str, new: str, now: str
    ) -> str | None:
        solved = new == "solved" and old != "solved"
        reopened = new == "open" and old in ("solved", "closed")
        if not (solved or reopened):
            return "not-notified"
        info = store.ticket_mail_info(conn, ticket)
        to = info["requester"] if info else None
        why = self.refusal(conn, to, now)
        if why is not None:
            return why
        assert to is not None
        self._queue(
            conn,
            MailKind.STATUS_CHANGE,
            ticket,
            to=to,
            now=now,
            in_reply_to=None,
            template="status_change",
            extra={"old_status": old, "new_status": new},
        )
        return None

    def tell_admins(
        self,
        conn: sqlite3.Connection,
        kind: MailKind,
        context: Callable[[], Mapping[str, object]],
        now: str,
        *,
        reasons: Sequence[str] = (),
        about: str | None = None,
    ) -> int:
        """Queue a notice to every configured admin (within the caps); returns how many.

        Each kind of notice has its own hourly cap per admin, so a flood of one kind (junk
        held as unknown senders) never silences another (a look-alike of a client, forged
        staff mail, a loop): a quarantine notice about a held message whose `reasons`
        include `unauthenticated` or `lookalike` is a security notice. Every notice a cap
        holds back leaves a `mail.withheld` event (one per call, naming the admins).

        `context` is called once, and only if some admin is to be told: what it looks up
        (the count of held mail, say) costs nothing for the notices the caps hold back.
        """
        if kind is MailKind.QUARANTINE_NOTICE and SECURITY_REASONS.intersection(reasons):
            kind = MailKind.SECURITY_NOTICE
        template = "loop_notice" if kind is MailKind.LOOP_NOTICE else "quarantine_notice"
        found: Mapping[str, object] | None = None
        queued = 0
        withheld: list[str] = []
        for admin in self.config.staff.admins:
            if self._admin_refusal(conn, admin, kind, now) is not None:
                withheld.append(admin)
                continue
            if found is None:
                found = _quoted(context())
            self._queue(
                conn,
                kind,
                None,
                to=admin,
                now=now,
                in_reply_to=None,
                template=template,
                extra=dict(found),
            )
            queued += 1
        if withheld:
            cap = self.admin_cap(kind)
            store.record_event(
                conn,
                time=now,
                actor="gateway",
                action="mail.withheld",
                subject=about or f"notice:{kind.value}",
                ticket=None,
                detail={
                    "kind": kind.value,
                    "to": withheld,
                    "why": "hourly-cap",
                    "cap": cap,
                    "reasons": list(reasons),
                },
            )
        return queued

    def admin_cap(self, kind: MailKind) -> int:
        """The hourly cap of one kind of admin notice, per admin."""
        policy = self.config.policy
        if kind is MailKind.SECURITY_NOTICE:
            return policy.max_security_notices_per_hour
        if kind is MailKind.LOOP_NOTICE:
            return policy.max_loop_notices_per_hour
        return policy.max_quarantine_notices_per_hour

    def _admin_refusal(
        self, conn: sqlite3.Connection, admin: str, kind: MailKind, now: str
    ) -> str | None:
        sent = store.count_admin_notices(conn, admin, (kind.value,), since=_before(now, hours=1))
        if sent >= self.admin_cap(kind):
            return "hourly-cap"
        return None

    # --- building and queueing -----------------------------------------------------------

    def _mailbox(self, address: str | None) -> MailboxConfig:
        for mailbox in self.config.mailboxes:
            if mailbox.address == address:
                return mailbox
        return self.config.mailboxes[0]

    def _queue(
        self,
        conn: sqlite3.Connection,
        kind: MailKind,
        ticket: int | None,
        *,
        to: str,
        now: str,
        in_reply_to: str | None,
        template: str,
        extra: Mapping[str, object],
        automatic: bool = True,
        references: Sequence[str] | None = None,
    ) -> None:
        info = store.ticket_mail_info(conn, ticket) if ticket is not None else None
        mailbox = self._mailbox(info["mailbox"] if info else None)
        reply_to = mailbox.address
        chain = list(references or [])
        context: dict[str, object] = {
            "desk": mailbox.desk,
            "mailbox": mailbox.address,
            "recipient": to,
            "recipient_name": "",
        }
        if info is not None and ticket is not None:
            reply_to = f"{mailbox.local_part}+{make_token(self.secret, ticket)}@{mailbox.domain}"
            if references is None:
                chain = info["message_ids"][-MAX_REFERENCES:]
            in_reply_to = in_reply_to or (chain[-1] if chain else None)
            context["ticket"] = {
                "number": ticket,
                "tag": self.tag.format(ticket),
                "subject": quote_subject(info["subject"] or ""),
                "status": info["status"],
            }
        context["reply_address"] = reply_to
        context.update(extra)
        # Only the subject is rendered now; the mail itself is built by the delivery
        # worker from this spec, so building MIME never runs inside the intake transaction.
        subject = sanitise_header(self.templates.render_subject(template, context), MAX_SUBJECT)
        if ticket is not None:
            subject = sanitise_header(self.tag.add(subject, ticket), MAX_SUBJECT)
        display = mailbox.desk
        if kind is MailKind.STAFF_REPLY and extra.get("staff_name"):
            display = f"{extra['staff_name']} ({mailbox.desk})"
        sender = Address(display_name=sanitise_header(display, 80), addr_spec=mailbox.address)
        spec = MailSpec(
            template=template,
            context=context,
            sender_name=sender.display_name,
            sender=mailbox.address,
            to=to,
            subject=subject,
            message_id=new_message_id(self.config.smtp.hostname, ticket),
            date=now,
            hostname=self.config.smtp.hostname,
            reply_to=reply_to,
            in_reply_to=in_reply_to,
            references=tuple(chain[-MAX_REFERENCES:]),
            auto_submitted=_AUTO_SUBMITTED.get(kind) if automatic else None,
        )
        self._store(conn, kind, ticket, automatic, spec, str(sender), now)

    def _store(
        self,
        conn: sqlite3.Connection,
        kind: MailKind,
        ticket: int | None,
        automatic: bool,
        spec: MailSpec,
        from_header: str,
        now: str,
    ) -> None:
        mail_from = "" if automatic else spec.sender
        record = StoredMessage(
            queue_id=f"out-{secrets.token_hex(8)}",
            received_at=now,
            mail_from=mail_from,
            rcpt_to=(spec.to,),
            peer="",
            helo="",
            raw=b"",
            sha256="",
            message_id=spec.message_id,
            from_header=from_header,
            subject=spec.subject,
            date_header=None,
            malformed=None,
            defects=(),
            direction="out",
            classification="auto-reply" if automatic else "normal",
            reasons=(kind.value,),
        )
        message_kind = MessageKind.STAFF if kind is MailKind.STAFF_REPLY else MessageKind.AUTO_REPLY
        row = store.insert_planned_mail(
            conn, record, Filing(ticket, message_kind, "outgoing"), spec.to_json()
        )
        store.queue_mail(
            conn,
            message_row=row,
            ticket=ticket,
            kind=kind.value,
            automatic=automatic,
            mail_from=mail_from,
            rcpt_to=spec.to,
            subject=spec.subject,
            message_id=spec.message_id,
            now=now,
        )
        store.record_event(
            conn,
            time=now,
            actor="gateway",
            action="mail.queued",
            subject=f"message:{row}",
            ticket=ticket,
            detail={"kind": kind.value, "to": spec.to, "message_id": spec.message_id},
        )


@dataclass(frozen=True)
class MailSpec:
    """Everything needed to build one planned mail, kept as JSON with its outbox row."""

    template: str
    context: Mapping[str, object]
    sender_name: str
    sender: str
    to: str
    subject: str
    message_id: str
    date: str
    hostname: str
    reply_to: str | None
    in_reply_to: str | None
    references: tuple[str, ...]
    auto_submitted: str | None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> MailSpec:
        values = json.loads(text)
        values["references"] = tuple(values["references"])
        return cls(**values)


def build_planned(templates: Templates, spec_json: str) -> tuple[bytes, str]:
    """Build a planned mail: (its bytes, its text part). Runs in the delivery worker."""
    spec = MailSpec.from_json(spec_json)
    rendered = templates.render(spec.template, spec.context)
    raw = build_mail(
        sender=Address(display_name=spec.sender_name, addr_spec=spec.sender),
        to=spec.to,
        subject=spec.subject,
        rendered=rendered,
        message_id=spec.message_id,
        date=datetime.fromisoformat(spec.date),
        hostname=spec.hostname,
        reply_to=spec.reply_to,
        in_reply_to=spec.in_reply_to,
        references=spec.references,
        auto_submitted=spec.auto_submitted,
    )
    return raw, rendered.text


_AUTO_SUBMITTED = {
    MailKind.ACKNOWLEDGEMENT: "auto-replied",
    MailKind.STATUS_CHANGE: "auto-generated",
    MailKind.QUARANTINE_NOTICE: "auto-generated",
    MailKind.SECURITY_NOTICE: "auto-generated",
    MailKind.LOOP_NOTICE: "auto-generated",
}


def _quoted(context: Mapping[str, object]) -> dict[str, object]:
    """An admin notice's context with the held sender's words made safe to quote: its
    subject cut to MAX_QUOTED_SUBJECT, no bidi or other format characters in it or in
    the addresses shown."""
    values = dict(context)
    entry = values.get("entry")
    if isinstance(entry, Mapping):
        entry = dict(entry)
        entry["subject"] = quote_subject(str(entry.get("subject") or ""))
        entry["sender"] = sanitise_header(str(entry.get("sender") or ""), 998)
        values["entry"] = entry
    if isinstance(values.get("sender"), str):
        values["sender"] = sanitise_header(str(values["sender"]), 998)
    return values


def _before(now: str, *, hours: int) -> str:
    return (datetime.fromisoformat(now) - timedelta(hours=hours)).isoformat(timespec="microseconds")


def describe(reasons: Sequence[str]) -> str:
    return json.dumps(list(reasons))
