"""Bounce and delivery-notice reading, in the parser worker: what a delivery report says
(RFC 3464, RFC 6522, and the non-standard bounces of the MTAs in sisimai's set-of-emails),
and the recognisers both this and the main-process `classify` rules use (mail-system
senders, challenge-response requests). Nothing here may raise, do I/O, or read more than
the first 64 KB of any text: a hostile message must not make parsing slow or fail it.
"""

from __future__ import annotations

import codecs
import email.header
import email.message
import importlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryReport:
    """What a bounce or delivery notice says, extracted in the worker."""

    # True for an RFC 3464 report (multipart/report; report-type=delivery-status, RFC 6522) or
    # a non-standard bounce whose content and sender agree. False: the content looks like a
    # bounce but nothing else says so; classify() counts it only from an automated sender.
    is_report: bool
    actions: tuple[str, ...]  # per recipient: failed, delayed, delivered, relayed, expanded
    failed_recipients: tuple[str, ...]  # addr-specs, lower-case
    status_codes: tuple[str, ...]  # RFC 3463 enhanced status codes, e.g. "5.1.1"
    original_message_id: str | None  # "<id>" of the mail that bounced, if it could be found
    # "<how it was recognised>-<what it says>", e.g. "dsn-failed", "qmail-failed",
    # "exim-delayed", "subject-failed", "amazon-ses-delivered".
    reason: str


# --- limits and patterns ------------------------------------------------------------------------

# Bounded work: no text is scanned past this many characters, no more parts are visited than
# this, and no more recipients are kept than this.
SCAN_LIMIT = 64 * 1024
_MAX_PARTS = 100
_MAX_RECIPIENTS = 100

# RFC 3464 section 2.3.3 actions, plus the non-standard words some MTAs write there.
FAILED_ACTIONS = frozenset({"failed"})
NOTICE_ACTIONS = frozenset({"delayed", "delivered", "relayed", "expanded"})
_ACTION_ALIASES = MappingProxyType(
    {"expired": "failed", "deliverable": "delivered", "failure": "failed"}
)
_STATUS_ACTION = MappingProxyType({"5": "failed", "4": "delayed", "2": "delivered"})

# RFC 3464 section 2.1 (message/delivery-status) and RFC 6533 (the internationalised form);
# text/delivery-status is a mislabelling seen in the wild.
_STATUS_TYPES = frozenset(
    {"message/delivery-status", "message/global-delivery-status", "text/delivery-status"}
)
# RFC 6522 section 3: the third part of a report returns the message or only its header.
_RETURNED_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
_RETURNED_HEADER_TYPES = frozenset(
    {"text/rfc822-headers", "message/rfc822-headers", "message/global-headers"}
)

_UNSAFE_CODECS = frozenset({"idna", "punycode", "undefined"})
_NEWLINES = re.compile(r"\r\n?")
_SURROGATE = re.compile(r"[\udc80-\udcff]")
_TAGS = re.compile(r"<[^<>]{0,2000}>")
_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9-]{0,60})[ \t]*:[ \t]*(.*)")
_STATUS_CODE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_MESSAGE_ID = re.compile(r"<[^<>\s]{3,250}>")
_MESSAGE_ID_LINE = re.compile(
    r"^[ \t>]{0,20}(?:x-)?(?:original-)?message-id[ \t]{0,20}:[ \t]{0,20}(<[^<>\s]{3,250}>)",
    re.IGNORECASE | re.MULTILINE,
)
# An address as written in report fields and X-Loop (loose on purpose: it only finds them).
ADDRESS = re.compile(r"[A-Za-z0-9._%+=/'&!#$*?^`{|}~-]{1,64}@[A-Za-z0-9.-]{1,253}[A-Za-z0-9]")

