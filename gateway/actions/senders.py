"""Organisations and senders: what an admin does to the sender list (add, update and
remove an organisation; authorise, update, remove and block a sender; grant a whole
domain; import a file), and what a quarantine release or block does to it, through the
same functions.

Every check and change runs in the caller's one transaction (BEGIN IMMEDIATE for the
CLI): the checks still hold when the changes commit. The daemon reads the sender list for
each message, so a committed change applies to the next message.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NotRequired, TypedDict, cast

from email_validator import EmailNotValidError, validate_email

from ..address import is_our_domain, match_mailbox
from ..config import MailboxConfig
from ..store.events import EventAction, record_event
from ..store.senders import (
    Organisation,
    SenderEntry,
    add_org_domain,
    add_organisation,
    block_sender,
    count_organisation_tickets,
    find_organisation,
    find_sender,
    last_inbound_from,
    list_senders,
    organisation_extras,
    organisation_for_domain,
    remove_org_domain,
    remove_organisation,
    remove_sender,
    sender_record,
    unblock_sender,
    update_organisation,
    upsert_sender,
)
from .errors import ActionError

# --- arguments as stored -----------------------------------------------------------------


def printable(text: str) -> str:
    return "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in text)


def valid_address(text: str) -> str:
    """An address as senders are stored: valid, lower-case, IDNA (A-label) domain."""
    try:
        valid = validate_email(text.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise ActionError(f"invalid address '{text}': {exc}") from None
    return f"{valid.local_part.lower()}@{valid.ascii_domain.lower()}"


def valid_domain(text: str) -> str:
    """A mail domain as stored: lower-case A-label (a leading "@" is allowed)."""
    candidate = text.strip().removeprefix("@")
    try:
        valid = validate_email(f"postmaster@{candidate}", check_deliverability=False)
    except EmailNotValidError as exc:
        raise ActionError(f"invalid domain '{text}': {exc}") from None
    return valid.ascii_domain.lower()


def org_name(text: str) -> str:
    name = text.strip()
    if not name:
        raise ActionError("the organisation name is empty")
    if not name.isprintable() or len(name) > 200:
        raise ActionError(f"invalid organisation name '{printable(name)}': printable, 200 at most")
    return name


def display_name(text: str | None) -> str | None:
    # Line breaks and tabs (a spreadsheet cell's, say) become single spaces.
    name = " ".join((text or "").split())
    if not name:
        return None
    if not name.isprintable():
        raise ActionError(f"invalid name '{printable(name)}': control characters")
    return name


def unit(mailboxes: Sequence[MailboxConfig], text: str) -> str | None:
    """A desk unit named by one of the mailboxes ("" for none)."""
    if not text.strip():
        return None
    units = sorted({m.unit for m in mailboxes})
    if text.strip() not in units:
        raise ActionError(f"unknown unit '{text}' (the mailboxes' units: {', '.join(units)})")
    return text.strip()


def check_not_ours(
    mailboxes: Sequence[MailboxConfig], staff_domains: Sequence[str], domain: str
) -> None:
    if is_our_domain(f"x@{domain}", mailboxes) or domain in staff_domains:
        raise ActionError(f"domain '{domain}' is one of our own (a mailbox or staff domain)")


def check_not_own_mailbox(mailboxes: Sequence[MailboxConfig], address: str) -> None:
    if not address.startswith("@") and match_mailbox(address, mailboxes) is not None:
        raise ActionError(f"{address} is one of our own mailboxes")


def sender_key(address: str | None, domain: str | None, *, at_domain: bool = False) -> str:
    """The senders row an ADDRESS or --domain argument names ("@domain" for a domain).

    Only with `at_domain` does an ADDRESS "@domain" name a domain: authorising a whole
    domain must always be asked for by name (--domain).
    """
    if (address is None) == (domain is None):
        raise ActionError("give either an ADDRESS or --domain DOMAIN")
    if domain is not None:
        return "@" + valid_domain(domain)
    assert address is not None
    if at_domain and address.strip().startswith("@"):
        return "@" + valid_domain(address)
    return valid_address(address)


def find_org(conn: sqlite3.Connection, name: str) -> Organisation:
    org = find_organisation(conn, name.strip())
    if org is None:
        raise ActionError(f"no organisation '{name}'")
    return org


def domain_grant_problem(conn: sqlite3.Connection, address: str, org: Organisation) -> str | None:
    """Why `org` may not be granted this "@domain", or None if it may."""
    domain = address[1:]
    if domain in org.domains:
        return None
    owner = organisation_for_domain(conn, domain)
    if owner is not None:
        return f"domain '{domain}' belongs to organisation '{owner.name}', not '{org.name}'"
    return (
        f"domain '{domain}' is not one of {org.name}'s domains "
        f"(add it first: gateway orgs update '{org.name}' --add-domain {domain})"
    )


# --- the audit details, one shape per action ----------------------------------------------
#
# Every sender.* event says how it came about ("via": the command, the import, the
# quarantine entry) and why ("reason", null when none was given). The organisation events
# have one path each and carry "reason" only when one was given, as they always did.


class SenderAdded(TypedDict):
    organisation: str
    name: str | None
    via: str
    reason: str | None
    domain: NotRequired[bool]  # a grant of a whole domain ("@domain")
    file: NotRequired[str]  # `senders import`: the file and its line
    line: NotRequired[int]


def detail_sender_added(
    address: str, org: str, name: str | None, source: Source, reason: str | None
) -> SenderAdded:
    detail: SenderAdded = {"organisation": org, "name": name, "via": source.via, "reason": reason}
    _mark(detail, address, source)
    return detail


class SenderUpdated(TypedDict):
    organisation: NotRequired[dict[str, str | None]]  # {"from": ..., "to": ...}
    name: NotRequired[dict[str, str | None]]
    via: str
    reason: str | None
    domain: NotRequired[bool]
    file: NotRequired[str]
    line: NotRequired[int]


def detail_sender_updated(
    address: str, old: SenderEntry, org: str, name: str | None, source: Source, reason: str | None
) -> SenderUpdated:
    # The changes first, as the CLI has always shown them.
    changes: dict[str, Any] = {}
    if old.organisation != org:
        changes["organisation"] = {"from": old.organisation, "to": org}
    if old.name != name:
        changes["name"] = {"from": old.name, "to": name}
    detail = cast(SenderUpdated, {**changes, "via": source.via, "reason": reason})
    _mark(detail, address, source)
    return detail


def _mark(detail: SenderAdded | SenderUpdated, address: str, source: Source) -> None:
    if address.startswith("@"):
        detail["domain"] = True
    if source.file is not None:
        detail["file"] = source.file
        detail["line"] = source.line or 0


class SenderBlocked(TypedDict):
    organisation: str | None
    was: str  # "authorised" or "unknown"
    via: str
    reason: str | None


def detail_sender_blocked(
    existing: SenderEntry | None, via: str, reason: str | None
) -> SenderBlocked:
    return {
        "organisation": existing.organisation if existing else None,
        "was": "authorised" if existing else "unknown",
        "via": via,
        "reason": reason,
    }


class SenderRemoved(TypedDict):
    organisation: str | None
    name: str | None
    blocked: bool
    via: str
    reason: str | None


def detail_sender_removed(entry: SenderEntry, via: str, reason: str | None) -> SenderRemoved:
    return {
        "organisation": entry.organisation,
        "name": entry.name,
        "blocked": entry.blocked,
        "via": via,
        "reason": reason,
    }


def _with_reason(detail: dict[str, Any], reason: str | None) -> dict[str, Any]:
    return {**detail, "reason": reason} if reason else detail


def detail_org_added(
    domains: list[str],
    unit: str | None,
    manager: str | None,
    reason: str | None,
    out_of_hours: bool = False,
) -> dict[str, Any]:
    detail = {
        "domains": domains,
        "unit": unit,
        "account_manager": manager,
        "out_of_hours": out_of_hours,
    }
    return _with_reason(detail, reason)


def detail_org_removed(org: Organisation, removed: list[str], reason: str | None) -> dict[str, Any]:
    return _with_reason({"domains": list(org.domains), "senders_removed": removed}, reason)


def detail_senders_imported(
    file: str, added: int, updated: int, unchanged: int, reason: str | None
) -> dict[str, Any]:
    detail = {"file": file, "added": added, "updated": updated, "unchanged": unchanged}
    return _with_reason(detail, reason)


def _event(
    conn: sqlite3.Connection,
    *,
    actor: str,
    now: str,
    action: EventAction,
    subject: str,
    detail: Any,
) -> None:
    record_event(conn, time=now, actor=actor, action=action, subject=subject, detail=dict(detail))


# --- organisations ---------------------------------------------------------------------------


def add_org(
    conn: sqlite3.Connection,
    *,
    name: str,
    domains: list[str],
    unit: str | None,
    account_manager: str | None,
    actor: str,
    now: str,
    reason: str | None = None,
    out_of_hours: bool = False,
) -> None:
    """A new organisation with its domains (checked: not ours, not another's);
    `out_of_hours`: urgent mail out of hours pages the person on call (issue 12)."""
    existing = find_organisation(conn, name)
    if existing is not None:
        raise ActionError(f"organisation '{existing.name}' exists")
    for domain in domains:
        owner = organisation_for_domain(conn, domain)
        if owner is not None:
            raise ActionError(f"domain '{domain}' belongs to organisation '{owner.name}'")
    add_organisation(
        conn,
        name=name,
        domains=domains,
        unit=unit,
        account_manager=account_manager,
        now=now,
        out_of_hours=out_of_hours,
    )
    _event(
        conn,
        actor=actor,
        now=now,
        action=EventAction.ORG_ADDED,
        subject=f"org:{name}",
        detail=detail_org_added(domains, unit, account_manager, reason, out_of_hours),
    )


def update_org(
    conn: sqlite3.Connection,
    *,
    name: str,
    add_domains: list[str],
    remove_domains: list[str],
    mailboxes: Sequence[MailboxConfig],
    unit_text: str | None,
    account_manager_text: str | None,
    actor: str,
    now: str,
    reason: str | None = None,
    out_of_hours: bool | None = None,
) -> tuple[Organisation, dict[str, Any]]:
    """Change an organisation's domains, unit, account manager or out-of-hours cover;
    returns the changes (empty: nothing changed, nothing recorded)."""
    org = find_org(conn, name)
    changes: dict[str, Any] = {}
    for domain in add_domains:
        owner = organisation_for_domain(conn, domain)
        if owner is not None and owner.id == org.id:
            raise ActionError(f"domain '{domain}' is already one of {org.name}'s domains")
        if owner is not None:
            raise ActionError(f"domain '{domain}' belongs to organisation '{owner.name}'")
        add_org_domain(conn, org.id, domain)
    for domain in remove_domains:
        if find_sender(conn, f"@{domain}") is not None:
            raise ActionError(
                f"every address at {domain} is authorised: "
                f"`gateway senders remove --domain {domain}` first"
            )
        if not remove_org_domain(conn, org.id, domain):
            raise ActionError(f"domain '{domain}' is not one of {org.name}'s domains")
    if add_domains:
        changes["domains_added"] = add_domains
    if remove_domains:
        changes["domains_removed"] = remove_domains
    new_unit, manager = org.unit, org.account_manager
    if unit_text is not None:
        new_unit = unit(mailboxes, unit_text)
    if account_manager_text is not None:
        manager = valid_address(account_manager_text) if account_manager_text else None
    if new_unit != org.unit:
        changes["unit"] = {"from": org.unit, "to": new_unit}
    if manager != org.account_manager:
        changes["account_manager"] = {"from": org.account_manager, "to": manager}
    if out_of_hours is not None and out_of_hours != org.out_of_hours:
        changes["out_of_hours"] = {"from": org.out_of_hours, "to": out_of_hours}
    if not changes:
        return org, changes
    update_organisation(
        conn, org.id, unit=new_unit, account_manager=manager, out_of_hours=out_of_hours
    )
    _event(
        conn,
        actor=actor,
        now=now,
        action=EventAction.ORG_UPDATED,
        subject=f"org:{org.name}",
        detail=_with_reason(changes, reason),
    )
    return org, changes


def remove_org(
    conn: sqlite3.Connection, *, name: str, actor: str, now: str, reason: str | None = None
) -> tuple[Organisation, list[str]]:
    """Remove an organisation with no tickets, and its authorised senders (returned)."""
    org = find_org(conn, name)
    tickets = count_organisation_tickets(conn, org.id)
    if tickets:
        raise ActionError(
            f"organisation '{org.name}' has {tickets} ticket(s) and cannot be removed"
        )
    authorised = {s.address: s for s in list_senders(conn, organisation=org.id)}
    removed = remove_organisation(conn, org.id)
    for address in removed:
        _event(
            conn,
            actor=actor,
            now=now,
            action=EventAction.SENDER_REMOVED,
            subject=f"sender:{address}",
            detail=detail_sender_removed(authorised[address], "orgs remove", reason),
        )
    _event(
        conn,
        actor=actor,
        now=now,
        action=EventAction.ORG_REMOVED,
        subject=f"org:{org.name}",
        detail=detail_org_removed(org, removed, reason),
    )
    return org, removed


# --- senders -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """How a sender change came about, for its audit event."""

    via: str  # "senders add", "import", "quarantine release", ...
    file: str | None = None  # an import's file and line
    line: int | None = None


class Authorised(StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class Blocked(ActionError):
    """The address is blocked: it must be unblocked (removed) before it is authorised."""

    def __init__(self, address: str) -> None:
        super().__init__(f"{address} is blocked; `gateway senders remove {address}` it first")
        self.address = address


def authorise(
    conn: sqlite3.Connection,
    *,
    address: str,
    org: Organisation,
    name: str | None,
    keep_name: bool,
    mailboxes: Sequence[MailboxConfig],
    source: Source,
    actor: str,
    now: str,
    reason: str | None = None,
) -> tuple[Authorised, str | None]:
    """Authorise an address (or "@domain": every address at a domain of `org`) for an
    organisation, or move or rename it there. Never one of our own mailboxes, never a
    blocked address, never a domain that is not the organisation's. `keep_name`: a None
    `name` keeps the stored one. Returns what changed and the name it has now."""
    check_not_own_mailbox(mailboxes, address)
    if address.startswith("@"):
        problem = domain_grant_problem(conn, address, org)
        if problem is not None:
            raise ActionError(problem)
    existing = find_sender(conn, address)
    if existing is not None and existing.blocked:
        raise Blocked(address)
    if existing is not None and keep_name and name is None:
        name = existing.name
    if existing is not None and (existing.organisation, existing.name) == (org.name, name):
        return Authorised.UNCHANGED, name
    upsert_sender(conn, address=address, organisation=org.id, name=name, now=now)
    if existing is None:
        _event(
            conn,
            actor=actor,
            now=now,
            action=EventAction.SENDER_ADDED,
            subject=f"sender:{address}",
            detail=detail_sender_added(address, org.name, name, source, reason),
        )
        return Authorised.ADDED, name
    _event(
        conn,
        actor=actor,
        now=now,
        action=EventAction.SENDER_UPDATED,
        subject=f"sender:{address}",
        detail=detail_sender_updated(address, existing, org.name, name, source, reason),
    )
    return Authorised.UPDATED, name


def remove(
    conn: sqlite3.Connection,
    *,
    address: str | None,
    domain: str | None,
    actor: str,
    now: str,
    reason: str | None = None,
) -> tuple[str, SenderEntry]:
    """Remove an address or a domain grant (authorised or blocked); returns what it was."""
    try:
        key = sender_key(address, domain, at_domain=True)
    except ActionError:
        # A row stored under rules that have since changed must stay removable.
        raw = (address or "").strip().lower()
        if not raw or domain is not None or find_sender(conn, raw) is None:
            raise
        key = raw
    existing = find_sender(conn, key)
    if existing is None or not remove_sender(conn, key):
        raise ActionError(f"no sender '{key}'")
    _event(
        conn,
        actor=actor,
        now=now,
        action=EventAction.SENDER_REMOVED,
        subject=f"sender:{key}",
        detail=detail_sender_removed(existing, "senders remove", reason),
    )
    return key, existing


def block(
    conn: sqlite3.Connection,
    *,
    address: str,
    via: str,
    actor: str,
    now: str,
    reason: str | None = None,
) -> bool:
    """Refuse all mail from an address; False if it was blocked already (nothing done)."""
    existing = find_sender(conn, address)
    if existing is not None and existing.blocked:
        return False
    block_sender(conn, address, now=now)
    _event(
        conn,
        actor=actor,
        now=now,
        action=EventAction.SENDER_BLOCKED,
        subject=f"sender:{address}",
        detail=detail_sender_blocked(existing, via, reason),
    )
    return True


# --- import -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportRow:
    line: int  # physical line in the file, the header being line 1
    address: str  # normalised, or "@domain"
    org: str
    name: str | None


# The fields of a senders CSV file (its header).
CSV_FIELDS = ("address", "org", "name")


def import_row(mailboxes: Sequence[MailboxConfig], line: int, record: list[str]) -> ImportRow:
    """One record of a senders file, checked as `senders add` checks its arguments."""
    if len(record) not in (2, 3):
        raise ActionError(f"expected 3 fields ({','.join(CSV_FIELDS)}), found {len(record)}")
    address_text, org = record[0].strip(), record[1].strip()
    if address_text.startswith("@"):
        address = "@" + valid_domain(address_text)
    else:
        address = valid_address(address_text)
        check_not_own_mailbox(mailboxes, address)
    if not org:
        raise ActionError("the org field is empty")
    name = display_name(record[2] if len(record) == 3 else None)
    return ImportRow(line, address, org, name)


class ImportRefused(ActionError):
    """A file with bad rows: nothing is imported; `errors` names them (line, why)."""

    def __init__(self, label: str, errors: list[tuple[int, str]]) -> None:
        super().__init__(f"{label}: nothing imported ({len(errors)} bad row(s))")
        self.errors = sorted(errors)


@dataclass(frozen=True)
class Imported:
    added: int
    updated: int
    unchanged: int
    granted: list[tuple[str, str]]  # the domain grants added or changed: ("@domain", org)


def import_senders(
    conn: sqlite3.Connection,
    *,
    label: str,
    rows: list[ImportRow],
    errors: list[tuple[int, str]],
    mailboxes: Sequence[MailboxConfig],
    actor: str,
    now: str,
    reason: str | None = None,
) -> Imported:
    """Add or update senders from a file's rows: all of them or none (ImportRefused, with
    `errors` found while reading the file and the ones found here)."""
    errors = list(errors)
    orgs: dict[str, Organisation] = {}
    plans: list[tuple[ImportRow, Organisation]] = []
    for row in rows:
        key = row.org.casefold()
        if key not in orgs:
            found = find_organisation(conn, row.org)
            if found is None:
                errors.append((row.line, f"no organisation '{row.org}'"))
                continue
            orgs[key] = found
        org = orgs[key]
        existing = find_sender(conn, row.address)
        if existing is not None and existing.blocked:
            errors.append((row.line, f"{row.address} is blocked"))
            continue
        if row.address.startswith("@"):
            problem = domain_grant_problem(conn, row.address, org)
            if problem is not None:
                errors.append((row.line, problem))
                continue
        plans.append((row, org))
    if errors:
        raise ImportRefused(label, errors)
    counts = {state: 0 for state in Authorised}
    granted: list[tuple[str, str]] = []
    for row, org in plans:
        state, _name = authorise(
            conn,
            address=row.address,
            org=org,
            name=row.name,
            keep_name=False,
            mailboxes=mailboxes,
            source=Source("import", label, row.line),
            actor=actor,
            now=now,
            reason=reason,
        )
        counts[state] += 1
        if state is not Authorised.UNCHANGED and row.address.startswith("@"):
            granted.append((row.address, org.name))
    added, updated = counts[Authorised.ADDED], counts[Authorised.UPDATED]
    unchanged = counts[Authorised.UNCHANGED]
    if added or updated:
        _event(
            conn,
            actor=actor,
            now=now,
            action=EventAction.SENDERS_IMPORTED,
            subject="senders",
            detail=detail_senders_imported(label, added, updated, unchanged, reason),
        )
    return Imported(added, updated, unchanged, granted)


# --- issue 13: unblock, and the one-sender / one-organisation views ------------------------


def unblock(
    conn: sqlite3.Connection,
    *,
    address: str | None,
    domain: str | None,
    actor: str,
    now: str,
    reason: str | None = None,
) -> tuple[str, bool]:
    """Lift the block of an address or a whole domain. Returns the key ("@domain" for a
    domain) and whether it is authorised again (a grant blocked later comes back as it
    was; a bare block is gone). ActionError when it is not blocked."""
    key = sender_key(address, domain, at_domain=True)
    existing = find_sender(conn, key)
    if existing is None or not existing.blocked:
        raise ActionError(f"{key} is not blocked")
    authorised = unblock_sender(conn, key)
    if authorised:
        _event(
            conn,
            actor=actor,
            now=now,
            action=EventAction.SENDER_UPDATED,
            subject=f"sender:{key}",
            detail={
                "blocked": {"from": True, "to": False},
                "via": "senders unblock",
                "reason": reason,
            },
        )
    else:
        _event(
            conn,
            actor=actor,
            now=now,
            action=EventAction.SENDER_REMOVED,
            subject=f"sender:{key}",
            detail=detail_sender_removed(existing, "senders unblock", reason),
        )
    return key, authorised


def sender_view(conn: sqlite3.Connection, text: str) -> dict[str, Any]:
    """What the sender list says of one address: its own row and its domain's (grants and
    blocks), the organisation owning its domain, and the last mail received from it."""
    address = valid_address(text)
    domain = address.rpartition("@")[2]
    grants: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    for key in (address, f"@{domain}"):
        entry = find_sender(conn, key)
        if entry is None:
            continue
        row = {
            "address": key,
            "domain": entry.is_domain,
            "organisation": entry.organisation,
            "name": entry.name,
            "since": entry.created_at,
        }
        (blocks if entry.blocked else grants).append(row)
    owner = organisation_for_domain(conn, domain)
    record = sender_record(conn, address)
    return {
        "address": address,
        "status": (
            "blocked"
            if record is not None and record.blocked
            else "authorised"
            if record is not None and record.authorised
            else "unknown"
        ),
        "grants": grants,
        "blocks": blocks,
        "domain_organisation": owner.name if owner is not None else None,
        "last_mail": last_inbound_from(conn, address),
    }


def org_view(conn: sqlite3.Connection, name: str) -> dict[str, Any]:
    """One organisation: its domains, unit, account manager, out-of-hours flag, senders
    (authorised and blocked rows) and the number of its open tickets."""
    org = find_org(conn, name)
    senders = [
        {"address": s.address, "name": s.name, "blocked": s.blocked, "domain": s.is_domain}
        for s in list_senders(conn, organisation=org.id)
    ]
    return {
        "name": org.name,
        "domains": list(org.domains),
        "unit": org.unit,
        "account_manager": org.account_manager,
        **organisation_extras(conn, org.id),
        "senders": senders,
        "created_at": org.created_at,
    }
