"""The [classify] stage: whether a message comes from a person, or is an auto-reply, a bounce, a
delivery notice, or our own mail coming back - and every signal that says so.

`classify` decides, in the main process where the envelope is known, by an ordered table of
rules (RULES); what a bounce says was read before, in the parser worker (`bounce.py`). It may
not raise, do I/O, or read more than the first 64 KB of any text: a hostile message must not
make classification slow or fail the intake.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .bounce import (
    ADDRESS,
    FAILED_ACTIONS,
    NOTICE_ACTIONS,
    SCAN_LIMIT,
    DeliveryReport,
    daemon_kind,
    is_challenge,
)

# --- values ---------------------------------------------------------------------------------


class Kind(StrEnum):
    NORMAL = "normal"
    AUTO_REPLY = "auto-reply"
    BOUNCE = "bounce"
    # A delivery report that is only news (delayed, relayed, delivered): stored like an
    # auto-reply and never answered, but it marks no recipient undeliverable.
    NOTICE = "notice"
    LOOP = "loop"


# The header on all the mail we send (mailbuild.build_mail): mail that comes back with it is
# our own.
LOOP_HEADER = "X-Gateway-Loop"


@dataclass(frozen=True)
class OwnIdentity:
    hostname: str  # our outgoing Message-IDs end with "@<hostname>>"; the loop header's value
    addresses: tuple[str, ...]  # our mailboxes, lower-case
    loop_header: str = LOOP_HEADER


@dataclass(frozen=True)
class Classification:
    kind: Kind
    reasons: tuple[str, ...]  # every signal that hit, in table order, kebab-case


# --- patterns ----------------------------------------------------------------------------------

# A header-supplied word in a reason is cut to this many characters.
_MAX_TOKEN = 40
_TOKEN = re.compile(r"[a-z0-9][a-z0-9_-]*")

# Out-of-office subjects (the defaults of Exchange, Outlook, Gmail, Apple Mail, Zimbra and
# Notes in the languages our clients write), anchored at the start so that a request *about*
# such a feature ("Re: automatic reply not working") stays a person's mail. Plain words
# ("Absent", "Afwezig") count only as a prefix ending in ":" or "-", as responders write them.
_OUT_OF_OFFICE_SUBJECT = re.compile(
    r"(?:\[[^\]]{0,40}\][ \t]*)?(?:out of (?:the )?office|automatic reply|automated reply"
    r"|auto[- ]?reply|auto[- ]?response|autorespon|away from (?:the |my )?office|away until"
    r"|on vacation until|vacation (?:reply|notice|message)|abwesenheitsnotiz|abwesenheit"
    r"|automatische antwort|réponse automatique|reponse automatique|message d'absence"
    r"|absent du bureau|respuesta automática|respuesta automatica|fuera de la oficina"
    r"|automatisch antwoord|afwezigheidsbericht|niet aanwezig|risposta automatica"
    r"|fuori (?:sede|ufficio)|resposta automática|resposta automatica|fora do escritório"
    r"|automatiskt svar|automatisk svar|automaattinen vastaus|automatyczna odpowiedź"
    r"|automatická odpověď|自動応答|自動返信|自动回复"
    # Russian "автоматический ответ", escaped: its letters look like Latin ones.
    r"|\u0430\u0432\u0442\u043e\u043c\u0430\u0442\u0438\u0447\u0435\u0441\u043a\u0438\u0439"
    r" \u043e\u0442\u0432\u0435\u0442"
    r"|(?:absent|absence|abwesend|afwezig|ausente|ausencia|assente|frånvarande|fraværende"
    r"|ooo|不在)[ \t]*[:\-\u2013])",
    re.IGNORECASE,
)
# Notes and some Zimbra responders put the person first: "Jane Doe is out of the office".
_OUT_OF_OFFICE_ANYWHERE = re.compile(r"\b(?:is|am) (?:currently )?out of (?:the )?office\b", re.I)

# Headers that auto-responders older than RFC 3834 (and some still) put on what they send.
_AUTOREPLY_HEADERS = frozenset(
    {
        "x-autoreply",
        "x-autorespond",
        "x-autoresponder",
        "x-autoreply-from",
        "x-auto-reply",
        "x-autoresponse",
        "x-mail-autoreply",
    }
)
# Precedence values for which responders stay silent (RFC 3834 section 2, common practice).
_BULK_PRECEDENCE = frozenset({"bulk", "junk", "list", "auto_reply"})
# Exchange's X-Auto-Response-Suppress values that ask for no auto-reply (DR, NDR, RN and NRN
# only concern delivery and read receipts, which we never send).
_SUPPRESS_AUTO_REPLY = frozenset({"all", "oof", "autoreply"})


# --- main-process side: the decision ------------------------------------------------------------


@dataclass(frozen=True)
class _Facts:
    """classify()'s inputs, normalised once for all rules."""

    headers: tuple[tuple[str, str], ...]  # (lower-case name, value)
    subject: str
    from_addresses: tuple[str, ...]  # lower-case addr-specs
    mail_from: str  # lower-case addr-spec, "" for the null reverse-path
    content_type: str
    report: DeliveryReport | None
    own: OwnIdentity
    text: str

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


