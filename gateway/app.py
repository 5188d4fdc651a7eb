"""Daemon lifecycle: build the parts, serve, and stop gracefully.

`Gateway` owns the writer, the parser pool and the listening server, so tests start the
very same thing the daemon runs. `run` adds what only a daemon needs: signals, systemd
readiness and watchdog. It must never exit 0 while acknowledged mail is still uncommitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import ssl
import sys
import time
from typing import Any

from . import __version__
from .actions.intake import own_identity
from .authn import DnsFunc
from .clock import Clock, iso
from .config import Config, ConfigError, check_writable, load_config, parse_listen
from .logs import event
from .metrics import health, open_read_only, serve_metrics
from .notify import Planner
from .outbox import STOP_GRACE_SECONDS as OUTBOX_STOP_GRACE
from .outbox import OutboxWorker, relay_tls_context
from .parserpool import ParserPool, parse_limits
from .pipeline import Pipeline
from .render import TemplateError, Templates
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
        self._metrics: Any = None  # the metrics HTTP server, when [metrics] listen is set
        self.metrics_port = 0
        self._search_backfill: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.writer.start()
        try:
            if self.config.metrics.listen:
                host, port = parse_listen(self.config.metrics.listen, "metrics.listen")
                self._metrics, _thread = serve_metrics(host, port, self.config.database_path)
                self.metrics_port = int(self._metrics.server_port)
                event("metrics.listening", listen=f"{host}:{self.metrics_port}")
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
            self._stop_metrics()
            await self.outbox.stop()
            await self.reader.close()
            await self.parser.close()
            await self.writer.close()
            raise

    def reload(self, new: Config) -> Config:
        """Apply a checked new configuration to what can change while running; returns
        the configuration now in force.

        Restart-only: [smtp] (the listening socket, protocol, TLS files, limits),
        [[mailbox]] (which recipients the server accepts), [storage], [parser] and
        [metrics]; their old values are kept, and the keys that differ are returned
        by `restart_needed`. Everything else (templates, policy, staff, units,
        commitments, delivery, tickets, urgency, upset, on-call) applies to the next
        message, delivery and scheduler pass.
        """
        old = self.config
        config = dataclasses.replace(
            new,
            smtp=old.smtp,
            mailboxes=old.mailboxes,
            storage=old.storage,
            parser=old.parser,
            metrics=old.metrics,
        )
        templates = Templates(config.templates_path)
        tls_context = self.outbox.tls_context
        if config.delivery != old.delivery and config.delivery.mode == "smtp":
            tls_context = relay_tls_context(config) if config.delivery.starttls else None
        # Nothing below can fail: a reload is applied whole or not at all.
        self.config = config
        self.pipeline.config = config
        self.pipeline.own = own_identity(config)
        self.pipeline.planner = Planner(config, templates, self.pipeline.token_secret)
        self.outbox.config = config
        self.outbox.delivery = config.delivery
        self.outbox.templates = templates
        self.outbox.tls_context = tls_context
        self.outbox._folder_ready = False  # a new delivery.directory is made on first use
        if self._scheduler is not None:
            # The scheduler reads its config once a pass: a new task uses the new one
            # (its first pass runs now; every job is done once, so an early pass is safe).
            self._scheduler.cancel()
            self._scheduler = asyncio.create_task(
                run_scheduler(config, self.writer, self.clock), name="gateway-scheduler"
            )
        self.outbox.wake()
        return config

    def _stop_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None

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
        self._stop_metrics()
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
    started_at = iso(gateway.clock.now())

    def reload() -> None:
        # SIGHUP: read and check the whole new configuration (and its templates) first;
        # a bad one is logged, naming the key or file, and the running one is kept.
        try:
            new = load_config(config.path)
            Templates(new.templates_path).check()
        except (ConfigError, TemplateError, OSError) as exc:
            event("config.reload_failed", logging.ERROR, path=config.path, error=exc)
            return
        restart = restart_needed(gateway.config, new)
        try:
            gateway.reload(new)
        except (ssl.SSLError, OSError) as exc:
            event("config.reload_failed", logging.ERROR, path=config.path, error=exc)
            return
        if restart:
            event(
                "config.restart_needed",
                logging.WARNING,
                sections=",".join(restart),
                detail="changed, kept until restart",
            )
        event("config.reloaded", path=config.path)

    # Until the parts are started there is nothing to reload into; SIGHUP's default
    # action (exit) must not kill a starting daemon either.
    loop.add_signal_handler(
        signal.SIGHUP, lambda: event("config.reload_ignored", logging.WARNING, why="starting")
    )
    try:
        await gateway.start()
    except StoreError as exc:
        # STATUS= is what `systemctl status` shows next to the failed unit.
        notifier.status(f"refusing to start: {exc}")
        notifier.close()
        raise
    loop.add_signal_handler(signal.SIGHUP, reload)
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

    status_task = asyncio.create_task(_keep_status(gateway, notifier, started_at))
    watchdog: asyncio.Task[None] | None = None
    interval = watchdog_interval()
    if interval is not None:
        watchdog = asyncio.create_task(_keep_watchdog(notifier, interval))

    await stop.wait()
    event("gateway.stopping")
    notifier.stopping(
        f"database failed: {failures[0]}" if failures else "finishing sessions in flight"
    )
    for task in (watchdog, status_task):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await gateway.stop()
    with contextlib.suppress(OSError):
        config.status_path.unlink()  # a clean stop: `gateway status` says "not running"
    notifier.close()
    event("gateway.stopped", batches=gateway.writer.batches, messages=gateway.writer.units)
    return 1 if failures else 0


def restart_needed(old: Config, new: Config) -> list[str]:
    """The restart-only sections (see `Gateway.reload`) that differ between two configs."""
    names = ("smtp", "mailboxes", "storage", "parser", "metrics")
    return [name for name in names if getattr(old, name) != getattr(new, name)]


def status_summary(found: dict[str, Any]) -> str:
    """The one line `systemctl status` shows (sd_notify STATUS=)."""
    overdue = sum(found["overdue_by_unit"].values())
    return (
        f"{found['messages_today']} messages today, {found['quarantine_held']} held, "
        f"outbox {found['outbox_waiting']} waiting / {found['outbox_failed']} failed, "
        f"{overdue} overdue"
    )


def _write_status(gateway: Gateway, started_at: str, summary: str) -> None:
    """The status file `gateway status` reads: written whole under a temporary name and
    renamed, so a reader never sees half of it."""
    config = gateway.config
    data = {
        "pid": os.getpid(),
        "started_at": started_at,
        "updated_at": iso(gateway.clock.now()),
        "listen": f"{config.smtp.host}:{gateway.port}",
        "commits": gateway.writer.batches,
        "units": gateway.writer.units,
        "summary": summary,
    }
    path = config.status_path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _read_health(gateway: Gateway) -> dict[str, Any]:
    conn = open_read_only(gateway.config.database_path)
    try:
        return health(conn, gateway.clock.now())
    finally:
        conn.close()


async def _keep_status(gateway: Gateway, notifier: SystemdNotifier, started_at: str) -> None:
    # The health queries are indexed, but they are file I/O: off the event loop.
    while True:
        try:
            found = await asyncio.to_thread(_read_health, gateway)
            summary = status_summary(found)
            notifier.status(summary)
            await asyncio.to_thread(_write_status, gateway, started_at, summary)
        except Exception as exc:  # a status line is a courtesy: never stop the daemon
            event("status.failed", logging.WARNING, error=exc)
        await asyncio.sleep(gateway.config.metrics.status_interval)


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
    # Before anything is opened or bound: a folder the daemon cannot write is a ConfigError
    # naming the key (cli.main prints it, exit 1), not a crash after READY.
    check_writable(config)
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
