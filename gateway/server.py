"""The SMTP/LMTP edge: aiosmtpd protocol objects with production limits, and the handler.

The protocol subclass enforces what aiosmtpd leaves open (connection caps, command budgets,
DATA slots, graceful stop); the handler maps verbs to pipeline calls and pipeline results to
the reply constants below. No business logic lives here, and no reply ever carries a
version, a path or exception text (RELIABILITY.md test 14).

This module overrides and uses private members of aiosmtpd (smtp_DATA is replaced whole;
_handle_client, push and the greeting commands are wrapped; the reader's buffer is used),
so pyproject.toml pins aiosmtpd exactly. The one list of those members, with why each is
needed and its signature or source fingerprint as last read, is `EDGE` in
tests/test_aiosmtpd_edge.py; that test fails, naming the member, when an upgrade changes
one, and when this module touches an aiosmtpd internal the list does not hold.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import ipaddress
import logging
import os
import re
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from . import metrics
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
# RFC 3463: X.4.2 "bad connection" for a transfer that does not progress, X.7.0 for a
# client that spent its budget (as aiosmtpd's own "sent too many times").
REPLY_421_DATA_TOO_SLOW = "421 4.4.2 Data transfer too slow, closing connection"
REPLY_421_SESSION_TOO_LONG = "421 4.4.2 Session too long, closing connection"
REPLY_421_TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
REPLY_421_TOO_MANY_COMMANDS = "421 4.7.0 Too many commands in one session, reconnect"
REPLY_451_TEMPFAIL = "451 4.3.0 Temporary failure, please try again later (ref {ref})"
REPLY_451_AUTH_TEMPFAIL = "451 4.7.0 Temporary authentication failure, please try again later"
REPLY_451_BUSY = "451 4.3.2 Too busy, please try again later"
REPLY_452_DISK_FULL = "452 4.3.1 Insufficient system storage, try again later"
REPLY_452_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_500_LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
REPLY_500_COMMAND_TOO_LONG = "500 5.5.2 Command line too long"
REPLY_500_BAD_SYNTAX = "500 5.5.2 Syntax error: empty, 8-bit or non-ASCII command line"
REPLY_500_UNKNOWN_COMMAND = "500 5.5.1 Command not recognized"
REPLY_501_8BIT_HOSTNAME = "501 5.5.2 Host name is not valid ASCII or UTF-8 (RFC 5321 4.1.1.1)"
REPLY_553_8BIT_SENDER = "553 5.1.7 Sender address is not valid UTF-8"
REPLY_553_8BIT_RECIPIENT = "553 5.1.3 Recipient address is not valid UTF-8"
REPLY_354_START = "354 End data with <CR><LF>.<CR><LF>"
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
# Every other stock reply without one gets the code for its reply code from
# _DEFAULT_ENHANCED (RFC 3463; RFC 2034 section 3 asks for one on every reply but the
# greeting and the HELO/EHLO answer, and 3yz replies have no enhanced class).
_STOCK_REPLIES = {
    "552 Error: Too much mail data": REPLY_552_TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": REPLY_552_TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": REPLY_500_LINE_TOO_LONG,
    "500 Command line too long": REPLY_500_COMMAND_TOO_LONG,
    "500 Error: bad syntax": REPLY_500_BAD_SYNTAX,
    "500 Error: strict ASCII mode": REPLY_500_BAD_SYNTAX,
    "454 TLS not available": "454 4.7.0 TLS not available",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused: TLS failed",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
}
# Prefixes of stock replies that echo what the client sent: answered without the echo.
_STOCK_PREFIXES = (("500 Error: command ", REPLY_500_UNKNOWN_COMMAND),)
_DEFAULT_ENHANCED = {
    "2": "2.0.0",
    "4": "4.0.0",
    "5": "5.0.0",
    "251": "2.1.5",
    "421": "4.7.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "538": "5.7.11",
    "552": "5.3.4",
    "553": "5.1.3",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_REPLY_CODE = re.compile(r"([245]\d\d)([ -])(.*)", re.DOTALL)


def with_enhanced_code(text: str) -> str:
    """A reply with an RFC 3463 enhanced status code: ours as is, aiosmtpd's mapped."""
    mapped = _STOCK_REPLIES.get(text)
    if mapped is not None:
        return mapped
    for prefix, reply in _STOCK_PREFIXES:
        if text.startswith(prefix):
            return reply
    lines = text.split("\r\n")
    for i, line in enumerate(lines):
        match = _REPLY_CODE.fullmatch(line)
        if match is None or _HAS_ENHANCED.match(line):
            continue
        code, sep, rest = match.groups()
        enhanced = _DEFAULT_ENHANCED.get(code) or _DEFAULT_ENHANCED[code[0]]
        lines[i] = f"{code}{sep}{enhanced} {rest}".rstrip()
    return "\r\n".join(lines)