# Non-standard bounces: the text each MTA writes, found by reading sisimai's set-of-emails.
# Strong fingerprints are template sentences a person does not write; generic phrases also
# appear in people's mail, so they count only together with the sender and the subject.
_FINGERPRINTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # qmail-send's bounce text (qmail, netqmail, and the MTAs built on them).
    (
        "qmail",
        re.compile(
            r"This is the qmail-send program|I'm afraid I wasn't able to deliver your message",
            re.IGNORECASE,
        ),
    ),
    # Exim's bounce text, which GMX, 1&1, Mail.ru and MXLogic copied.
    ("exim", re.compile(r"This message was created automatically by mail delivery software")),
    # Postfix bounce(8) when the sender did not ask for a DSN (or the report lost its parts).
    (
        "postfix",
        re.compile(
            r"This is the mail system at host|I'm sorry to have to inform you that your message",
            re.IGNORECASE,
        ),
    ),
    # Sendmail and V5 sendmail (copied by Active!hunter and Biglobe).
    (
        "sendmail",
        re.compile(
            r"Transcript of session follows|The following addresses had (?:permanent fatal"
            r" errors|fatal errors|delivery problems)|Unsent message follows"
            r"|The original message was received at",
            re.IGNORECASE,
        ),
    ),
    # Microsoft Exchange 2003 to Office 365 non-delivery reports.
    (
        "exchange",
        re.compile(
            r"did not reach the following recipient|Delivery has failed to these recipients"
            r"|Your message did not reach some or all of the intended recipients"
            r"|Microsoft Exchange will not try to redeliver",
            re.IGNORECASE,
        ),
    ),
    # Lotus Notes and Domino.
    (
        "notes",
        re.compile(
            r"Failure Reasons[ \t]{0,5}-{3}|was not delivered to:\s{1,20}\S{1,200}\s{1,20}because:",
            re.IGNORECASE,
        ),
    ),
    # Gmail and Google Workspace without a DSN part.
    (
        "gmail",
        re.compile(
            r"Delivery to the following recipients? failed|Google tried to deliver your message",
            re.IGNORECASE,
        ),
    ),
    ("yahoo", re.compile(r"Sorry, we were unable to deliver your message", re.IGNORECASE)),
    ("courier", re.compile(r"running the Courier mail server", re.IGNORECASE)),
    (
        "opensmtpd",
        re.compile(
            r"This is the MAILER-DAEMON, please DO NOT REPLY"
            r"|An error has occurred while attempting to deliver a message",
            re.IGNORECASE,
        ),
    ),
    ("dragonfly", re.compile(r"This is the DragonFly Mail Agent", re.IGNORECASE)),
    # Sun/Oracle Communications Messaging Server.
    (
        "messaging-server",
        re.compile(
            r"This report relates to a message you sent|Your message cannot be delivered to the"
            r" following recipients",
            re.IGNORECASE,
        ),
    ),
    (
        "mimecast",
        re.compile(
            r"An email that you attempted to send to the following address could not be",
            re.IGNORECASE,
        ),
    ),
    # Amazon SES bounce and delivery notifications sent as JSON through Amazon SNS.
    ("amazon-ses", re.compile(r'\\?"notificationType\\?"\s*:\s*\\?"(?:Bounce|Delivery)\\?"')),
)
_GENERIC_FAILURE = re.compile(
    r"could not be delivered|Unable to deliver (?:the )?message|Delivery (?:has )?failed"
    r"|permanent (?:error|failure|fatal error)|failed permanently|undeliverable"
    r"|(?:could not|cannot|can't) be delivered|(?:wasn't|was not|not) delivered"
    r"|Message delivery has failed|returned permanent errors|trouble delivering your message"
    r"|delivery (?:status )?notification|mailbox (?:is )?full|user unknown|no such user",
    re.IGNORECASE,
)
# The subjects bounces are sent with (anchored at the start: "Fwd: Undeliverable" is a person
# forwarding a bounce, which is a person's mail).
_BOUNCE_SUBJECT = re.compile(
    # Some MTAs put their host name first ("mx.example.net Mail delivery failed").
    r"(?:[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}[ \t]+)?(?:Undeliver(?:able|ed)"
    r"|Undelivered Mail"
    r"|Returned mail|Mail delivery failed|Mail delivery failure|Mail failure|failure notice"
    r"|Delivery (?:Status )?Notification|Delivery status|Delivery report|Delivery failure"
    r"|Delivery Notification|Delivery has failed|failed delivery|failure delivery"
    r"|Permanent Delivery Failure|Non[- ]?Delivery|Nondeliverable|Mail System Error"
    r"|Message delivery has failed|Mail could not be delivered|Email Delivery Failure"
    r"|Postmaster notify|Warning: could not send|Warning--Could not send|Warning: message"
    r"|Delayed Mail|NOTICE: mail delivery status|Mail Delivery Status|Mail Delivery Failure"
    r"|DELIVERY FAILURE|Sorry, your message could not be delivered|mail failed, returning"
    r"|There was an error sending your mail|Message you sent blocked|email bounce"
    r"|Returned Mail|Failed mail|Message not delivered|Message Delivery Failure"
    r"|\u30e1\u30fc\u30eb\u30a8\u30e9\u30fc|\u914d\u4fe1\u3067\u304d\u307e\u305b\u3093)",
    re.IGNORECASE,
)
_LEADING_TAGS = re.compile(r"^(?:\[[^\]]{0,40}\][ \t]*)+")
_FORWARD_OR_REPLY = re.compile(r"(?:re|fwd?|aw|wg|tr|sv|vs|rif|enc|doorst)\s*:", re.IGNORECASE)
# A warning that delivery is late, not that it failed (Exim's "has not yet been delivered",
# Sendmail's "THIS IS A WARNING MESSAGE ONLY", the "(Delay)" DSN subjects).
_DELAY_SUBJECT = re.compile(
    r"\bdelay(?:ed)?\b|Warning: could not send|Warning--Could not send|still being retried",
    re.IGNORECASE,
)
_DELAY_TEXT = re.compile(
    r"has not yet been delivered|THIS IS A WARNING MESSAGE ONLY|will (?:continue to )?retry"
    r"|still being retried|delivery attempts will continue|is delayed|has been delayed",
    re.IGNORECASE,
)
_PERMANENT_TEXT = re.compile(r"permanent|given up|failed permanently", re.IGNORECASE)
_FAILURE_TEXT = re.compile(
    r"permanent|given up|could not be delivered|cannot be delivered|failed|undeliverable"
    r"|returning message|returned",
    re.IGNORECASE,
)
# Where the returned copy of the message starts in a bounce that quotes it inline: past this
# point addresses are the original's, not failed recipients.
_RETURNED_COPY = re.compile(
    r"^.{0,20}(?:This is a copy of the message|Below this line is a copy of the message"
    r"|Original message|Returned Message|Unsent message follows|header of the original message"
    r"|copy of the message header|copy of the original message|Message headers follow"
    r"|original message follows)",
    re.IGNORECASE | re.MULTILINE,
)
# Lines naming a failed recipient in non-DSN bounces, before the returned copy:
# - "<user@host>:" (qmail, Postfix, Yahoo, Courier);
# - an address alone on its line (Exim, Gmail, Notes, Office 365);
# - "user@host on <date>" (Exchange 2003);
# - "550 <user@host>... reason" and "RCPT TO:<user@host>" (Sendmail transcripts; never
#   "MAIL From", which names the sender);
# - "Recipient address:" (Messaging Server), "Final-Recipient:" (a DSN pasted into the text);
# - "could not be delivered to <user@host>" and the like (KDDI and others).
_ADDR_SPEC = r"[^<>\s@\"(),;:]{1,64}@[A-Za-z0-9][A-Za-z0-9.-]{0,252}"
_RECIPIENT_LINES = (
    re.compile(rf"^[ \t]*<({_ADDR_SPEC})>[ \t]*:", re.MULTILINE),
    re.compile(
        rf"^[ \t]*[\"<]?({_ADDR_SPEC})[\">]?:?[ \t]*(?:<mailto:[^<>\s]{{1,320}}>)?[ \t]*$",
        re.MULTILINE,
    ),
    re.compile(rf"^[ \t]*({_ADDR_SPEC}) on ", re.MULTILINE),
    re.compile(
        rf"^[ \t]*[245]\d\d[ \t]+(?:[245]\.\d{{1,3}}\.\d{{1,3}}[ \t]+)?<?({_ADDR_SPEC})>?\.\.\.",
        re.MULTILINE,
    ),
    re.compile(rf"RCPT TO:[ \t]*<?({_ADDR_SPEC})", re.IGNORECASE),
    re.compile(rf"Recipient address:[ \t]*<?({_ADDR_SPEC})", re.IGNORECASE),
    re.compile(r"^[ \t]*Final-Recipient:[^;\n]{0,20};[ \t]*<?([^<>\s]{1,320})", re.I | re.M),
    re.compile(
        r"(?:not be delivered to|not delivered to|failed to deliver to|delivery to|"
        rf"undeliverable to|Unknown user)[: \t]{{1,4}}<?({_ADDR_SPEC})",
        re.IGNORECASE,
    ),
)

