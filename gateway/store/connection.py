"""Opening the database: created all or nothing, checked before any write, migrated.

An existing file must be ours (application id, or schema version and tables) and pass
`PRAGMA quick_check`, or `DatabaseRefused` names the file and the fault.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import stat
from pathlib import Path

from .errors import SQLITE_CORRUPT, SQLITE_NOTADB, DatabaseRefused
from .migrations import APPLICATION_ID, SCHEMA_VERSION, migrate, tables_of_version

# The size of an SQLite 3 database header (fileformat.html, section 1.3): no database is
# shorter.
SQLITE_HEADER_SIZE = 100

# Most problems `PRAGMA quick_check` lists before it stops: enough to say what is wrong.
QUICK_CHECK_ERRORS = 5


def connect(path: Path, busy_timeout_ms: int = 5000, *, create: bool = True) -> sqlite3.Connection:
    """Open our database in WAL mode with full sync, checked and migrated.

    A new database is created only where no file exists (and only with `create`). An
    existing file must be ours and pass `PRAGMA quick_check`, or `DatabaseRefused` says
    why: an empty file is not a new database (it would silently reset tickets, senders
    and the reply-token secret).
    """
    if not os.path.lexists(path):
        if not create:
            raise DatabaseRefused(f"{path}: the database file is gone (moved or deleted)")
        _create(path)
    _check_file(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    except sqlite3.Error as exc:
        raise DatabaseRefused(f"{path}: cannot open the database: {exc}") from None
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # Every check before the first write: a refused file is left exactly as it was.
        _check_identity(conn, path)
        _check_integrity(conn, path)
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL syncs the WAL on every commit: survives power loss, not only kill -9.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        if code == SQLITE_NOTADB:  # no SQLite header: "file is not a database"
            raise DatabaseRefused(_refusal(path, "it is not an SQLite database")) from None
        if code == SQLITE_CORRUPT:
            # Among others, a file shorter than its header says: SQLite refuses it so.
            size = path.stat().st_size
            problem = f"it is corrupt or truncated ({exc}; the file has {size} bytes)"
            raise DatabaseRefused(_refusal(path, problem)) from None
        raise
    except BaseException:
        conn.close()
        raise
    return conn


class DatabaseMissing(DatabaseRefused):
    """No database file where the configuration points: a read has nothing to read."""


def connect_existing(path: Path, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """Open the database for a command that only reads: never creates one.

    A read command run before the daemon ever started (or with the wrong --config) must
    not leave an empty desk behind at that path: the daemon would then start on it, and
    the operator would read "no tickets" where the answer is "wrong database". The file
    is checked and migrated as `connect` does (a read of an older schema needs its
    columns); if it vanishes between the check and the open, `connect` refuses it too.
    """
    if not os.path.lexists(path):
        raise DatabaseMissing(f"no database at {path}: has the daemon run? (storage.database)")
    return connect(path, busy_timeout_ms, create=False)


def _refusal(path: Path, problem: str) -> str:
    return (
        f"{path}: refusing to use this database: {problem}. Restore it from a backup, or "
        "point [storage] database at a path where no file exists to start an empty desk"
    )


def _create(path: Path) -> None:
    """Make a new, migrated database at `path`, which did not exist: all or nothing.

    It is built under a temporary name and linked into place only when complete, so a
    crash half-way never leaves an empty or half-made file at `path` (which the next
    start would rightly refuse), and a file another process put there meanwhile (the
    daemon and a CLI command starting at once) is used, never replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.new")
    try:
        # 0644 less the umask: what SQLite itself gives a file it creates.
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        conn = sqlite3.connect(temporary, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            migrate(conn)
        finally:
            conn.close()  # the last connection: checkpoints and removes the -wal file
        _fsync(temporary)
        try:
            os.link(temporary, path)  # fails, rather than replaces, if `path` exists now
        except FileExistsError:
            pass
        _fsync(path.parent)  # the new directory entry survives power loss too
    finally:
        for leftover in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{temporary}{leftover}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_file(path: Path) -> None:
    """What the file's metadata tells, before SQLite may write anything to it.

    Never open() the file here to read its header: closing any descriptor of a file
    drops every POSIX lock this process holds on it, SQLite's included (the daemon's
    other connections, when the writer reopens), so the header is left to SQLite.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise DatabaseRefused(f"{path}: cannot read the database: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DatabaseRefused(_refusal(path, "it is not a regular file"))
    if info.st_size == 0:
        raise DatabaseRefused(
            _refusal(
                path,
                "the file is empty (0 bytes), and a new database is only made where no file exists",
            )
        )
    if info.st_size < SQLITE_HEADER_SIZE:
        raise DatabaseRefused(
            _refusal(path, f"it is truncated ({info.st_size} bytes, less than an SQLite header)")
        )


def _check_identity(conn: sqlite3.Connection, path: Path) -> None:
    """Ours, by application_id, or made before it by its schema version and tables."""
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if application_id not in (0, APPLICATION_ID):
        raise DatabaseRefused(
            _refusal(
                path,
                f"it belongs to another application (application_id {application_id:#010x}, "
                f"gateway's is {APPLICATION_ID:#010x})",
            )
        )
    if version > SCHEMA_VERSION:
        if application_id == APPLICATION_ID:
            raise DatabaseRefused(
                f"{path}: the database has schema version {version}, newer than this "
                f"gateway knows ({SCHEMA_VERSION}): it was written by a newer gateway; "
                "upgrade gateway (a downgrade cannot read it)"
            )
        raise DatabaseRefused(
            _refusal(path, f"it is not a gateway database (schema version {version})")
        )
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    if application_id == APPLICATION_ID:
        missing = tables_of_version(version) - tables
        if version == 0 or missing:
            names = ", ".join(sorted(missing)) or "all"
            raise DatabaseRefused(
                _refusal(path, f"it is a damaged gateway database (tables missing: {names})")
            )
        return
    if version == 0:
        what = (
            "it has no tables" if not tables else f"its tables are {', '.join(sorted(tables)[:5])}"
        )
        raise DatabaseRefused(_refusal(path, f"it is not a gateway database ({what})"))
    missing = tables_of_version(version) - tables
    if missing:
        raise DatabaseRefused(
            _refusal(
                path,
                f"it is not a gateway database (schema version {version}, but no "
                f"{', '.join(sorted(missing)[:5])} table)",
            )
        )


def _check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """`PRAGMA quick_check`: every page and record well-formed (not the index contents,
    which integrity_check adds at twice the cost). About 0.2 s for 400 MB in the page
    cache, and as long as reading the file from disk when cold."""
    problems = [row[0] for row in conn.execute(f"PRAGMA quick_check({QUICK_CHECK_ERRORS})")]
    if problems != ["ok"]:
        raise DatabaseRefused(
            _refusal(path, "it is corrupt (quick_check: " + "; ".join(problems) + ")")
        )
