"""[deliver] Committed outbox rows -> the relay over SMTP, or .eml files in a directory.

The worker reads due rows through the daemon's read-only aiosqlite connection (the store's
`Reader`, opened by app.py), which sees committed rows only, delivers a few at a time, and
records each outcome through the Writer: sent after the relay's 250 to DATA (or once the
file is in place), retried with back-off after a temporary failure, failed after a 5xx or
once retrying has gone on for too long. A page's webhook (issue 12) is a row of its own
kind (`page-webhook`): its stored bytes are the JSON document, POSTed with the stdlib's
urllib in a thread (aiohttp is no dependency, and one small POST a page does not warrant
one), with `[delivery] timeout` per attempt and the same back-off and limits as mail; a
webhook failing never marks the relay down, so other mail goes on. It must
never send a row that is not committed, never send in plaintext when ``starttls`` is on,
and never build a file path from anything but the row id and a sanitised Message-ID.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import re
import sqlite3
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Protocol

import aiosmtplib

from . import __version__, metrics, store
from .clock import Clock, iso
from .config import Config
from .logs import event
from .mailbuild import build_planned
from .render import Templates
from .store import OutboxMail, Writer
from .store.events import EventAction
from .store.messages import fetch_mail_spec, fetch_raw
from .store.outbox import due_mail
from .store.pages import WEBHOOK_KIND
from .store.reader import Reader

log = logging.getLogger("gateway")

# Rows delivered at the same time: each holds one relay connection (or one file write).
CONCURRENCY = 4
# Rows read per round; a full round is followed at once by the next one.
ROUND_LIMIT = 64
# The longest wait between two attempts, however many there were.
MAX_BACKOFF_SECONDS = 6 * 3600
# last_error is for a human reading `gateway outbox list`: one bounded line.
MAX_ERROR_CHARS = 300
# How long stop() lets the deliveries in progress finish before cancelling them.
STOP_GRACE_SECONDS = 10.0

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME_CHARS = 100


class DeliveryError(Exception):
    """One attempt failed.

    `permanent`: retrying cannot help (a 5xx to MAIL, RCPT or DATA). `relay_down`: the
    relay itself failed (no connection, no TLS, a timeout), so the rest of the round waits
    for the next one instead of trying it too.
    """

    def __init__(self, error: str, *, permanent: bool = False, relay_down: bool = False):
        super().__init__(error)
        self.error = one_line(error)
        self.permanent = permanent
        self.relay_down = relay_down


class Transport(Protocol):
    """How one slot of a round hands mail on: `send` returns once it is taken."""

    async def send(self, mail: OutboxMail, raw: bytes) -> None: ...

    async def close(self) -> None: ...


def one_line(text: str) -> str:
    """A relay's reply or an exception as one line of at most MAX_ERROR_CHARS."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_ERROR_CHARS else flat[: MAX_ERROR_CHARS - 1] + "…"


def next_attempt_at(
    *, created_at: datetime, now: datetime, attempts: int, retry_after: int, give_up_after: int
) -> datetime | None:
    """When to try again after `attempts` attempts have failed; None: give up now.

    The wait doubles from `retry_after`, capped at MAX_BACKOFF_SECONDS, and never goes past
    the deadline (`give_up_after` after the row was planned), so the last try is at it.
    """
    deadline = created_at + timedelta(seconds=give_up_after)
    if now >= deadline:
        return None
    wait = min(retry_after * 2 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS)
    return min(now + timedelta(seconds=wait), deadline)


def eml_name(row_id: int, message_id: str) -> str:
    """`<id>-<Message-ID>.eml`, the Message-ID reduced to [A-Za-z0-9._-]: never a path."""
    safe = _UNSAFE_NAME_CHARS.sub("_", message_id.strip().strip("<>"))[:_MAX_NAME_CHARS]
    return f"{int(row_id)}-{safe or 'no-message-id'}.eml"


