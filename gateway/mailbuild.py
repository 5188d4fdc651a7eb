"""MIME building: a planned mail's spec becomes the bytes we send. Runs in the outbox
worker, never inside a store transaction; planning (which mail, to whom) is `notify.py`'s.

Every value we put in a header we generate goes through `sanitise_header`: no header may
carry a line break or a control character from the sender's words (CVE-2024-6923), nor a
bidi override or invisible character (CVE-2021-42574).
"""

from __future__ import annotations

import dataclasses
import email.charset
import json
import re
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email._policybase import Compat32
from email.header import Header
from email.headerregistry import Address
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr
from typing import Any

from .classify import LOOP_HEADER
from .render import RenderedMail, Templates

# RELIABILITY 42: a generated subject is one line of at most 120 characters.
MAX_SUBJECT = 120
MAX_HEADER = 200
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
