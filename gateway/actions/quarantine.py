"""Held mail: what an admin can do with it (release, discard, block) and its expiry.

Each action is one transaction with its audit event. A release files the message exactly
as the intake path would have, had its sender been authorised; authorising or blocking
its sender is `actions.senders`' authorise and block, as from the CLI. Nothing here ever
mails the sender of held mail: the quarantine is invisible from outside.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypedDict

from .. import store
from ..clock import iso
from ..config import Config
from ..inbound import InboundMessage
from ..notify import Planner
from ..parserpool import ParserPool, parse_limits
from ..policy import Disposition, decide
from ..render import Templates
from ..store.events import EventAction
from . import senders
from .errors import ActionError
from .intake import (
    classify_message,
    file_message,
    intake_of,
    look_up,
    own_identity,
    sender_identity,
)


class QuarantineReleased(TypedDict):
    message: int
    ticket: int | None
    authorised: str | None  # the sender added to an organisation, if --authorise
    reason: str | None


def detail_quarantine_released(
    message: int, ticket: int | None, authorised: str | None, reason: str | None
) -> QuarantineReleased:
    return {"message": message, "ticket": ticket, "authorised": authorised, "reason": reason}


class QuarantineDiscarded(TypedDict):
    message: int
    blocked: str | None  # the sender blocked with it
    reason: str | None


def detail_quarantine_discarded(
    message: int, blocked: str | None, reason: str | None
) -> QuarantineDiscarded:
    return {"message": message, "blocked": blocked, "reason": reason}


class QuarantineExpired(TypedDict):
    after_days: int


def detail_quarantine_expired(days: int) -> QuarantineExpired:
    return {"after_days": days}


@dataclass(frozen=True)
class Released:
    quarantine_id: int
    message: int
    ticket: int | None
    authorised: str | None  # the sender added to an organisation, if --authorise


def parse_held(config: Config, raw: bytes) -> InboundMessage:
    """Parse held mail again, in a worker process with the daemon's limits: it may be hostile."""

    async def run() -> InboundMessage:
        pool = ParserPool(parse_limits(config), workers=1)
        await pool.start()
        try:
            return await pool.parse(raw)
        finally:
            await pool.close()

    return asyncio.run(run())


def _held(conn: sqlite3.Connection, quarantine_id: int) -> dict[str, Any]:
    row = store.held_message(conn, quarantine_id)
    if row is None:
        raise ActionError(f"no quarantine entry {quarantine_id}")
    if row["status"] != "held":
        raise ActionError(f"quarantine entry {quarantine_id} is already {row['status']}")
    return row


def release(
    config: Config,
    conn: sqlite3.Connection,
    quarantine_id: int,
    *,
    actor: str,
    now: str,
    authorise: bool = False,
    reason: str | None = None,
) -> Released:
    """File held mail as if its sender were authorised (an admin vouches for it)."""
    # Parse before taking the write lock: a parse may take seconds.
    with store.write_transaction(conn):
        raw = bytes(_held(conn, quarantine_id)["raw"])
    parsed = parse_held(config, raw)
    with store.write_transaction(conn):
        row = _held(conn, quarantine_id)
        record = store.stored_message_from_row(row)
        sender, from_problem = sender_identity(parsed)
        added = None
        if authorise:
            added = _authorise(config, conn, sender, actor=actor, now=now, reason=reason)
        secret = store.token_secret(conn)
        # What intake would have filed it with, had the admin's word been there then.
        classification = classify_message(parsed, record.mail_from, own_identity(config))
        intake = intake_of(
            config,
            secret,
            record,
            parsed,
            classification,
            sender,
            from_problem,
            None,
            released=True,
        )
        found = look_up(conn, intake, config.policy)
        if found.facts.blocked:
            raise ActionError(f"{sender} is blocked; unblock it before releasing its mail")
        decision = decide(found.facts)
        if decision.disposition is not Disposition.FILE:
            raise ActionError(f"cannot release: {decision.reason}")
        planner = Planner(config, Templates(config.templates_path), secret)
        message_id = int(row["id"])
        _, filing = file_message(
            conn,
            intake,
            record,
            planner,
            organisation=found.organisation,
            row=message_id,
            now=now,
            event=found.event,
        )
        store.decide_held(conn, quarantine_id, status="released", actor=actor, now=now)
        store.record_event(
            conn,
            time=now,
            actor=actor,
            action=EventAction.QUARANTINE_RELEASED,
            subject=f"quarantine:{quarantine_id}",
            ticket=filing.ticket,
            detail=dict(detail_quarantine_released(message_id, filing.ticket, added, reason)),
        )
    return Released(quarantine_id, message_id, filing.ticket, added)


def _authorise(
    config: Config,
    conn: sqlite3.Connection,
    sender: str | None,
    *,
    actor: str,
    now: str,
    reason: str | None,
) -> str:
    """Authorise held mail's sender for the organisation that owns its domain."""
    if not sender:
        raise ActionError("the message has no usable From address to authorise")
    domain = sender.rpartition("@")[2]
    organisation = store.organisation_for_domain(conn, domain)
    if organisation is None:
        raise ActionError(
            f"no organisation has the domain {domain}: add it to one "
            f"(gateway orgs add NAME --domain {domain}) or use `gateway senders add`"
        )
    try:
        senders.authorise(
            conn,
            address=sender,
            org=organisation,
            name=None,
            keep_name=True,
            mailboxes=config.mailboxes,
            source=senders.Source("quarantine release"),
            actor=actor,
            now=now,
            reason=reason,
        )
    except senders.Blocked:
        raise ActionError(f"{sender} is blocked; unblock it before authorising it") from None
    return sender


def discard(
    conn: sqlite3.Connection,
    quarantine_id: int,
    *,
    actor: str,
    now: str,
    reason: str | None = None,
    block: bool = False,
) -> str | None:
    """Discard held mail (its bytes stay stored for audit); with block, block its sender."""
    with store.write_transaction(conn):
        row = _held(conn, quarantine_id)
        sender = row["sender"]
        if block:
            if not isinstance(sender, str) or not sender:
                raise ActionError("the message has no usable From address to block")
            senders.block(
                conn,
                address=sender,
                via=f"quarantine:{quarantine_id}",
                actor=actor,
                now=now,
                reason=reason,
            )
        store.decide_held(conn, quarantine_id, status="discarded", actor=actor, now=now)
        store.record_event(
            conn,
            time=now,
            actor=actor,
            action=EventAction.QUARANTINE_DISCARDED,
            subject=f"quarantine:{quarantine_id}",
            detail=dict(detail_quarantine_discarded(row["id"], sender if block else None, reason)),
        )
    return sender if block and isinstance(sender, str) else None


def expire(conn: sqlite3.Connection, *, days: int, now: datetime) -> list[int]:
    """Expire held mail older than `days` (a unit for the writer, or the CLI)."""
    stamp = iso(now)
    before = iso(now - timedelta(days=days))
    expired = store.expire_held(conn, before=before, now=stamp)
    for quarantine_id in expired:
        store.record_event(
            conn,
            time=stamp,
            actor="gateway",
            action=EventAction.QUARANTINE_EXPIRED,
            subject=f"quarantine:{quarantine_id}",
            detail=dict(detail_quarantine_expired(days)),
        )
    return expired