def client_key(ip: str) -> str:
    """The unit per-address limits count: an IPv4 address, or an IPv6 /64.

    One IPv6 host is usually given a whole /64 (RFC 6177), so counting per address would
    let one client open unlimited connections. IPv4-mapped IPv6 is the IPv4 address."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _is_exempt(ip: str, networks: tuple[_Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _has_8bit_fault(text: str) -> bool:
    """True if a decoded argument held bytes that are not UTF-8 (aiosmtpd decodes with
    surrogateescape, so each such byte is a lone surrogate that no store can encode)."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def _safe_text(text: str) -> str:
    """Lone surrogates from undecodable bytes as U+FFFD, so the value is storable."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


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

    def admit(self, ip: str, exempt: bool = False) -> str | None:
        """None if admitted (and counted), else the reply to refuse with.

        `ip` is a client key (see client_key): an IPv4 address or an IPv6 /64."""
        if self.total >= self.max_total:
            return REPLY_421_TOO_MANY_CONNECTIONS
        if not exempt and self._per_ip[ip] >= self.max_per_ip:
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


class DataSlots:
    """At most `total` DATA transfers + parses at once, at most `per_client` per client key.

    One address (or IPv6 /64) can therefore never hold every slot (issue 9 item 6); its
    extra DATA commands wait like everybody's, then get 451 4.3.2, while others still get
    slots. Exempt clients (smtp.per_ip_exempt) count only against the total."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.in_use = 0
        self.peak_per_client = 0
        self._held: collections.Counter[str] = collections.Counter()
        # Waiting DATA commands in arrival order: (future, client key, exempt).
        self._waiters: collections.deque[tuple[asyncio.Future[None], str, bool]] = (
            collections.deque()
        )

    def _free_for(self, key: str, exempt: bool) -> bool:
        if self.in_use >= self.total:
            return False
        return exempt or self._held[key] < self.per_client

    def _grant(self, key: str, exempt: bool) -> None:
        self.in_use += 1
        self._held[key] += 1
        if not exempt:
            self.peak_per_client = max(self.peak_per_client, self._held[key])

    async def take(self, key: str, exempt: bool, wait: float) -> bool:
        """Take a slot within `wait` seconds; False if none came free for this client.

        A freed slot is handed to the first waiter that may use it (first come, first
        served): only that one wakes, with the slot already counted as its own. Waking
        every waiter to race for one slot cost each release a task switch per waiter: at
        32 clients for 8 slots that was a quarter of the daemon's CPU per message.
        """
        if not self._waiters and self._free_for(key, exempt):
            self._grant(key, exempt)
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (waiter, key, exempt)
        self._waiters.append(entry)
        self._hand_over()  # a slot may be free for us even while others wait
        try:
            async with asyncio.timeout(wait):
                await waiter
        except TimeoutError:
            # The slot may have been handed over in the same instant the wait ran out:
            # then it is ours, and better used than lost.
            if waiter.done() and not waiter.cancelled():
                return True
            return False
        except asyncio.CancelledError:
            # The session went away while waiting: a slot handed over meanwhile is
            # given back, or it would be lost for good.
            if waiter.done() and not waiter.cancelled():
                self.release(key)
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
        return True

    def release(self, key: str) -> None:
        self.in_use -= 1
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]
        self._hand_over()

    def _hand_over(self) -> None:
        """Give free slots to waiters, in arrival order, skipping those whose client
        already holds its share (the freed slot may be usable only by another client)."""
        for entry in list(self._waiters):
            waiter, key, exempt = entry
            if waiter.done():
                continue
            if self.in_use >= self.total:
                return
            if self._free_for(key, exempt):
                self._grant(key, exempt)
                self._waiters.remove(entry)
                waiter.set_result(None)


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
    data_slots: DataSlots
    sessions: set[_GatewayProtocol] = field(default_factory=set)
    stopping: bool = False
    exempt: tuple[_Network, ...] = ()


