"""[decide] Whether a message is filed, quarantined or refused, as an ordered table of rules.

Each rule is a small predicate named after the condition that hits; every rule is asked,
every hit is kept (with its reason) for the log, the message and the quarantine, and the
first hit decides. It must never let an address count as authorised when the message is
shown forged, and it never decides on anything but the facts handed to it (no I/O).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from .classify import Kind


class Disposition(StrEnum):
    FILE = "file"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    TEMPFAIL = "tempfail"  # we could not decide now (a DNS temporary error): 451 4.7.0


class Reason(StrEnum):
    """The kebab-case reasons of the contract, kept on messages and quarantine rows."""

    BLOCKED = "blocked"
    LOOP = "loop"
    MALFORMED = "malformed"
    MALFORMED_FROM = "malformed-from"
    UNAUTHENTICATED = "unauthenticated"
    AUTH_TEMPERROR = "auth-temperror"
    LOOKALIKE = "lookalike"
    STAFF = "staff"
    AUTHORISED = "authorised"
    RELEASED = "released"
    TICKET_EVENT = "ticket-event"
    UNKNOWN_SENDER = "unknown-sender"
    DUPLICATE = "duplicate"  # a copy of a message already stored: filed with the first
    # Not a rule's reason but a flag kept with the others: another sender's mail was
    # stored first with this Message-ID (pipeline._flags).
    REUSED_MESSAGE_ID = "reused-message-id"


@dataclass(frozen=True)
class MessageFacts:
    """What the message says about itself, read on the event loop (`actions.intake.intake_of`);
    what the sender list says is looked up in the store transaction, and both make the
    `PolicyFacts`, once (`actions.intake.look_up`)."""

    sender: str | None
    from_problem: str | None
    malformed: str | None
    classification: Kind
    staff: bool
    forged: str | None
    auth_temperror: bool
    lookalike_of: str | None  # the staff address or mailbox of ours it imitates


@dataclass(frozen=True)
class PolicyFacts:
    """Everything the rules look at: what the message says (`MessageFacts`) and what the
    sender list and the store say, built once inside the store transaction."""

    sender: str | None  # the From addr-spec, normalised; None if there is no usable one
    from_problem: str | None  # why From is unusable: "missing", "several", "group", ...
    malformed: str | None  # why the message could not be parsed, if it could not
    classification: Kind
    loop_reason: str | None  # our own mail came back, or the sender's rate tripped the loop
    blocked: bool
    authorised: bool  # on the sender list (address or granted domain), not blocked
    staff: bool
    forged: str | None  # why the message is shown forged (only asked of known senders)
    auth_temperror: bool
    lookalike_of: str | None  # the authorised or staff address it imitates
    known_ticket: bool  # an auto-reply or bounce about mail we sent (our Message-ID or token)
    released: bool  # an admin released it from the quarantine: they vouch for the sender
    unknown_sender: str  # "quarantine" or "reject" ([policy] unknown_sender)


@dataclass(frozen=True)
class Hit:
    rule: str
    reason: str
    disposition: Disposition


@dataclass(frozen=True)
class Verdict:
    disposition: Disposition
    reason: Reason
    hits: tuple[Hit, ...]

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(h.reason for h in self.hits)


# A rule answers with its reason when it hits, None otherwise.
Rule = Callable[[PolicyFacts], str | None]


def blocked(f: PolicyFacts) -> str | None:
    return Reason.BLOCKED if f.blocked else None


def mail_loop(f: PolicyFacts) -> str | None:
    # Our own mail came back: refuse it at once.
    return Reason.LOOP if f.classification is Kind.LOOP else None


def inbound_flood(f: PolicyFacts) -> str | None:
    # A sender over the hourly threshold: hold (never answer) the rest of that hour's mail.
    return Reason.LOOP if f.loop_reason else None


def unparseable(f: PolicyFacts) -> str | None:
    return Reason.MALFORMED if f.malformed else None


def malformed_from(f: PolicyFacts) -> str | None:
    return Reason.MALFORMED_FROM if f.from_problem or not f.sender else None


def forged_known_sender(f: PolicyFacts) -> str | None:
    # Invariant 6: a known address counts only when the message is not shown forged.
    # Strangers need no such check: they are unknown either way.
    if (f.staff or f.authorised) and f.forged:
        return Reason.UNAUTHENTICATED
    return None


def auth_undecided(f: PolicyFacts) -> str | None:
    # A DNS temporary error is never a pass: ask the sender to retry (451 4.7.0).
    if (f.staff or f.authorised) and f.auth_temperror and not f.forged:
        return Reason.AUTH_TEMPERROR
    return None


def lookalike(f: PolicyFacts) -> str | None:
    return Reason.LOOKALIKE if f.lookalike_of and not (f.staff or f.authorised) else None


def staff(f: PolicyFacts) -> str | None:
    return Reason.STAFF if f.staff else None


def authorised(f: PolicyFacts) -> str | None:
    return Reason.AUTHORISED if f.authorised else None


def released(f: PolicyFacts) -> str | None:
    return Reason.RELEASED if f.released else None


def automatic_for_known_ticket(f: PolicyFacts) -> str | None:
    automatic = f.classification in (Kind.AUTO_REPLY, Kind.NOTICE, Kind.BOUNCE)
    return Reason.TICKET_EVENT if automatic and f.known_ticket else None


def unknown_sender(f: PolicyFacts) -> str | None:
    return Reason.UNKNOWN_SENDER


def _unknown_disposition(f: PolicyFacts) -> Disposition:
    return Disposition.REJECT if f.unknown_sender == "reject" else Disposition.QUARANTINE


# The policy, in order: first hit wins. A disposition given as a function depends on config.
RULES: tuple[tuple[Rule, Disposition | Callable[[PolicyFacts], Disposition]], ...] = (
    (blocked, Disposition.REJECT),
    (mail_loop, Disposition.REJECT),
    (inbound_flood, Disposition.QUARANTINE),
    # An admin's release vouches for everything below: it files what was held.
    (released, Disposition.FILE),
    # "Automatic" is the sender's own claim (an Auto-Submitted header, an "Out of office"
    # subject): a known address shown forged, or a look-alike, is held whatever it claims.
    (forged_known_sender, Disposition.QUARANTINE),
    (auth_undecided, Disposition.TEMPFAIL),
    (lookalike, Disposition.QUARANTINE),
    # An auto-reply or bounce about mail we sent (our Message-ID or reply token) is an
    # event on its ticket and carries no authority (it never opens, reopens or gets an
    # answer), while its From is routinely unusable ("MAILER-DAEMON <>"): file it before
    # the rules about the From's shape and the sender list.
    (automatic_for_known_ticket, Disposition.FILE),
    (unparseable, Disposition.QUARANTINE),
    (malformed_from, Disposition.QUARANTINE),
    (staff, Disposition.FILE),
    (authorised, Disposition.FILE),
    (unknown_sender, _unknown_disposition),
)


def decide(facts: PolicyFacts) -> Verdict:
    hits = []
    for rule, disposition in RULES:
        reason = rule(facts)
        if reason is None:
            continue
        chosen = disposition if isinstance(disposition, Disposition) else disposition(facts)
        hits.append(Hit(rule.__name__, reason, chosen))
    # unknown_sender always hits, so there is at least one.
    first = hits[0]
    return Verdict(first.disposition, Reason(first.reason), tuple(hits))
