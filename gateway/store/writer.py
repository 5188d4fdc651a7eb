"""The group-commit writer, and the transaction of the admin CLI.

Every write of the intake path goes through one `Writer`: a single thread that owns the
write connection and commits whatever units of work are queued in one transaction
(group commit), synced to disk (WAL, ``synchronous=FULL``) before any caller is told it
succeeded. It must never acknowledge a unit that is not durable, and a caller that goes
away mid-commit must never wedge it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..metrics import STORE_BATCH_SIZE
from .connection import connect
from .errors import (
    SQLITE_CORRUPT,
    SQLITE_IOERR,
    SQLITE_IOERR_FSYNC,
    SQLITE_NOTADB,
    DatabaseRefused,
    StoreError,
    classify_error,
)

log = logging.getLogger("gateway")

T = TypeVar("T")
Unit = Callable[[sqlite3.Connection], Any]

# Most units a batch takes: bounds how long one commit holds the write lock.
MAX_BATCH = 128


@dataclass
class _Pending:
    unit: Unit
    future: asyncio.Future[Any]


class Writer:
    """The single writer: queued units of work, committed together.

    `write()` returns only after the unit's transaction is committed and synced. A
    unit that raises is rolled back alone (a savepoint each) and its caller gets the
    error; the other units of the batch still commit.
    """

    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gateway-writer"
        )
        self._conn: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.units = 0
        # Set once the database, opened again after an I/O error, is refused (corrupt):
        # nothing can be stored any more, and answering 451 forever would hide it.
        self.failed: DatabaseRefused | None = None
        # Called once, on the event loop, when `failed` is set: the daemon stops and
        # exits non-zero, so systemd shows the fault (and the next start names it).
        self.on_failure: Callable[[DatabaseRefused], None] | None = None
        self._failure_reported = False
        # Test hook (`inject_commit_faults`): commits still to fail as a failed sync would.
        self._faults = 0
        self._faults_lock = threading.Lock()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._thread, self._open)
        except BaseException:
            self._thread.shutdown(wait=False)  # refused at start: nothing to close
            raise
        self._task = asyncio.create_task(self._run(), name="gateway-writer")

    def _open(self, create: bool = True) -> sqlite3.Connection:
        return connect(self._path, self._busy_timeout_ms, create=create)

    def inject_commit_faults(self, count: int) -> None:
        """Test hook: make the next `count` commits fail as a failed fsync does, with
        SQLITE_IOERR_FSYNC ("disk I/O error") after the units ran and before COMMIT.
        The daemon arms it only with GATEWAY_TEST_HOOKS=1 (see app.py)."""
        with self._faults_lock:
            self._faults += count

    def _take_fault(self) -> bool:
        with self._faults_lock:
            if self._faults <= 0:
                return False
            self._faults -= 1
            return True

    async def write(self, unit: Callable[[sqlite3.Connection], T]) -> T:
        """Run `unit(conn)` inside the next group commit; return its result once durable."""
        if self._task is None or self._task.done():
            raise StoreError("writer is not running")
        if self.failed is not None:
            raise self.failed
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # If the caller is cancelled (the client hung up), nobody reads the outcome:
        # retrieve it here so asyncio does not log "exception was never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.put_nowait(_Pending(unit, future))
        # shield: cancelling the session must not cancel a commit already under way.
        result: T = await asyncio.shield(future)
        return result

    async def close(self) -> None:
        """Commit everything queued so far, then close the connection."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            await loop.run_in_executor(self._thread, self._conn.close)
            self._conn = None
        self._thread.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            units = [p.unit for p in batch]
            try:
                outcomes = await loop.run_in_executor(self._thread, self._commit, units)
            except BaseException as exc:  # the executor itself failed: fail the batch
                outcomes = [(False, classify_error(exc))] * len(batch)
                if isinstance(exc, asyncio.CancelledError):
                    stopping = True
            self.batches += 1
            self.units += len(batch)
            STORE_BATCH_SIZE.observe(len(batch))
            if self.failed is not None and not self._failure_reported:
                self._failure_reported = True
                if self.on_failure is not None:
                    self.on_failure(self.failed)
            for pending, (ok, value) in zip(batch, outcomes, strict=True):
                if pending.future.done():
                    continue
                if ok:
                    pending.future.set_result(value)
                else:
                    pending.future.set_exception(value)

    def _commit(self, units: list[Unit]) -> list[tuple[bool, Any]]:
        """On the writer thread: one transaction, a savepoint per unit, one synced commit."""
        conn = self._conn
        if conn is None:
            try:
                # Never a new database here: the daemon's tickets, and the reply-token
                # secret it has handed out, are in the file it started with.
                conn = self._conn = self._open(create=False)
            except DatabaseRefused as exc:
                # Opened again after an I/O error, the file no longer passes the checks.
                log.error("event=store.refused error=%s", _quote(exc))
                self.failed = exc
                return [(False, exc)] * len(units)
            except Exception as exc:
                error = classify_error(exc)
                log.error("event=store.reopen_failed error=%s", _quote(error))
                return [(False, error)] * len(units)
            log.warning("event=store.reopened database=%s", _quote(self._path))
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for unit in units:
                conn.execute("SAVEPOINT unit")
                try:
                    outcomes.append((True, unit(conn)))
                except Exception as exc:
                    if _is_file_fault(exc):
                        raise  # not this unit's fault: the whole batch fails, see below
                    conn.execute("ROLLBACK TO unit")
                    outcomes.append((False, classify_error(exc)))
                conn.execute("RELEASE unit")
            if self._take_fault():
                raise _injected_sync_error()
            conn.execute("COMMIT")
            return outcomes
        except Exception as exc:
            error = classify_error(exc)
            log.error("event=store.commit_failed units=%d error=%s", len(units), _quote(error))
            with contextlib.suppress(Exception):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if _is_file_fault(exc):
                # After an I/O error SQLite's view of the file may be wrong (a failed
                # fsync may have dropped pages the kernel then calls clean): start afresh
                # on the next batch, with the start-up checks, rather than trust this
                # connection again. A file found corrupt then stops the daemon.
                with contextlib.suppress(Exception):
                    conn.close()
                self._conn = None
            return [(False, error)] * len(units)


def _is_file_fault(exc: BaseException) -> bool:
    """An I/O error or a corrupt page: the file, not the unit of work, is at fault."""
    code = getattr(exc, "sqlite_errorcode", 0) or 0
    return code & 0xFF in (SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_NOTADB)


def _injected_sync_error() -> sqlite3.OperationalError:
    """What sqlite3 raises when the WAL's fsync fails (SQLITE_IOERR_FSYNC)."""
    exc = sqlite3.OperationalError("disk I/O error")
    exc.sqlite_errorcode = SQLITE_IOERR_FSYNC
    exc.sqlite_errorname = "SQLITE_IOERR_FSYNC"
    return exc


def _quote(value: object) -> str:
    return json.dumps(str(value), ensure_ascii=False)


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises.

    IMMEDIATE takes the write lock up front (waiting up to busy_timeout for the daemon's
    writer), so that reads made inside the block still hold when their changes commit.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
