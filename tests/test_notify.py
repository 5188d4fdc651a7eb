"""Outgoing mail through real SMTP: acknowledgements, staff replies, status notices, and
every guard that keeps the desk from writing to anyone it must not (RELIABILITY 37-42).

These tests read the planned mail from the database (the transactional outbox): what is
queued there is exactly what the delivery worker sends.
"""

from __future__ import annotations

import base64
import email
import email.policy
from contextlib import closing
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

import pytest

from gateway import store
from gateway.app import Gateway
from gateway.config import Config
from gateway.mailbuild import build_mail
from gateway.render import RenderedMail

from .conftest import cli, make_message, rows, send_message, wait_for

STAFF = (
    '[staff]\naddresses = ["dana@example.org"]\nadmins = ["admin@example.org"]\n'
    '[policy]\ntrusted_authserv_ids = ["mx.example.org"]'
)
# Staff mail counts as staff only when authenticated ([staff] require_authentication).
DANA = "Authentication-Results: mx.example.org; dkim=pass header.d=example.org\r\n"


@pytest.fixture
def config(make_config: Any) -> Config:
    # Mail queued by the CLI cannot wake the daemon's worker: let it look often.
    cfg: Config = make_config(extra=STAFF + "\n[delivery]\npoll_interval = 0.2")
    return cfg


def outbox(config: Config, kind: str | None = None) -> list[dict[str, Any]]:
    """Queued mail; `raw` is None until the delivery worker has built it."""
    sql = """
        SELECT o.*, r.raw FROM outbox o LEFT JOIN message_raw r ON r.message = o.message
        {where} ORDER BY o.id
    """
    if kind:
        return [dict(r) for r in rows(config, sql.format(where="WHERE o.kind = ?"), (kind,))]
    return [dict(r) for r in rows(config, sql.format(where=""))]


async def built(config: Config, kind: str | None = None) -> list[dict[str, Any]]:
    """Queued mail once the delivery worker (woken by the commit) has built every one."""
    return await wait_for(
        lambda: (found := outbox(config, kind)) and all(m["raw"] for m in found) and found,
        timeout=15,
    )