# RFC 3834 section 5 and the challenge-response systems (TMDA, Boxbe, SpamArrest, ...): a
# request to prove the sender is a person. Such mail often comes from a null sender and talks
# about a held message, so it must never be mistaken for a bounce.
_CHALLENGE_SUBJECT = re.compile(
    r"\bconfirm(?:ation)?\b.{0,30}\b(?:your|this|the) (?:message|e-?mail|mail)\b"
    r"|\b(?:verify|verification)\b.{0,30}\b(?:sender|human|message)\b|challenge[- ]response"
    r"|\bplease (?:confirm|verify) (?:that )?you are\b|\bawaiting (?:your )?(?:verification|"
    r"confirmation)\b|\brequest for authori[sz]ation\b",
    re.IGNORECASE,
)
_CHALLENGE_TEXT = re.compile(
    r"\b(?:confirm|verify|prove) (?:that )?you are (?:a )?(?:human|real person|not a "
    r"(?:robot|spammer|computer|machine))|challenge[- ]response|\bboxbe\b|\bspam ?arrest\b"
    r"|\bTMDA\b.{0,200}\bconfirm|(?:held|quarantined|waiting|pending) (?:until|for) (?:you|your)"
    r" (?:confirm|verif|repl|respon)|\bI (?:am|'m) protecting myself from (?:receiving )?(?:junk|"
    r"spam)",
    re.IGNORECASE | re.DOTALL,
)

