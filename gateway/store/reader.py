"""The daemon's read-only connection, for its async readers (the outbox worker; later the
scheduler's and status reads): one aiosqlite connection, opened at start, closed at stop.

Writes never come here: they are units for the group-commit Writer (`writer.py`), one
dedicated thread that is shielded from session cancellation. A read needs neither group
commit nor that shield, as long as it never leaves a statement half-stepped: the async
read functions use `execute_fetchall`, which runs the statement to its end on
aiosqlite's thread in one call, so a cancelled awaiter cannot leave a read snapshot open.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite


class Reader:
    """One read-only aiosqlite connection to an existing, migrated database.

    `mode=ro` and `query_only` both: the first is the file's open mode, the second makes
    SQLite itself refuse any write statement on this connection (RELIABILITY.md: one
    writer). `busy_timeout` is the store's, as on every connection of ours.
    """

    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        if self._db is not None:
            return
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute_fetchall(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            await db.execute_fetchall("PRAGMA query_only = ON")
        except BaseException:
            await db.close()
            raise
        self._db = db

    @property
    def db(self) -> aiosqlite.Connection:
        """The open connection; the async read functions of the store take it."""
        if self._db is None:
            raise RuntimeError("the daemon's reader is not open")
        return self._db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()
