"""What can go wrong in the store: the errors callers see, and SQLite's result codes.

Apart from the writer so that the start-up checks (connection) and the migrations raise
the same errors without importing the writer.
"""

from __future__ import annotations

# SQLite primary result codes (https://www.sqlite.org/rescode.html).
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26
SQLITE_IOERR_FSYNC = SQLITE_IOERR | (4 << 8)


class StoreError(Exception):
    """A unit of work could not be committed; nothing of it is stored."""


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full."""


class DatabaseRefused(StoreError):
    """The database file is not one we may use: empty, truncated, corrupt, another
    application's, or of a newer schema. The message names the file and the fault."""


def classify_error(exc: BaseException) -> StoreError:
    """Map a sqlite3 (or OS) error to what the SMTP edge needs to know."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == SQLITE_FULL:
        return StoreFull("database or disk is full")
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        return StoreFull("disk is full")
    if isinstance(exc, StoreError):
        return exc
    return StoreError(f"{type(exc).__name__}: {exc}")
