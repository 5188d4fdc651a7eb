"""Threading, classification and readable text, end to end through real SMTP.

Fixtures in tests/data/tickets/ are templates: $mid, $subject, $threading (a whole
header line, or nothing) and $original are filled in per test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from contextlib import closing
from pathlib import Path
from string import Template
from typing import Any

import pytest

from gateway import store
from gateway.app import Gateway
from gateway.clock import Clock
from gateway.config import Config
from gateway.store import Filing, StoredMessage
from gateway.tickets import make_token

from .conftest import make_message, rows, run_cli, send_message, stored_messages

DATA = Path(__file__).resolve().parent / "data" / "tickets"


def fixture(name: str, threading: str = "", **values: str) -> bytes:
    text = (DATA / name).read_bytes().decode("latin-1")
    text = text.replace("$threading\r\n", f"{threading}\r\n" if threading else "")
    values.setdefault("mid", f"<{time.monotonic_ns()}@client.example.com>")
    values.setdefault("subject", "Invoice export fails")
    values.setdefault("original", "<none@example.org>")
    return Template(text).safe_substitute(values).encode("latin-1")


def tickets(config: Config, **filters: Any) -> list[dict[str, Any]]:
    with closing(store.connect(config.database_path)) as conn:
        return store.list_tickets(conn, now=Clock().stamp(), **filters)


def ticket(config: Config, number: int) -> dict[str, Any]:
    with closing(store.connect(config.database_path)) as conn:
        found = store.show_ticket(conn, number, now=Clock().stamp())
    assert found is not None
    return found


def received(config: Config, number: int) -> list[dict[str, Any]]:
    """The messages a ticket received (its acknowledgement and other mail we sent aside)."""
    return [m for m in ticket(config, number)["messages"] if m["direction"] == "in"]


def message_by_id(config: Config, message_id: str) -> dict[str, Any]:
    [found] = [m for m in stored_messages(config) if m["message_id"] == message_id]
    return found


def set_status(config: Config, number: int, status: str) -> None:
    with closing(store.connect(config.database_path)) as conn:
        conn.execute("UPDATE tickets SET status = ? WHERE number = ?", (status, number))


async def open_ticket(gateway: Gateway, mid: str = "<first@client.example.com>") -> None:
    await send_message(gateway, fixture("new-request.eml", mid=mid))


async def test_new_request_opens_a_ticket(config: Config, gateway: Gateway) -> None:
    await open_ticket(gateway)
    await send_message(
        gateway, make_message(subject="Invoice question"), recipients=("billing@example.org",)
    )
    listed = {t["number"]: t for t in tickets(config)}
    assert set(listed) == {1, 2}
    first = listed[1]
    assert first["status"] == "new"
    assert first["subject"] == "Invoice export fails"
    assert first["requester"] == "alice@client.example.com"
    assert first["unit"] == "support"
    assert first["message_count"] == 2  # the request and our acknowledgement
    assert listed[2]["unit"] == "billing"
    shown = ticket(config, 1)
    message, ack = shown["messages"]
    assert message["direction"] == "in" and message["kind"] == "client"
    assert ack["direction"] == "out" and ack["kind"] == "auto-reply"
    assert "error 500" in message["text"]
    assert message["message_id"] == "<first@client.example.com>"
    created = rows(config, "SELECT actor, action FROM events WHERE ticket = 1")
    assert [(r["actor"], r["action"]) for r in created] == [
        ("alice@client.example.com", "ticket.created"),
        # "error 500" in the first lines: a server error is urgent (issue 12, urgency.py).
        ("alice@client.example.com", "ticket.urgent"),
        ("alice@client.example.com", "commitment.set"),
        ("gateway", "mail.queued"),
    ]


async def test_reply_by_token(config: Config, gateway: Gateway) -> None:
    await open_ticket(gateway)
    secret = gateway.pipeline.token_secret
    # Even a different sender with no threading headers joins by the signed token...
    await send_message(
        gateway,
        make_message(subject="hello", sender="carol@client.example.com"),
        recipients=(f"support+{make_token(secret, 1)}@example.org",),
    )
    assert len(received(config, 1)) == 2
    # ...while a forged mac is accepted for the mailbox but threads nothing.
    await send_message(
        gateway,
        make_message(subject="forged", sender="mallory@other.example.net"),
        recipients=("support+t1-aaaaaaaaaa@example.org",),
    )
    assert len(received(config, 1)) == 2
    assert [t["number"] for t in tickets(config)] == [2, 1]


@pytest.mark.parametrize(
    "header",
    [
        "In-Reply-To: <first@client.example.com>",
        "References: <unknown@elsewhere.example.net> <first@client.example.com>",
    ],
    ids=["in-reply-to", "references"],
)
async def test_reply_by_threading_headers(config: Config, gateway: Gateway, header: str) -> None:
    await open_ticket(gateway)
    await send_message(
        gateway, fixture("gmail-reply.eml", threading=header, subject="changed subject")
    )
    [only] = tickets(config)
    assert len(received(config, only["number"])) == 2


async def test_subject_tag_from_participant_and_from_stranger(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    await send_message(gateway, make_message(subject="Re: [#1] Invoice export fails"))
    assert len(received(config, 1)) == 2
    # A stranger quoting the tag opens a ticket of their own and learns nothing of #1.
    await send_message(
        gateway,
        make_message(subject="Re: [#1] Invoice export fails", sender="eve@other.example.net"),
        sender="eve@other.example.net",
    )
    assert len(received(config, 1)) == 2
    stranger = ticket(config, 2)
    assert stranger["requester"] == "eve@other.example.net"


async def test_custom_tag_format(make_config: Any, start_gateway: Any) -> None:
    config = make_config(extra='[tickets]\ntag = "(Ticket {number})"')
    gateway = await start_gateway(config)
    await open_ticket(gateway)
    await send_message(gateway, make_message(subject="Re: (Ticket 1) Invoice export fails"))
    await send_message(gateway, make_message(subject="Re: [#1] old style"))
    assert len(received(config, 1)) == 2
    assert len(tickets(config)) == 2


async def test_mail_to_closed_ticket_opens_a_linked_follow_up(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    set_status(config, 1, "closed")
    await send_message(
        gateway, fixture("gmail-reply.eml", threading="In-Reply-To: <first@client.example.com>")
    )
    assert len(received(config, 1)) == 1
    follow_up = ticket(config, 2)
    assert follow_up["follows"] == 1
    assert follow_up["status"] == "new"


async def test_client_reply_reopens_pending_and_solved(config: Config, gateway: Gateway) -> None:
    await open_ticket(gateway)
    for status in ("pending", "solved"):
        set_status(config, 1, status)
        await send_message(gateway, make_message(subject="Re: [#1] still broken"))
        assert ticket(config, 1)["status"] == "open"


async def test_duplicate_delivery_is_stored_but_filed_once(
    config: Config, gateway: Gateway
) -> None:
    message = fixture("new-request.eml", mid="<dup@client.example.com>")
    await send_message(gateway, message)
    await send_message(gateway, message)
    copies = [m for m in stored_messages(config) if m["message_id"] == "<dup@client.example.com>"]
    assert len(copies) == 2
    [only] = tickets(config)
    assert len(received(config, only["number"])) == 1
    newest = copies[0]
    assert newest["ticket"] is None and newest["duplicate_of"] == copies[1]["id"]
    # Same Message-ID, other bytes: not a retry but another message. Reusing an ID joins
    # nothing (a forged Message-ID must not hijack a ticket): it opens its own.
    await send_message(
        gateway, fixture("new-request.eml", mid="<dup@client.example.com>", subject="x")
    )
    assert [(t["number"], len(received(config, t["number"]))) for t in tickets(config)] == [
        (2, 1),
        (1, 1),
    ]


async def test_auto_reply_without_ticket_opens_none(config: Config, gateway: Gateway) -> None:
    await send_message(gateway, fixture("auto-reply.eml", mid="<ooo@client.example.com>"))
    assert tickets(config) == []
    stored = message_by_id(config, "<ooo@client.example.com>")
    assert stored["ticket"] is None
    assert stored["kind"] == "auto-reply"
    assert "auto-submitted:auto-replied" in stored["reasons"]


async def test_auto_reply_joins_its_ticket_without_reopening(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    set_status(config, 1, "solved")
    [ack] = rows(config, "SELECT message_id FROM outbox WHERE kind = 'acknowledgement'")
    # An auto-reply cites our acknowledgement: that, not the client's own Message-ID nor
    # the tag (anyone can write those), makes it an event on the ticket.
    for threading in (
        f"In-Reply-To: {ack['message_id']}",
        "In-Reply-To: <first@client.example.com>",
    ):
        await send_message(
            gateway,
            fixture(
                "auto-reply.eml",
                threading=threading,
                mid=f"<ooo{len(threading)}@client.example.com>",
                subject="Out of office: [#1] Invoice export fails",
            ),
        )
    shown = ticket(config, 1)
    assert shown["status"] == "solved"
    assert [m["kind"] for m in received(config, 1)] == ["client", "auto-reply"]
    assert len(tickets(config)) == 1


async def test_null_sender_mail_is_an_auto_reply(config: Config, gateway: Gateway) -> None:
    sent = await send_message(gateway, make_message(message_id="<null@client.example.com>"), "")
    assert sent.code == 250
    assert tickets(config) == []
    assert message_by_id(config, "<null@client.example.com>")["kind"] == "auto-reply"


async def test_bounce_of_our_own_mail_joins_the_ticket(config: Config, gateway: Gateway) -> None:
    await open_ticket(gateway)
    # Our acknowledgement of ticket 1, as the outbox will store it.
    ack_id = "<t1.ack@support.example.org>"

    def store_ack(conn: Any) -> int:
        return store.insert_message(
            conn,
            StoredMessage(
                queue_id="out-1",
                received_at="2026-11-27T10:00:01.000000+00:00",
                mail_from="",
                rcpt_to=("alice@client.example.com",),
                peer="",
                helo="",
                raw=b"Subject: [#1] Invoice export fails\r\n\r\nack\r\n",
                sha256="0" * 64,
                message_id=ack_id,
                from_header="support@example.org",
                subject="[#1] Invoice export fails",
                date_header=None,
                malformed=None,
                defects=(),
                direction="out",
            ),
            Filing(1, "auto-reply", "new"),
        )

    await gateway.writer.write(store_ack)
    sent = await send_message(gateway, fixture("dsn-our-mail.eml", original=ack_id), "")
    assert sent.code == 250
    shown = ticket(config, 1)
    assert shown["status"] == "new"
    assert [m["kind"] for m in received(config, 1)][-1] == "bounce"
    [marked] = rows(config, "SELECT address, ticket, status FROM undeliverable")
    assert (marked["address"], marked["ticket"], marked["status"]) == (
        "alice@client.example.com",
        1,
        "5.1.1",
    )
    assert len(tickets(config)) == 1


async def test_forged_bounce_marks_nobody_undeliverable(config: Config, gateway: Gateway) -> None:
    await open_ticket(gateway)
    # A report naming a client's message (not one we sent) is no event on her ticket (a
    # client's Message-ID is anyone's to cite), and cannot mark anyone undeliverable.
    await send_message(gateway, fixture("dsn-our-mail.eml", original="<first@client.example.com>"))
    assert [m["kind"] for m in received(config, 1)] == ["client"]
    [bounce] = [m for m in stored_messages(config) if m["classification"] == "bounce"]
    assert bounce["ticket"] is None  # held: MAILER-DAEMON@mx.client.example.com is unknown
    assert rows(config, "SELECT * FROM undeliverable") == []


@pytest.mark.parametrize(
    "header",
    ["X-Gateway-Loop: support.example.org", None],
    ids=["loop-header", "own-message-id"],
)
async def test_our_own_mail_coming_back_is_refused(
    config: Config, gateway: Gateway, header: str | None
) -> None:
    if header:
        message = make_message(headers=header + "\r\n")
    else:
        message = make_message(message_id="<t1.abc@support.example.org>")
    refused = (await send_message(gateway, message, check=False)).after_dot
    assert (refused.code, refused.message[:5]) == (554, "5.4.6")
    assert stored_messages(config) == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gmail-reply.eml", "It works again, thank you!"),
        ("outlook-reply.eml", "Still failing for the March invoices."),
        ("apple-reply.eml", "Confirmed, the export finished."),
    ],
)
async def test_quoted_history_is_stripped_and_raw_kept(
    config: Config, gateway: Gateway, name: str, expected: str
) -> None:
    await open_ticket(gateway)
    raw = fixture(name, threading="In-Reply-To: <first@client.example.com>")
    await send_message(gateway, raw)
    reply = received(config, 1)[1]
    assert reply["text"].strip().startswith(expected)
    assert "restarted the export service" not in reply["text"]
    assert "Sent from my iPhone" not in reply["text"]
    [stored] = rows(config, "SELECT raw FROM message_raw WHERE message = ?", (reply["id"],))
    assert bytes(stored["raw"]) == raw


async def test_html_only_mail_becomes_text(config: Config, gateway: Gateway) -> None:
    await send_message(gateway, fixture("html-only.eml"))
    text = received(config, 1)[0]["text"]
    assert "The dashboard is blank after login." in text
    assert "alert" not in text and "color: red" not in text and "<" not in text


async def test_unknown_charset_gives_replacement_characters(
    config: Config, gateway: Gateway
) -> None:
    await send_message(gateway, fixture("unknown-charset.eml"), sender="bob@client.example.com")
    text = received(config, 1)[0]["text"]
    assert "au lait" in text and "\ufffd" in text


async def test_encoded_word_subject_is_decoded(config: Config, gateway: Gateway) -> None:
    await send_message(gateway, fixture("encoded-subject.eml"), sender="juergen@client.example.com")
    only = tickets(config)[0]
    assert only["subject"] == "Überweisung fehlgeschlagen à vérifier"
    assert only["requester"] == "juergen@client.example.com"
    assert "Müller" in received(config, 1)[0]["from"]


async def test_attachment_with_traversal_name_is_content_addressed(
    config: Config, gateway: Gateway, tmp_path: Path
) -> None:
    before = set(tmp_path.rglob("*"))
    await send_message(gateway, fixture("traversal-attachment.eml"))
    [attachment] = received(config, 1)[0]["attachments"]
    assert "/" not in attachment["name"] and ".." not in attachment["name"]
    assert attachment["name"].endswith("passwd")
    data = b"root:x:0:0:root:/root:/bin/bash\n"
    assert attachment["size"] == len(data)
    assert attachment["sha256"] == hashlib.sha256(data).hexdigest()
    [blob] = rows(config, "SELECT data FROM blobs WHERE sha256 = ?", (attachment["sha256"],))
    assert bytes(blob["data"]) == data
    # Nothing but the database grew in the state folder: no file was named after the mail.
    created = {p for p in set(tmp_path.rglob("*")) - before if "gateway.db" not in p.name}
    assert created == set()


async def test_tickets_cli_contract(config: Config, gateway: Gateway) -> None:
    await open_ticket(gateway)
    await send_message(
        gateway, make_message(subject="Invoice question"), recipients=("billing@example.org",)
    )
    await send_message(gateway, fixture("auto-reply.eml", mid="<ooo@client.example.com>"))
    set_status(config, 2, "open")

    result = await asyncio.to_thread(run_cli, config, "tickets", "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert {t["number"] for t in listed} == {1, 2}
    for key in (
        "number",
        "status",
        "subject",
        "requester",
        "unit",
        "message_count",
        "created_at",
        "updated_at",
    ):
        assert all(key in t for t in listed)

    only_open = json.loads(
        (
            await asyncio.to_thread(
                run_cli, config, "tickets", "list", "--status", "open", "--json"
            )
        ).stdout
    )
    assert [t["number"] for t in only_open] == [2]
    billing = json.loads(
        (
            await asyncio.to_thread(
                run_cli, config, "tickets", "list", "--unit", "billing", "--json"
            )
        ).stdout
    )
    assert [t["number"] for t in billing] == [2]

    shown = json.loads(
        (await asyncio.to_thread(run_cli, config, "tickets", "show", "1", "--json")).stdout
    )
    assert shown["number"] == 1
    message = shown["messages"][0]
    for key in (
        "id",
        "message_id",
        "direction",
        "kind",
        "from",
        "date",
        "subject",
        "text",
        "attachments",
    ):
        assert key in message
    text = await asyncio.to_thread(run_cli, config, "tickets", "show", "#1")
    assert text.returncode == 0 and "[#1] Invoice export fails" in text.stdout
    table = await asyncio.to_thread(run_cli, config, "tickets", "list")
    assert "#2" in table.stdout and "billing" in table.stdout
    missing = await asyncio.to_thread(run_cli, config, "tickets", "show", "99")
    assert missing.returncode == 1 and "no ticket #99" in missing.stderr

    messages = json.loads(
        (await asyncio.to_thread(run_cli, config, "messages", "list", "--json")).stdout
    )
    by_mid = {m["message_id"]: m for m in messages}
    assert by_mid["<first@client.example.com>"]["ticket"] == 1
    assert by_mid["<first@client.example.com>"]["kind"] == "client"
    assert by_mid["<ooo@client.example.com>"]["ticket"] is None
    assert by_mid["<ooo@client.example.com>"]["kind"] == "auto-reply"