# Mail-system mailboxes: postmaster (RFC 5321 section 4.5.1) and MAILER-DAEMON, the name
# MTAs send bounces from, with the spellings seen in the wild.
_DAEMON_LOCAL_PARTS = MappingProxyType(
    {
        "mailer-daemon": "mailer-daemon",
        "mailerdaemon": "mailer-daemon",
        "mailer_daemon": "mailer-daemon",
        "postmaster": "postmaster",
        "post_master": "postmaster",
    }
)
_DAEMON_DISPLAY_NAME = re.compile(r"mail delivery (?:sub)?system|mailer[- ]daemon", re.IGNORECASE)


# --- keyword gates for the body scans -----------------------------------------------------------
#
# CPython's regex engine has no fast path for a case-insensitive pattern of alternatives: it
# tries each alternative at every character, 10-40 us per KB whether or not anything matches,
# and every message's body met 15 such patterns in the worker and one more on the event loop.
# So each body scan is preceded by a substring test (str's C search): the pattern runs only if
# the text contains the words that any match of it must contain. The words are derived from
# the pattern itself at import (_gate), so they cannot drift from it; a pattern they cannot be
# derived for is always run. A gate only ever skips a search that could not have matched:
# every verdict is still the pattern's own (tests/test_fast_paths.py checks this).

# re.IGNORECASE equates these with ASCII letters and str.lower() does not (U+212A KELVIN SIGN
# it does, to "k"); found by matching every code point against every ASCII character.
_IGNORECASE_FOLDS = (("\u0130", "i"), ("\u0131", "i"), ("\u017f", "s"))
# A clause of shorter words would let nearly every text through: it is left out of the gate.
_MIN_GATE_WORD = 3
# Clauses kept per alternative (the most selective), to bound the substring searches.
_MAX_GATE_CLAUSES = 3

# A clause: words, one of which is in the text. An alternative: clauses, all of which hold.
# A gate: alternatives, one of which holds; None where no gate could be derived.
Clause = frozenset[str]
Gate = tuple[tuple[Clause, ...], ...]


def _folded(text: str) -> str:
    """The text as the gates search it: lower case, and every character re.IGNORECASE takes for
    an ASCII letter made that letter, one character for one (so words stay contiguous)."""
    for char, letter in _IGNORECASE_FOLDS:
        if char in text:
            text = text.replace(char, letter)
    return text.lower()


def _may_match(gate: Gate | None, folded: str) -> bool:
    """False only if no match of the gated pattern can be in the text `folded` came from."""
    if gate is None:
        return True
    # Plain loops: this runs ~20 times a message, where generator frames cost more than
    # the searches.
    for alternative in gate:
        for clause in alternative:
            for word in clause:
                if word in folded:
                    break
            else:
                break  # no word of this clause: try the next alternative
        else:
            return True
    return False


def _gate(pattern: re.Pattern[str]) -> Gate | None:
    """What every match of `pattern` contains, as lower-case ASCII words; None if unknown.

    Read from the pattern's parse tree (the re module's own parser). A match of a top-level
    alternative contains a match of each element of its sequence: a run of literal characters,
    what a group's content requires, what an item repeated at least once requires, and for a
    nested branch one of the words its alternatives each require. Characters matched
    case-insensitively are fine: the words are looked for in _folded text. Anything
    unexpected gives None, and the pattern is always run.
    """
    try:
        parser: Any = importlib.import_module("re._parser")
        ops: Any = importlib.import_module("re._constants")
        items = list(parser.parse(pattern.pattern, pattern.flags))
        if len(items) == 1 and items[0][0] is ops.BRANCH:
            sequences = list(items[0][1][1])
        else:
            sequences = [items]
        gate = []
        for sequence in sequences:
            clauses = sorted(_clauses(sequence, ops), key=_selectivity, reverse=True)
            if not clauses:
                return None
            gate.append(tuple(clauses[:_MAX_GATE_CLAUSES]))
    except Exception:
        return None
    return tuple(gate)