Rule = Callable[[_Facts], str | None]


def own_loop_header(facts: _Facts) -> str | None:
    # Every mail we send carries our loop header; seeing it again means a forwarder or
    # another auto-responder sent our own mail back.
    name = facts.own.loop_header.lower()
    hostname = facts.own.hostname.lower()
    if any(v.strip().lower() == hostname for v in facts.values(name)):
        return f"loop-header:{name}"
    return None


def x_loop_own_address(facts: _Facts) -> str | None:
    # X-Loop (procmail, many list managers) naming one of our mailboxes.
    addresses = {a.lower() for a in facts.own.addresses}
    for value in facts.values("x-loop"):
        if any(m.group(0).lower() in addresses for m in ADDRESS.finditer(value)):
            return "x-loop:own-address"
    return None


def own_message_id(facts: _Facts) -> str | None:
    # Our outgoing Message-IDs end with "@<hostname>>": this message is one we sent.
    suffix = f"@{facts.own.hostname.lower()}>"
    if any(v.strip().lower().endswith(suffix) for v in facts.values("message-id")):
        return "own-message-id"
    return None


def own_sender(facts: _Facts) -> str | None:
    # A mail "from" our own mailbox is either a self-loop or a forgery; neither is answered.
    addresses = {a.lower() for a in facts.own.addresses}
    if facts.mail_from in addresses:
        return "mail-from:own-address"
    if any(a in addresses for a in facts.from_addresses):
        return "from:own-address"
    return None


def delivery_failure(facts: _Facts) -> str | None:
    # RFC 3464 "failed" (or a non-standard bounce saying the same), from a report or from an
    # automated sender: a bounce, possibly of our own mail (report.original_message_id).
    report = facts.report
    if report is None or not any(a in FAILED_ACTIONS for a in report.actions):
        return None
    if report.is_report or _is_automated_sender(facts):
        return report.reason
    return None


def delivery_notice(facts: _Facts) -> str | None:
    # A report whose recipients are only delayed, relayed, delivered or expanded is news.
    report = facts.report
    if report is None or not report.actions:
        return None
    if not all(a in NOTICE_ACTIONS for a in report.actions):
        return None
    if report.is_report or _is_automated_sender(facts):
        return report.reason
    return None


def auto_submitted(facts: _Facts) -> str | None:
    # RFC 3834 section 5: any value but "no" marks automatic mail.
    for value in facts.values("auto-submitted"):
        keyword = value.strip().lower().split(";")[0].split("(")[0].strip()
        if keyword != "no":
            return f"auto-submitted:{_token(keyword)}"
    return None


def bulk_precedence(facts: _Facts) -> str | None:
    # Precedence is not standard, but responders honour it (RFC 3834 section 2).
    for value in facts.values("precedence"):
        keyword = value.strip().lower()
        if keyword in _BULK_PRECEDENCE:
            return f"precedence:{keyword}"
    return None


def auto_response_suppress(facts: _Facts) -> str | None:
    # Exchange's X-Auto-Response-Suppress (MS-OXCMAIL): set on auto-replies, and a request
    # that we send none.
    for value in facts.values("x-auto-response-suppress"):
        words = {w.strip().lower() for w in value.split(",")}
        hit = sorted(words & _SUPPRESS_AUTO_REPLY)
        if hit:
            return f"x-auto-response-suppress:{hit[0]}"
    return None


def autoreply_header(facts: _Facts) -> str | None:
    # The X-Autoreply / X-Autorespond family that pre-RFC 3834 responders still send.
    for name, _value in facts.headers:
        if name in _AUTOREPLY_HEADERS:
            return f"header:{name}"
    return None


def list_header(facts: _Facts) -> str | None:
    # RFC 2369 (List-Help, List-Unsubscribe, ...) and RFC 2919 (List-Id): list traffic.
    for name, _value in facts.headers:
        if name.startswith("list-"):
            return f"list-header:{_token(name)}"
    return None


def null_sender(facts: _Facts) -> str | None:
    # RFC 5321 section 4.5.5: the null reverse-path is for notifications, never to be answered.
    return "null-sender" if facts.mail_from == "" else None


