"""Issue 9, "who may speak as whom", through real SMTP: one test (or a few) per item.

1. staff actions by mail need proof; 2. self-declared "automatic" grants nothing;
3. identity is strict; 4. Message-IDs as keys; 5. counts that punish only the guilty;
8. Authentication-Results read to RFC 8601's grammar. Each test here failed on the code
before the fix (the attack it names worked).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import Config
from gateway.tickets import make_token

from .conftest import cli, make_message, rows, send_message, stored_messages
from .test_tickets import received, tickets

TRUSTED = "mx.example.org"
STAFF = (
    "[staff]\n"
    'addresses = ["dana@example.org"]\n'
    'domains = ["staff.example.org"]\n'
    'admins = ["admin@example.org"]\n'
)
POLICY = f'[policy]\ntrusted_authserv_ids = ["{TRUSTED}"]\n'


def passed(domain: str) -> str:
    """What the front MTA writes for mail it verified: an aligned DKIM pass."""
    return f"Authentication-Results: {TRUSTED}; dkim=pass header.d={domain}\r\n"


def held(config: Config) -> list[dict[str, Any]]:
    """Held quarantine entries, oldest first: (sender, reasons)."""
    found = rows(
        config,
        """
        SELECT m.sender, q.reasons FROM quarantine q JOIN messages m ON m.id = q.message
        WHERE q.status = 'held' ORDER BY q.id
        """,
    )
    return [{"sender": r["sender"], "reasons": json.loads(r["reasons"])} for r in found]


def outbox_kinds(config: Config) -> list[str]:
    return [r["kind"] for r in rows(config, "SELECT kind FROM outbox ORDER BY id")]


def ack_id(config: Config, ticket: int) -> str:
    [row] = rows(
        config,
        "SELECT message_id FROM outbox WHERE ticket = ? AND kind = 'acknowledgement'",
        (ticket,),
    )
    return str(row["message_id"])


def status_of(config: Config, ticket: int) -> str:
    [row] = rows(config, "SELECT status FROM tickets WHERE number = ?", (ticket,))
    return str(row["status"])


@pytest.fixture
def config(make_config: Any) -> Config:
    cfg: Config = make_config(extra=STAFF + POLICY)
    return cfg


async def open_ticket(gateway: Gateway, mid: str = "<req@client.example.com>") -> None:
    await send_message(gateway, make_message(subject="Printer", message_id=mid))


# --- 1. staff actions by mail need proof ---------------------------------------------


@pytest.mark.parametrize("sender", ["dana@example.org", "eve@staff.example.org"])
async def test_forged_staff_reply_is_held_and_never_reaches_the_client(
    config: Config, gateway: Gateway, sender: str
) -> None:
    await open_ticket(gateway)
    secret = gateway.pipeline.token_secret
    # The tag alone, then the real reply token, then our own Message-ID: none of them is
    # proof of who wrote the mail.
    forged = [
        (make_message(subject="Re: [#1] Printer", sender=sender), "support@example.org"),
        (
            make_message(subject="Re: [#1] Printer", sender=sender),
            f"support+{make_token(secret, 1)}@example.org",
        ),
        (
            make_message(
                subject="Re: [#1] Printer",
                sender=sender,
                headers=f"In-Reply-To: {ack_id(config, 1)}\r\n",
            ),
            "support@example.org",
        ),
    ]
    for message, to in forged:
        await send_message(gateway, message, sender=sender, recipients=(to,))
    assert [e["reasons"][0] for e in held(config)] == ["unauthenticated"] * 3
    assert "staff-reply" not in outbox_kinds(config)
    # The admins are told, under the security cap that junk cannot exhaust.
    assert outbox_kinds(config).count("security-notice") >= 1
    assert status_of(config, 1) == "new"
    assert [m["kind"] for m in received(config, 1)] == ["client"]


async def test_authenticated_staff_reply_threads_by_our_message_id_or_token_only(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    auth = passed("example.org")
    # Authenticated, but only the tag: the tag never threads staff mail. It opens a
    # ticket of its own (Dana its requester) and nothing is mailed to the client.
    await send_message(
        gateway,
        make_message(subject="Re: [#1] Printer", sender="dana@example.org", headers=auth),
        sender="dana@example.org",
    )
    assert [t["number"] for t in tickets(config)] == [2, 1]
    assert tickets(config)[0]["requester"] == "dana@example.org"
    # Authenticated and citing a client's Message-ID (not ours): the same.
    await send_message(
        gateway,
        make_message(
            subject="Printer",
            sender="dana@example.org",
            headers=auth + "In-Reply-To: <req@client.example.com>\r\n",
        ),
        sender="dana@example.org",
    )
    assert len(tickets(config)) == 3
    assert "staff-reply" not in outbox_kinds(config)
    # Authenticated and threading by our own Message-ID: a staff reply to the client.
    await send_message(
        gateway,
        make_message(
            subject="Re: [#1] Printer",
            sender="dana@example.org",
            headers=auth + f"In-Reply-To: {ack_id(config, 1)}\r\n",
            body="Please restart it.\r\n",
        ),
        sender="dana@example.org",
    )
    assert status_of(config, 1) == "pending"
    assert outbox_kinds(config).count("staff-reply") == 1
    # ...and by the reply token, from an address at a staff domain.
    await send_message(
        gateway,
        make_message(
            subject="x", sender="eve@staff.example.org", headers=passed("staff.example.org")
        ),
        sender="eve@staff.example.org",
        recipients=(f"support+{make_token(gateway.pipeline.token_secret, 1)}@example.org",),
    )
    assert outbox_kinds(config).count("staff-reply") == 2
    assert held(config) == []


async def test_release_of_held_staff_mail_files_a_note_never_mailed(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    forged = make_message(
        subject="Re: [#1] Printer",
        sender="dana@example.org",
        headers=f"In-Reply-To: {ack_id(config, 1)}\r\n",
        body="Send your password to me.\r\n",
    )
    await send_message(gateway, forged, sender="dana@example.org")
    [entry] = json.loads((await cli(config, "quarantine", "list", "--json")).stdout)
    released = await cli(config, "quarantine", "release", str(entry["id"]))
    assert released.returncode == 0, released.stderr
    assert [m["kind"] for m in received(config, 1)] == ["client", "note"]
    assert "staff-reply" not in outbox_kinds(config)
    assert status_of(config, 1) == "new"


async def test_check_config_warns_when_staff_authentication_is_off(make_config: Any) -> None:
    off = make_config(extra=STAFF + "require_authentication = false\n" + POLICY)
    assert off.staff.require_authentication is False
    result = await cli(off, "check-config")
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "staff.require_authentication" in result.stderr
    # On (the default) with nothing that could authenticate staff: warned too.
    nothing = make_config(extra=STAFF)
    assert nothing.staff.require_authentication is True
    result = await cli(nothing, "check-config")
    assert result.returncode == 0 and "WARNING" in result.stderr
    assert "trusted_authserv_ids" in result.stderr
    quiet = await cli(make_config(extra=STAFF + POLICY), "check-config")
    assert quiet.returncode == 0 and "WARNING" not in quiet.stderr


# --- 2. self-declared "automatic" grants nothing --------------------------------------

OOO = "Auto-Submitted: auto-replied\r\n"


async def test_automatic_markers_do_not_bypass_the_forged_from_rule(
    make_config: Any, start_gateway: Any
) -> None:
    config = make_config(extra=STAFF + POLICY + "require_authentication = true\n")
    gateway = await start_gateway(config)
    await send_message(
        gateway, make_message(subject="Printer", headers=passed("client.example.com"))
    )
    for sender in ("alice@client.example.com", "dana@example.org"):
        message = make_message(subject="Out of office Re: [#1] Printer", sender=sender, headers=OOO)
        await send_message(gateway, message, sender=sender)
    assert [(e["sender"], e["reasons"][0]) for e in held(config)] == [
        ("alice@client.example.com", "unauthenticated"),
        ("dana@example.org", "unauthenticated"),
    ]
    assert [m["kind"] for m in received(config, 1)] == ["client"]


async def test_automatic_mail_files_only_by_our_own_message_id(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    robot = "robot@elsewhere.example.net"
    # By the tag, or by the client's Message-ID: a stranger's say-so, not an event on #1.
    for headers in (OOO, OOO + "In-Reply-To: <req@client.example.com>\r\n"):
        message = make_message(
            subject="Out of office Re: [#1] Printer", sender=robot, headers=headers
        )
        await send_message(gateway, message, sender=robot)
    assert [m["kind"] for m in received(config, 1)] == ["client"]
    assert [e["reasons"][0] for e in held(config)] == ["unknown-sender", "unknown-sender"]
    # By our own Message-ID: an event on the ticket that reopens nothing and answers nothing.
    before = outbox_kinds(config)
    message = make_message(
        subject="Out of office", sender=robot, headers=OOO + f"In-Reply-To: {ack_id(config, 1)}\r\n"
    )
    await send_message(gateway, message)
    assert [m["kind"] for m in received(config, 1)] == ["client", "auto-reply"]
    assert status_of(config, 1) == "new"
    assert outbox_kinds(config) == before


async def test_bounce_with_unusable_from_about_our_mail_still_files(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    bounce = (
        b"From: MAILER-DAEMON <>\r\n"
        b"To: support@example.org\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n"
        b"Auto-Submitted: auto-replied\r\n"
        b"In-Reply-To: " + ack_id(config, 1).encode() + b"\r\n"
        b"\r\n"
        b"This is the mail system. Your message could not be delivered.\r\n"
    )
    code, text = (await send_message(gateway, bounce, sender="")).reply
    assert code == 250, text
    assert held(config) == []
    assert [m["kind"] for m in received(config, 1)][1] in ("bounce", "auto-reply")


# --- 3. identity is strict ------------------------------------------------------------


@pytest.mark.parametrize(
    "from_lines",
    [
        "From: alice@client.example.com <mallory@evil.example>",
        "From: <alice@client.example.com> mallory@evil.example",
        "From: alice@client.example.com;mallory@evil.example",
        "From: alice@client.example.com\r\nFrom: mallory@evil.example",
    ],
    ids=["addr-then-angle", "angle-then-addr", "semicolon", "two-from-fields"],
)
async def test_ambiguous_from_is_malformed_from(
    config: Config, gateway: Gateway, from_lines: str
) -> None:
    raw = (
        f"{from_lines}\r\nTo: support@example.org\r\nSubject: hi\r\n"
        "Message-ID: <amb@evil.example>\r\n\r\nbody\r\n"
    ).encode()
    await send_message(gateway, raw, sender="mallory@evil.example")
    assert [e["reasons"][0] for e in held(config)] == ["malformed-from"]
    assert tickets(config) == []


async def test_obsolete_but_unambiguous_from_is_still_an_identity(
    config: Config, gateway: Gateway
) -> None:
    # RFC 5322 section 4: "Dr. A. Example" (an unquoted "." in the phrase) must be
    # accepted; it names one address without doubt.
    raw = make_message().replace(b"From: Alice Example <", b"From: Dr. A. Example <")
    await send_message(gateway, raw)
    assert held(config) == [] and len(tickets(config)) == 1


@pytest.mark.parametrize("result", ["pass", "fail"])
async def test_dmarc_result_for_another_domain_is_forged(
    config: Config, gateway: Gateway, result: str
) -> None:
    # The verifier saw another From than we read: whatever it concluded, this From is
    # not the one it checked.
    headers = (
        f"Authentication-Results: {TRUSTED}; dkim=pass header.d=evil.example; "
        f"dmarc={result} header.from=evil.example\r\n"
    )
    await send_message(gateway, make_message(headers=headers))
    assert [e["reasons"][0] for e in held(config)] == ["unauthenticated"]
    assert tickets(config) == []


# --- 4. Message-IDs as keys -----------------------------------------------------------


async def test_citing_a_clients_message_id_does_not_join_her_ticket(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    eve = "eve@other.example.net"
    cite = make_message(
        subject="about that", sender=eve, headers="In-Reply-To: <req@client.example.com>\r\n"
    )
    await send_message(gateway, cite, sender=eve)
    assert [m["kind"] for m in received(config, 1)] == ["client"]
    assert tickets(config)[0]["requester"] == eve
    # A participant (Alice herself) still threads by her own Message-ID.
    await send_message(
        gateway,
        make_message(subject="more", headers="In-Reply-To: <req@client.example.com>\r\n"),
    )
    assert len(received(config, 1)) == 2


async def test_reused_message_id_is_kept_apart_flagged_and_captures_nothing(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    eve = "eve@other.example.net"
    reuse = make_message(subject="mine now", sender=eve, message_id="<req@client.example.com>")
    await send_message(gateway, reuse, sender=eve)
    [eves] = [t for t in tickets(config) if t["requester"] == eve]
    assert eves["number"] == 2
    [flagged] = [m for m in stored_messages(config) if m["from"].endswith(f"<{eve}>")]
    assert "reused-message-id" in flagged["reasons"] and flagged["ticket"] == 2
    [event] = rows(config, "SELECT detail FROM events WHERE action = 'message.flagged'")
    assert json.loads(event["detail"])["reason"] == "reused-message-id"
    # Alice's follow-up to her own first mail still reaches her ticket: the first row wins.
    await send_message(
        gateway,
        make_message(subject="follow-up", headers="In-Reply-To: <req@client.example.com>\r\n"),
    )
    assert len(received(config, 1)) == 2
    assert len(received(config, 2)) == 1


# --- 5. counts that punish only the guilty --------------------------------------------


async def test_forged_held_mail_does_not_mute_the_genuine_sender(
    make_config: Any, start_gateway: Any
) -> None:
    config = make_config(
        extra=POLICY + "require_authentication = true\nloop_threshold_per_hour = 3\n"
    )
    gateway = await start_gateway(config)
    for i in range(5):
        await send_message(gateway, make_message(subject=f"forged {i}"))
    assert [e["reasons"][0] for e in held(config)] == ["unauthenticated"] * 5
    genuine = make_message(subject="genuine", headers=passed("client.example.com"))
    await send_message(gateway, genuine)
    assert len(held(config)) == 5
    assert [t["subject"] for t in tickets(config)] == ["genuine"]
    # A real loop from a genuine sender is still caught: past the threshold it is held.
    for i in range(3):
        await send_message(
            gateway, make_message(subject=f"loop {i}", headers=passed("client.example.com"))
        )
    assert len(tickets(config)) == 3
    assert held(config)[-1]["reasons"][0] == "loop"


# --- 8. Authentication-Results to RFC 8601's grammar ----------------------------------


@pytest.mark.parametrize(
    "authserv_id",
    [f'"{TRUSTED}"', f"(c) {TRUSTED}", f"{TRUSTED}.", '"' + TRUSTED.replace(".", "\\.", 1) + '"'],
    ids=["quoted", "comment-first", "trailing-dot", "escaped"],
)
async def test_only_the_exact_authserv_id_token_is_trusted(
    make_config: Any, start_gateway: Any, authserv_id: str
) -> None:
    config = make_config(extra=POLICY + "require_authentication = true\n")
    gateway = await start_gateway(config)
    forged = (
        f"Authentication-Results: {authserv_id}; dkim=pass header.d=client.example.com; "
        "dmarc=pass header.from=client.example.com\r\n"
    )
    await send_message(gateway, make_message(headers=forged))
    assert [e["reasons"][0] for e in held(config)] == ["unauthenticated"]
    await send_message(gateway, make_message(headers=passed("client.example.com")))
    assert len(tickets(config)) == 1


async def test_staff_lookalike_with_automatic_markers_is_held_as_lookalike(
    config: Config, gateway: Gateway
) -> None:
    # A look-alike of a staff address with the automatic markers is held as a look-alike,
    # not filed as an event (the look-alike rule comes before the automatic one).
    await open_ticket(gateway)
    forged = "d\u0430na@example.org"  # CYRILLIC SMALL LETTER A
    message = make_message(
        subject="Out of office", headers=OOO + f"In-Reply-To: {ack_id(config, 1)}\r\n"
    ).replace(b"alice@client.example.com", forged.encode())
    sent = await send_message(gateway, message, sender="x@evil.example", check=False)
    assert sent.accepted, f"refused at SMTP time: {sent.reply.text}"
    assert [e["reasons"][0] for e in held(config)] == ["lookalike"]
    assert [m["kind"] for m in received(config, 1)] == ["client"]


def test_the_loop_count_reads_filed_mail_only_however_much_is_held(config: Config) -> None:
    # The count behind item 5 must not grow with what is held in the sender's name: a
    # looping or impersonated sender has most of its mail held, and a count that walked
    # every held row would make each of its messages cost more than the one before.
    from contextlib import closing

    from gateway import store
    from gateway.model import MessageKind, Via
    from gateway.store.messages import Filing, StoredMessage

    def message(n: int) -> StoredMessage:
        stamp = f"2026-12-04T10:{n // 60:02d}:{n % 60:02d}.000000+00:00"
        return StoredMessage(
            queue_id=f"q{n}", received_at=stamp, mail_from="alice@client.example.com",
            rcpt_to=("support@example.org",), peer="127.0.0.1:1", helo="client.example.com",
            raw=b"x", sha256=f"{n:064x}", message_id=f"<{n}@client.example.com>",
            from_header=None, subject=None, date_header=None, malformed=None, defects=(),
            sender="alice@client.example.com",
        )  # fmt: skip

    def steps(held: int) -> int:
        config.database_path.unlink(missing_ok=True)
        with closing(store.connect(config.database_path)) as conn:
            with store.write_transaction(conn):
                for n in range(3):
                    store.insert_message(
                        conn, message(n), Filing(None, MessageKind.CLIENT, Via.NEW)
                    )
                for n in range(3, 3 + held):
                    store.insert_message(conn, message(n), None)
            counted: list[int] = []
            conn.set_progress_handler(lambda: counted.append(1) and 0, 1)
            found = store.count_inbound_from(
                conn, "alice@client.example.com", since="2026-12-04T00:00:00", cap=5
            )
            conn.set_progress_handler(None, 0)
            assert found == 3
            return len(counted)

    assert steps(2000) <= 2 * steps(2)