def _clauses(items: Iterable[tuple[Any, Any]], ops: Any) -> list[Clause]:
    """The clauses every match of this sequence satisfies (all of them, any order)."""
    found: list[Clause] = []
    run: list[str] = []

    def add(clause: Clause | None) -> None:
        if clause and all(w.isascii() and len(w.strip()) >= _MIN_GATE_WORD for w in clause):
            found.append(clause)

    for op, arg in items:
        if op is ops.LITERAL:
            run.append(chr(arg))
            continue
        add(frozenset({"".join(run).lower()}) if run else None)
        run = []
        if op is ops.SUBPATTERN:
            found.extend(_clauses(arg[-1], ops))
        elif op is ops.ATOMIC_GROUP:
            found.extend(_clauses(arg, ops))
        elif op in (ops.MAX_REPEAT, ops.MIN_REPEAT, ops.POSSESSIVE_REPEAT) and arg[0] >= 1:
            found.extend(_clauses(arg[2], ops))
        elif op is ops.BRANCH:
            # Each alternative's best clause; the branch requires one of their words.
            best = [max(_clauses(alt, ops), key=_selectivity, default=None) for alt in arg[1]]
            if all(best):
                add(frozenset().union(*(clause for clause in best if clause)))
        # Anything else (classes, anchors, look-arounds, "."): nothing required here.
    add(frozenset({"".join(run).lower()}) if run else None)
    return found


def _selectivity(clause: Clause) -> tuple[int, int]:
    return min(len(word.strip()) for word in clause), -len(clause)


_FINGERPRINT_GATES = tuple(_gate(pattern) for _name, pattern in _FINGERPRINTS)
_GENERIC_FAILURE_GATE = _gate(_GENERIC_FAILURE)
_CHALLENGE_TEXT_GATE = _gate(_CHALLENGE_TEXT)

# --- worker side: what a bounce says ------------------------------------------------------------


def extract_report(msg: email.message.Message) -> DeliveryReport | None:
    """In the parser worker: the bounce or notice facts, or None if this is neither.

    Accepts a message from either email policy. Never raises: a bounce that cannot be read is
    left to the header rules in classify().
    """
    try:
        return _extract_report(msg)
    except Exception:
        return None


@dataclass
class _Parts:
    status_blocks: list[dict[str, str]]  # RFC 3464 field groups from delivery-status parts
    text: str  # the human-readable notification, newlines normalised, bounded
    returned_ids: list[str]  # Message-IDs of returned messages or returned headers


def _extract_report(msg: email.message.Message) -> DeliveryReport | None:
    parts = _collect_parts(msg)
    subject = _decoded_header(msg, "subject")
    text = parts.text
    # RFC 6522: the top-level structure says "delivery report" by itself (so does a bare
    # delivery-status message). A delivery-status part buried in other mail, an attachment,
    # needs the sender or subject to agree.
    top_type = msg.get_content_type()
    top_report = top_type in _STATUS_TYPES or (
        top_type == "multipart/report"
        and str(msg.get_param("report-type", "") or "").strip().lower() == "delivery-status"
    )
    folded = _folded(text)
    if not top_report and is_challenge(subject, text, folded):
        return None
    fingerprint = _fingerprint(text, folded)
    subject_hit = _is_bounce_subject(subject)
    sender_hit = _is_daemon_origin(msg)
    blocks = parts.status_blocks
    if not blocks and (top_report or fingerprint or subject_hit):
        # RFC 3464 fields written into the text: a report whose parts were lost (a broken
        # boundary) or an MTA that pastes its DSN into the notification.
        blocks = _field_blocks(text)

    # How it was recognised, and whether that alone makes it a report (see DeliveryReport).
    source: str
    if top_report:
        source, is_report = "dsn", True
    elif parts.status_blocks:
        source, is_report = "dsn", bool(sender_hit or subject_hit or fingerprint)
    elif fingerprint == "amazon-ses":
        # A JSON notification a person does not write; its sender is no-reply@, not a daemon.
        source, is_report = fingerprint, True
    elif fingerprint and (sender_hit or subject_hit):
        source, is_report = fingerprint, True
    elif subject_hit and sender_hit:
        source, is_report = "subject", True
    elif fingerprint:
        source, is_report = fingerprint, False
    elif subject_hit and _generic_failure(text, folded):
        source, is_report = "subject", False
    elif sender_hit and _generic_failure(text, folded):
        source, is_report = "daemon-text", False
    else:
        return None

    recipients = [b for b in blocks if _is_recipient_block(b)][:_MAX_RECIPIENTS]
    actions, failed, codes = _recipient_facts(recipients)
    if not actions:
        # No per-recipient fields: the words decide between a failure and a late delivery.
        delayed = (_DELAY_SUBJECT.search(subject) or _DELAY_TEXT.search(text)) and not (
            _FAILURE_TEXT.search(subject) or _PERMANENT_TEXT.search(text[:8192])
        )
        action = _amazon_action(text) if fingerprint == "amazon-ses" else None
        action = action or ("delayed" if delayed else "failed")
        failed = _text_recipients(msg, text) if action == "failed" else []
        actions = [action] * max(1, len(failed))
        codes = _unique(m.group(0) for m in _STATUS_CODE.finditer(text[:8192]))
    outcome = "failed" if "failed" in actions else actions[0]

    return DeliveryReport(
        is_report=is_report,
        actions=tuple(actions),
        failed_recipients=tuple(failed),
        status_codes=tuple(codes),
        original_message_id=_original_message_id(blocks, parts, text),
        reason=f"{source}-{outcome}",
    )