def daemon_sender(facts: _Facts) -> str | None:
    # MAILER-DAEMON and postmaster (RFC 5321 section 4.5.1), and the -request and owner-
    # mailboxes of list managers (RFC 2142's LIST-REQUEST convention): none is a person.
    for address in (facts.mail_from, *facts.from_addresses):
        kind = daemon_kind(address)
        if kind:
            return f"sender:{kind}"
    return None


def out_of_office_subject(facts: _Facts) -> str | None:
    # Auto-responders that set no header at all still title their reply this way.
    subject = facts.subject
    if _OUT_OF_OFFICE_SUBJECT.match(subject) or _OUT_OF_OFFICE_ANYWHERE.search(subject):
        return "subject:out-of-office"
    return None


def challenge_response(facts: _Facts) -> str | None:
    # A challenge ("confirm you are human") answered by an acknowledgement would verify us.
    return "challenge-response" if is_challenge(facts.subject, facts.text) else None


def report_content_type(facts: _Facts) -> str | None:
    # RFC 6522: every multipart/report (DSN, MDN read receipt, ARF feedback) is machine mail.
    return "content-type:multipart/report" if facts.content_type == "multipart/report" else None


# Ordered by the kind each rule gives: loop > bounce > notice > auto-reply. The first hit
# decides the kind; every hit is kept as a reason.
RULES: tuple[tuple[Rule, Kind], ...] = (
    (own_loop_header, Kind.LOOP),
    (x_loop_own_address, Kind.LOOP),
    (own_message_id, Kind.LOOP),
    (own_sender, Kind.LOOP),
    (delivery_failure, Kind.BOUNCE),
    (delivery_notice, Kind.NOTICE),
    (auto_submitted, Kind.AUTO_REPLY),
    (bulk_precedence, Kind.AUTO_REPLY),
    (auto_response_suppress, Kind.AUTO_REPLY),
    (autoreply_header, Kind.AUTO_REPLY),
    (list_header, Kind.AUTO_REPLY),
    (null_sender, Kind.AUTO_REPLY),
    (daemon_sender, Kind.AUTO_REPLY),
    (out_of_office_subject, Kind.AUTO_REPLY),
    (challenge_response, Kind.AUTO_REPLY),
    (report_content_type, Kind.AUTO_REPLY),
)


def classify(
    headers: Sequence[tuple[str, str]],
    subject: str | None,
    from_addresses: Sequence[tuple[str, str]],
    mail_from: str,
    content_type: str,
    report: DeliveryReport | None,
    own: OwnIdentity,
    text: str = "",
) -> Classification:
    """Pure and cheap, in the main process. Order: loop > bounce > notice > auto-reply > normal.

    headers: every top-level (name, value); from_addresses: (display name, addr-spec) per From
    address; mail_from: the envelope sender, "" or "<>" for the null reverse-path; text: the
    message's plain text (only its first 64 KB is read).
    """
    facts = _Facts(
        headers=tuple((str(n).strip().lower(), str(v)) for n, v in headers),
        subject=(subject or "").strip(),
        from_addresses=tuple(_bare_address(a) for _n, a in from_addresses),
        mail_from=_bare_address(mail_from),
        content_type=content_type.partition(";")[0].strip().lower(),
        report=report,
        own=own,
        text=text[:SCAN_LIMIT],
    )
    kind = Kind.NORMAL
    reasons: list[str] = []
    for rule, rule_kind in RULES:
        reason = rule(facts)
        if reason is None:
            continue
        if not reasons:
            kind = rule_kind
        if reason not in reasons:
            reasons.append(reason)
    return Classification(kind, tuple(reasons))


def _is_automated_sender(facts: _Facts) -> bool:
    """The envelope or From says a mail system sent this (what confirms a bounce-like text)."""
    return (
        null_sender(facts) is not None
        or any(daemon_kind(a) in ("mailer-daemon", "postmaster") for a in _senders(facts))
        or auto_submitted(facts) is not None
    )


def _senders(facts: _Facts) -> tuple[str, ...]:
    return (facts.mail_from, *facts.from_addresses)


def _bare_address(value: str) -> str:
    """A lower-case addr-spec from "<a@b>", "a@b" or "Name <a@b>"; "" for the null path."""
    value = value.strip()
    if "<" in value:
        value = value[value.rfind("<") + 1 :].partition(">")[0]
    return value.strip().lower()


def _token(value: str) -> str:
    """A header-supplied word made safe for a reason string (log fields, audit rows)."""
    found = _TOKEN.match(value.lower())
    return found.group(0)[:_MAX_TOKEN] if found else "other"