def write_eml(folder: Path, name: str, raw: bytes) -> Path:
    """Write `raw` to folder/name atomically and durably; no temporary file is left."""
    if "/" in name or name.startswith("."):
        raise ValueError(f"not a plain file name: {name!r}")
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".outbox-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        target = folder / name
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename is durable only once the folder's entry is on disk.
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)
    return target


class DirectoryTransport:
    """Delivery mode "directory": each mail becomes an .eml file in the configured folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def send(self, mail: OutboxMail, raw: bytes) -> None:
        try:
            await asyncio.to_thread(write_eml, self.folder, eml_name(mail.id, mail.message_id), raw)
        except OSError as exc:
            raise DeliveryError(f"cannot write to {self.folder}: {exc.strerror or exc}") from exc

    async def close(self) -> None:
        return None


def relay_tls_context(config: Config) -> ssl.SSLContext:
    """Certificate and host name checks against the system's CAs, or `ca_file`'s."""
    ca_file = config.delivery.ca_file
    context = ssl.create_default_context(cafile=config.resolve(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class RelayTransport:
    """Delivery mode "smtp": one connection to the relay, reused while mail goes through.

    With ``starttls`` on, nothing but EHLO and STARTTLS is said before TLS is up with a
    verified certificate; a relay that offers no STARTTLS gets no MAIL command at all.
    """

    def __init__(self, config: Config, tls_context: ssl.SSLContext | None) -> None:
        self.config = config
        self.delivery = config.delivery
        self.tls_context = tls_context
        self._smtp: aiosmtplib.SMTP | None = None

    async def send(self, mail: OutboxMail, raw: bytes) -> None:
        smtp = self._smtp
        self._smtp = None  # reused only if this mail goes through cleanly
        try:
            if smtp is None:
                smtp = await self._connect()
            await self._transfer(smtp, mail, raw)
        except BaseException as exc:
            if smtp is not None:
                smtp.close()
            if isinstance(exc, Exception):
                raise relay_error(exc) from exc
            raise
        self._smtp = smtp

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            await smtp.quit(timeout=min(self.delivery.timeout, 5))
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()

    async def _connect(self) -> aiosmtplib.SMTP:
        delivery = self.delivery
        smtp = aiosmtplib.SMTP(
            hostname=delivery.relay_host,
            port=delivery.relay_port,
            timeout=delivery.timeout,
            local_hostname=self.config.smtp.hostname,
            # Never aiosmtplib's opportunistic default: STARTTLS is ours to require below.
            start_tls=False,
        )
        try:
            await smtp.connect()
            await smtp.ehlo()
            if delivery.starttls:
                if not smtp.supports_extension("starttls"):
                    raise DeliveryError("relay offers no STARTTLS", relay_down=True)
                assert self.tls_context is not None
                await smtp.starttls(
                    tls_context=self.tls_context, server_hostname=delivery.relay_host
                )
                # RFC 3207 4.2: forget what the relay said before TLS; ask again.
                await smtp.ehlo()
            if delivery.username:
                password = await asyncio.to_thread(self._password)
                await smtp.login(delivery.username, password)
        except BaseException as exc:
            smtp.close()
            if isinstance(exc, DeliveryError):
                raise
            if isinstance(exc, Exception):
                # Whatever stops a connection is the relay's problem, not this mail's.
                error = relay_error(exc)
                raise DeliveryError(error.error, relay_down=True) from exc
            raise
        return smtp

    def _password(self) -> str:
        path = self.config.resolve(self.delivery.password_file)
        try:
            return path.read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DeliveryError(
                f"cannot read delivery.password_file: {exc}", relay_down=True
            ) from exc

    async def _transfer(self, smtp: aiosmtplib.SMTP, mail: OutboxMail, raw: bytes) -> None:
        mail_options: list[str] = []
        encoding = "ascii"
        if not (mail.mail_from.isascii() and mail.rcpt_to.isascii()):
            if not smtp.supports_extension("smtputf8"):
                # RFC 6531 section 3.4: never downgraded, never an encoded word (RFC
                # 2047 section 5): the mail is failed with this reason for the admins.
                raise DeliveryError(
                    "withheld: an internationalised address (RFC 6531) and the relay "
                    "does not offer SMTPUTF8",
                    permanent=True,
                )
            mail_options.append("SMTPUTF8")
            encoding = "utf-8"
        if not raw.isascii() and smtp.supports_extension("8bitmime"):
            mail_options.append("BODY=8BITMIME")
        # mail("") sends MAIL FROM:<>, the null sender of automatic mail (RFC 3834 3.3).
        await smtp.mail(mail.mail_from, options=mail_options, encoding=encoding)
        await smtp.rcpt(mail.rcpt_to, encoding=encoding)
        await smtp.data(raw)


def relay_error(exc: Exception) -> DeliveryError:
    """What an exception from a relay conversation means for the row."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = f"{exc.code} {exc.message}"
        # A 5xx to the mail itself is final; one to EHLO, STARTTLS or AUTH is about our
        # relationship with the relay, which an admin can fix: retried.
        final = isinstance(
            exc,
            aiosmtplib.SMTPSenderRefused
            | aiosmtplib.SMTPRecipientRefused
            | aiosmtplib.SMTPDataError,
        )
        return DeliveryError(reply, permanent=final and 500 <= exc.code < 600)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return DeliveryError(f"timeout: {exc}", relay_down=True)
    if isinstance(exc, aiosmtplib.SMTPConnectError) and isinstance(
        exc.__cause__, ConnectionRefusedError
    ):
        return DeliveryError(f"connection refused: {exc}", relay_down=True)
    if isinstance(exc, ssl.SSLError):
        return DeliveryError(f"TLS: {exc}", relay_down=True)
    if isinstance(exc, aiosmtplib.SMTPException | OSError):
        return DeliveryError(str(exc) or type(exc).__name__, relay_down=True)
    if isinstance(exc, ValueError):
        # aiosmtplib refuses addresses that would not fit on a command line.
        return DeliveryError(f"invalid address: {exc}", permanent=True)
    return DeliveryError(f"{type(exc).__name__}: {exc}")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A webhook's redirect is not followed: it could lead a page to a plain-http host
    that is not loopback, which [oncall] webhook refuses (config.py)."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def webhook_allowed(url: str) -> bool:
    """https, or http to loopback: the rule config.py checks, again at delivery (the URL
    is the queued row's, written when the page was)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return True
    if parts.scheme != "http":
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _post(url: str, body: bytes, timeout: float) -> int:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": f"gateway/{__version__}"},
    )
    # No proxy from the environment (the loopback rule is about where the POST goes) and
    # no redirects; certificates and host names are checked against the system's CAs.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        _NoRedirects(),
    )
    with opener.open(request, timeout=timeout) as response:
        response.read(65536)
        return int(response.status)


async def post_webhook(url: str, body: bytes, *, seconds: float) -> None:
    """POST a page's JSON; DeliveryError unless the receiver answers 2xx. `seconds` bounds
    each socket operation, and the attempt as a whole at twice that (a receiver that
    trickles its answer); a 4xx other than 408 and 429 is final, anything else retried."""
    if not webhook_allowed(url):
        raise DeliveryError(
            f"webhook refused: {url!r} is not https or loopback http", permanent=True
        )
    try:
        status = await asyncio.wait_for(asyncio.to_thread(_post, url, body, seconds), 2 * seconds)
    except urllib.error.HTTPError as exc:
        final = 300 <= exc.code < 500 and exc.code not in (408, 429)
        raise DeliveryError(f"webhook: HTTP {exc.code} {exc.reason}", permanent=final) from exc
    except urllib.error.URLError as exc:
        raise DeliveryError(f"webhook: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:
        raise DeliveryError(
            f"webhook: timeout or network error: {exc or type(exc).__name__}"
        ) from exc
    if not 200 <= status < 300:
        raise DeliveryError(f"webhook: HTTP {status}")


class OutboxWorker:
    """Delivers due outbox rows until stopped; `wake()` after a commit that queued mail.

    Reads go through `reader` (open before the first round, closed by its owner after
    `stop()`); writes are units for `writer`.
    """

    def __init__(
        self,
        config: Config,
        writer: Writer,
        reader: Reader,
        *,
        clock: Clock,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.delivery = config.delivery
        self.writer = writer
        self.reader = reader
        self.clock = clock
        self.templates = Templates(config.templates_path)
        self.tls_context = tls_context
        if tls_context is None and self.delivery.mode == "smtp" and self.delivery.starttls:
            self.tls_context = relay_tls_context(config)
        # Building mail is pure Python, bound by the GIL: one thread builds for all the
        # delivery slots, rather than several threads taking the GIL from the event loop.
        self._builder = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gateway-build"
        )
        self._folder_ready = False
        self._round = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Outcomes the Writer could not record yet, by row id: recorded first next round,
        # and their rows are not delivered again meanwhile.
        self._unrecorded: dict[int, Callable[[sqlite3.Connection], None]] = {}

    async def start(self) -> None:
        await self._prepare()
        self._task = asyncio.create_task(self._run(), name="gateway-outbox")

    def wake(self) -> None:
        """Look for due mail now rather than at the next poll."""
        self._wakeup.set()

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Finish the deliveries in progress (for at most `grace` s), start no more."""
        self._stopping = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                # The rows being sent stay queued and go again after the restart.
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A deliver_due() of a test or bench may still be running: once stop() returns, no
        # read is in flight, so the reader's owner may close it.
        async with self._round:
            pass
        self._builder.shutdown(wait=True)

    async def deliver_due(self) -> int:
        """One round: deliver the rows due now; returns how many were tried."""
        async with self._round:
            await self._prepare()
            await self._record_pending()
            due = await due_mail(
                self.reader.db,
                now=self.clock.stamp(),
                limit=ROUND_LIMIT,
                exclude=frozenset(self._unrecorded),
            )
            if not due:
                return 0
            queue = collections.deque(due)
            relay_down = asyncio.Event()
            slots = min(CONCURRENCY, len(due))
            tried = await asyncio.gather(*(self._slot(queue, relay_down) for _ in range(slots)))
            return sum(tried)

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                tried = await self.deliver_due()
            except Exception:
                log.exception("event=outbox.round_failed")
                tried = 0
            if self._stopping:
                break
            if tried >= ROUND_LIMIT:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.delivery.poll_interval)

    async def _slot(self, queue: collections.deque[OutboxMail], relay_down: asyncio.Event) -> int:
        """Deliver rows from the round's queue one after the other; returns how many."""
        transport = self._transport()
        tried = 0
        try:
            while queue and not self._stopping and not relay_down.is_set():
                tried += 1
                failure = await self._attempt(transport, queue.popleft())
                if failure is not None and failure.relay_down:
                    # The rest of the round waits for the next one: no point in trying
                    # every queued mail against a relay that is down.
                    relay_down.set()
        finally:
            await transport.close()
        return tried

    def _transport(self) -> Transport:
        if self.delivery.mode == "directory":
            return DirectoryTransport(self.config.outbox_path)
        return RelayTransport(self.config, self.tls_context)

    async def _attempt(self, transport: Transport, mail: OutboxMail) -> DeliveryError | None:
        failure: DeliveryError | None = None
        try:
            raw = await fetch_raw(self.reader.db, mail.message)
            if mail.kind == WEBHOOK_KIND:
                if raw is None:
                    raise DeliveryError("the stored webhook document is missing", permanent=True)
                await post_webhook(mail.rcpt_to, raw, seconds=self.delivery.timeout)
            else:
                if raw is None:
                    raw = await self._build(mail)
                await transport.send(mail, raw)
        except DeliveryError as exc:
            failure = exc
        except Exception as exc:
            log.exception("event=outbox.error id=%d", mail.id)
            failure = DeliveryError(f"{type(exc).__name__}: {exc}")
        await self._record(mail, failure)
        return failure

    async def _build(self, mail: OutboxMail) -> bytes:
        """Build a planned mail from its spec and keep the bytes before sending them, so
        that every later attempt (and the admin) sees exactly what was sent."""
        spec = await fetch_mail_spec(self.reader.db, mail.message)
        if spec is None:
            raise DeliveryError("the stored bytes of this mail are missing", permanent=True)
        try:
            raw, text = await asyncio.get_running_loop().run_in_executor(
                self._builder, build_planned, self.templates, spec
            )
        except Exception as exc:
            # A template or spec that cannot be built will not build on a retry either.
            raise DeliveryError(f"cannot build the mail: {exc}", permanent=True) from exc
        stored: bytes = await self.writer.write(
            partial(store.store_built_mail, message=mail.message, raw=raw, text=text)
        )
        return stored

    async def _record(self, mail: OutboxMail, failure: DeliveryError | None) -> None:
        now = self.clock.now()
        attempts = mail.attempts + 1
        fields: dict[str, object] = {
            "id": mail.id,
            "message_id": mail.message_id,
            "to": mail.rcpt_to,
            "attempts": attempts,
        }
        unit: Callable[[sqlite3.Connection], None]
        if failure is None:
            unit = partial(store.mark_outbox_sent, row_id=mail.id, attempts=attempts, now=iso(now))
            event("outbox.sent", **fields)
            metrics.DELIVERIES.labels("sent").inc()
        else:
            retry_at = None
            if not failure.permanent:
                retry_at = next_attempt_at(
                    created_at=datetime.fromisoformat(mail.created_at),
                    now=now,
                    attempts=attempts,
                    retry_after=self.delivery.retry_after,
                    give_up_after=self.delivery.give_up_after,
                )
            if retry_at is not None:
                unit = partial(
                    store.mark_outbox_retry,
                    row_id=mail.id,
                    attempts=attempts,
                    error=failure.error,
                    next_attempt_at=iso(retry_at),
                )
                event(
                    "outbox.retry",
                    logging.WARNING,
                    **fields,
                    error=failure.error,
                    next_attempt_at=iso(retry_at),
                )
                metrics.DELIVERIES.labels("retry").inc()
            else:
                error = failure.error
                if not failure.permanent:
                    error = one_line(f"gave up after {attempts} attempts: {error}")
                unit = partial(self._fail, mail, attempts, error, iso(now))
                event("outbox.failed", logging.ERROR, **fields, error=error)
                metrics.DELIVERIES.labels("failed").inc()
        try:
            await self.writer.write(unit)
        except store.StoreError as exc:
            # Not delivered again until recorded: a lost "sent" mark would mean a duplicate.
            self._unrecorded[mail.id] = unit
            event("outbox.unrecorded", logging.ERROR, id=mail.id, error=exc)

    @staticmethod
    def _fail(
        mail: OutboxMail, attempts: int, error: str, now: str, conn: sqlite3.Connection
    ) -> None:
        store.mark_outbox_failed(conn, mail.id, attempts=attempts, error=error)
        store.record_event(
            conn,
            time=now,
            actor="gateway",
            action=EventAction.OUTBOX_FAILED,
            subject=f"outbox:{mail.id}",
            ticket=mail.ticket,
            detail={"to": mail.rcpt_to, "kind": mail.kind, "error": error},
        )

    async def _record_pending(self) -> None:
        for row_id, unit in list(self._unrecorded.items()):
            try:
                await self.writer.write(unit)
            except store.StoreError:
                return
            del self._unrecorded[row_id]

    async def _prepare(self) -> None:
        if self._folder_ready:
            return
        if self.delivery.mode == "directory":
            await asyncio.to_thread(self.config.outbox_path.mkdir, parents=True, exist_ok=True)
        self._folder_ready = True
