"""Intake through real SMTP/LMTP on loopback: what is accepted, stored, and refused."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway.app import Gateway
from gateway.config import Config

from .conftest import (
    LmtpClient,
    RawClient,
    Refused,
    make_message,
    rows,
    run_cli,
    send_message,
    stored_messages,
)


async def test_accepted_message_is_stored_exactly(config: Config, gateway: Gateway) -> None:
    message = make_message(
        subject="=?utf-8?q?Caf=C3=A9_down?=", message_id="<abc.123@client.example.com>"
    )
    sent = await send_message(gateway, message)
    assert sent.accepted
    reply = sent.message
    assert reply.startswith("2.0.0 Ok: queued as ")

    [stored] = stored_messages(config)
    assert stored["message_id"] == "<abc.123@client.example.com>"
    assert stored["mail_from"] == "alice@client.example.com"
    assert stored["rcpt_to"] == ["support@example.org"]
    assert stored["subject"] == "Café down"
    assert "alice@client.example.com" in stored["from"]
    assert stored["malformed"] is None
    assert stored["size"] == len(message)
    assert stored["peer"].startswith("127.0.0.1:")
    assert stored["queue_id"] in reply
    [raw] = rows(config, "SELECT raw FROM message_raw WHERE message = ?", (stored["id"],))
    assert bytes(raw["raw"]) == message
    assert stored["sha256"] == hashlib.sha256(message).hexdigest()
    [date] = rows(config, "SELECT date_header FROM messages WHERE id = ?", (stored["id"],))
    assert date["date_header"] == "Fri, 27 Nov 2026 10:00:00 +0000"


async def test_recipients_accepted_only_for_configured_mailboxes(
    config: Config, gateway: Gateway, raw_client: Callable[[int], Any]
) -> None:
    client: RawClient = await raw_client(gateway.port)
    assert (await client.reply())[0] == 220
    assert (await client.command("EHLO client.example.com"))[0] == 250
    assert (await client.command("MAIL FROM:<alice@client.example.com>"))[0] == 250
    for good in (
        "support@example.org",
        "Support@EXAMPLE.ORG",
        "support+t12-abc@example.org",
        "billing@example.org",
    ):
        code, text = await client.command(f"RCPT TO:<{good}>")
        assert (code, text[:9]) == (250, "250 2.1.5"), good
    code, text = await client.command("RCPT TO:<root@example.org>")
    assert text.startswith("550 5.1.1")
    code, text = await client.command("RCPT TO:<support@other.example.com>")
    assert text.startswith("550 5.7.1")
    code, text = await client.command("RCPT TO:<support@example.org.evil.example>")
    assert text.startswith("550 5.7.1")


async def test_refused_recipients_store_nothing(config: Config, gateway: Gateway) -> None:
    with pytest.raises(Refused) as info:
        await send_message(gateway, make_message(), recipients=("victim@elsewhere.example.net",))
    assert info.value.delivery.rcpt["victim@elsewhere.example.net"].code == 550
    assert stored_messages(config) == []


async def test_null_sender_is_stored_as_empty_string(config: Config, gateway: Gateway) -> None:
    await send_message(gateway, make_message(), sender="")
    [stored] = stored_messages(config)
    assert stored["mail_from"] == ""


async def test_size_limit(make_config: Callable[..., Config], start_gateway: Any) -> None:
    config = make_config(max_message_size=10_000)
    gateway = await start_gateway(config)
    client = await RawClient.connect(gateway.port)
    try:
        await client.reply()
        code, text = await client.command("EHLO client.example.com")
        assert "SIZE 10000" in text
        code, text = await client.command("MAIL FROM:<a@client.example.com> SIZE=20000")
        assert text.startswith("552 5.3.4")
        # Without SIZE= the limit bites after the final dot, and nothing is kept.
        big = make_message(body="x" * 70 + "\r\n") + b"y" * 70 * 200 + b"\r\n"
        big = big.replace(b"y" * 70, b"y" * 68 + b"\r\n")
        code, text = (await client.transaction(big, check=False)).reply
        assert text.startswith("552 5.3.4")
        # The session is still usable afterwards.
        code, text = (await client.transaction(make_message())).reply
        assert code == 250
    finally:
        await client.close()
    assert len(stored_messages(config)) == 1


async def test_recipient_limit(make_config: Callable[..., Config], start_gateway: Any) -> None:
    gateway = await start_gateway(make_config(max_recipients=3))
    client = await RawClient.connect(gateway.port)
    try:
        await client.reply()
        await client.command("EHLO client.example.com")
        await client.command("MAIL FROM:<a@client.example.com>")
        for _ in range(3):
            assert (await client.command("RCPT TO:<support@example.org>"))[0] == 250
        code, text = await client.command("RCPT TO:<support@example.org>")
        assert text.startswith("452 4.5.3")
    finally:
        await client.close()


async def test_connection_limits_per_ip_and_in_all(
    make_config: Callable[..., Config], start_gateway: Any
) -> None:
    gateway = await start_gateway(make_config(max_connections=3, max_connections_per_ip=2))
    held = []
    for _ in range(2):
        client = await RawClient.connect(gateway.port)
        assert (await client.reply())[0] == 220
        held.append(client)
    # A third connection from the same address is refused...
    extra = await RawClient.connect(gateway.port)
    code, text = await extra.reply()
    assert text.startswith("421 4.7.0")
    assert await extra.closed()
    # ...while another address still gets in, up to the global cap.
    other = await RawClient.connect(gateway.port, source="127.0.0.2")
    assert (await other.reply())[0] == 220
    over = await RawClient.connect(gateway.port, source="127.0.0.3")
    code, text = await over.reply()
    assert text.startswith("421 4.7.0")
    # Closing one frees its place.
    await held.pop().close()
    again = None
    deadline = time.monotonic() + 10
    while again is None and time.monotonic() < deadline:
        candidate = await RawClient.connect(gateway.port)
        code, _ = await candidate.reply()
        if code == 220:
            again = candidate
        else:
            await candidate.close()
    assert again is not None
    for client in [*held, extra, other, over, again]:
        await client.close()


async def test_lmtp_replies_once_per_recipient(
    make_config: Callable[..., Config], start_gateway: Any
) -> None:
    config = make_config(protocol="lmtp")
    gateway = await start_gateway(config)
    client = await LmtpClient.connect(gateway.port)
    try:
        code, text = await client.reply()
        assert code == 220
        assert (await client.command("EHLO client.example.com"))[0] == 500
        assert (await client.command("LHLO mta.example.org"))[0] == 250
        sent = await client.transaction(
            make_message(),
            recipients=("support@example.org", "nobody@example.org", "billing@example.org"),
            check=False,
        )
        assert sent.mail.code == 250
        assert [r.code for r in sent.rcpt.values()] == [250, 550, 250]
        assert sent.data is not None and sent.data.code == 354
        first, second = sent.final.values()
        assert first[0] == second[0] == 250
        assert (await client.command("NOOP"))[0] == 250  # no third reply was queued
    finally:
        await client.close()
    [stored] = stored_messages(config)
    assert stored["rcpt_to"] == ["support@example.org", "billing@example.org"]


async def test_starttls_with_a_throwaway_certificate(
    tmp_path: Path, make_config: Callable[..., Config], start_gateway: Any
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("support.example.org", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    extra = 'tls_cert = "server.pem"\ntls_key = "server.pem"'
    config = make_config(extra_smtp=extra)
    gateway = await start_gateway(config)
    client_context = __import__("ssl").create_default_context()
    ca.configure_trust(client_context)
    client = await RawClient.connect(gateway.port)
    try:
        features = await client.greet()
        assert "STARTTLS" in features.upper()
        assert (await client.command("STARTTLS"))[0] == 220
        await asyncio.wait_for(
            client.writer.start_tls(client_context, server_hostname="127.0.0.1"), 10
        )
        code, features = await client.command("EHLO client.example.com")
        assert code == 250
        assert "STARTTLS" not in features.upper()  # not offered twice
        await client.transaction(make_message())
    finally:
        await client.close()
    assert len(stored_messages(config)) == 1


async def test_hang_up_after_final_dot_does_not_wedge_the_writer(
    config: Config, gateway: Gateway
) -> None:
    # RELIABILITY.md: a client closing right after the dot cancels handle_DATA; a shared
    # transaction left open would wedge every later message.
    for i in range(5):
        client = await RawClient.connect(gateway.port)
        await client.reply()
        await client.command("EHLO client.example.com")
        await client.command("MAIL FROM:<alice@client.example.com>")
        await client.command("RCPT TO:<support@example.org>")
        await client.command("DATA")
        client.writer.write(make_message(message_id=f"<hangup{i}@client.example.com>") + b".\r\n")
        client.writer.transport.abort()  # hang up without waiting for the reply

    async def one(i: int) -> None:
        await send_message(gateway, make_message(message_id=f"<after{i}@client.example.com>"))

    for start in range(0, 100, 10):
        await asyncio.gather(*(one(i) for i in range(start, start + 10)))
    ids = {m["message_id"] for m in stored_messages(config)}
    assert {f"<after{i}@client.example.com>" for i in range(100)} <= ids


async def test_database_locked_by_another_writer_is_a_tempfail(
    make_config: Callable[..., Config], start_gateway: Any
) -> None:
    config = make_config(extra_storage="busy_timeout_ms = 300")
    gateway = await start_gateway(config)
    blocker = sqlite3.connect(config.database_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        reply = (await send_message(gateway, make_message(), check=False)).after_dot
        assert reply.code == 451
        assert reply.message.startswith("4.3.0")
        assert "sqlite" not in reply.message.lower()
        assert "locked" not in reply.message.lower()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # Once the lock is gone the same gateway accepts mail again.
    await send_message(gateway, make_message())
    assert len(stored_messages(config)) == 1


async def test_too_many_hops_is_refused(config: Config, gateway: Gateway) -> None:
    received = "".join(
        f"Received: from relay{i}.example.net by mx.example.net; 27 Nov 2026 10:00 +0000\r\n"
        for i in range(31)
    )
    sent = await send_message(gateway, received.encode() + make_message(), check=False)
    assert (sent.after_dot.code, sent.after_dot.message[:5]) == (554, "5.4.6")
    assert stored_messages(config) == []
    # Exactly at the limit is fine.
    await send_message(gateway, received.encode().split(b"\r\n", 1)[1] + make_message())
    assert len(stored_messages(config)) == 1


@pytest.mark.parametrize(
    "header",
    [b"Subject: a\nBcc: victim@example.net\r\n", b"Subject: a\x00b\r\n", b"Subject: a\rb\r\n"],
    ids=["bare-lf", "nul", "bare-cr"],
)
async def test_bare_line_endings_and_nul_in_headers_are_refused(
    config: Config, gateway: Gateway, header: bytes
) -> None:
    message = b"From: alice@client.example.com\r\n" + header + b"\r\nbody\r\n"
    code, text = (await send_message(gateway, message, check=False)).reply
    assert text.startswith("554 5.6.0")
    assert stored_messages(config) == []


def nested(depth: int) -> bytes:
    head = b"From: alice@client.example.com\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    parts = [head]
    for i in range(depth):
        parts.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
    parts.append(b"Content-Type: text/plain\r\n\r\nbottom\r\n")
    for i in reversed(range(depth)):
        parts.append(b"--b%d--\r\n" % i)
    return b"".join(parts)


def many_parts(count: int) -> bytes:
    head = (
        b"From: alice@client.example.com\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n'
    )
    body = b"".join(b"--p\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(count))
    return head + body + b"--p--\r\n"


async def test_hostile_mime_is_stored_malformed_without_blocking_others(
    make_config: Callable[..., Config], start_gateway: Any
) -> None:
    config = make_config(max_message_size=4_000_000, extra_parser="")
    gateway = await start_gateway(config)
    hostile = [nested(2000), many_parts(20_000)]
    hostile_sends = [asyncio.create_task(send_message(gateway, m)) for m in hostile]
    started = time.monotonic()
    await send_message(gateway, make_message(message_id="<normal@client.example.com>"))
    normal_latency = time.monotonic() - started
    await asyncio.gather(*hostile_sends)
    assert normal_latency < 1.0 + 0.5  # the issue's bar is 1 s; leave CI some slack
    by_subject = {m["subject"]: m for m in stored_messages(config)}
    assert by_subject["deep"]["malformed"] == "mime-depth"
    assert by_subject["parts"]["malformed"] == "too-many-parts"
    assert by_subject["Printer on fire"]["malformed"] is None


async def test_messages_list_json_contract(config: Config, gateway: Gateway) -> None:
    await send_message(
        gateway, make_message(subject="first", message_id="<one@client.example.com>")
    )
    await send_message(
        gateway, make_message(subject="second", message_id="<two@client.example.com>"), sender=""
    )
    result = await asyncio.to_thread(run_cli, config, "messages", "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = [m for m in json.loads(result.stdout) if m["direction"] == "in"]
    assert [m["subject"] for m in listed] == ["second", "first"]  # newest first
    newest = listed[0]
    for key in (
        "id",
        "message_id",
        "mail_from",
        "rcpt_to",
        "from",
        "subject",
        "size",
        "received_at",
        "malformed",
    ):
        assert key in newest
    assert newest["message_id"] == "<two@client.example.com>"
    assert newest["mail_from"] == ""
    assert newest["rcpt_to"] == ["support@example.org"]
    assert newest["received_at"].endswith("+00:00")
    text = await asyncio.to_thread(run_cli, config, "messages", "list")
    assert "second" in text.stdout and text.returncode == 0
    shown = await asyncio.to_thread(run_cli, config, "messages", "show", str(newest["id"]), "--raw")
    assert "Subject: second" in shown.stdout
    missing = await asyncio.to_thread(run_cli, config, "messages", "show", "999")
    assert missing.returncode == 1 and "no message with id 999" in missing.stderr
