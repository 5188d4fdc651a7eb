"""Daemon lifecycle: build the parts, serve, and stop gracefully.

`Gateway` owns the writer, the parser pool and the listening server, so tests start the
very same thing the daemon runs. `run` adds what only a daemon needs: signals, systemd
readiness and watchdog. It must never exit 0 while acknowledged mail is still uncommitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import ssl
from collections.abc import Callable
from datetime import datetime

from . import __version__
from .authn import DnsFunc
from .config import Config
from .inbound import ParseLimits, ParserPool
from .logs import event
from .outbox import STOP_GRACE_SECONDS as OUTBOX_STOP_GRACE
from .outbox import OutboxWorker
from .pipeline import Pipeline, utc_now
from .scheduler import run_scheduler
from .sdnotify import SystemdNotifier, watchdog_interval
from .server import ServerState, start_server, stop_server
from .store import Writer

# systemd's TimeoutStopSec is 60 s: leave time to close the parser and the database.
STOP_GRACE_SECONDS = 50.0


def parse_limits(config: Config) -> ParseLimits:
    fields = dataclasses.asdict(config.parser)
    fields.pop("workers")
    return ParseLimits(**fields)


class Gateway:
    """The running service: writer + parser pool + SMTP/LMTP server."""

    def __init__(
        self,
        config: Config,
        *,
        now: Callable[[], datetime] = utc_now,
        dnsfunc: DnsFunc | None = None,
        relay_tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.now = now
        self.writer = Writer(config.database_path, config.storage.busy_timeout_ms)
        self.parser = ParserPool(parse_limits(config), workers=config.parser.workers)
        # dnsfunc: the DNS lookup of DKIM keys; tests pass a stub, production None.
        self.pipeline = Pipeline(config, self.parser, self.writer, now, dnsfunc)
        # relay_tls_context: tests trust their own CA; production builds it from the config.
        self.outbox = OutboxWorker(config, self.writer, now=now, tls_context=relay_tls_context)
        self.pipeline.mail_queued = self.outbox.wake
        self._server: asyncio.Server | None = None
        self._state: ServerState | None = None
        self._scheduler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.writer.start()
        try:
            await self.outbox.start()
            await self.parser.start()
            await self.pipeline.start()
            self._server, self._state = await start_server(self.config, self.pipeline)
            self._scheduler = asyncio.create_task(
                run_scheduler(self.config, self.writer, self.now), name="gateway-scheduler"
            )
        except BaseException:
            await self.outbox.stop()
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
        await self.parser.close()
        await self.writer.close()


async def run(config: Config) -> int:
    """`gateway serve`: run until SIGTERM/SIGINT, then stop gracefully and return 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    notifier = SystemdNotifier()
    gateway = Gateway(config)
    await gateway.start()
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
    notifier.stopping("finishing sessions in flight")
    if watchdog is not None:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
    await gateway.stop()
    notifier.close()
    event("gateway.stopped", batches=gateway.writer.batches, messages=gateway.writer.units)
    return 0


async def _keep_watchdog(notifier: SystemdNotifier, interval: float) -> None:
    # Pinging from the event loop itself means a loop blocked for longer than
    # WatchdogSec stops the pings and systemd restarts the service.
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def serve(config: Config) -> int:
    try:
        return asyncio.run(run(config))
    except OSError as exc:
        event("gateway.failed", logging.ERROR, error=exc)
        return 1
