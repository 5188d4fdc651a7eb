"""A real SMTP server playing the outbox's relay on loopback, which can be told to fail.

It is aiosmtpd's `SMTP` protocol served by `loop.create_server` on the test's own event
loop, the way gateway/server.py serves the gateway (no threaded Controller). It records
every message it answers 250 to, with its envelope, and every MAIL command it sees, so a
test can prove that nothing was said in plaintext. `mode` decides how it answers:

- "accept": 250 to everything;
- "refuse": 550 5.1.1 at RCPT;
- "tempfail": 451 4.3.0 at DATA;
- "close": 421 4.3.2 as the greeting, then it hangs up;
- "hang": no answer to DATA until the client gives up (at most HANG_LIMIT s, or until the
  relay is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

MODES = ("accept", "refuse", "tempfail", "close", "hang")
# The longest a "hang" lasts: far beyond any client timeout of the tests, and bounded.
HANG_LIMIT = 30.0
HOSTNAME = "relay.example.net"


@dataclass(frozen=True)
class RelayedMessage:
    mail_from: str  # as aiosmtpd gives it: "<>" for the null sender
    rcpt_tos: tuple[str, ...]
    data: bytes  # the message as received, dot-unstuffed
    tls: bool  # it came over TLS
    login: str | None  # the user that authenticated, if any
    mail_options: tuple[str, ...] = ()  # the MAIL parameters: SMTPUTF8, BODY=8BITMIME


class _Greeting421(asyncio.Protocol):
    """Mode "close": a relay that is up but refuses service at the greeting."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"421 4.3.2 Service not available, closing transmission channel\r\n")
        transport.close()


class _Handler:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self.relay.mail_commands.append(address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.relay.mode == "refuse":
            return "550 5.1.1 <" + address + ">: Recipient address rejected: no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        relay = self.relay
        if relay.mode == "tempfail":
            return "451 4.3.0 Temporary local problem, try again later"
        if relay.mode == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(relay.released.wait(), HANG_LIMIT)
            return "451 4.3.0 Took too long"
        assert isinstance(envelope.original_content, bytes)
        assert envelope.mail_from is not None
        message = RelayedMessage(
            mail_from=envelope.mail_from,
            mail_options=tuple(envelope.mail_options),
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=envelope.original_content,
            tls=session.ssl is not None,
            login=session.auth_data if session.authenticated else None,
        )
        relay.messages.append(message)
        hook, relay.on_message = relay.on_message, None
        if hook is not None:
            await hook(message)
        return "250 2.0.0 Ok: queued"


class Relay:
    """The relay; use `async with Relay(...) as relay:` or the `relay` fixture.

    tls: offer STARTTLS with a certificate for 127.0.0.1 from `ca` (a fresh trustme CA by
    default); tls=False offers no STARTTLS at all. require_starttls: refuse MAIL before
    STARTTLS (530); off, a client that falls back to plaintext is recorded doing so.
    users: {login: password} accepted by AUTH (over TLS only). smtputf8: advertise
    SMTPUTF8 (RFC 6531) and take internationalised addresses; off, a client that sends one
    anyway is refused (aiosmtpd's 553/555).
    """

    def __init__(
        self,
        *,
        tls: bool = True,
        ca: trustme.CA | None = None,
        users: dict[str, str] | None = None,
        require_starttls: bool = True,
        smtputf8: bool = False,
    ) -> None:
        self.mode = "accept"
        self.messages: list[RelayedMessage] = []
        self.mail_commands: list[str] = []
        # Called once with the next message accepted, before the 250 is sent.
        self.on_message: Callable[[RelayedMessage], Awaitable[None]] | None = None
        self.released = asyncio.Event()
        self.ca = ca or trustme.CA()
        self.users = dict(users or {})
        self.require_starttls = require_starttls
        self.smtputf8 = smtputf8
        self._tls_context: ssl.SSLContext | None = None
        if tls:
            self._tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(self._tls_context)
        self._server: asyncio.Server | None = None
        self._sessions: list[SMTP] = []

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def client_tls_context(self) -> ssl.SSLContext:
        """A client context that trusts this relay's CA (and checks host names)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def write_ca(self, path: Path) -> Path:
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = data.login.decode(), data.password.decode()
        ok = login in self.users and self.users[login] == password
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)

    def _protocol(self) -> asyncio.Protocol:
        if self.mode == "close":
            return _Greeting421()
        session = SMTP(
            _Handler(self),
            hostname=HOSTNAME,
            tls_context=self._tls_context,
            require_starttls=self._tls_context is not None and self.require_starttls,
            authenticator=self._authenticate if self.users else None,
            auth_require_tls=True,
            enable_SMTPUTF8=self.smtputf8,
            timeout=60,
        )
        self._sessions.append(session)
        return session

    async def start(self) -> Relay:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host="127.0.0.1", port=0)
        return self

    async def close(self) -> None:
        self.released.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for session in self._sessions:
            if session.transport is not None:
                session.transport.close()
        await asyncio.sleep(0)  # let the sessions see their connections go

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
