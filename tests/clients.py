"""The one SMTP/LMTP client of the tests, and the one way to send a message with it.

`RawClient` speaks byte-exact SMTP for protocol tests (raw lines, whole multi-line replies,
closed-connection detection); `LmtpClient` is the same client saying LHLO and reading one
reply per accepted recipient after the final dot (RFC 2033 4.2). `send_message` is the
one "send a message" helper: a connection, one transaction, every reply kept per recipient.
Nothing here knows the gateway's internals: it is what a mail client sees on the wire.
"""

from __future__ import annotations

import asyncio
import email.policy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import NamedTuple, Protocol

HELO_NAME = "client.example.com"
SENDER = "alice@client.example.com"
MAILBOX = "support@example.org"


class Reply(NamedTuple):
    """One complete server reply. Unpacks as (code, text) like a plain tuple."""

    code: int
    text: str  # every line as received, code included, joined by "\n"

    @property
    def message(self) -> str:
        """The text without the code on each line, as a client library reports it."""
        return "\n".join(line[4:] for line in self.text.splitlines())

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


class HasPort(Protocol):
    @property
    def port(self) -> int: ...


class RawClient:
    """A byte-exact SMTP client for protocol tests: send lines, read whole replies.

    `on_reply`, if given, sees the text of every reply read (e.g. a test that no reply
    leaks internals)."""

    hello_verb = "EHLO"

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_reply: Callable[[str], None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.on_reply = on_reply

    @classmethod
    async def connect(
        cls,
        port: int,
        host: str = "127.0.0.1",
        *,
        source: str | None = None,
        on_reply: Callable[[str], None] | None = None,
    ) -> RawClient:
        """Connect, from loopback address `source` if given (per-IP limits)."""
        local_addr = None if source is None else (source, 0)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local_addr), 5
        )
        return cls(reader, writer, on_reply)

    async def reply(self, timeout: float = 10) -> Reply:
        """One complete (possibly multi-line) reply: (code, text of all lines)."""
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("connection closed: " + " | ".join(lines))
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            # RFC 5321 4.2.1: "ddd-" continues a reply, "ddd " (or a bare code) ends it.
            if len(text) < 4 or text[3] != "-":
                reply = Reply(int(text[:3]), "\n".join(lines))
                if self.on_reply is not None:
                    self.on_reply(reply.text)
                return reply

    async def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    async def command(self, line: str | bytes, timeout: float = 10) -> Reply:
        raw = line.encode() if isinstance(line, str) else line
        await self.send(raw + b"\r\n")
        return await self.reply(timeout)

    async def greet(self, name: str = HELO_NAME) -> str:
        """Read the banner and say EHLO (LHLO for LMTP); return the greeting's reply text."""
        code, banner = await self.reply()
        assert code == 220, banner
        code, text = await self.command(f"{self.hello_verb} {name}")
        assert code == 250, text
        return text

    async def replies_until_closed(self, within: float = 10) -> list[Reply]:
        """Every reply the server sends until it closes the connection (within `within` s)."""
        deadline = time.monotonic() + within
        replies = []
        while True:
            try:
                replies.append(await self.reply(max(0.05, deadline - time.monotonic())))
            except ConnectionError:
                return replies

    async def closed(self, timeout: float = 10) -> bool:
        """True once the server has closed the connection."""
        try:
            data = await asyncio.wait_for(self.reader.read(), timeout)
        except (ConnectionError, TimeoutError):
            return False
        return data == b"" or self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def _final_replies(self, accepted: Sequence[str], timeout: float) -> list[Reply]:
        # SMTP: one reply to the final dot stands for every accepted recipient.
        reply = await self.reply(timeout)
        return [reply] * len(accepted)

    async def transaction(
        self,
        message: bytes | EmailMessage,
        sender: str = SENDER,
        recipients: Sequence[str] = (MAILBOX,),
        *,
        mail_options: Sequence[str] = (),
        timeout: float = 30,
        check: bool = True,
        before_dot: Callable[[], object] | None = None,
    ) -> Delivery:
        """MAIL, RCPT for each recipient, DATA and the message on this (greeted) session.

        The transaction stops at the first refusal of MAIL or DATA, or when no recipient
        is accepted, and then the session is left as the server left it. With `check`,
        any refusal raises `Refused`; without, the Delivery says what happened.
        `before_dot` is called once the server has said 354, before the message goes out
        (a load test counts what it sent); `timeout` bounds the wait after the dot."""
        options = list(mail_options)
        # RFC 6531 3.4: a non-ASCII address needs SMTPUTF8 on MAIL.
        if not (sender + "".join(recipients)).isascii() and "SMTPUTF8" not in options:
            options.append("SMTPUTF8")
        delivery = Delivery(tuple(recipients), await self.command(_mail_line(sender, options)))
        if delivery.mail.code == 250:
            for rcpt in recipients:
                delivery.rcpt[rcpt] = await self.command(f"RCPT TO:<{rcpt}>")
            accepted = [r for r, reply in delivery.rcpt.items() if reply.code == 250]
            if accepted:
                delivery.data = await self.command("DATA")
                if delivery.data.code == 354:
                    if before_dot is not None:
                        before_dot()
                    await self.send(dot_stuffed(_as_bytes(message, sender, recipients)))
                    finals = await self._final_replies(accepted, timeout)
                    delivery.final.update(zip(accepted, finals, strict=True))
        if check and not delivery.accepted:
            raise Refused(delivery)
        return delivery