def _collect_parts(msg: email.message.Message) -> _Parts:
    """Walk the MIME tree (never into a returned message), bounded in parts and characters."""
    status_blocks: list[dict[str, str]] = []
    texts: list[str] = []
    html: list[str] = []
    returned_ids: list[str] = []
    budget = SCAN_LIMIT
    stack = [msg]
    visited = 0
    while stack and visited < _MAX_PARTS:
        part = stack.pop()
        visited += 1
        ctype = part.get_content_type()
        if ctype in _RETURNED_MESSAGE_TYPES:
            returned_ids.extend(_returned_message_ids(part))
            continue
        if ctype in _STATUS_TYPES:
            status_blocks.extend(_status_part_blocks(part))
            continue
        if part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(p for p in reversed(payload) if isinstance(p, email.message.Message))
            continue
        if ctype in _RETURNED_HEADER_TYPES:
            returned_ids.extend(_MESSAGE_ID_LINE.findall(_part_text(part, SCAN_LIMIT)))
            continue
        # Text parts, the top part, and multiparts whose boundary was lost (their body is
        # still the notification's text).
        if budget <= 0 or not (ctype.startswith(("text/", "multipart/")) or part is msg):
            continue
        body = _part_text(part, budget)
        budget -= len(body)
        (html if ctype == "text/html" else texts).append(body)
    if not texts and html:
        # An HTML-only notification (some Office 365 NDRs): the words, without the markup.
        texts = [_TAGS.sub(" ", h) for h in html]
    text = _NEWLINES.sub("\n", "\n".join(texts))[:SCAN_LIMIT]
    return _Parts(status_blocks, text, returned_ids)


def _part_text(part: email.message.Message, limit: int) -> str:
    """The decoded text of a leaf part, at most `limit` characters, decoding only its start."""
    try:
        data = _decoded_start(part, limit)
    except Exception:
        return ""
    if not isinstance(data, bytes):
        return ""
    data = data[:limit]
    codec = _text_codec(part.get_content_charset())
    # The declared charset first; 8-bit text under a 7-bit label (common in Japanese
    # bounces) is most often UTF-8.
    for candidate in (codec, "utf-8"):
        try:
            return data.decode(candidate)[:limit]
        except ValueError:
            continue
    return data.decode(codec, "replace")[:limit]


def _text_codec(charset: object) -> str:
    """A codec for a MIME charset label; unknown or unsafe ones read as UTF-8."""
    label = str(charset or "utf-8").strip().lower()[:64]
    try:
        info = codecs.lookup(label)
    except LookupError:
        return "utf-8"
    # punycode decoding is quadratic and idna refuses errors="replace" (see gateway.inbound).
    if info.name in _UNSAFE_CODECS or not getattr(info, "_is_text_encoding", True):
        return "utf-8"
    return info.name


def _decoded_start(part: email.message.Message, limit: int) -> object:
    # Decoding is bounded too: a 50 MB text part is cut before its transfer encoding is undone.
    # Four encoded characters per decoded byte covers base64 (4:3) and quoted-printable (3:1).
    payload = part.get_payload()
    if isinstance(payload, str) and len(payload) > 4 * limit:
        head = email.message.Message()
        encoding = part.get("content-transfer-encoding")
        if encoding is not None:
            head["Content-Transfer-Encoding"] = str(encoding)
        head.set_payload(payload[: 4 * limit])
        return head.get_payload(decode=True)
    return part.get_payload(decode=True)