def parsed(row: dict[str, Any]) -> EmailMessage:
    message = email.message_from_bytes(bytes(row["raw"]), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def body_text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


def status_of(config: Config, number: int) -> str:
    [row] = rows(config, "SELECT status FROM tickets WHERE number = ?", (number,))
    return str(row["status"])


async def test_new_request_gets_exactly_one_acknowledgement(
    config: Config, gateway: Gateway
) -> None:
    request = make_message(
        subject="Invoice export fails",
        message_id="<req1@client.example.com>",
        headers="References: <older@client.example.com>\r\n",
        body="SECRET-BODY-LINE please do not quote me\r\n",
    )
    await send_message(gateway, request)
    [ack] = await built(config)
    assert (ack["kind"], ack["ticket"], ack["rcpt_to"]) == (
        "acknowledgement",
        1,
        "alice@client.example.com",
    )
    assert ack["mail_from"] == ""  # RFC 3834 section 3.3: the null envelope sender
    message = parsed(ack)
    assert message.get_all("To") == ["alice@client.example.com"]
    assert message["From"].addresses[0].addr_spec == "support@example.org"
    reply_to = message["Reply-To"].addresses[0].addr_spec
    assert reply_to.startswith("support+t1-") and reply_to.endswith("@example.org")
    assert "[#1]" in message["Subject"] and "Invoice export fails" in message["Subject"]
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["X-Auto-Response-Suppress"] == "All"
    assert message["Precedence"] == "bulk"
    assert message["In-Reply-To"] == "<req1@client.example.com>"
    assert message["References"].split() == [
        "<older@client.example.com>",
        "<req1@client.example.com>",
    ]
    assert message["Message-ID"] == ack["message_id"]
    assert message["Message-ID"].endswith("@support.example.org>")
    assert "SECRET-BODY-LINE" not in bytes(ack["raw"]).decode("utf-8", "replace")
    assert "[#1]" in body_text(message) or "#1" in body_text(message)
    assert message.get_body(preferencelist=("html",)) is not None
    # A second message on the same ticket earns no second acknowledgement.
    await send_message(gateway, make_message(subject="Re: [#1] Invoice export fails"))
    assert len(outbox(config)) == 1


async def test_acknowledgement_is_written_to_the_outbox_directory(
    config: Config, gateway: Gateway
) -> None:
    await send_message(gateway, make_message())
    folder = config.outbox_path
    files = await wait_for(lambda: sorted(folder.glob("*.eml")), timeout=15)
    [ack] = await built(config)
    assert files[0].read_bytes() == bytes(ack["raw"])
    await wait_for(lambda: outbox(config)[0]["status"] == "sent", timeout=15)


@pytest.mark.parametrize(
    "headers",
    [
        "Auto-Submitted: auto-replied\r\n",
        "Auto-Submitted: auto-generated\r\n",
        "Auto-Submitted: auto-notified\r\n",
        "Precedence: bulk\r\n",
        "Precedence: list\r\n",
        "Precedence: junk\r\n",
        "List-Id: <users.lists.example.com>\r\n",
        "List-Unsubscribe: <mailto:leave@lists.example.com>\r\n",
        "X-Auto-Response-Suppress: All\r\n",
        "X-Auto-Response-Suppress: OOF\r\n",
        "Content-Type: multipart/report; report-type=disposition-notification; boundary=x\r\n",
    ],
)
async def test_automatic_mail_is_never_answered(
    config: Config, gateway: Gateway, headers: str
) -> None:
    # RELIABILITY 37/38: stored, no acknowledgement (here it also opens no ticket).
    message = make_message(headers=headers)
    if "multipart/report" in headers:
        message = message.replace(b"Content-Type: text/plain; charset=utf-8\r\n", b"")
    await send_message(gateway, message)
    assert outbox(config) == []
    assert rows(config, "SELECT id FROM messages")


async def test_auto_submitted_no_is_answered(config: Config, gateway: Gateway) -> None:
    await send_message(gateway, make_message(headers="Auto-Submitted: no\r\n"))
    assert [r["kind"] for r in outbox(config)] == ["acknowledgement"]


@pytest.mark.parametrize(
    "sender",
    [
        "MAILER-DAEMON@client.example.com",
        "postmaster@client.example.com",
        "users-request@client.example.com",
        "owner-users@client.example.com",
    ],
)
async def test_robot_senders_are_never_answered(
    config: Config, gateway: Gateway, sender: str
) -> None:
    await send_message(gateway, make_message(sender=sender), sender=sender)
    assert outbox(config) == []


async def test_null_sender_is_never_answered(config: Config, gateway: Gateway) -> None:
    await send_message(gateway, make_message(), sender="")
    assert outbox(config) == []


async def test_our_own_address_is_never_answered(config: Config, gateway: Gateway) -> None:
    # RELIABILITY 39: mail "from" our own support address is a loop: refused, never answered.
    sent = await send_message(
        gateway, make_message(sender="support@example.org"), sender="x@x.example", check=False
    )
    assert sent.after_dot.code == 554
    assert outbox(config) == []


async def test_quarantined_sender_is_never_answered_but_admins_are_told(
    config: Config, gateway: Gateway
) -> None:
    await send_message(
        gateway, make_message(sender="eve@stranger.example.net"), "eve@stranger.example.net"
    )
    mail = await built(config)
    assert [m["rcpt_to"] for m in mail] == ["admin@example.org"]
    assert mail[0]["kind"] == "quarantine-notice"
    notice = parsed(mail[0])
    assert "eve@stranger.example.net" in body_text(notice)
    assert notice["Auto-Submitted"] == "auto-generated"


async def test_undeliverable_address_is_never_answered(config: Config, gateway: Gateway) -> None:
    # As a bounce of our earlier mail to Alice would have left it.
    with closing(store.connect(config.database_path)) as conn:
        conn.execute(
            "INSERT INTO undeliverable (address, reason, updated_at) VALUES (?, 'test', ?)",
            ("alice@client.example.com", "2026-11-27T00:00:00+00:00"),
        )
    await send_message(gateway, make_message())
    assert outbox(config) == []
    [withheld] = rows(config, "SELECT detail FROM events WHERE action = 'mail.withheld'")
    assert "undeliverable" in withheld["detail"]


async def test_hourly_cap_per_recipient(config: Config, gateway: Gateway) -> None:
    for i in range(7):
        await send_message(gateway, make_message(subject=f"request {i}"))
    acks = outbox(config, "acknowledgement")
    assert len(acks) == 5  # max_auto_replies_per_hour
    assert len(rows(config, "SELECT number FROM tickets")) == 7


async def test_ping_pong_with_another_helpdesk_stops(make_config: Any, start_gateway: Any) -> None:
    # RELIABILITY 40: a peer that answers every mail with a new one, without marking its
    # mail as automatic. Our acknowledgements stop at the cap; past 20 inbound mails an
    # hour the peer's mail is held as a loop, and the admins are told once.
    config = make_config(extra=STAFF)
    gateway = await start_gateway(config)
    peer = "helpdesk@other.example.net"
    for i in range(25):
        await send_message(gateway, make_message(subject=f"Ticket {i} received", sender=peer), peer)
    acks = [m for m in outbox(config) if m["rcpt_to"] == peer]
    assert len(acks) <= 5
    held = rows(config, "SELECT reasons FROM quarantine WHERE status = 'held'")
    assert len(held) == 5 and all('"loop"' in r["reasons"] for r in held)
    notices = outbox(config, "loop-notice")
    assert [n["rcpt_to"] for n in notices] == ["admin@example.org"]


async def test_hostile_subject_cannot_add_a_header(config: Config, gateway: Gateway) -> None:
    # RELIABILITY 42: encoded line breaks of every kind, and 10 KB of subject.
    hostile = "Hi\nBcc: victim@example.net\r\nX-Evil: 1\u2028Y: 2\x85Z: 3 " + "x" * 10_000
    # Folded into encoded-words of 40 characters, as a mail program would send it.
    words = [
        "=?utf-8?b?" + base64.b64encode(hostile[i : i + 40].encode()).decode() + "?="
        for i in range(0, len(hostile), 40)
    ]
    subject = "\r\n ".join(words)
    await send_message(gateway, make_message(subject=subject))
    [ack] = await built(config)
    message = parsed(ack)
    assert message["Bcc"] is None and message["X-Evil"] is None
    assert "\n" not in message["Subject"] and len(message["Subject"]) <= 120
    names = [name.lower() for name in message.keys()]
    assert names.count("to") == 1
    expected = {
        "from",
        "to",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "auto-submitted",
        "x-auto-response-suppress",
        "precedence",
        "x-gateway-loop",
        "content-type",
        "mime-version",
    }
    assert set(names) <= expected


def test_built_mail_is_7bit_and_reads_back_as_written() -> None:
    text = "Bonjour Zoë,\n\nvotre demande [#12] est ouverte.\n" + "long " * 300 + "\n"
    html = "<p>Bonjour Zoë</p>"
    raw = build_mail(
        sender=Address(display_name='Support, "Désk"', addr_spec="support@example.org"),
        to="zoe@client.example.com",
        subject="Re: [#12] Imprimante en panne — encore",
        rendered=RenderedMail(subject="", text=text, html=html),
        message_id="<gw.t12.abc@support.example.org>",
        date=datetime(2026, 11, 27, 10, 0, tzinfo=UTC),
        hostname="support.example.org",
        in_reply_to="<café@client.example.com>",
        references=("<first@client.example.com>", "<café@client.example.com>"),
        auto_submitted="auto-replied",
    )
    # No 8BITMIME needed, CRLF line ends, and no line longer than RFC 5322 allows.
    assert raw.isascii()
    lines = raw.split(b"\r\n")
    assert lines[0].startswith(b"From: ")  # as people expect to read it
    assert b"\n" not in b"".join(lines) and max(len(line) for line in lines) <= 998
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == "Re: [#12] Imprimante en panne — encore"
    assert message["From"].addresses[0].display_name == 'Support, "Désk"'
    assert message["From"].addresses[0].addr_spec == "support@example.org"
    assert message["To"] == "zoe@client.example.com"
    # A non-ASCII Message-ID cannot be written as one: left out, the others kept.
    assert message["In-Reply-To"] is None
    assert message["References"] == "<first@client.example.com>"
    assert message["Auto-Submitted"] == "auto-replied"
    # Mail is CRLF on the wire; quoted-printable keeps those line ends in what it decodes.
    assert body_text(message).replace("\r\n", "\n") == text
    html_part = message.get_body(preferencelist=("html",))
    assert html_part is not None and html_part.get_content().rstrip() == html


async def test_staff_reply_reaches_the_client_and_the_client_threads_back(
    config: Config, gateway: Gateway
) -> None:
    await send_message(
        gateway, make_message(subject="Printer", message_id="<req@client.example.com>")
    )
    [ack] = await built(config)
    ack_id = ack["message_id"]
    # Staff answer by replying to the acknowledgement.
    staff = make_message(
        subject="Re: [#1] Printer",
        sender="dana@example.org",
        headers=DANA + f"In-Reply-To: {ack_id}\r\n",
        body="Please restart it.\r\n\r\n-- \r\nDana\r\n",
    )
    await send_message(gateway, staff, sender="dana@example.org")
    assert status_of(config, 1) == "pending"
    [reply] = await built(config, "staff-reply")
    assert reply["rcpt_to"] == "alice@client.example.com"
    assert reply["mail_from"] == "support@example.org"  # human mail: bounces come back
    message = parsed(reply)
    assert "Please restart it." in body_text(message)
    assert message["Auto-Submitted"] is None
    assert "dana@example.org" not in bytes(reply["raw"]).decode()
    reply_to = message["Reply-To"].addresses[0].addr_spec

    # The client answers to the Reply-To (token) address...
    await send_message(gateway, make_message(subject="thanks"), recipients=(reply_to,))
    assert status_of(config, 1) == "open"
    # ...or from another program that keeps only References.
    await send_message(
        gateway,
        make_message(subject="something else", headers=f"References: {reply['message_id']}\r\n"),
    )
    counts = rows(
        config, "SELECT COUNT(*) AS n FROM messages WHERE ticket = 1 AND direction = 'in'"
    )
    assert counts[0]["n"] == 4
    assert len(rows(config, "SELECT number FROM tickets")) == 1


async def test_staff_note_is_never_sent(config: Config, gateway: Gateway) -> None:
    await send_message(
        gateway, make_message(subject="Printer", message_id="<req@client.example.com>")
    )
    [ack] = outbox(config, "acknowledgement")
    note = make_message(
        subject="Re: [#1] Printer",
        sender="dana@example.org",
        headers=DANA + f"In-Reply-To: {ack['message_id']}\r\n",
        body="#note the client is on the old firmware\r\n",
    )
    await send_message(gateway, note, sender="dana@example.org")
    assert outbox(config, "staff-reply") == []
    [kind] = rows(config, "SELECT kind FROM messages WHERE sender = 'dana@example.org'")
    assert kind["kind"] == "note"


async def test_cli_reply_and_status_notify_the_client(config: Config, gateway: Gateway) -> None:
    await send_message(gateway, make_message(subject="Printer"))
    replied = await cli(
        config, "tickets", "reply", "1", "--from", "dana@example.org", stdin="Fixed it.\n"
    )
    assert replied.returncode == 0, replied.stderr
    assert status_of(config, 1) == "pending"
    [reply] = await built(config, "staff-reply")
    assert "Fixed it." in body_text(parsed(reply))

    stranger = await cli(config, "tickets", "reply", "1", "--from", "eve@x.example", stdin="x")
    assert stranger.returncode == 1 and "not a staff address" in stranger.stderr

    solved = await cli(config, "tickets", "status", "1", "solved")
    assert solved.returncode == 0, solved.stderr
    [notice] = await built(config, "status-change")
    assert parsed(notice)["Auto-Submitted"] == "auto-generated"
    assert "[#1]" in notice["subject"]

    quiet = await cli(config, "tickets", "status", "1", "pending")
    assert quiet.returncode == 0 and len(outbox(config, "status-change")) == 1
    reopened = await cli(config, "tickets", "status", "1", "open")
    assert reopened.returncode == 0 and len(outbox(config, "status-change")) == 1
    await cli(config, "tickets", "status", "1", "solved")
    await cli(config, "tickets", "status", "1", "open")
    assert len(outbox(config, "status-change")) == 3  # solved, solved, reopened
    missing = await cli(config, "tickets", "status", "99", "open")
    assert missing.returncode == 1 and "no ticket #99" in missing.stderr
    note = await cli(
        config, "tickets", "reply", "1", "--from", "dana@example.org", stdin="#note internal"
    )
    assert note.returncode == 0 and len(outbox(config, "staff-reply")) == 1


async def test_end_to_end_through_a_real_relay(
    make_config: Any, start_gateway: Any, relay: Any
) -> None:
    """SMTP in, a real SMTP relay out: the acknowledgement as delivered, a staff reply
    reaching the client, and the client's answers threading back (by token, and by
    References alone)."""
    r = await relay()
    delivery = (
        f'\n[delivery]\nmode = "smtp"\nrelay_host = "127.0.0.1"\nrelay_port = {r.port}\n'
        "timeout = 5\npoll_interval = 3600\n"
    )
    config = make_config(extra=STAFF + delivery)
    gateway = await start_gateway(config, relay_tls_context=r.client_tls_context())

    await send_message(
        gateway, make_message(subject="Printer", message_id="<req@client.example.com>")
    )
    await wait_for(lambda: len(r.messages) == 1, timeout=15)
    [delivered] = r.messages
    assert delivered.tls and delivered.mail_from == "<>"
    assert delivered.rcpt_tos == ("alice@client.example.com",)
    ack = email.message_from_bytes(delivered.data, policy=email.policy.default)
    assert ack["Auto-Submitted"] == "auto-replied" and "[#1]" in ack["Subject"]
    assert ack["In-Reply-To"] == "<req@client.example.com>"
    reply_to = ack["Reply-To"].addresses[0].addr_spec

    staff = make_message(
        subject="Re: [#1] Printer",
        sender="dana@example.org",
        headers=DANA + f"In-Reply-To: {ack['Message-ID']}\r\n",
        body="Please restart it.\r\n",
    )
    await send_message(gateway, staff, sender="dana@example.org")
    await wait_for(lambda: len(r.messages) == 2, timeout=15)
    answer = email.message_from_bytes(r.messages[1].data, policy=email.policy.default)
    assert r.messages[1].rcpt_tos == ("alice@client.example.com",)
    assert r.messages[1].mail_from == "support@example.org"
    assert isinstance(answer, EmailMessage) and "Please restart it." in body_text(answer)

    await send_message(gateway, make_message(subject="thanks, by token"), recipients=(reply_to,))
    await send_message(
        gateway,
        make_message(subject="by references", headers=f"References: {answer['Message-ID']}\r\n"),
    )
    counts = rows(
        config, "SELECT COUNT(*) AS n FROM messages WHERE ticket = 1 AND direction = 'in'"
    )
    assert counts[0]["n"] == 4
    assert len(rows(config, "SELECT number FROM tickets")) == 1
    assert status_of(config, 1) == "open"
    # Dana owns #1 since her reply (issue 11): the client's answers are news for her.
    await wait_for(lambda: {row["status"] for row in outbox(config)} == {"sent"}, timeout=15)
    assert [m.rcpt_tos for m in r.messages[2:]] == [("dana@example.org",)] * 2


async def test_staff_reply_by_subject_tag_alone_is_never_a_staff_reply(
    config: Config, gateway: Gateway
) -> None:
    # Issue 9: the tag is no proof (anyone can write "[#1]" and a staff From). Without
    # authentication the mail is held; authenticated, it opens a ticket of its own. In
    # neither case is anything mailed to the client of #1.
    await send_message(gateway, make_message(subject="Printer"))
    staff = make_message(subject="Re: [#1] Printer", sender="dana@example.org", body="On it.\r\n")
    await send_message(gateway, staff, sender="dana@example.org")
    [held] = rows(config, "SELECT reasons FROM quarantine WHERE status = 'held'")
    assert held["reasons"].startswith('["unauthenticated"')
    verified = make_message(
        subject="Re: [#1] Printer", sender="dana@example.org", headers=DANA, body="On it.\r\n"
    )
    await send_message(gateway, verified, sender="dana@example.org")
    assert len(rows(config, "SELECT number FROM tickets")) == 2
    assert status_of(config, 1) == "new"
    assert outbox(config, "staff-reply") == []
