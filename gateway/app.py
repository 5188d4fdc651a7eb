"""Daemon lifecycle: build the parts, serve, and stop gracefully.

`Gateway` owns the writer, the parser pool and the listening server, so tests start the
very same thing the daemon runs. `run` adds what only a daemon needs: signals, systemd
readiness and watchdog. It must never exit 0 while acknowledged mail is still uncommitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import time

from . import __version__
from .authn import DnsFunc
from .clock import Clock
from .config import Config
from .logs import event
from .outbox import STOP_GRACE_SECONDS as OUTBOX_STOP_GRACE
from .outbox import OutboxWorker
from .parserpool import ParserPool, parse_limits
from .pipeline import Pipeline
from .scheduler import run_scheduler
from .sdnotify import SystemdNotifier, watchdog_interval
from .server import ServerState, start_server, stop_server
from .store import DatabaseRefused, StoreError, Writer, search
from .store.reader import Reader

# systemd's TimeoutStopSec is 60 s: leave time to close the parser and the database.
STOP_GRACE_SECONDS = 50.0

# Test hooks, for the durability and watchdog tests of a real daemon process; off unless
# this variable is "1" (the systemd unit never sets it). See `_install_test_hooks`.
TEST_HOOKS_ENV = "GATEWAY_TEST_HOOKS"


class Gateway:
    """The running service: writer + parser pool + SMTP/LMTP server."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        dnsfunc: DnsFunc | None = None,
        relay_tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        # The one wall clock of the daemon, passed to every part that stamps a row; tests
        # pass a FixedClock to move time.
        self.clock = clock or Clock()
        self.writer = Writer(config.database_path, config.storage.busy_timeout_ms)
        # The readers' one read-only aiosqlite connection (the outbox worker's reads),
        # opened once the writer has made or checked the database.
        self.reader = Reader(config.database_path, config.storage.busy_timeout_ms)
        self.parser = ParserPool(parse_limits(config), workers=config.parser.workers)
        # dnsfunc: the DNS lookup of DKIM keys; tests pass a stub, production None.
        self.pipeline = Pipeline(config, self.parser, self.writer, self.clock, dnsfunc)
        # relay_tls_context: tests trust their own CA; production builds it from the config.
        self.outbox = OutboxWorker(
            config, self.writer, self.reader, clock=self.clock, tls_context=relay_tls_context
        )
        self.pipeline.mail_queued = self.outbox.wake
        self._server: asyncio.Server | None = None
        self._state: ServerState | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._search_backfill: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.writer.start()
        try:
            await self.reader.open()
            await self.outbox.start()
            await self.parser.start()
            await self.pipeline.start()
            self._server, self._state = await start_server(self.config, self.pipeline)
            self._scheduler = asyncio.create_task(
                run_scheduler(self.config, self.writer, self.clock), name="gateway-scheduler"
            )
            storage = self.config.storage
            self._search_backfill = asyncio.create_task(
                search.run_backfill(
                    self.writer, storage.search_backfill_batch, storage.search_backfill_interval
                ),
                name="gateway-search-backfill",
            )
        except BaseException:
            await self.outbox.stop()
            await self.reader.close()
            await self.parser.close()
            await self.writer.close()
            raise

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def state(self) -> ServerState:
        assert self._state is not None
        return self._state

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        if self._search_backfill is not None:
            self._search_backfill.cancel()  # a batch under way commits or rolls back whole
            with contextlib.suppress(asyncio.CancelledError):
                await self._search_backfill
            self._search_backfill = None
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        # The outbox finishes the deliveries in progress while the sessions drain.
        outbox_stopped = asyncio.create_task(self.outbox.stop(min(grace, OUTBOX_STOP_GRACE)))
        if self._server is not None and self._state is not None:
            await stop_server(self._server, self._state, grace)
            self._server = None
        await outbox_stopped
        await self.reader.close()
        await self.parser.close()
        await self.writer.close()


async def run(config: Config) -> int:
    """`gateway serve`: run until SIGTERM/SIGINT, then stop gracefully and return 0.

    Returns 1 instead when the database turns out unusable while running (found corrupt
    when reopened after an I/O error): the daemon drains and exits, so that systemd shows
    the failure rather than a service that is "running" and answers every message 451.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    notifier = SystemdNotifier()
    gateway = Gateway(config)
    failures: list[DatabaseRefused] = []

    def database_failed(exc: DatabaseRefused) -> None:
        event("gateway.database_failed", logging.CRITICAL, error=exc)
        failures.append(exc)
        stop.set()

    gateway.writer.on_failure = database_failed
    try:
        await gateway.start()
    except StoreError as exc:
        # STATUS= is what `systemctl status` shows next to the failed unit.
        notifier.status(f"refusing to start: {exc}")
        notifier.close()
        raise
    if os.environ.get(TEST_HOOKS_ENV) == "1":
        _install_test_hooks(loop, gateway)
    event(
        "gateway.ready",
        version=__version__,
        protocol=config.smtp.protocol,
        listen=f"{config.smtp.host}:{gateway.port}",
        database=config.database_path,
        mailboxes=",".join(m.address for m in config.mailboxes),
    )
    notifier.ready(f"accepting mail on {config.smtp.host}:{gateway.port}")

    watchdog: asyncio.Task[None] | None = None
    interval = watchdog_interval()
    if interval is not None:
        watchdog = asyncio.create_task(_keep_watchdog(notifier, interval))

    await stop.wait()
    event("gateway.stopping")
    notifier.stopping(
        f"database failed: {failures[0]}" if failures else "finishing sessions in flight"
    )
    if watchdog is not None:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
    await gateway.stop()
    notifier.close()
    event("gateway.stopped", batches=gateway.writer.batches, messages=gateway.writer.units)
    return 1 if failures else 0


async def _keep_watchdog(notifier: SystemdNotifier, interval: float) -> None:
    # Pinging from the event loop itself means a loop blocked for longer than
    # WatchdogSec stops the pings and systemd restarts the service. Never from a thread:
    # a thread keeps pinging while the loop, and with it every session, is stuck.
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def _install_test_hooks(loop: asyncio.AbstractEventLoop, gateway: Gateway) -> None:
    """Faults a test can cause in a running daemon (only with GATEWAY_TEST_HOOKS=1).

    SIGUSR1: the next commit fails as a failed fsync does (test-plan item 47).
    SIGUSR2: the event loop blocks for GATEWAY_TEST_STALL_SECONDS (default 1), as a
    runaway handler would (item 53: the watchdog pings must stop meanwhile).
    """
    stall = float(os.environ.get("GATEWAY_TEST_STALL_SECONDS", "1"))

    def arm_fault() -> None:
        gateway.writer.inject_commit_faults(1)
        event("test.commit_fault_armed", logging.WARNING)

    def stall_loop() -> None:
        event("test.loop_stall", logging.WARNING, seconds=stall)
        time.sleep(stall)  # on the loop thread: deliberately blocks everything
        event("test.loop_resumed", logging.WARNING)

    loop.add_signal_handler(signal.SIGUSR1, arm_fault)
    loop.add_signal_handler(signal.SIGUSR2, stall_loop)
    event("test.hooks_installed", logging.WARNING)


def serve(config: Config) -> int:
    try:
        return asyncio.run(run(config))
    except StoreError as exc:
        # Refused at start (corrupt, empty, foreign or newer database): one clear line
        # naming the file and the fault, on the log and on stderr, and a non-zero exit.
        event("gateway.failed", logging.CRITICAL, error=exc)
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        event("gateway.failed", logging.ERROR, error=exc)
        return 1