def _status_part_blocks(part: email.message.Message) -> list[dict[str, str]]:
    """RFC 3464 field groups of a delivery-status part, as {lower-case name: value}."""
    payload = part.get_payload()
    if isinstance(payload, list):
        # The stdlib parser reads message/delivery-status as a list of header blocks.
        blocks = []
        for block in payload[: _MAX_RECIPIENTS + 1]:
            if isinstance(block, email.message.Message):
                fields = {k.lower(): _one_line(v) for k, v in block.raw_items()}
                blocks.append(fields)
        return blocks
    return _field_blocks(_NEWLINES.sub("\n", _part_text(part, SCAN_LIMIT)))


def _field_blocks(text: str) -> list[dict[str, str]]:
    """'Name: value' groups separated by blank lines (RFC 3464 section 2.1), folding undone."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text[:SCAN_LIMIT].split("\n"):
        if not line.strip():
            if current:
                blocks.append(current)
                current, last = {}, ""
            continue
        if line[0] in " \t" and last:
            current[last] += " " + line.strip()
            continue
        match = _FIELD.fullmatch(line.strip())
        if match is None:
            last = ""
            continue
        last = match.group(1).lower()
        current.setdefault(last, match.group(2).strip())
    if current:
        blocks.append(current)
    return [b for b in blocks if _is_recipient_block(b) or "original-message-id" in b][
        : _MAX_RECIPIENTS + 1
    ]


def _is_recipient_block(block: dict[str, str]) -> bool:
    return "final-recipient" in block or (
        "action" in block and ("status" in block or "original-recipient" in block)
    )


def _recipient_facts(
    blocks: Sequence[dict[str, str]],
) -> tuple[list[str], list[str], list[str]]:
    """(actions, failed recipients, status codes) of RFC 3464 per-recipient groups."""
    actions: list[str] = []
    failed: list[str] = []
    codes: list[str] = []
    for block in blocks:
        status = _STATUS_CODE.search(block.get("status", ""))
        code = status.group(0) if status else ""
        words = block.get("action", "").lower().split()
        action = _ACTION_ALIASES.get(words[0], words[0]) if words else ""
        if action not in FAILED_ACTIONS and action not in NOTICE_ACTIONS:
            # No or an unknown Action: the status class says what happened (RFC 3463).
            action = _STATUS_ACTION.get(code[:1], "failed")
        actions.append(action)
        if code and code not in codes:
            codes.append(code)
        if action == "failed":
            address = _recipient_address(
                block.get("final-recipient") or block.get("original-recipient") or ""
            )
            if address and address not in failed:
                failed.append(address)
    return actions, failed, codes


def _recipient_address(value: str) -> str | None:
    # "rfc822; user@host" (RFC 3464 section 2.3.2); the address type is optional in practice.
    address = value.rpartition(";")[2] if ";" in value else value
    found = ADDRESS.search(address)
    return found.group(0).lower() if found else None


def _text_recipients(msg: email.message.Message, text: str) -> list[str]:
    """Failed recipients named in a non-DSN bounce, before its copy of the message."""
    found: list[str] = []
    # Exim (and MTAs built on it) name them in a header of their own.
    for value in _header_all(msg, "x-failed-recipients"):
        found.extend(m.group(0).lower() for m in ADDRESS.finditer(value))
    copy = _RETURNED_COPY.search(text)
    notice = text[: copy.start()] if copy else text[:8192]
    for pattern in _RECIPIENT_LINES:
        for match in pattern.finditer(notice):
            address = _recipient_address(match.group(1))
            if address:
                found.append(address)
    return _unique(found)[:_MAX_RECIPIENTS]


def _original_message_id(blocks: Sequence[dict[str, str]], parts: _Parts, text: str) -> str | None:
    # Some MTAs name it in the report itself (Original-Message-ID, X-Original-Message-ID).
    for block in blocks:
        for name in ("original-message-id", "x-original-message-id"):
            found = _MESSAGE_ID.search(block.get(name, ""))
            if found:
                return found.group(0)
    # RFC 6522: the returned message or its header section.
    if parts.returned_ids:
        return parts.returned_ids[0]
    # Bounces that quote the message inline: the Message-ID line of the copy, else any.
    copy = _RETURNED_COPY.search(text)
    if copy:
        found = _MESSAGE_ID_LINE.search(text, copy.start())
        if found:
            return found.group(1)
    found = _MESSAGE_ID_LINE.search(text)
    return found.group(1) if found else None


def _returned_message_ids(part: email.message.Message) -> list[str]:
    payload = part.get_payload()
    inner = payload[0] if isinstance(payload, list) and payload else None
    if isinstance(inner, email.message.Message):
        for name, value in inner.raw_items():
            if name.lower() == "message-id":
                found = _MESSAGE_ID.search(value)
                return [found.group(0)] if found else []
        return []
    # Unparsed (e.g. message/global): read the header lines as text.
    return _MESSAGE_ID_LINE.findall(_part_text(part, SCAN_LIMIT).partition("\n\n")[0])


def _fingerprint(text: str, folded: str | None = None) -> str | None:
    """The first MTA whose bounce text this is; folded: _folded(text), if already made."""
    folded = _folded(text) if folded is None else folded
    for (name, pattern), gate in zip(_FINGERPRINTS, _FINGERPRINT_GATES, strict=True):
        if _may_match(gate, folded) and pattern.search(text):
            return name
    return None


def _generic_failure(text: str, folded: str) -> bool:
    return _may_match(_GENERIC_FAILURE_GATE, folded) and bool(_GENERIC_FAILURE.search(text))


def _is_bounce_subject(subject: str) -> bool:
    # "[External] Fwd: Undeliverable: ..." is a person forwarding a bounce.
    subject = _LEADING_TAGS.sub("", subject.strip())
    return not _FORWARD_OR_REPLY.match(subject) and bool(_BOUNCE_SUBJECT.match(subject))


def _is_daemon_origin(msg: email.message.Message) -> bool:
    """From a mail system: a daemon From (name or mailbox), or a null or daemon Return-Path."""
    for value in _header_all(msg, "from")[:1] + _header_all(msg, "return-path")[:1]:
        if _DAEMON_DISPLAY_NAME.search(value):
            return True
        for match in ADDRESS.finditer(value):
            if daemon_kind(match.group(0)) in ("mailer-daemon", "postmaster"):
                return True
    return any(v.strip() in ("<>", "") for v in _header_all(msg, "return-path")[:1])


def _amazon_action(text: str) -> str:
    kind = re.search(r'notificationType\\?"\s*:\s*\\?"(\w+)', text)
    return "delivered" if kind and kind.group(1) == "Delivery" else "failed"


def _decoded_header(msg: email.message.Message, name: str) -> str:
    """The first value with RFC 2047 encoded-words decoded; as written if they are broken."""
    values = _header_all(msg, name)
    if not values:
        return ""
    try:
        pieces = email.header.decode_header(values[0])
        text = "".join(
            data if isinstance(data, str) else data.decode(_text_codec(charset), "replace")
            for data, charset in pieces
        )
    except Exception:
        return values[0]
    return _one_line(text)


def _header_all(msg: email.message.Message, name: str) -> list[str]:
    """Raw values, unfolded: raw_items never runs a header parser, so it cannot raise."""
    return [_one_line(v) for k, v in msg.raw_items() if k.lower() == name]


def _one_line(value: object) -> str:
    text = str(value)
    if _SURROGATE.search(text):
        # Raw 8-bit header bytes come back as surrogate escapes; they are most often UTF-8.
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join(text.split())[:SCAN_LIMIT]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- recognisers the main-process classify rules use too -----------------------------------------


def is_challenge(subject: str, text: str, folded: str | None = None) -> bool:
    """A challenge-response request; folded: _folded(text), if already made (the fold is one
    character for one, so its first 8,192 characters are those of text[:8192])."""
    if _CHALLENGE_SUBJECT.search(subject):
        return True
    head = text[:8192]
    gate = _folded(head) if folded is None else folded[:8192]
    return _may_match(_CHALLENGE_TEXT_GATE, gate) and bool(_CHALLENGE_TEXT.search(head))


def daemon_kind(address: str) -> str | None:
    """Which mail-system or list-manager mailbox an address is (None: not one)."""
    local = address.strip().strip("<>").rpartition("@")[0] or address.strip().strip("<>")
    local = local.lower()
    if not local:
        return None
    if local in _DAEMON_LOCAL_PARTS:
        return _DAEMON_LOCAL_PARTS[local]
    if local.endswith("-request"):
        return "list-request"
    if local.startswith("owner-") or local.endswith("-owner"):
        return "list-owner"
    return None
