"""The SMTP/LMTP edge: aiosmtpd protocol objects with production limits, and the handler.

The protocol subclass enforces what aiosmtpd leaves open (connection caps, command budgets,
DATA slots, graceful stop); the handler maps verbs to pipeline calls and pipeline results to
the reply constants below. No business logic lives here, and no reply ever carries a
version, a path or exception text (RELIABILITY.md test 14).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from .address import is_our_domain, match_mailbox
from .config import Config
from .logs import event
from .pipeline import Envelope as IntakeEnvelope
from .pipeline import IntakeResult, IntakeStatus, Pipeline

log = logging.getLogger("gateway")

# Greeting ident: the product, never a version (aiosmtpd's default names itself and its version).
IDENT = "ESMTP"

REPLY_250_SENDER_OK = "250 2.1.0 Sender ok"
REPLY_250_RECIPIENT_OK = "250 2.1.5 Recipient ok"
REPLY_250_QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
REPLY_421_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
REPLY_421_TOO_MANY_FROM_IP = "421 4.7.0 Too many connections from your address, try again later"
REPLY_421_TOO_MANY_REJECTED = "421 4.7.0 Too many rejected recipients, closing connection"
REPLY_421_TOO_MANY_MESSAGES = "421 4.7.0 Too many messages in one connection, reconnect"
REPLY_421_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_421_OUT_OF_SYNC = "421 4.5.0 SMTP protocol synchronization error, closing connection"
REPLY_451_TEMPFAIL = "451 4.3.0 Temporary failure, please try again later (ref {ref})"
REPLY_451_AUTH_TEMPFAIL = "451 4.7.0 Temporary authentication failure, please try again later"
REPLY_451_BUSY = "451 4.3.2 Too busy, please try again later"
REPLY_452_DISK_FULL = "452 4.3.1 Insufficient system storage, try again later"
REPLY_452_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_500_LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
REPLY_500_COMMAND_TOO_LONG = "500 5.5.2 Command line too long"
REPLY_550_NO_SUCH_MAILBOX = "550 5.1.1 No such mailbox here"
REPLY_550_RELAY_DENIED = "550 5.7.1 Relaying denied"
REPLY_550_NOT_AUTHORISED = (
    "550 5.7.1 Sorry, this address only accepts requests from senders authorised by our "
    "clients. Please ask {contact} to authorise you."
)
REPLY_552_TOO_BIG = "552 5.3.4 Message too big for this system"
REPLY_553_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"
REPLY_554_TOO_MANY_HOPS = "554 5.4.6 Too many hops, possible mail loop"
REPLY_554_LOOP = "554 5.4.6 Mail loop detected: this message came from us"
REPLY_554_BAD_HEADER = "554 5.6.0 Malformed header: bare CR, LF or NUL in the header block"

# aiosmtpd's own replies that carry no enhanced status code, or say too much, mapped to ours.
_STOCK_REPLIES = {
    "552 Error: Too much mail data": REPLY_552_TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": REPLY_552_TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": REPLY_500_LINE_TOO_LONG,
    "500 Command line too long": REPLY_500_COMMAND_TOO_LONG,
}

_RESULT_REPLIES = {
    IntakeStatus.TEMPFAIL: REPLY_451_TEMPFAIL,
    IntakeStatus.DISK_FULL: REPLY_452_DISK_FULL,
    IntakeStatus.TOO_MANY_HOPS: REPLY_554_TOO_MANY_HOPS,
    IntakeStatus.LOOP: REPLY_554_LOOP,
    IntakeStatus.AUTH_TEMPFAIL: REPLY_451_AUTH_TEMPFAIL,
    IntakeStatus.BAD_HEADER: REPLY_554_BAD_HEADER,
}

# Extension parameters a MAIL command may add to the 512-octet command line:
# SIZE=<n> (RFC 1870 section 6: 26 octets) and SMTPUTF8 (RFC 6531 section 3.4: 10 octets).
_MAIL_COMMAND_LIMIT = 512 + 26 + 10


def reply_for(result: IntakeResult, contact: str = "") -> str:
    if result.status is IntakeStatus.ACCEPTED:
        return REPLY_250_QUEUED.format(queue_id=result.queue_id)
    if result.status is IntakeStatus.REFUSED:
        return REPLY_550_NOT_AUTHORISED.format(
            contact=contact or "your organisation's account manager"
        )
    return _RESULT_REPLIES[result.status].format(ref=result.queue_id)


def format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


class ConnectionGate:
    """Counts open connections, in all and per client address."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: collections.Counter[str] = collections.Counter()

    def admit(self, ip: str) -> str | None:
        """None if admitted (and counted), else the reply to refuse with."""
        if self.total >= self.max_total:
            return REPLY_421_TOO_MANY_CONNECTIONS
        if self._per_ip[ip] >= self.max_per_ip:
            return REPLY_421_TOO_MANY_FROM_IP
        self.total += 1
        self._per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    @property
    def stressed(self) -> bool:
        return self.total > 0.8 * self.max_total