class _DataEnd(enum.Enum):
    """How reading a message after 354 ended."""

    DOT = "dot"  # the final dot: content is the message
    TOO_LONG = "too-long"  # a line over 1,000 octets: 500 after the dot
    TOO_BIG = "too-big"  # over max_message_size: 552 after the dot
    TOO_SLOW = "too-slow"  # under min_data_rate or silent too long: 421, close
    SESSION_OVER = "session-over"  # max_session_time reached: 421, close
    EOF = "eof"  # the client went away


# The end of DATA (RFC 5321 4.1.1.4): CRLF "." CRLF, and nothing else. Bare CR or LF around
# the dot never ends it (SMTP smuggling, CVE-2023-51764/51765/51766, RELIABILITY test 10).
_END_OF_DATA = b"\r\n.\r\n"
_READ_CHUNK = 1 << 16


class _GatewayProtocol(SMTP):
    """Limits and lifecycle shared by the SMTP and LMTP protocol classes."""

    state: ServerState
    _in_data = False
    _awaiting_data_reply = False
    _ip = "?"
    _key = "?"
    _exempt = False
    _greeted = False
    _verbatim = False
    _keep_reply = False
    _expired = False
    _errors = 0
    _replies = 0
    _session_deadline = float("inf")
    _session_timer: asyncio.TimerHandle | None = None

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
        # The greeting and the HELO/EHLO answer keep their form (RFC 2034 section 3).
        verbatim = not self._greeted or (self._verbatim and text.startswith("250"))
        self._greeted = True
        if not verbatim:
            text = with_enhanced_code(text)
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
        over = self._over_budget(text, verbatim)
        if over is not None and self._keep_reply:
            # The answer to a message's final dot is never replaced: a 250 must reach the
            # client, or it sends the message again. The 421 follows it.
            metrics.SMTP_REPLIES.labels(text[:3]).inc()
            await super().push(text)
            text = over
        elif over is not None:
            text = over
        metrics.SMTP_REPLIES.labels(text[:3]).inc()
        await super().push(text)
        # RFC 5321 section 3.8: a 421 reply means the server is closing the channel.
        if text.startswith("421") and self.transport is not None:
            self.transport.close()

    def _over_budget(self, text: str, verbatim: bool) -> str | None:
        """The 421 to send instead of (or after) `text` once the session spent a budget.

        Every final reply counts as one command (3yz intermediate replies and the greeting
        do not); every 4xx/5xx reply counts as an error too. A 421 closes anyway."""
        if text.startswith("421") or text[3:4] == "-" or text.startswith("3"):
            return None
        if verbatim and not self._verbatim:
            return None  # the greeting
        smtp = self.state.config.smtp
        self._replies += 1
        if text[:1] in ("4", "5"):
            self._errors += 1
            if self._errors > smtp.max_errors_per_session:
                self._log_closed("too-many-errors")
                return REPLY_421_TOO_MANY_ERRORS
        if self._replies > smtp.max_commands_per_session:
            self._log_closed("too-many-commands")
            return REPLY_421_TOO_MANY_COMMANDS
        return None

    def _log_closed(self, reason: str) -> None:
        assert self.session is not None
        event("smtp.closed", peer=format_peer(self.session.peer), reason=reason)

    def _has_unread_input(self) -> bool:
        buffer = getattr(self._reader, "_buffer", b"")  # asyncio has no public accessor
        return len(buffer) > 0

    def _unread(self, data: bytes | bytearray) -> None:
        """Put back bytes read past the end of DATA: the client's next commands."""
        buffer = getattr(self._reader, "_buffer", None)  # asyncio has no public accessor
        if buffer is not None and data:
            buffer[0:0] = data

    async def _handle_client(self) -> None:
        assert self.session is not None
        peer = self.session.peer
        self._ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self._key = client_key(self._ip)
        self._exempt = _is_exempt(self._ip, self.state.exempt)
        refusal = REPLY_421_SHUTTING_DOWN if self.state.stopping else None
        refusal = refusal or self.state.gate.admit(self._key, self._exempt)
        if refusal is not None:
            event("smtp.refused", peer=format_peer(peer), reason=refusal[10:])
            self._writer.write(refusal.encode() + b"\r\n")
            if self.transport is not None:
                self.transport.close()
            return
        self.state.sessions.add(self)
        lifetime = self.state.config.smtp.max_session_time
        self._session_deadline = self.loop.time() + lifetime
        self._session_timer = self.loop.call_later(lifetime, self._session_expired)
        try:
            if self.state.gate.stressed:
                self._timeout_duration = self.state.config.smtp.stress_timeout
                self._reset_timeout()
            await super()._handle_client()
        finally:
            self._session_timer.cancel()
            self.state.gate.release(self._key)
            self.state.sessions.discard(self)

    def _session_expired(self) -> None:
        """max_session_time is up: an idle session is told so and closed now; one inside
        DATA is closed by the reader, or after the answer to its final dot."""
        self._expired = True
        if not self._in_data and self.transport is not None and not self.transport.is_closing():
            self._log_closed("session-time")
            self._writer.write(REPLY_421_SESSION_TOO_LONG.encode() + b"\r\n")
            self.transport.close()

    async def smtp_HELO(self, hostname: str) -> None:
        await self._greeting_command(hostname, super().smtp_HELO)

    async def smtp_EHLO(self, hostname: str) -> None:
        await self._greeting_command(hostname, super().smtp_EHLO)

    async def _greeting_command(self, hostname: str, method: Callable[[str], Any]) -> None:
        # Issue 9 item 7: a host name with bytes that are not UTF-8 (a CP1252 Windows name)
        # was accepted and then made every message of the session fail to store with 451.
        # RFC 5321 4.1.1.1: the argument is a domain or an address literal; 501 refuses a
        # permanent syntax fault, and the client can still say HELO/EHLO properly.
        if hostname and _has_8bit_fault(hostname):
            await self.push(REPLY_501_8BIT_HOSTNAME)
            return
        self._verbatim = True
        try:
            await method(hostname)
        finally:
            self._verbatim = False

    async def smtp_DATA(self, arg: str) -> None:
        # Replaces aiosmtpd's smtp_DATA (same checks and replies) for three reasons: the
        # slot is taken per client address; the transfer must keep a minimum rate and
        # never stall (issue 9 item 6); and the content is read in chunks and scanned
        # with bytes methods, where aiosmtpd's loop ran Python code per line and stalled
        # the event loop for ~0.5-1 s on 8 MiB of 3-byte lines (issue 9 item 11).
        self._awaiting_data_reply = True
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        # A DATA slot is taken before 354, so at most `data_slots` messages are held in
        # memory and parsed at once, at most `data_slots_per_ip` of one client; the rest
        # wait, then get a 451 and retry later.
        slots = self.state.data_slots
        if not await slots.take(self._key, self._exempt, self.state.config.smtp.data_slot_wait):
            await self.push(REPLY_451_BUSY)
            return
        self._in_data = True
        try:
            await self._receive_message()
        except Exception:
            # After a fault (answered 451 by handle_exception) the transaction is over;
            # otherwise the client's next MAIL gets "503 nested MAIL command".
            self.envelope = self._create_envelope()
            raise
        finally:
            self._in_data = False
            slots.release(self._key)
        if self.state.stopping:
            await self.push(REPLY_421_SHUTTING_DOWN)
        elif self._expired:
            self._log_closed("session-time")
            await self.push(REPLY_421_SESSION_TOO_LONG)

    async def _receive_message(self) -> None:
        await self.push(REPLY_354_START)
        end, content = await self._read_data()
        assert self.envelope is not None and self.session is not None
        if end is _DataEnd.EOF:
            return
        if end in (_DataEnd.TOO_SLOW, _DataEnd.SESSION_OVER):
            self._log_closed(end.value)
            self.envelope = self._create_envelope()  # aiosmtpd's _set_post_data_state
            slow = end is _DataEnd.TOO_SLOW
            await self.push(REPLY_421_DATA_TOO_SLOW if slow else REPLY_421_SESSION_TOO_LONG)
            return
        if end is not _DataEnd.DOT:
            # RFC 5321 4.2.5 (as aiosmtpd): the refusal comes after the final dot.
            self.envelope = self._create_envelope()  # aiosmtpd's _set_post_data_state
            too_long = end is _DataEnd.TOO_LONG
            await self.push(REPLY_500_LINE_TOO_LONG if too_long else REPLY_552_TOO_BIG)
            return
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()  # aiosmtpd's _set_post_data_state
        self._keep_reply = True
        try:
            await self.push("250 2.0.0 OK" if status is MISSING else status)
        finally:
            self._keep_reply = False

    async def _read_data(self) -> tuple[_DataEnd, bytes]:
        """Read the message up to the final dot; (how it ended, dot-unstuffed content).

        Chunks are searched for CRLF "." CRLF with bytes.find and checked for long lines
        with one split per chunk, so the cost per chunk is C code, not Python per line. A
        leading CRLF stands for the one before the first line, so a "." first line ends the
        data too. Bytes after the final dot are the client's next commands: put back."""
        smtp = self.state.config.smtp
        limit = self.data_size_limit or 0
        max_line = self.line_length_limit - 2  # octets before CRLF (RFC 5321 4.5.3.1.6)
        started = self.loop.time()
        received = 0
        body = bytearray(b"\r\n")
        scan_from = 0  # where the end marker may start, in body
        line_start = 2  # start of the line not yet checked for length, in body
        end = _DataEnd.DOT
        while True:
            now = self.loop.time()
            rate_deadline = started + max(smtp.data_rate_grace, received / smtp.min_data_rate)
            deadline = min(now + smtp.data_stall_timeout, rate_deadline, self._session_deadline)
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await self._reader.read(_READ_CHUNK)
            except TimeoutError:
                if self.loop.time() >= self._session_deadline:
                    return _DataEnd.SESSION_OVER, b""
                return _DataEnd.TOO_SLOW, b""
            if not chunk:
                return _DataEnd.EOF, b""
            received += len(chunk)
            body += chunk
            found = body.find(_END_OF_DATA, scan_from)
            stop = len(body) if found < 0 else found + 2
            if end is _DataEnd.DOT:
                # Complete lines are those up to the last CRLF; the rest is checked when
                # it is complete, but a partial line already too long counts now.
                lines = body[line_start:stop].split(b"\r\n")
                partial = lines.pop()
                unfinished = len(partial) - (1 if partial.endswith(b"\r") else 0)
                if (lines and max(map(len, lines)) > max_line) or unfinished > max_line:
                    end = _DataEnd.TOO_LONG
                elif limit and stop - 2 > limit:
                    end = _DataEnd.TOO_BIG
                line_start = stop - len(partial)
            if found >= 0:
                self._unread(body[found + 5 :])
                if end is not _DataEnd.DOT:
                    return end, b""
                # RFC 5321 4.5.2: a line's leading dot was added by the client; drop it.
                del body[found + 2 :]
                return end, bytes(body).replace(b"\r\n.", b"\r\n")[2:]
            if end is not _DataEnd.DOT:
                # Over a limit: keep only what the end marker may start in.
                del body[:-4]
                line_start = len(body)
            scan_from = max(0, len(body) - 4)

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
    async def smtp_LHLO(self, arg: str) -> None:
        # RFC 2033 4.1: LHLO is LMTP's EHLO: the same 8-bit check, the answer kept verbatim.
        await self._greeting_command(arg, super().smtp_LHLO)


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
        if _has_8bit_fault(address):
            # RFC 6531 3.3: even with SMTPUTF8 an address is UTF-8; other 8-bit bytes are a
            # permanent fault (a 4xx would have the client retry it for days).
            return REPLY_553_8BIT_SENDER
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
        if _has_8bit_fault(address):
            return REPLY_553_8BIT_RECIPIENT
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
        # Defence in depth for issue 9 item 7: whatever got past the checks at HELO, MAIL
        # and RCPT, the store gets text it can encode (undecodable bytes as U+FFFD).
        intake = IntakeEnvelope(
            mail_from=_safe_text(mail_from),
            rcpt_to=tuple(_safe_text(r) for r in envelope.rcpt_tos),
            peer=format_peer(session.peer),
            helo=_safe_text(str(session.host_name or "")),
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
        data_slots=DataSlots(config.smtp.data_slots, config.smtp.data_slots_per_ip_effective),
        exempt=tuple(ipaddress.ip_network(n, strict=False) for n in config.smtp.per_ip_exempt),
    )
    handler = Handler(config, pipeline, free_space_check(config))
    factory = protocol_factory(config, handler, state)
    loop = asyncio.get_running_loop()
    backlog = listen_backlog(config)
    if sock is not None:
        server = await loop.create_server(factory, sock=sock, backlog=backlog)
    else:
        server = await loop.create_server(
            factory,
            host=config.smtp.host,
            port=config.smtp.port,
            reuse_address=True,
            backlog=backlog,
        )
    return server, state


def listen_backlog(config: Config) -> int:
    """Room in the kernel's accept queue for a flood of five times the connection cap
    (RELIABILITY.md part 2.7): every attempt is accepted and, past the cap, answered
    `421` at once; with asyncio's default of 100 a larger flood overflows the queue and
    its clients wait out a one-second SYN retry before they even hear the 421. The
    kernel caps it at net.core.somaxconn (4096 by default)."""
    return min(4096, max(128, 5 * config.smtp.max_connections))


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
