"""SMTP protocol and envelope edge cases (RELIABILITY.md part 2.1, tests 3-14), on the wire.

Every test speaks byte-exact SMTP to the real gateway on an ephemeral loopback port, and
every reply it reads is checked for leaked internals (test 14). Intake basics that
test_intake.py already covers (recipient policy, size, recipient and connection limits,
LMTP, bare LF/NUL in headers, hop limit) are not repeated here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import platform
import random
import re
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtpd
import pytest
import trustme
from aiosmtpd.smtp import SMTP

import gateway as gateway_package
from gateway.app import Gateway
from gateway.config import Config
from gateway.server import GatewaySMTP

from .conftest import HELO_NAME, RawClient, make_message, rows, stored_messages

SENDER = "alice@client.example.com"
MAILBOX = "support@example.org"

# What a reply must never carry (test 14): product names, versions, paths, exception names.
_LEAKED_WORDS = re.compile(r"aiosmtpd|python|traceback|site-packages|\.py\b", re.IGNORECASE)
_EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b")
_PATH = re.compile(r"(?:^|[\s(\"'=])/(?:[\w.-]+/)+")
_VERSION = re.compile(r"\bv?\d+\.\d+\.\d+\b")
# Allowed dotted numbers: the enhanced status code after the reply code (RFC 3463) and an
# RFC section reference ("RFC 5321 4.5.3.1.6").
_STATUS_PREFIX = re.compile(r"^\d{3}[ -](?:\d\.\d{1,3}\.\d{1,3} )?", re.MULTILINE)
_RFC_SECTION = re.compile(r"RFC ?\d+ [\d.]+")
_VERSIONS = (aiosmtpd.__version__, platform.python_version(), gateway_package.__version__)


def assert_discreet(text: str) -> None:
    """Fail if an SMTP reply names the software, a version, a path or an exception."""
    assert not _LEAKED_WORDS.search(text), text
    assert not _EXCEPTION_NAME.search(text), text
    assert not _PATH.search(text), text
    assert sys.prefix not in text, text
    for version in _VERSIONS:
        assert version not in text, text
    bare = _RFC_SECTION.sub("", _STATUS_PREFIX.sub("", text))
    assert not _VERSION.search(bare), text


@pytest.fixture
def connect(raw_client: Callable[..., Any]) -> Callable[[int], Any]:
    """Factory: the shared RawClient on the gateway's port, every reply it reads checked
    for leaked internals (test 14); all are closed at the end."""
    return functools.partial(raw_client, on_reply=assert_discreet)


def raw_of_only_message(config: Config) -> bytes:
    [row] = rows(
        config,
        "SELECT r.raw FROM message_raw r JOIN messages m ON m.id = r.message"
        " WHERE m.direction = 'in'",
    )
    return bytes(row["raw"])


# --- 3. Rejected recipients (Postfix's hard error limit) -------------------------------


async def test_eleventh_rejected_recipient_in_a_session_closes_it(
    config: Config, gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    client: RawClient = await connect(gateway.port)
    await client.greet()
    # The count is per session, not per transaction: RSET does not clear it.
    assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
    for i in range(5):
        _, text = await client.command(f"RCPT TO:<nobody{i}@example.org>")
        assert text.startswith("550 5.1.1"), text
    assert (await client.command("RSET"))[0] == 250
    assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
    for i in range(5, 10):
        _, text = await client.command(f"RCPT TO:<victim{i}@elsewhere.example.net>")
        assert text.startswith("550 5.7.1"), text
    _, text = await client.command("RCPT TO:<nobody10@example.org>")
    assert text.startswith("421 4.7.0"), text
    assert await client.closed()
    assert stored_messages(config) == []


# --- 4. Null reverse-path --------------------------------------------------------------


async def test_null_reverse_path_is_accepted_and_stored_as_empty(
    config: Config, gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    client: RawClient = await connect(gateway.port)
    await client.greet()
    _, text = await client.command("MAIL FROM:<>")
    assert text.startswith("250 2.1.0"), text
    assert (await client.command(f"RCPT TO:<{MAILBOX}>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    await client.send(make_message(sender="mailer-daemon@client.example.com") + b".\r\n")
    _, text = await client.reply()
    assert text.startswith("250 2.0.0"), text
    [stored] = stored_messages(config)
    assert stored["mail_from"] == ""
    assert stored["rcpt_to"] == [MAILBOX]


# --- Paths: the gateway's fast path parses them exactly as aiosmtpd does ----------------

_PATHS = [
    "<a@b.c>",
    "<a@b.c> SIZE=1",
    "<a@b.c>  BODY=8BITMIME SMTPUTF8",
    "<a@b.c>\tSIZE=1",
    "<a@b.c>SIZE=1",
    "<a@b.c> ",
    "<a@b.c>(comment) SIZE=1",
    "<a@b.c> (comment) SIZE=1",
    " <a@b.c>",
    "<>",
    "<> SIZE=3",
    "<A.B+tag=x@C.example-d.ORG>",
    "<a..b@c.d>",
    "<.a@c.d>",
    "<a.@c.d>",
    "<a@c.d.>",
    "<a@.c.d>",
    "<a@c..d>",
    '<"x y"@c.d>',
    "<a@[192.0.2.1]>",
    "<@relay.example:a@b.c>",
    "<a@b.c",
    "a@b.c",
    "<a b@c.d>",
    "<a@b_c.d>",
    "<\u00e9@b.c>",
    "<a@b.c>> S",
    "<a@b.c> <x@y.z>",
    "<" + "x" * 70 + "@b.c>",
]


def _random_paths(count: int) -> list[str]:
    rng = random.Random(20261127)
    alphabet = 'ab.@<>-+_ \t()"[]:=\u00e9'
    return ["<" + "".join(rng.choices(alphabet, k=rng.randint(0, 14))) for _ in range(count)]


@pytest.mark.parametrize("local_part_limit", [0, 64])
async def test_path_fast_path_agrees_with_aiosmtpd(local_part_limit: int) -> None:
    protocol = GatewaySMTP(object())
    protocol.local_part_limit = local_part_limit
    for path in [*_PATHS, *_random_paths(3000)]:
        try:
            expected = SMTP._getaddr(protocol, path)
        except (IndexError, AttributeError):
            expected = None, None  # aiosmtpd trips over "<" or "<a@["; we call it malformed
        assert protocol._getaddr(path) == expected, path


@pytest.mark.parametrize("path", ["<", "< ", "<a@["])
async def test_unterminated_path_is_a_malformed_address_not_a_fault(
    gateway: Gateway, connect: Callable[[int], Any], path: str
) -> None:
    client: RawClient = await connect(gateway.port)
    await client.greet()
    _, text = await client.command(f"MAIL FROM:{path}")
    assert text.startswith(("553", "501")), text
    assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250


async def test_mail_and_rcpt_parameters_survive_the_fast_path(
    config: Config, gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    client: RawClient = await connect(gateway.port)
    await client.greet()
    _, text = await client.command(f"MAIL FROM:<{SENDER}> SIZE=2000 BODY=8BITMIME")
    assert text.startswith("250 2.1.0"), text
    assert (await client.command(f"RCPT TO:<{MAILBOX}>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    await client.send(make_message() + b".\r\n")
    assert (await client.reply())[0] == 250
    _, text = await client.command(f"MAIL FROM:<{SENDER}> SIZE=999999999")
    assert text.startswith("552"), text
    _, text = await client.command(f"MAIL FROM:<{SENDER}> NOSUCHPARAM=1")
    assert text.startswith("555"), text
    [stored] = stored_messages(config)
    assert stored["mail_from"] == SENDER


# --- 6. Line lengths (RFC 5321 4.5.3.1.4 and 4.5.3.1.6) -----------------------------------


def noop_of(length: int) -> str:
    """A NOOP command line of exactly `length` octets, CRLF not counted."""
    return "NOOP " + "x" * (length - 5)


def mail_of(length: int, params: str = "") -> str:
    """A MAIL command line of exactly `length` octets, CRLF not counted."""
    head, tail = "MAIL FROM:<", f"@client.example.com>{params}"
    return head + "a" * (length - len(head) - len(tail)) + tail


@pytest.mark.parametrize("extended", [False, True], ids=["helo", "ehlo"])
async def test_command_line_over_512_octets_is_refused(
    gateway: Gateway, connect: Callable[[int], Any], extended: bool
) -> None:
    client: RawClient = await connect(gateway.port)
    assert (await client.reply())[0] == 220
    greeting = f"EHLO {HELO_NAME}" if extended else f"HELO {HELO_NAME}"
    assert (await client.command(greeting))[0] == 250
    assert await client.command(noop_of(510)) == (250, "250 2.0.0 OK")
    for length in (513, 1000, 5000):  # the last one overruns the stream reader's buffer
        _, text = await client.command(noop_of(length))
        assert text.startswith("500 5.5.2"), (length, text)
    _, text = await client.command(f"RCPT TO:<{'r' * 520}@example.org>")
    assert text.startswith("500 5.5.2"), text
    # A refused line is consumed whole; the session goes on in step.
    assert await client.command("NOOP") == (250, "250 2.0.0 OK")


async def test_mail_length_limit_does_not_grow_with_ehlo(
    config: Config, gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    # aiosmtpd 1.4.6 adds 36 octets to a class-wide MAIL limit on every EHLO, so repeated
    # EHLOs - on one connection or on several at once - let an overlong MAIL through.
    clients: list[RawClient] = [await connect(gateway.port) for _ in range(3)]
    for client in clients:
        assert (await client.reply())[0] == 220
    for _ in range(5):
        for client in clients:
            assert (await client.command(f"EHLO {HELO_NAME}"))[0] == 250
    for client in clients:
        _, text = await client.command(mail_of(600))
        assert text.startswith("500 5.5.2"), text
        _, text = await client.command(mail_of(549, " SIZE=1000 SMTPUTF8"))
        assert text.startswith("500 5.5.2"), text
        # SIZE= and SMTPUTF8 still get their RFC 1870/6531 allowance above 512.
        _, text = await client.command(mail_of(548, " SIZE=1000 SMTPUTF8"))
        assert text.startswith("250 2.1.0"), text
        assert (await client.command("RSET"))[0] == 250
    # A fresh connection after all those EHLOs starts from the same limit.
    late: RawClient = await connect(gateway.port)
    await late.greet()
    _, text = await late.command(mail_of(600))
    assert text.startswith("500 5.5.2"), text
    assert stored_messages(config) == []


async def test_overlong_data_line_is_refused_after_the_dot(
    config: Config, gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    client: RawClient = await connect(gateway.port)
    await client.greet()
    for line_length in (1002, 20_000):  # CRLF included; the second overruns the reader
        long_line = "y" * (line_length - 2)
        message = make_message(body=f"before\r\n{long_line}\r\nafter\r\n")
        _, text = (await client.transaction(message, check=False)).reply
        assert text.startswith("500 5.5.2"), (line_length, text)
    assert stored_messages(config) == []
    # RFC 5321 4.5.3.1.6: 1,000 octets including CRLF is the largest a line may be.
    at_limit = make_message(body="z" * 998 + "\r\n")
    _, text = (await client.transaction(at_limit, check=False)).reply
    assert text.startswith("250 2.0.0"), text
    assert raw_of_only_message(config) == at_limit


# --- 7. Unknown commands, VRFY, EXPN ------------------------------------------------


async def test_unknown_commands_end_the_session(
    config: Config, gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    client: RawClient = await connect(gateway.port)
    await client.greet()
    codes = []
    for _ in range(6):
        try:
            code, text = await client.command("XYZZY")
        except ConnectionError:
            break
        codes.append(code)
    # aiosmtpd's fixed budget is 5: the fifth unknown command is the last one answered.
    assert codes == [500, 500, 500, 500, 502]
    assert text.startswith("502 5.5.1"), text
    assert await client.closed()


async def test_vrfy_never_tells_whether_a_mailbox_exists(
    gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    answers = []
    for address in (MAILBOX, "nobody@example.org", "someone@elsewhere.example.net"):
        client: RawClient = await connect(gateway.port)
        await client.greet()
        answers.append(await client.command(f"VRFY <{address}>"))
    assert answers[0][0] == 252
    assert answers[0] == answers[1] == answers[2]


async def test_expn_is_not_implemented(gateway: Gateway, connect: Callable[[int], Any]) -> None:
    client: RawClient = await connect(gateway.port)
    await client.greet()
    for name in ("support", "staff@example.org"):
        code, text = await client.command(f"EXPN {name}")
        assert code == 502, text
        assert "@" not in text  # no list of members, not even an echo
    assert await client.command("NOOP") == (250, "250 2.0.0 OK")


# --- 8. Command budgets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("verb", "line", "ok", "budget"),
    [
        ("NOOP", "NOOP", 250, 10),
        ("RSET", "RSET", 250, 50),
        ("HELO", f"HELO {HELO_NAME}", 250, 3),
        ("EHLO", f"EHLO {HELO_NAME}", 250, 5),
        ("VRFY", f"VRFY <{MAILBOX}>", 252, 1),
    ],
)
async def test_command_budget_closes_the_session(
    gateway: Gateway,
    connect: Callable[[int], Any],
    verb: str,
    line: str,
    ok: int,
    budget: int,
) -> None:
    client: RawClient = await connect(gateway.port)
    assert (await client.reply())[0] == 220
    for _ in range(budget):
        assert (await client.command(line))[0] == ok
    _, text = await client.command(line)
    assert text == f"421 4.7.0 {verb} sent too many times"
    assert await client.closed()


# --- 9. SMTPUTF8 (RFC 6531) ---------------------------------------------------------------


async def test_non_ascii_address_needs_smtputf8(
    config: Config, gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    client: RawClient = await connect(gateway.port)
    features = await client.greet()
    assert "SMTPUTF8" in features
    code, text = await client.command("MAIL FROM:<jösé@client.example.com>".encode())
    assert text.startswith("553 5.6.7"), text
    code, text = await client.command(f"MAIL FROM:<{SENDER}>")
    assert code == 250, text
    code, text = await client.command("RCPT TO:<süpport@example.org>".encode())
    assert text.startswith("553 5.6.7"), text
    assert (await client.command("RSET"))[0] == 250
    code, text = await client.command("MAIL FROM:<jösé@client.example.com> SMTPUTF8".encode())
    assert text.startswith("250 2.1.0"), text
    assert (await client.command(f"RCPT TO:<{MAILBOX}>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    await client.send(make_message() + b".\r\n")
    assert (await client.reply())[0] == 250
    [stored] = stored_messages(config)
    assert stored["mail_from"] == "jösé@client.example.com"


async def test_smtputf8_parameter_is_refused_when_disabled(
    make_config: Callable[..., Config], start_gateway: Any, connect: Callable[[int], Any]
) -> None:
    gateway = await start_gateway(make_config(extra_smtp="smtputf8 = false"))
    client: RawClient = await connect(gateway.port)
    features = await client.greet()
    assert "SMTPUTF8" not in features
    code, text = await client.command(f"MAIL FROM:<{SENDER}> SMTPUTF8")
    assert code in (501, 555), text
    code, text = await client.command("MAIL FROM:<jösé@client.example.com> SMTPUTF8".encode())
    assert 500 <= code < 600, text
    assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250


# --- 10. SMTP smuggling (hannob/smtpsmug; CVE-2024-27305) --------------------------------

SMUGGLING_ENDINGS = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
]

SMUGGLED_TRANSACTION = (
    b"MAIL FROM:<evil@attacker.example.net>\r\n"
    b"RCPT TO:<billing@example.org>\r\n"
    b"DATA\r\n"
    b"From: Evil <evil@attacker.example.net>\r\n"
    b"To: billing@example.org\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"smuggled body\r\n"
)


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=lambda e: repr(e)[2:-1])
async def test_smuggling_endings_do_not_end_data(
    config: Config, gateway: Gateway, connect: Callable[[int], Any], ending: bytes
) -> None:
    client: RawClient = await connect(gateway.port)
    await client.greet()
    assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
    assert (await client.command(f"RCPT TO:<{MAILBOX}>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    message = make_message(body="first line\r\nlast words") + ending + SMUGGLED_TRANSACTION
    # Sent as is: no dot-stuffing, exactly as a smuggling client would.
    await client.send(message + b".\r\n")
    _, text = await client.reply()
    assert text.startswith("250 2.0.0"), text
    # Had the fake ending ended DATA, the smuggled commands' replies would come next.
    assert await client.command("NOOP") == (250, "250 2.0.0 OK")
    [stored] = stored_messages(config)
    assert stored["mail_from"] == SENDER
    assert stored["rcpt_to"] == [MAILBOX]
    assert b"MAIL FROM:<evil@attacker.example.net>\r\n" in raw_of_only_message(config)


# --- 12. Pipelining without PIPELINING advertised ---------------------------------------


async def test_commands_sent_before_the_greeting_are_answered_in_order(
    config: Config, gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    client: RawClient = await connect(gateway.port)
    # Everything in one write, before the banner has been read: a client that does not
    # wait. The server answers strictly in order, one reply per command.
    await client.send(
        f"EHLO {HELO_NAME}\r\n"
        f"MAIL FROM:<{SENDER}>\r\n"
        f"RCPT TO:<{MAILBOX}>\r\n"
        "RCPT TO:<nobody@example.org>\r\n"
        "DATA\r\n".encode()
        + make_message(subject="pipelined")
        + b".\r\nNOOP\r\nQUIT\r\n"
    )
    replies = await client.replies_until_closed()
    assert [code for code, _ in replies] == [220, 250, 250, 250, 550, 354, 250, 250, 221]
    assert "PIPELINING" not in replies[1][1]
    [stored] = stored_messages(config)
    assert stored["subject"] == "pipelined"
    assert stored["rcpt_to"] == [MAILBOX]


async def test_body_pipelined_after_a_refused_data_is_not_run_as_commands(
    config: Config, gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    # A client that sends the content without waiting for 354 (RFC 5321 3.3 and RFC 2920
    # 3.1 forbid it) must not have that content read as commands when DATA is refused:
    # the body would then be an SMTP session of its own.
    client: RawClient = await connect(gateway.port)
    await client.greet()
    await client.send(
        f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n".encode()
        + SMUGGLED_TRANSACTION.replace(b"billing@", b"support@")
        + b".\r\nQUIT\r\n"
    )
    replies = await client.replies_until_closed()
    # One answer to DATA, then the server hangs up.
    assert [code for code, _ in replies] == [250, 550, 421], replies
    assert replies[2][1].startswith("421 4.5.0"), replies
    assert stored_messages(config) == []


async def test_body_pipelined_while_data_slots_are_busy_is_not_run_as_commands(
    make_config: Callable[..., Config], start_gateway: Any, connect: Callable[[int], Any]
) -> None:
    config = make_config(extra_smtp="data_slots = 1\ndata_slot_wait = 1")
    gateway = await start_gateway(config)
    holder: RawClient = await connect(gateway.port)
    await holder.greet()
    await holder.transaction(make_message(subject="holder"))
    assert (await holder.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
    assert (await holder.command(f"RCPT TO:<{MAILBOX}>"))[0] == 250
    assert (await holder.command("DATA"))[0] == 354  # holds the only slot

    client: RawClient = await connect(gateway.port)
    await client.greet()
    assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
    assert (await client.command(f"RCPT TO:<{MAILBOX}>"))[0] == 250
    await client.send(
        b"DATA\r\n" + SMUGGLED_TRANSACTION.replace(b"billing@", b"support@") + b".\r\nQUIT\r\n"
    )
    replies = await client.replies_until_closed()
    assert [text[:9] for _, text in replies] == ["421 4.5.0"], replies

    await holder.send(make_message(subject="held") + b".\r\n")
    assert (await holder.reply())[0] == 250
    assert sorted(m["subject"] for m in stored_messages(config)) == ["held", "holder"]


# --- 13. STARTTLS command injection (CVE-2024-34083) ------------------------------------


async def test_commands_injected_with_starttls_are_discarded(
    tmp_path: Path, make_config: Callable[..., Config], start_gateway: Any
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("support.example.org", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    config = make_config(extra_smtp='tls_cert = "server.pem"\ntls_key = "server.pem"')
    gateway = await start_gateway(config)
    context = ssl.create_default_context()
    ca.configure_trust(context)

    client = await RawClient.connect(gateway.port, on_reply=assert_discreet)
    try:
        features = await client.greet()
        assert "STARTTLS" in features
        assert (await client.command("MAIL FROM:<before-tls@client.example.com>"))[0] == 250
        # The upgrade request and a plaintext command in one segment.
        await client.send(b"STARTTLS\r\nMAIL FROM:<injected@client.example.com>\r\n")
        code, text = await client.reply()
        assert code == 220, text
        await asyncio.wait_for(
            client.writer.start_tls(context, server_hostname="support.example.org"), 10
        )
        # RFC 3207 4.2: everything before TLS is forgotten, EHLO included.
        code, text = await client.command(f"RCPT TO:<{MAILBOX}>")
        assert code == 503, text
        code, features = await client.command(f"EHLO {HELO_NAME}")
        assert code == 250 and "STARTTLS" not in features
        code, text = await client.command(f"RCPT TO:<{MAILBOX}>")
        assert code == 503, text  # neither the pre-TLS nor the injected MAIL survived
        code, text = await client.command(f"MAIL FROM:<{SENDER}>")
        assert code == 250, text
        assert (await client.command(f"RCPT TO:<{MAILBOX}>"))[0] == 250
        assert (await client.command("DATA"))[0] == 354
        await client.send(make_message(subject="over tls") + b".\r\n")
        code, text = await client.reply()
        assert code == 250, text
    finally:
        await client.close()
    [stored] = stored_messages(config)
    assert stored["mail_from"] == SENDER
    assert stored["subject"] == "over tls"


# --- 14. No internals on the wire -------------------------------------------------------


def test_discretion_check_has_teeth() -> None:
    assert_discreet("220 support.example.org ESMTP")
    assert_discreet("500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)")
    assert_discreet("451 4.3.0 Temporary failure, please try again later (ref 0a1b2c3d4e5f)")
    for leak in (
        f"220 support.example.org Python SMTP {aiosmtpd.__version__}",
        "220 support.example.org ESMTP 2.7.1",
        "500 Error: (RuntimeError) boom",
        "451 4.3.0 failed in /srv/gateway/pipeline.py",
        f"451 4.3.0 {sys.prefix}",
        "451 4.3.0 Traceback (most recent call last)",
    ):
        with pytest.raises(AssertionError):
            assert_discreet(leak)


async def test_banner_and_ehlo_name_nothing_but_the_host(
    gateway: Gateway, connect: Callable[[int], Any]
) -> None:
    client: RawClient = await connect(gateway.port)
    code, banner = await client.reply()
    assert banner == "220 support.example.org ESMTP"
    code, features = await client.command(f"EHLO {HELO_NAME}")
    assert features.splitlines()[0] == "250-support.example.org"
    code, text = await client.command("HELP")
    assert code in (214, 250), text


async def test_handler_exception_is_a_451_with_a_reference_only(
    config: Config,
    gateway: Gateway,
    connect: Callable[[int], Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(gateway.pipeline, "receive", broken)
    client: RawClient = await connect(gateway.port)
    await client.greet()
    with caplog.at_level(logging.ERROR, logger="gateway"):
        _, text = (await client.transaction(make_message(), check=False)).reply
    match = re.fullmatch(r"451 4\.3\.0 [^()]*\(ref ([0-9a-f]{8,})\)", text)
    assert match, text
    assert "secret" not in text
    assert match.group(1) in caplog.text  # the reference leads an admin to the log line
    assert stored_messages(config) == []

    # The daemon keeps serving: the same session starts a new transaction, and so does
    # a new connection.
    monkeypatch.undo()
    _, text = (await client.transaction(make_message(subject="same session"), check=False)).reply
    assert text.startswith("250 2.0.0"), text
    other: RawClient = await connect(gateway.port)
    await other.greet()
    _, text = (await other.transaction(make_message(subject="new session"), check=False)).reply
    assert text.startswith("250 2.0.0"), text
    assert sorted(m["subject"] for m in stored_messages(config)) == ["new session", "same session"]


# --- Limits from part 3 ----------------------------------------------------------------


async def test_messages_per_connection_limit(
    make_config: Callable[..., Config], start_gateway: Any, connect: Callable[[int], Any]
) -> None:
    config = make_config(extra_smtp="max_messages_per_connection = 3")
    gateway = await start_gateway(config)
    client: RawClient = await connect(gateway.port)
    await client.greet()
    for i in range(3):
        code, text = (await client.transaction(make_message(subject=f"m{i}"), check=False)).reply
        assert text.startswith("250 2.0.0"), text
    code, text = await client.command(f"MAIL FROM:<{SENDER}>")
    assert text.startswith("421 4.7.0"), text
    assert await client.closed()
    assert len(stored_messages(config)) == 3
    # The limit is per connection: a new one is served.
    again: RawClient = await connect(gateway.port)
    await again.greet()
    code, text = (await again.transaction(make_message(subject="m3"), check=False)).reply
    assert code == 250, text


async def test_busy_data_slots_answer_451_and_the_retry_succeeds(
    make_config: Callable[..., Config], start_gateway: Any, connect: Callable[[int], Any]
) -> None:
    config = make_config(extra_smtp="data_slots = 1\ndata_slot_wait = 1")
    gateway = await start_gateway(config)
    first: RawClient = await connect(gateway.port)
    second: RawClient = await connect(gateway.port)
    for client in (first, second):
        await client.greet()
        assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
        assert (await client.command(f"RCPT TO:<{MAILBOX}>"))[0] == 250

    # The first client takes the only slot and stays inside DATA.
    assert (await first.command("DATA"))[0] == 354
    head, body = make_message(subject="slow").split(b"\r\n\r\n", 1)
    await first.send(head + b"\r\n")
    code, text = await second.command("DATA")
    assert text.startswith("451 4.3.2"), text

    await first.send(b"\r\n" + body + b".\r\n")
    code, text = await first.reply()
    assert code == 250, text
    # The refused client keeps its envelope and retries DATA.
    assert (await second.command("DATA"))[0] == 354
    await second.send(make_message(subject="retried") + b".\r\n")
    code, text = await second.reply()
    assert code == 250, text
    assert sorted(m["subject"] for m in stored_messages(config)) == ["retried", "slow"]
