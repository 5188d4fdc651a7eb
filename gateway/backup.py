"""`gateway backup PATH` and `gateway restore PATH` (issue 13).

Backup: SQLite's online backup API (`sqlite3.Connection.backup`) copies the live database
while the daemon runs and writes. It copies in one step, not in pages with sleeps between:
SQLite restarts a stepped backup whenever another connection writes the source, so under
steady intake a paged copy may never finish. One step is still cheap for the daemon: the
database is in WAL mode, where the copy is a read transaction (a snapshot) that writers do
not wait for; only the WAL cannot be checkpointed past it meanwhile. The copy is therefore
the database exactly as of one commit: every message acknowledged before the backup began
(its transaction committed before the 250 reply) is in it.

The attachment store is part of that copy: attachment bytes are `blobs` rows in the same
database, so they are copied in the same snapshot as the rows that refer to them. (Were
they ever kept as files, they would be copied after the database: files are written
before the row that refers to them commits, and the orphan purge removes only files no row
refers to, so every file the copy refers to exists when the copy of files starts.)

Restore: refused while the database is in use (the daemon holds it open: an exclusive
lock cannot be taken), then the backup is checked (`PRAGMA integrity_check`), copied
beside the database and renamed over it; the old file (and its WAL) is kept aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .actions.errors import ActionError
from .config import Config
from .store import connection, events
from .store.writer import write_transaction

DB_NAME = "gateway.db"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Made:
    messages: int
    size: int

    def summary(self) -> str:
        return f"{self.messages} messages, {self.size} bytes, integrity ok"


@dataclass(frozen=True)
class Restored:
    messages: int
    moved_aside: Path | None

    def summary(self) -> str:
        return f"{self.messages} messages, integrity ok"


def _integrity(conn: sqlite3.Connection, what: Path) -> None:
    problems = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
    if problems != ["ok"]:
        raise ActionError(f"{what}: integrity check failed: {'; '.join(problems)}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])


def backup(config: Config, dest: Path, *, now: str) -> Made:
    source = config.database_path
    if not source.is_file():
        raise ActionError(f"no database at {source} (see [storage] database)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ActionError(f"{dest}: exists and is not an empty folder; give a new one")
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / (DB_NAME + ".partial")
    timeout = config.storage.busy_timeout_ms / 1000
    with (
        closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=timeout)) as src,
        closing(sqlite3.connect(partial)) as dst,
    ):
        src.backup(dst, pages=-1)  # one step: see the module docstring
        _integrity(dst, partial)
        messages = _count(dst)
        schema = int(dst.execute("PRAGMA user_version").fetchone()[0])
    _fsync(partial)
    final = dest / DB_NAME
    os.replace(partial, final)
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    manifest = {
        "created_at": now,
        "source": str(source),
        "schema_version": schema,
        "messages": messages,
        "database": DB_NAME,
        "sha256": digest,
        "integrity": "ok",
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _fsync(dest / MANIFEST)
    _fsync(dest)
    return Made(messages=messages, size=final.stat().st_size)


def _refuse_if_in_use(path: Path) -> None:
    """The daemon keeps the database open: then no exclusive lock can be had at once."""
    try:
        with closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as conn:
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            conn.execute("BEGIN EXCLUSIVE")
            conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        raise ActionError(
            f"{path} is in use ({exc}): stop the daemon (systemctl stop gateway) and any "
            "other gateway command first; nothing was changed"
        ) from None


def restore(config: Config, source: Path, *, actor: str, now: str) -> Restored:
    copy = source / DB_NAME
    if not copy.is_file() or not (source / MANIFEST).is_file():
        raise ActionError(f"{source}: not a backup folder (no {DB_NAME} and {MANIFEST})")
    manifest = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    if hashlib.sha256(copy.read_bytes()).hexdigest() != manifest.get("sha256"):
        raise ActionError(f"{copy}: does not match the sha256 in {MANIFEST}; not restored")
    with closing(sqlite3.connect(f"file:{copy}?mode=ro", uri=True)) as conn:
        _integrity(conn, copy)
    target = config.database_path
    target.parent.mkdir(parents=True, exist_ok=True)
    moved: Path | None = None
    if target.exists():
        _refuse_if_in_use(target)
        stamp = now[:19].replace(":", "").replace("-", "")
        moved = target.with_name(f"{target.name}.before-restore-{stamp}")
        # The WAL and its index go with their database: a WAL left beside the restored
        # file would be replayed into it.
        for suffix in ("-wal", "-shm", ""):
            old = Path(str(target) + suffix)
            if old.exists():
                os.replace(old, Path(str(moved) + suffix))
    partial = target.with_name(target.name + ".restore-partial")
    partial.write_bytes(copy.read_bytes())
    _fsync(partial)
    os.replace(partial, target)
    _fsync(target.parent)
    with closing(connection.connect(target, create=False)) as conn:
        _integrity(conn, target)
        with write_transaction(conn):
            events.record_event(
                conn,
                time=now,
                actor=actor,
                action=events.EventAction.DATABASE_RESTORED,
                subject="database",
                detail={"from": str(source), "backup_created_at": manifest.get("created_at")},
            )
        messages = _count(conn)
    return Restored(messages=messages, moved_aside=moved)
