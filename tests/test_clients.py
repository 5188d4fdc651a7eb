"""The shared test client (tests/clients.py) against the real gateway: what every other test
relies on when it reads a reply per recipient, sends an EmailMessage or a source address."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest

from gateway.app import Gateway
from gateway.config import Config

from .conftest import RawClient, Refused, make_message, rows, send_message, stored_messages

RECIPIENTS = ("support@example.org", "nobody@example.org", "billing@example.org")


async def test_lmtp_send_reports_each_recipient(
    make_config: Callable[..., Config], start_gateway: Any, raw_client: Callable[..., Any]
) -> None:
    # RFC 2033 4.2: one reply per accepted recipient after the dot; the refused one keeps
    # its RCPT refusal.
    config = make_config(protocol="lmtp")
    gateway: Gateway = await start_gateway(config)
    sent = await send_message(
        gateway, make_message(), recipients=RECIPIENTS, lmtp=True, check=False
    )
    codes = {rcpt: reply.code for rcpt, reply in sent.replies.items()}
    assert codes == dict(zip(RECIPIENTS, (250, 550, 250), strict=True))
    assert sent.replies["nobody@example.org"].text.startswith("550 5.1.1")
    assert list(sent.final) == ["support@example.org", "billing@example.org"]
    assert not sent.accepted and sent.reply.code == 550
    assert all("queued as" in reply.text for reply in sent.final.values())
    [stored] = stored_messages(config)
    assert stored["rcpt_to"] == ["support@example.org", "billing@example.org"]
    # On one session: both replies after the dot were read, none is left for the next
    # command to pick up.
    client: RawClient = await raw_client(gateway.port, lmtp=True)
    await client.greet()
    await client.transaction(make_message(), recipients=RECIPIENTS[::2])
    assert await client.command("NOOP") == (250, "250 2.0.0 OK")
    # By default a refusal is an error, and it carries the whole delivery.
    with pytest.raises(Refused) as info:
        await send_message(gateway, make_message(), recipients=RECIPIENTS, lmtp=True)
    assert info.value.code == 550
    assert info.value.delivery.final["billing@example.org"].code == 250


async def test_send_takes_an_email_message_from_a_source_address(
    config: Config, gateway: Gateway
) -> None:
    message = EmailMessage()
    message["From"] = "Alice Example <alice@client.example.com>"
    message["To"] = "support@example.org"
    message["Subject"] = "From an EmailMessage"
    message["Message-ID"] = "<emailmessage@client.example.com>"
    message.set_content("Hello,\n\n.a line that starts with a dot\n")
    sent = await send_message(gateway, message, source="127.0.0.2")
    assert sent.accepted
    assert sent.message.startswith("2.0.0 Ok: queued as ")
    [stored] = stored_messages(config)
    assert stored["peer"].startswith("127.0.0.2:")
    [raw] = rows(config, "SELECT raw FROM message_raw WHERE message = ?", (stored["id"],))
    # RFC 5322 2.1: CRLF on the wire; the dot-stuffed line arrives as written.
    assert b"\r\n.a line that starts with a dot\r\n" in bytes(raw["raw"])
    assert b"\n" not in bytes(raw["raw"]).replace(b"\r\n", b"")


async def test_multi_line_reply_is_read_whole(
    gateway: Gateway, raw_client: Callable[..., Any]
) -> None:
    client: RawClient = await raw_client(gateway.port)
    features = await client.greet()
    lines = features.splitlines()
    assert len(lines) > 2 and all(line.startswith("250-") for line in lines[:-1])
    assert lines[-1].startswith("250 ")
    code, text = await client.command("NOOP")  # nothing of the EHLO reply is left over
    assert (code, text) == (250, "250 2.0.0 OK")
    await client.send(b"QUIT\r\n")
    assert (await client.reply()).message.startswith("2.0.0")
    assert await client.closed()


async def test_the_standard_clients_deliver_as_the_shared_one_does(
    config: Config, gateway: Gateway
) -> None:
    # The shared client is ours; the mail programs and MTAs in front of the desk are not.
    # The two client libraries most Python senders use must get the same answers: a 250
    # whose message is stored byte for byte (smtplib, blocking, in a thread so that it does
    # not block the server's loop; aiosmtplib, with its own EHLO parsing and pipelining).
    first = make_message(subject="From smtplib", message_id="<smtplib@client.example.com>")
    second = make_message(subject="From aiosmtplib", message_id="<aio@client.example.com>")

    def with_smtplib() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
            client.ehlo("client.example.com")
            return client.sendmail("alice@client.example.com", ["support@example.org"], first)

    assert await asyncio.to_thread(with_smtplib) == {}  # no recipient refused
    errors, reply = await aiosmtplib.send(
        second,
        sender="alice@client.example.com",
        recipients=["support@example.org"],
        hostname="127.0.0.1",
        port=gateway.port,
        local_hostname="client.example.com",
        start_tls=False,
        timeout=10,
    )
    assert errors == {} and reply.startswith("2.0.0 Ok: queued as ")
    stored = {m["message_id"]: m["id"] for m in stored_messages(config)}
    for message_id, sent in (
        ("<smtplib@client.example.com>", first),
        ("<aio@client.example.com>", second),
    ):
        [raw] = rows(config, "SELECT raw FROM message_raw WHERE message = ?", (stored[message_id],))
        assert bytes(raw["raw"]).rstrip(b"\r\n") == sent.rstrip(b"\r\n")
