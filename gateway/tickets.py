"""[thread] Which ticket a message belongs to, or whether it opens a new one.

The order is DESIGN.md's: the signed reply token in the recipient address, then
In-Reply-To/References naming a Message-ID we stored, then the subject tag - the tag only
when the sender may write to that ticket. It must never attach mail to a ticket on the
word of a stranger: a tag or a token we cannot verify is ignored, not trusted.

Message-IDs are chosen by whoever writes the mail, so only our own outgoing IDs are keys
anyone may use (they were only ever sent to the ticket's people); a client's ID threads
only mail from someone who may write to that ticket, and the first stored row with an ID
is the one it names (a later mail reusing it captures nothing). Staff mail threads by our
own reply token or our own Message-ID only: a staff reply is mailed to the client, so it
needs a key only the desk's mail carried, never the tag or a client's ID.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# The shared value types live in model.py (the store uses them too and imports no stage);
# they are re-exported here so that `from .tickets import Status` keeps working.
from .model import MessageKind as Kind
from .model import Status, TicketRef, Via

__all__ = [
    "Kind",
    "Status",
    "SubjectTag",
    "ThreadDecision",
    "ThreadFacts",
    "TicketLookup",
    "TicketRef",
    "Via",
    "make_token",
    "reference_order",
    "thread_message",
    "verify_token",
]

# A reply token is the plus-tag "t<number>-<mac>"; the mac is 10 base32 characters
# (50 bits) of HMAC-SHA256 over the ticket number: not guessable, short enough for an
# address that people see.
_TOKEN = re.compile(r"t(\d{1,12})-([a-z2-7]{10})")
_MAC_CHARS = 10


def make_token(secret: bytes, number: int) -> str:
    return f"t{number}-{_mac(secret, number)}"


def verify_token(secret: bytes, tag: str | None) -> int | None:
    """The ticket number a reply token names, or None if it is absent or forged."""
    if not tag:
        return None
    match = _TOKEN.fullmatch(tag.lower())
    if match is None:
        return None
    number = int(match.group(1))
    if not hmac.compare_digest(match.group(2), _mac(secret, number)):
        return None
    return number


def _mac(secret: bytes, number: int) -> str:
    digest = hmac.new(secret, f"ticket:{number}".encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:_MAC_CHARS]


class SubjectTag:
    """The ticket tag in subjects, from a format such as "[#{number}]"."""

    def __init__(self, template: str) -> None:
        if template.count("{number}") != 1:
            raise ValueError("the tag format must contain {number} exactly once")
        self.template = template
        before, _, after = template.partition("{number}")
        self._pattern = re.compile(re.escape(before) + r"(\d{1,12})" + re.escape(after))

    def format(self, number: int) -> str:
        return self.template.replace("{number}", str(number))

    def find(self, subject: str | None) -> list[int]:
        """Every ticket number tagged in the subject, in order."""
        if not subject:
            return []
        return [int(n) for n in self._pattern.findall(subject[:2000])]

    def add(self, subject: str, number: int) -> str:
        """The subject with the tag of `number` in front, unless it already has it."""
        if number in self.find(subject):
            return subject
        return f"{self.format(number)} {subject}".strip()


class TicketLookup(Protocol):
    """The reads threading needs, answered inside the filing transaction."""

    def ticket(self, number: int) -> TicketRef | None: ...

    def ticket_for_message_ids(
        self, message_ids: Sequence[str], sender: str | None
    ) -> TicketRef | None:
        """The ticket of the first of `message_ids` that names one: our own outgoing
        mail's, or (when `sender` is given) the first stored incoming row's, if `sender`
        may write to that ticket. `sender` None: our own Message-IDs only."""
        ...

    def may_write(self, number: int, address: str) -> bool: ...


@dataclass(frozen=True)
class ThreadFacts:
    """What threading looks at, taken from the message and its envelope."""

    sender: str | None  # normalised From address
    token_ticket: int | None  # from a verified reply token, else None
    references: tuple[str, ...]  # In-Reply-To first, then References newest first
    tagged: tuple[int, ...]  # ticket numbers tagged in the subject
    # Staff mail threads by our own token or Message-ID only (never the tag, never a
    # client's Message-ID): what threads is a staff reply, mailed to the client.
    staff: bool = False


@dataclass(frozen=True)
class ThreadDecision:
    ticket: TicketRef | None  # the ticket it joins (None: a new one, or none at all)
    via: Via
    follows: int | None = None  # a closed ticket this mail was meant for


def thread_message(facts: ThreadFacts, lookup: TicketLookup) -> ThreadDecision:
    """Find the ticket for a message. A closed ticket is reported as `follows`."""
    found: TicketRef | None = None
    via = Via.NEW
    if facts.token_ticket is not None:
        found = lookup.ticket(facts.token_ticket)
        via = Via.TOKEN
    if found is None and facts.references:
        sender = None if facts.staff else facts.sender
        found = lookup.ticket_for_message_ids(facts.references, sender)
        via = Via.REFERENCES
    if found is None and facts.sender and not facts.staff:
        for number in facts.tagged:
            if lookup.may_write(number, facts.sender):
                found = lookup.ticket(number)
                via = Via.TAG
                if found is not None:
                    break
    if found is None:
        return ThreadDecision(None, Via.NEW)
    if found.status is Status.CLOSED:
        return ThreadDecision(None, Via.FOLLOW_UP, follows=found.number)
    return ThreadDecision(found, via)


def reference_order(in_reply_to: Sequence[str], references: Sequence[str]) -> tuple[str, ...]:
    """Message-IDs to look up, the most telling first: In-Reply-To, then References
    from the newest (last) to the oldest, without repeats, at most 50."""
    seen: dict[str, None] = {}
    for mid in [*in_reply_to, *reversed(references)]:
        mid = mid.strip()
        if mid and mid not in seen:
            seen[mid] = None
    return tuple(seen)[:50]
