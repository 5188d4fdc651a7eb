"""Senders and organisations: grants (an address or a whole "@domain"), blocks, the
intake path's lookup (`sender_record`), look-alike search, and the admin CLI's reads and
writes.

The admin CLI wraps its changes in `write_transaction` so that a change and its audit
event commit together, and wait for (rather than fight) the daemon's writer. The intake
path's own sender lookup is `sender_record`, not the admin functions.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from ..lookalike import domain_skeleton, skeleton


@dataclass(frozen=True)
class SenderRecord:
    """What the sender list says of one address (its own row, or its domain's grant)."""

    address: str  # the row that matched: the address, or "@domain"
    organisation: int | None
    organisation_name: str | None
    blocked: bool

    @property
    def authorised(self) -> bool:
        return self.organisation is not None and not self.blocked


def sender_record(conn: sqlite3.Connection, address: str) -> SenderRecord | None:
    """The sender list's word on `address`: its own row first, else its domain's grant."""
    domain = address.rpartition("@")[2]
    rows = conn.execute(
        """
        SELECT s.address, s.organisation, o.name, s.blocked
        FROM senders s LEFT JOIN organisations o ON o.id = s.organisation
        WHERE s.address IN (?, ?)
        """,
        (address, f"@{domain}"),
    ).fetchall()
    if not rows:
        return None
    # A block on the address itself always wins; otherwise the address's own row.
    rows.sort(key=lambda r: (not r["blocked"], r["address"] != address))
    row = rows[0]
    return SenderRecord(row["address"], row["organisation"], row[2], bool(row["blocked"]))


def find_lookalike(conn: sqlite3.Connection, address: str, skeleton: str) -> str | None:
    """An authorised address, or a domain granted whole ("@domain"), that renders like
    `address` (or like its domain) but is not it, if any.

    Both are one lookup on the skeleton index: a domain grant's skeleton is "@" and the
    skeleton of its domain, which is the domain part of the skeleton of every address
    at a look-alike domain. Intake never scans the sender list.
    """
    own_domain = "@" + address.rpartition("@")[2]
    row = conn.execute(
        """
        SELECT address FROM senders
        WHERE skeleton IN (?, ?) AND address NOT IN (?, ?)
            AND blocked = 0 AND organisation IS NOT NULL
        ORDER BY skeleton = ? DESC, address
        LIMIT 1
        """,
        (skeleton, domain_skeleton(skeleton), address, own_domain, skeleton),
    ).fetchone()
    return None if row is None else str(row["address"])


def organisation_unit(conn: sqlite3.Connection, organisation: int) -> str | None:
    """The desk unit an organisation's tickets go to, if it has one of its own."""
    row = conn.execute("SELECT unit FROM organisations WHERE id = ?", (organisation,)).fetchone()
    return None if row is None or not row["unit"] else str(row["unit"])


@dataclass(frozen=True)
class Organisation:
    id: int
    name: str
    domains: tuple[str, ...]  # lower-case A-labels, sorted
    unit: str | None
    account_manager: str | None
    senders: int  # authorised (not blocked) sender rows, domain grants included
    created_at: str
    # Issue 12: urgent mail out of hours pages the person on call only for an organisation
    # marked so (`orgs add/update --out-of-hours`); the others hear when the desk opens.
    out_of_hours: bool = False


@dataclass(frozen=True)
class SenderEntry:
    address: str  # normalised; "@domain" for a whole-domain grant
    organisation: str | None  # the organisation's name
    name: str | None
    blocked: bool
    created_at: str

    @property
    def is_domain(self) -> bool:
        return self.address.startswith("@")


_ORGANISATION_SELECT = """
    SELECT o.id, o.name, o.unit, o.account_manager, o.created_at, o.out_of_hours,
           (SELECT group_concat(d.domain, ' ') FROM
               (SELECT domain FROM org_domains WHERE organisation = o.id ORDER BY domain) d
           ) AS domains,
           (SELECT COUNT(*) FROM senders s WHERE s.organisation = o.id AND NOT s.blocked)
               AS sender_count
    FROM organisations o
"""


def _organisation(row: sqlite3.Row) -> Organisation:
    return Organisation(
        id=row["id"],
        name=row["name"],
        domains=tuple((row["domains"] or "").split()),
        unit=row["unit"],
        account_manager=row["account_manager"],
        senders=row["sender_count"],
        created_at=row["created_at"],
        out_of_hours=bool(row["out_of_hours"]),
    )


def add_organisation(
    conn: sqlite3.Connection,
    *,
    name: str,
    domains: Sequence[str],
    unit: str | None,
    account_manager: str | None,
    now: str,
    out_of_hours: bool = False,
) -> int:
    """A new organisation; the caller has checked that its name and domains are free."""
    cursor = conn.execute(
        "INSERT INTO organisations (name, unit, account_manager, created_at, out_of_hours) "
        "VALUES (?,?,?,?,?)",
        (name, unit, account_manager, now, int(out_of_hours)),
    )
    org_id = cursor.lastrowid
    assert org_id is not None
    for domain in domains:
        add_org_domain(conn, org_id, domain)
    return org_id


def find_organisation(conn: sqlite3.Connection, name: str) -> Organisation | None:
    """The organisation with this name, compared case-insensitively."""
    row = conn.execute(f"{_ORGANISATION_SELECT} WHERE o.name = ?", (name,)).fetchone()
    return None if row is None else _organisation(row)


def list_organisations(conn: sqlite3.Connection) -> list[Organisation]:
    sql = f"{_ORGANISATION_SELECT} ORDER BY o.name"
    return [_organisation(row) for row in conn.execute(sql)]


def organisation_for_domain(conn: sqlite3.Connection, domain: str) -> Organisation | None:
    """The organisation owning this mail domain (lower-case A-label), if any."""
    row = conn.execute(
        f"{_ORGANISATION_SELECT} WHERE o.id = "
        "(SELECT organisation FROM org_domains WHERE domain = ?)",
        (domain,),
    ).fetchone()
    return None if row is None else _organisation(row)


def update_organisation(
    conn: sqlite3.Connection,
    org_id: int,
    *,
    unit: str | None,
    account_manager: str | None,
    out_of_hours: bool | None = None,
) -> None:
    """Set an organisation's unit and account manager, and its out-of-hours cover unless
    `out_of_hours` is None (kept)."""
    conn.execute(
        "UPDATE organisations SET unit = ?, account_manager = ?, "
        "out_of_hours = coalesce(?, out_of_hours) WHERE id = ?",
        (unit, account_manager, None if out_of_hours is None else int(out_of_hours), org_id),
    )


def add_org_domain(conn: sqlite3.Connection, org_id: int, domain: str) -> None:
    conn.execute("INSERT INTO org_domains (domain, organisation) VALUES (?, ?)", (domain, org_id))


def remove_org_domain(conn: sqlite3.Connection, org_id: int, domain: str) -> bool:
    cursor = conn.execute(
        "DELETE FROM org_domains WHERE domain = ? AND organisation = ?", (domain, org_id)
    )
    return cursor.rowcount > 0


def count_organisation_tickets(conn: sqlite3.Connection, org_id: int) -> int:
    row = conn.execute("SELECT COUNT(*) FROM tickets WHERE organisation = ?", (org_id,)).fetchone()
    return int(row[0])


def remove_organisation(conn: sqlite3.Connection, org_id: int) -> list[str]:
    """Delete an organisation, its domains and its authorised senders (returned).

    Blocked addresses stay blocked: they lose the organisation, not the block. The caller
    has checked that no ticket refers to the organisation.
    """
    conn.execute(
        "UPDATE senders SET organisation = NULL WHERE organisation = ? AND blocked", (org_id,)
    )
    removed = [
        str(row["address"])
        for row in conn.execute(
            "SELECT address FROM senders WHERE organisation = ? ORDER BY address", (org_id,)
        )
    ]
    conn.execute("DELETE FROM senders WHERE organisation = ?", (org_id,))
    conn.execute("DELETE FROM org_domains WHERE organisation = ?", (org_id,))
    conn.execute("DELETE FROM organisations WHERE id = ?", (org_id,))
    return removed


_SENDER_SELECT = """
    SELECT s.address, o.name AS organisation, s.name, s.blocked, s.created_at
    FROM senders s LEFT JOIN organisations o ON o.id = s.organisation
"""


def _sender(row: sqlite3.Row) -> SenderEntry:
    return SenderEntry(
        address=row["address"],
        organisation=row["organisation"],
        name=row["name"],
        blocked=bool(row["blocked"]),
        created_at=row["created_at"],
    )


def find_sender(conn: sqlite3.Connection, address: str) -> SenderEntry | None:
    """The senders row for a normalised address (or "@domain"), exactly as stored."""
    row = conn.execute(f"{_SENDER_SELECT} WHERE s.address = ?", (address,)).fetchone()
    return None if row is None else _sender(row)


def upsert_sender(
    conn: sqlite3.Connection,
    *,
    address: str,
    organisation: int,
    name: str | None,
    now: str,
) -> None:
    """Authorise an address (or "@domain") for an organisation; an existing row is updated.

    The caller has checked that the address is not blocked: this never lifts a block.
    """
    conn.execute(
        """
        INSERT INTO senders (address, organisation, name, blocked, skeleton, created_at)
        VALUES (?, ?, ?, 0, ?, ?)
        ON CONFLICT (address) DO UPDATE SET organisation = excluded.organisation,
            name = excluded.name
        """,
        (address, organisation, name, skeleton(address), now),
    )


def block_sender(conn: sqlite3.Connection, address: str, *, now: str) -> None:
    """Block an address; an existing row keeps its organisation and name."""
    conn.execute(
        """
        INSERT INTO senders (address, organisation, name, blocked, skeleton, created_at)
        VALUES (?, NULL, NULL, 1, ?, ?)
        ON CONFLICT (address) DO UPDATE SET blocked = 1
        """,
        (address, skeleton(address), now),
    )


def remove_sender(conn: sqlite3.Connection, address: str) -> bool:
    """Delete the row of an address (or "@domain"): no longer authorised, nor blocked."""
    cursor = conn.execute("DELETE FROM senders WHERE address = ?", (address,))
    return cursor.rowcount > 0


def list_senders(
    conn: sqlite3.Connection, *, organisation: int | None = None, include_blocked: bool = True
) -> list[SenderEntry]:
    """Sender rows by organisation name (unattached blocked addresses last), then address."""
    clauses, params = [], []
    if organisation is not None:
        clauses.append("s.organisation = ?")
        params.append(organisation)
    if not include_blocked:
        clauses.append("NOT s.blocked")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"{_SENDER_SELECT} {where} ORDER BY o.name IS NULL, o.name, s.address"
    return [_sender(row) for row in conn.execute(sql, params)]


# --- issue 13: unblock, and what `senders show` / `orgs show` print --------------------------


def unblock_sender(conn: sqlite3.Connection, address: str) -> bool:
    """Lift the block of an address (or "@domain"). A row that was authorised before it
    was blocked (block_sender keeps the organisation) is authorised again; a bare block is
    deleted. True if the row is authorised now, False if it is gone."""
    row = conn.execute(
        "SELECT organisation FROM senders WHERE address = ? AND blocked", (address,)
    ).fetchone()
    if row is None:
        return False
    if row["organisation"] is None:
        conn.execute("DELETE FROM senders WHERE address = ?", (address,))
        return False
    conn.execute("UPDATE senders SET blocked = 0 WHERE address = ?", (address,))
    return True


def last_inbound_from(conn: sqlite3.Connection, address: str) -> dict[str, object] | None:
    """The newest message received from this (normalised) sender: when, its ticket, and
    what became of it (filed to a ticket, held in the quarantine, or stored only)."""
    row = conn.execute(
        """
        SELECT m.id, m.received_at, m.ticket, m.reasons, m.duplicate_of, q.status AS held
        FROM messages m LEFT JOIN quarantine q ON q.message = m.id
        WHERE m.sender = ? AND m.direction = 'in'
        ORDER BY m.received_at DESC, m.id DESC
        LIMIT 1
        """,
        (address,),
    ).fetchone()
    if row is None:
        return None
    if row["held"] is not None:
        disposition = f"quarantine ({row['held']})"
    elif row["ticket"] is not None:
        disposition = "filed"
    else:
        disposition = "stored"
    return {
        "message": row["id"],
        "time": row["received_at"],
        "ticket": row["ticket"],
        "disposition": disposition,
        "reasons": json.loads(row["reasons"]),
    }


def organisation_extras(conn: sqlite3.Connection, org_id: int) -> dict[str, object]:
    """What `orgs show` adds to an Organisation: out_of_hours (migration 10) and the
    number of its tickets not yet solved or closed."""
    row = conn.execute(
        """
        SELECT o.out_of_hours,
               (SELECT COUNT(*) FROM tickets t WHERE t.organisation = o.id
                   AND t.status NOT IN ('solved', 'closed')) AS open_tickets
        FROM organisations o WHERE o.id = ?
        """,
        (org_id,),
    ).fetchone()
    return {"out_of_hours": bool(row["out_of_hours"]), "open_tickets": int(row["open_tickets"])}
