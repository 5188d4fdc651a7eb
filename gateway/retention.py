"""Retention (issue 13): purge the content of old messages, and attachment blobs nothing
refers to, in bounded batches.

A pass runs with the scheduler's jobs (every minute; one indexed query when nothing is
due). Each batch is its own unit for the Writer, awaited before the next is queued, so
intake transactions run between batches and a large first purge never holds mail up.
Every batch that purged something records one aggregate `messages.purged` event.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta
from functools import partial
from typing import Any, TypedDict, TypeVar

from .clock import iso
from .config import Config
from .store import events
from .store import messages as store_messages

T = TypeVar("T")


class MessagesPurged(TypedDict):
    after_days: int
    before: str  # messages received before this were purged
    messages: int
    attachments: int
    blobs: int  # attachment blobs no row referred to any more


def purge_batch(
    conn: sqlite3.Connection, *, days: int, now: datetime, limit: int, sweep: bool = True
) -> store_messages.Purged:
    """One batch: up to `limit` old messages (when `days` > 0), the blobs they leave
    without a reference, and with `sweep` up to `limit` other orphan blobs."""
    stamp = iso(now)
    before = iso(now - timedelta(days=days))
    ids = store_messages.purgeable_messages(conn, before=before, limit=limit) if days > 0 else []
    purged = store_messages.purge_messages(conn, ids, now=stamp)
    blobs = purged.blobs + (store_messages.purge_orphan_blobs(conn, limit=limit) if sweep else 0)
    if purged.messages or blobs:
        detail: MessagesPurged = {
            "after_days": days,
            "before": before,
            "messages": purged.messages,
            "attachments": purged.attachments,
            "blobs": blobs,
        }
        events.record_event(
            conn,
            time=stamp,
            actor="gateway",
            action=events.EventAction.MESSAGES_PURGED,
            subject="retention",
            detail=dict(detail),
        )
    return store_messages.Purged(purged.messages, purged.attachments, blobs)


async def run_retention(
    config: Config,
    write: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
    now: datetime,
) -> store_messages.Purged:
    """Batches until one comes back short; `write` is the daemon's `Writer.write`."""
    limit = config.storage.retain_batch
    total = store_messages.Purged()
    # The whole-table sweep for orphan blobs reads every blob: at start and once a day,
    # not every minute (the blobs a purge orphans go with it, by an indexed look-up).
    key = str(config.database_path)
    sweep = _swept.get(key) != now.date()
    while True:
        batch: store_messages.Purged = await write(
            partial(
                purge_batch,
                days=config.storage.retain_messages_days,
                now=now,
                limit=limit,
                sweep=sweep,
            )
        )
        total = store_messages.Purged(
            total.messages + batch.messages,
            total.attachments + batch.attachments,
            total.blobs + batch.blobs,
        )
        if batch.messages < limit and batch.blobs < limit:
            if sweep:
                _swept[key] = now.date()
            return total


# Per database: the day of the daemon's last whole-table orphan sweep.
_swept: dict[str, date] = {}


def purge_all(config: Config, conn: sqlite3.Connection, now: datetime) -> store_messages.Purged:
    """The same passes from a CLI connection, each batch its own transaction."""
    from .store.writer import write_transaction

    limit = config.storage.retain_batch
    total = store_messages.Purged()
    while True:
        with write_transaction(conn):
            batch = purge_batch(
                conn, days=config.storage.retain_messages_days, now=now, limit=limit
            )
        total = store_messages.Purged(
            total.messages + batch.messages,
            total.attachments + batch.attachments,
            total.blobs + batch.blobs,
        )
        if batch.messages < limit and batch.blobs < limit:
            return total