class GatewaySession(Session):
    """aiosmtpd's session plus the counters our limits need."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.rejected_recipients = 0
        self.messages = 0


# The form of path nearly every client sends: <local@domain>, dot-atom local part, an
# LDH domain, then the parameters. aiosmtpd parses each MAIL and RCPT path with the email
# package's RFC 5322 header parser, defining a class on every call: a seventh of the
# event loop's time under load. A path of this form gives the same (address, parameters)
# with one regular expression; anything else (quoted local parts, address literals, source
# routes, comments, the null path, UTF-8) still goes through aiosmtpd.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*((?:[^ \t(].*)?)",
    re.DOTALL,
)


@dataclass
class ServerState:
    """Shared by every connection of one listening server."""

    config: Config
    gate: ConnectionGate
    data_slots: asyncio.Semaphore
    sessions: set[_GatewayProtocol] = field(default_factory=set)
    stopping: bool = False


class _GatewayProtocol(SMTP):
    """Limits and lifecycle shared by the SMTP and LMTP protocol classes."""

    state: ServerState
    _in_data = False
    _awaiting_data_reply = False
    _ip = "?"

    @property
    def command_size_limits(self) -> dict[str, int]:  # type: ignore[override]
        # aiosmtpd keeps this as a class-level dict and adds to MAIL's limit on every
        # EHLO, so after a few EHLOs an overlong MAIL got through (RELIABILITY.md test 6).
        # A fresh mapping per lookup cannot accumulate.
        limits: collections.defaultdict[str, int] = collections.defaultdict(
            lambda: self.command_size_limit
        )
        limits["MAIL"] = _MAIL_COMMAND_LIMIT
        return limits

    def _create_session(self) -> Session:
        return GatewaySession(self.loop)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        match = _PLAIN_PATH.fullmatch(arg)
        if match is None:
            try:
                return super()._getaddr(arg)
            except Exception:
                # The email package's parser trips over some broken paths ("<" alone: an
                # IndexError; "<a@[": an AttributeError) instead of raising its parse
                # error. Such a path is a malformed address (553), not a fault (451).
                return None, None
        address = match.group(1)
        if self.local_part_limit and address.rindex("@") > self.local_part_limit:
            return None, None
        return address, match.group(2)

    async def push(self, status: Any) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        text = _STOCK_REPLIES.get(text, text)
        if self._awaiting_data_reply:
            self._awaiting_data_reply = False
            # RFC 5321 section 3.3 and RFC 2920 section 3.1: a client must wait for the
            # reply to DATA before sending content. If it did not and DATA is refused, what
            # it sent is message text; reading it as commands would let a body carry a
            # whole SMTP transaction of its own. Hang up instead.
            if not text.startswith("354") and self._has_unread_input():
                assert self.session is not None
                event("smtp.out_of_sync", peer=format_peer(self.session.peer), refused=text[:3])
                text = REPLY_421_OUT_OF_SYNC
        await super().push(text)
        # RFC 5321 section 3.8: a 421 reply means the server is closing the channel.
        if text.startswith("421") and self.transport is not None:
            self.transport.close()

    def _has_unread_input(self) -> bool:
        buffer = getattr(self._reader, "_buffer", b"")  # asyncio has no public accessor
        return len(buffer) > 0

    async def _handle_client(self) -> None:
        assert self.session is not None
        peer = self.session.peer
        self._ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        refusal = REPLY_421_SHUTTING_DOWN if self.state.stopping else None
        refusal = refusal or self.state.gate.admit(self._ip)
        if refusal is not None:
            event("smtp.refused", peer=format_peer(peer), reason=refusal[10:])
            self._writer.write(refusal.encode() + b"\r\n")
            if self.transport is not None:
                self.transport.close()
            return
        self.state.sessions.add(self)
        try:
            if self.state.gate.stressed:
                self._timeout_duration = self.state.config.smtp.stress_timeout
                self._reset_timeout()
            await super()._handle_client()
        finally:
            self.state.gate.release(self._ip)
            self.state.sessions.discard(self)

    async def smtp_DATA(self, arg: str) -> None:
        # A DATA slot is taken before 354, so at most `data_slots` messages are held in
        # memory and parsed at once; the rest wait, then get a 451 and retry later.
        self._awaiting_data_reply = True
        try:
            async with asyncio.timeout(self.state.config.smtp.data_slot_wait):
                await self.state.data_slots.acquire()
        except TimeoutError:
            await self.push(REPLY_451_BUSY)
            return
        self._in_data = True
        try:
            await super().smtp_DATA(arg)
        except Exception:
            # aiosmtpd resets the envelope only when the handler returns. After a fault
            # (answered 451 by handle_exception) the transaction is over too; otherwise
            # the client's next MAIL gets "503 nested MAIL command".
            self.envelope = self._create_envelope()
            raise
        finally:
            self._in_data = False
            self.state.data_slots.release()
        if self.state.stopping:
            await self.push(REPLY_421_SHUTTING_DOWN)

    @property
    def is_idle(self) -> bool:
        return not self._in_data

    def close_for_shutdown(self) -> None:
        """Tell an idle client we are going away, and hang up."""
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(REPLY_421_SHUTTING_DOWN.encode() + b"\r\n")
            self.transport.close()


class GatewaySMTP(_GatewayProtocol):
    pass


class GatewayLMTP(_GatewayProtocol, LMTP):
    pass


class Handler:
    """aiosmtpd hooks: envelope checks here, everything about the content in the pipeline."""

    def __init__(
        self, config: Config, pipeline: Pipeline, has_free_space: Callable[[], bool]
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.has_free_space = has_free_space

    async def handle_MAIL(
        self,
        server: _GatewayProtocol,
        session: GatewaySession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if session.messages >= self.config.smtp.max_messages_per_connection:
            return REPLY_421_TOO_MANY_MESSAGES
        if not address.isascii() and "SMTPUTF8" not in mail_options:
            return REPLY_553_NEEDS_SMTPUTF8
        if not self.has_free_space():
            event("smtp.disk_low", logging.ERROR, peer=format_peer(session.peer))
            return REPLY_452_DISK_FULL
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return REPLY_250_SENDER_OK

    async def handle_RCPT(
        self,
        server: _GatewayProtocol,
        session: GatewaySession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            return REPLY_452_TOO_MANY_RECIPIENTS
        if not address.isascii() and not envelope.smtp_utf8:
            return REPLY_553_NEEDS_SMTPUTF8
        if match_mailbox(address, self.config.mailboxes) is None:
            session.rejected_recipients += 1
            event("smtp.rcpt_refused", peer=format_peer(session.peer), rcpt=address)
            if session.rejected_recipients > self.config.smtp.max_rejected_recipients:
                return REPLY_421_TOO_MANY_REJECTED
            if is_our_domain(address, self.config.mailboxes):
                return REPLY_550_NO_SUCH_MAILBOX
            return REPLY_550_RELAY_DENIED
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return REPLY_250_RECIPIENT_OK

    async def handle_DATA(
        self, server: _GatewayProtocol, session: GatewaySession, envelope: Envelope
    ) -> str:
        session.messages += 1
        raw = envelope.original_content or b""
        mail_from = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        intake = IntakeEnvelope(
            mail_from=mail_from,
            rcpt_to=tuple(envelope.rcpt_tos),
            peer=format_peer(session.peer),
            helo=str(session.host_name or ""),
        )
        # aiosmtpd does not reset its idle timer during DATA, so the transfer and this
        # handler share one window; a reply sent after it closes is lost. Give the
        # handler a fresh window and answer 451 well before it ends.
        server._reset_timeout()
        budget = max(1.0, self.config.smtp.timeout * 0.9)
        try:
            async with asyncio.timeout(budget):
                result = await self.pipeline.receive(intake, raw)
        except TimeoutError:
            ref = uuid.uuid4().hex[:12]
            event("message.timeout", logging.ERROR, ref=ref, peer=intake.peer)
            result = IntakeResult(IntakeStatus.TEMPFAIL, ref, "timeout")
        reply = reply_for(result, self.config.policy.contact)
        if isinstance(server, GatewayLMTP):
            # RFC 2033 section 4.2: one reply per accepted recipient, in order.
            return "\r\n".join([reply] * len(envelope.rcpt_tos))
        return reply

    async def handle_exception(self, error: Exception) -> str:
        ref = uuid.uuid4().hex[:12]
        log.error("event=smtp.exception ref=%s error=%s", ref, type(error).__name__, exc_info=error)
        return REPLY_451_TEMPFAIL.format(ref=ref)


def make_tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.smtp.tls_enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(
        config.resolve(config.smtp.tls_cert), config.resolve(config.smtp.tls_key)
    )
    return context


def free_space_check(config: Config) -> Callable[[], bool]:
    folder = config.database_path.parent
    floor = config.min_free_space

    def has_free_space() -> bool:
        try:
            stats = os.statvfs(folder)
        except OSError:
            return True  # cannot tell: let the commit decide (it answers 452 if full)
        return stats.f_bavail * stats.f_frsize >= floor

    return has_free_space


def protocol_factory(
    config: Config, handler: Handler, state: ServerState
) -> Callable[[], _GatewayProtocol]:
    cls: type[_GatewayProtocol] = GatewayLMTP if config.smtp.protocol == "lmtp" else GatewaySMTP
    tls_context = make_tls_context(config)
    smtp = config.smtp

    def factory() -> _GatewayProtocol:
        protocol = cls(
            handler,
            data_size_limit=smtp.max_message_size,
            enable_SMTPUTF8=smtp.smtputf8,
            hostname=smtp.hostname,
            ident=IDENT,
            tls_context=tls_context,
            timeout=smtp.timeout,
            command_call_limit=dict(smtp.command_limits),
        )
        protocol.state = state
        return protocol

    return factory


async def start_server(
    config: Config, pipeline: Pipeline, *, sock: Any = None
) -> tuple[asyncio.Server, ServerState]:
    """Listen on the configured address (or a given socket); return the server and its state."""
    state = ServerState(
        config=config,
        gate=ConnectionGate(config.smtp.max_connections, config.smtp.max_connections_per_ip),
        data_slots=asyncio.Semaphore(config.smtp.data_slots),
    )
    handler = Handler(config, pipeline, free_space_check(config))
    factory = protocol_factory(config, handler, state)
    loop = asyncio.get_running_loop()
    if sock is not None:
        server = await loop.create_server(factory, sock=sock)
    else:
        server = await loop.create_server(
            factory, host=config.smtp.host, port=config.smtp.port, reuse_address=True
        )
    return server, state


async def stop_server(server: asyncio.Server, state: ServerState, grace: float) -> None:
    """Stop accepting, hang up idle sessions with 421, let DATA in flight finish."""
    state.stopping = True
    server.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while state.sessions and loop.time() < deadline:
        for session in list(state.sessions):
            if session.is_idle:
                session.close_for_shutdown()
        await asyncio.sleep(0.05)
    for session in list(state.sessions):
        if session.transport is not None:
            session.transport.close()