class LmtpClient(RawClient):
    """The same client for LMTP: LHLO, and a reply per accepted recipient after the dot."""

    hello_verb = "LHLO"

    async def _final_replies(self, accepted: Sequence[str], timeout: float) -> list[Reply]:
        # RFC 2033 4.2: after the final dot, one reply for each successful RCPT, in order.
        return [await self.reply(timeout) for _ in accepted]


@dataclass
class Delivery:
    """Every reply of one transaction: to MAIL, to each RCPT, to DATA, after the dot."""

    recipients: tuple[str, ...]
    mail: Reply
    rcpt: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None
    final: dict[str, Reply] = field(default_factory=dict)  # per accepted recipient

    @property
    def replies(self) -> dict[str, Reply]:
        """The last word per recipient: the refusal that stopped it (of MAIL, RCPT or
        DATA), or the reply for it after the final dot."""
        last: dict[str, Reply] = {}
        for rcpt in self.recipients:
            if rcpt in self.final:
                last[rcpt] = self.final[rcpt]
            elif rcpt in self.rcpt and self.rcpt[rcpt].code != 250:
                last[rcpt] = self.rcpt[rcpt]
            else:
                last[rcpt] = self.data or self.mail
        return last

    @property
    def reply(self) -> Reply:
        """The reply that ended the transaction: the first refusal, or the one to the
        final dot (LMTP: the last recipient's)."""
        ordered = [self.mail, *self.rcpt.values(), *self.final.values()]
        if self.data is not None and self.data.code != 354:
            ordered.append(self.data)
        refused = [r for r in ordered if not r.ok]
        return refused[0] if refused else ordered[-1]

    @property
    def after_dot(self) -> Reply:
        """The reply to the final dot (LMTP: the first recipient's); a test that expects
        the message itself to be refused asserts on it, and fails if the transaction was
        refused before the message went out."""
        assert self.final, f"refused before the message was sent: {self.reply.text}"
        return next(iter(self.final.values()))

    @property
    def accepted(self) -> bool:
        """True if every recipient was accepted, and so was the message for each."""
        return len(self.final) == len(self.recipients) and all(
            r.code == 250 for r in self.final.values()
        )

    # The reply that ended the transaction, for the common one-recipient case.
    @property
    def code(self) -> int:
        return self.reply.code

    @property
    def text(self) -> str:
        return self.reply.text

    @property
    def message(self) -> str:
        return self.reply.message


class Refused(Exception):
    """A transaction the server did not take whole: `code` and `message` of the reply that
    ended it (as a client library reports them), the whole Delivery behind it."""

    def __init__(self, delivery: Delivery) -> None:
        super().__init__(delivery.reply.text)
        self.delivery = delivery
        self.code = delivery.reply.code
        self.message = delivery.reply.message


async def send_message(
    target: int | HasPort,
    message: bytes | EmailMessage,
    sender: str = SENDER,
    recipients: Sequence[str] = (MAILBOX,),
    *,
    source: str | None = None,
    lmtp: bool = False,
    mail_options: Sequence[str] = (),
    timeout: float = 30,
    check: bool = True,
) -> Delivery:
    """Send one message on a new connection (from loopback address `source` if given):
    greet, one transaction, QUIT. With `check` (the default) any refusal raises `Refused`.

    `message` goes on the wire as given but for dot-stuffing (raw bytes are never
    normalised: a test of bare line endings sends exactly its bytes); an EmailMessage is
    serialised with CRLF line endings (RFC 5322 2.1)."""
    port = target if isinstance(target, int) else target.port
    kind = LmtpClient if lmtp else RawClient
    client = await kind.connect(port, source=source)
    try:
        await client.greet()
        delivery = await client.transaction(
            message,
            sender,
            recipients,
            mail_options=mail_options,
            timeout=timeout,
            check=check,
        )
        try:
            await client.command("QUIT")
        except (ConnectionError, OSError):
            pass  # the server may already have closed the session (a 421)
        return delivery
    finally:
        await client.close()


def _mail_line(sender: str, options: Sequence[str]) -> str:
    return " ".join([f"MAIL FROM:<{sender}>", *options])


def _as_bytes(message: bytes | EmailMessage, sender: str, recipients: Sequence[str]) -> bytes:
    if isinstance(message, bytes):
        return message
    utf8 = not (sender + "".join(recipients)).isascii()
    policy = email.policy.SMTPUTF8 if utf8 else email.policy.SMTP
    return message.as_bytes(policy=policy)


def dot_stuffed(message: bytes) -> bytes:
    """The message as sent after 354: dot-stuffed (RFC 5321 4.5.2), ended by the final dot."""
    body = message.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"
