"""Value types shared by the stages and the store: what a ticket's status, a stored
message's kind and the way it was filed can be, and the reference to a ticket.

Not a stage: no I/O, no SQL, no imports from gateway. The store's records use these enums
so that a field of a fixed set is typed as that set; their values are the strings stored
in the database and shown in the CLI's JSON, so a member's value never changes (a new one
may be added).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """A ticket's status (tickets.status)."""

    NEW = "new"
    OPEN = "open"
    PENDING = "pending"
    SOLVED = "solved"
    CLOSED = "closed"


class MessageKind(StrEnum):
    """What a stored message is to its ticket (messages.kind; the `kind` of the JSON
    contract). `tickets.Kind` is this type."""

    CLIENT = "client"
    STAFF = "staff"
    AUTO_REPLY = "auto-reply"
    BOUNCE = "bounce"
    NOTE = "note"


class Via(StrEnum):
    """How a message found its ticket (messages.threaded_via, and the log)."""

    TOKEN = "token"
    REFERENCES = "references"
    TAG = "tag"
    NEW = "new"
    FOLLOW_UP = "follow-up"
    DUPLICATE = "duplicate"
    NONE = "none"
    # Not threaded at all: written to its ticket by us.
    OUTGOING = "outgoing"  # our own outgoing mail (an acknowledgement, a staff reply)
    CLI = "cli"  # an internal note written with the CLI


@dataclass(frozen=True)
class TicketRef:
    number: int
    status: Status
