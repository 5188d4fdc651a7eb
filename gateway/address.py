"""Address helpers: which configured mailbox an envelope recipient names.

Pure functions, no I/O. They must never treat an address outside the configured mailboxes
as ours: that is what keeps gateway from being a relay.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from .config import MailboxConfig


@dataclass(frozen=True)
class Recipient:
    mailbox: MailboxConfig
    tag: str | None  # the part after "+" in support+tag@, if any


def split_address(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def match_mailbox(address: str, mailboxes: Iterable[MailboxConfig]) -> Recipient | None:
    """The mailbox `address` delivers to, or None if it is not one of ours.

    Local part and domain compare case-insensitively (RFC 5321 leaves local parts to the
    receiver; every mail program treats Support@ as support@), and ``local+tag@`` reaches
    ``local@`` with the tag kept for reply tokens.
    """
    local, domain = split_address(address.strip())
    if not local or not domain:
        return None
    local = local.lower()
    domain = domain.lower().rstrip(".")
    base, plus, tag = local.partition("+")
    for mailbox in mailboxes:
        if mailbox.domain == domain and mailbox.local_part == base:
            return Recipient(mailbox, tag if plus else None)
    return None


def is_our_domain(address: str, mailboxes: Iterable[MailboxConfig]) -> bool:
    domain = split_address(address.strip())[1].lower().rstrip(".")
    return any(mailbox.domain == domain for mailbox in mailboxes)


def normalise_address(address: str) -> str | None:
    """An addr-spec as we compare and store it: lower-case, IDNA (A-label) domain.

    Local parts are compared case-insensitively, as every mail program does in practice.
    Returns None for something that is not an address at all.
    """
    local, domain = split_address(address.strip())
    if not local or not domain or any(c.isspace() for c in address.strip()):
        return None
    domain = domain.rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return f"{local.lower()}@{domain}"


# Validation costs ~50 us a call, on the event loop for every message, and the same senders
# write again and again. Keys are From addr-specs (at most 998 characters, see
# gateway.inbound), so the cache holds a few MB at most.
@functools.lru_cache(maxsize=1024)
def parse_sender(address: str) -> str | None:
    """The From addr-spec as identity: valid by email-validator (no DNS), lower-case,
    domain as IDNA A-label; None if it is not a valid address."""
    try:
        valid = validate_email(address.strip(), check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        return None
    return f"{valid.local_part.lower()}@{valid.ascii_domain.lower()}"
