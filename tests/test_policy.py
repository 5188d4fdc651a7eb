"""The sender policy through real SMTP: every rule of the table, in order, and the quarantine.

Tests start from an empty sender list (seed=False) and authorise exactly what they need.
"""

from __future__ import annotations

import base64
import json
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway import store
from gateway.actions import quarantine
from gateway.app import Gateway
from gateway.config import Config

from .conftest import Reply, cli, make_message, rows, send_message, stored_messages

NOW = "2026-11-27T00:00:00.000000+00:00"


def authorise(
    config: Config, *addresses: str, org: str = "Acme", domain: str = "acme.example"
) -> None:
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        found = store.find_organisation(conn, org)
        org_id = (
            found.id
            if found
            else store.add_organisation(
                conn, name=org, domains=[domain], unit=None, account_manager=None, now=NOW
            )
        )
        for address in addresses:
            store.upsert_sender(conn, address=address, organisation=org_id, name=None, now=NOW)


def block(config: Config, address: str) -> None:
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        store.block_sender(conn, address, now=NOW)


# Tests start from an empty sender list; this is the one they authorise most.
ALICE = "alice@acme.example"


async def refused(gateway: Gateway, message: bytes, sender: str = ALICE) -> Reply:
    """The reply to the final dot of a message the gateway must refuse."""
    return (await send_message(gateway, message, sender, check=False)).after_dot


def held(config: Config) -> list[dict[str, Any]]:
    with closing(store.connect(config.database_path)) as conn:
        return store.list_quarantine(conn)


def ack_id(config: Config) -> str:
    """The Message-ID of our (first) acknowledgement: what a real auto-reply cites."""
    found = rows(config, "SELECT message_id FROM outbox WHERE kind = 'acknowledgement'")
    return str(found[0]["message_id"])


def ticket_numbers(config: Config) -> list[int]:
    return [int(r["number"]) for r in rows(config, "SELECT number FROM tickets ORDER BY number")]


def acme(subject: str = "Please help", sender: str = "alice@acme.example", **kw: Any) -> bytes:
    return make_message(subject=subject, sender=sender, **kw)


@pytest.fixture
async def gateway(config: Config, start_gateway: Any) -> Gateway:
    gw: Gateway = await start_gateway(config, seed=False)
    return gw


async def test_unknown_sender_is_quarantined_by_default(config: Config, gateway: Gateway) -> None:
    await send_message(gateway, acme(message_id="<q1@acme.example>"), ALICE)
    [entry] = held(config)
    assert entry["reasons"] == ["unknown-sender"]
    assert entry["sender"] == "alice@acme.example"
    assert entry["recipients"] == ["support@example.org"]
    assert entry["message_id"] == "<q1@acme.example>"
    for key in ("id", "subject", "received_at"):
        assert key in entry
    assert ticket_numbers(config) == []
    [stored] = stored_messages(config)
    assert stored["quarantine"] == entry["id"] and stored["ticket"] is None
    [event] = rows(config, "SELECT action, actor FROM events")
    assert (event["action"], event["actor"]) == ("quarantine.held", "alice@acme.example")


async def test_unknown_sender_rejected_when_configured(
    make_config: Any, start_gateway: Any
) -> None:
    config = make_config(extra='[policy]\nunknown_sender = "reject"\ncontact = "help@example.org"')
    gateway = await start_gateway(config, seed=False)
    error = await refused(gateway, acme())
    assert error.code == 550
    assert error.message.startswith("5.7.1")
    assert "not" in error.message or "only accepts" in error.message
    assert "help@example.org" in error.message
    assert stored_messages(config) == []
    assert rows(config, "SELECT * FROM events") == []


async def test_authorised_sender_opens_a_ticket_of_its_organisation(
    config: Config, gateway: Gateway
) -> None:
    authorise(config, "alice@acme.example")
    await send_message(gateway, acme(), ALICE)
    [ticket] = rows(
        config,
        "SELECT t.number, o.name FROM tickets t JOIN organisations o ON o.id = t.organisation",
    )
    assert ticket["name"] == "Acme"
    assert held(config) == []


async def test_changes_take_effect_without_restart(config: Config, gateway: Gateway) -> None:
    await send_message(gateway, acme(subject="before"), ALICE)
    authorise(config, "alice@acme.example")
    await send_message(gateway, acme(subject="after"), ALICE)
    assert len(held(config)) == 1 and ticket_numbers(config) == [1]


async def test_organisation_domain_alone_authorises_nobody(
    config: Config, gateway: Gateway
) -> None:
    authorise(config, "alice@acme.example")
    await send_message(gateway, acme(sender="bob@acme.example"), sender="bob@acme.example")
    [entry] = held(config)
    assert entry["reasons"] == ["unknown-sender"]


async def test_explicit_domain_grant_authorises_the_domain(
    config: Config, gateway: Gateway
) -> None:
    authorise(config, "@acme.example")
    await send_message(gateway, acme(sender="bob@acme.example"), sender="bob@acme.example")
    assert ticket_numbers(config) == [1]


async def test_blocked_sender_is_refused_even_if_authorised(
    config: Config, gateway: Gateway
) -> None:
    authorise(config, "@acme.example")
    block(config, "alice@acme.example")
    error = await refused(gateway, acme())
    assert (error.code, error.message[:5]) == (550, "5.7.1")
    assert stored_messages(config) == []


async def test_staff_mail_is_filed_only_when_authenticated(
    make_config: Any, start_gateway: Any
) -> None:
    config = make_config(
        extra='[staff]\naddresses = ["Dana@Example.org"]\ndomains = ["staff.example.org"]\n'
        '[policy]\ntrusted_authserv_ids = ["mx.example.org"]'
    )
    gateway = await start_gateway(config, seed=False)
    for sender in ("dana@example.org", "eve@staff.example.org"):
        domain = sender.partition("@")[2]
        verified = f"Authentication-Results: mx.example.org; dkim=pass header.d={domain}\r\n"
        await send_message(gateway, acme(sender=sender, headers=verified), sender=sender)
        # [staff] require_authentication (the default): a staff From without proof.
        await send_message(gateway, acme(sender=sender), sender=sender)
    assert ticket_numbers(config) == [1, 2]
    assert [e["reasons"][0] for e in held(config)] == ["unauthenticated", "unauthenticated"]


@pytest.mark.parametrize(
    "from_header",
    [None, "a@acme.example, b@acme.example", "Undisclosed recipients: ;", "not an address"],
    ids=["missing", "several", "group", "unparseable"],
)
async def test_malformed_from_is_quarantined(
    config: Config, gateway: Gateway, from_header: str | None
) -> None:
    authorise(config, "@acme.example")
    headers = "To: support@example.org\r\nSubject: x\r\nMessage-ID: <m@acme.example>\r\n"
    if from_header is not None:
        headers = f"From: {from_header}\r\n" + headers
    await send_message(gateway, (headers + "\r\nbody\r\n").encode(), ALICE)
    [entry] = held(config)
    assert entry["reasons"][0] == "malformed-from"


async def test_unparseable_mail_is_quarantined_malformed(config: Config, gateway: Gateway) -> None:
    authorise(config, "@acme.example")
    head = b"From: alice@acme.example\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    parts = [head]
    for i in range(100):
        parts.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
    parts.append(b"Content-Type: text/plain\r\n\r\nbottom\r\n")
    await send_message(gateway, b"".join(parts), ALICE)
    [entry] = held(config)
    assert entry["reasons"][0] == "malformed"


async def test_lookalike_of_an_authorised_address(config: Config, gateway: Gateway) -> None:
    authorise(config, "support-lead@acme.example")
    # U+043E CYRILLIC SMALL LETTER O in the local part, then in the domain.
    for forged in ("supp\u043ert-lead@acme.example", "support-lead@acm\u0435.example"):
        message = acme(sender="x@x.example").replace(b"x@x.example", forged.encode())
        await send_message(gateway, message, sender="bounce@x.example")
    reasons = [e["reasons"][0] for e in held(config)]
    assert reasons == ["lookalike", "lookalike"]
    assert ticket_numbers(config) == []


async def test_lookalike_of_our_own_address(config: Config, gateway: Gateway) -> None:
    message = acme().replace(b"alice@acme.example", "supp\u043ert@example.org".encode())
    await send_message(gateway, message, sender="x@x.example")
    assert held(config)[0]["reasons"][0] == "lookalike"


async def test_trusted_dmarc_fail_makes_an_authorised_address_forged(
    make_config: Any, start_gateway: Any
) -> None:
    config = make_config(extra='[policy]\ntrusted_authserv_ids = ["mx.example.org"]')
    gateway = await start_gateway(config, seed=False)
    authorise(config, "alice@acme.example")
    results = (
        "Authentication-Results: mx.example.org; dkim=none; spf=fail "
        "smtp.mailfrom=acme.example; dmarc=fail header.from=acme.example\r\n"
    )
    await send_message(gateway, acme(headers=results), ALICE)
    [entry] = held(config)
    assert entry["reasons"][0] == "unauthenticated"
    assert ticket_numbers(config) == []


async def test_forged_results_with_our_own_authserv_id_are_ignored(
    make_config: Any, start_gateway: Any
) -> None:
    # require_authentication: only an aligned pass from a trusted party lets Alice in. A
    # sender writing our own authserv-id (or an untrusted one) into the mail proves nothing.
    config = make_config(
        extra='[policy]\nrequire_authentication = true\ntrusted_authserv_ids = ["mx.example.org"]'
    )
    gateway = await start_gateway(config, seed=False)
    authorise(config, "alice@acme.example")
    for authserv_id in ("support.example.org", "mx.evil.example.net"):
        forged = (
            f"Authentication-Results: {authserv_id}; dkim=pass header.d=acme.example; "
            "spf=pass smtp.mailfrom=acme.example; dmarc=pass header.from=acme.example\r\n"
        )
        await send_message(gateway, acme(headers=forged), ALICE)
    assert [e["reasons"][0] for e in held(config)] == ["unauthenticated", "unauthenticated"]
    genuine = (
        "Authentication-Results: mx.example.org; dkim=pass header.d=acme.example; "
        "dmarc=pass header.from=acme.example\r\n"
    )
    await send_message(gateway, acme(headers=genuine), ALICE)
    assert ticket_numbers(config) == [1]


async def test_auto_reply_for_a_known_ticket_is_filed_as_an_event(
    config: Config, gateway: Gateway
) -> None:
    authorise(config, "alice@acme.example")
    await send_message(gateway, acme(message_id="<req@acme.example>"), ALICE)
    ooo = make_message(
        sender="robot@elsewhere.example.net",
        headers=f"Auto-Submitted: auto-replied\r\nIn-Reply-To: {ack_id(config)}\r\n",
    )
    await send_message(gateway, ooo, sender="robot@elsewhere.example.net")
    kinds = [
        r["kind"]
        for r in rows(config, "SELECT kind FROM messages WHERE ticket = 1 AND direction = 'in'")
    ]
    assert kinds == ["client", "auto-reply"]
    # The same auto-reply about nothing we sent is just an unknown sender, even when it
    # cites the client's own Message-ID.
    stray = make_message(
        sender="robot@elsewhere.example.net",
        headers="Auto-Submitted: auto-replied\r\nIn-Reply-To: <req@acme.example>\r\n",
    )
    await send_message(gateway, stray, sender="robot@elsewhere.example.net")
    assert [e["reasons"][0] for e in held(config)] == ["unknown-sender"]


async def test_ticket_trick_verification_mail_gets_nowhere(
    config: Config, gateway: Gateway
) -> None:
    # RELIABILITY 24: a SaaS sends its sign-up verification to our support address.
    verification = make_message(
        subject="Verify your email address",
        sender="noreply@saas.example.com",
        body="Click https://saas.example.com/verify?token=secret to join the workspace.\r\n",
    )
    await send_message(gateway, verification, sender="bounces@saas.example.com")
    [entry] = held(config)
    assert entry["reasons"] == ["unknown-sender"]
    assert ticket_numbers(config) == []
    assert rows(config, "SELECT * FROM messages WHERE direction = 'out'") == []


async def test_authorised_colleague_may_write_by_tag(config: Config, gateway: Gateway) -> None:
    authorise(config, "alice@acme.example", "bob@acme.example")
    await send_message(gateway, acme(), ALICE)
    await send_message(
        gateway,
        acme(subject="Re: [#1] Please help", sender="bob@acme.example"),
        sender="bob@acme.example",
    )
    assert ticket_numbers(config) == [1]
    assert len(rows(config, "SELECT id FROM messages WHERE ticket = 1 AND direction = 'in'")) == 2


async def test_quarantine_cli_release_discard_block(config: Config, gateway: Gateway) -> None:
    for i in range(3):
        await send_message(
            gateway,
            acme(subject=f"held {i}", sender=f"user{i}@acme.example"),
            sender=f"user{i}@acme.example",
        )
    listed = json.loads((await cli(config, "quarantine", "list", "--json")).stdout)
    assert [e["subject"] for e in listed] == ["held 2", "held 1", "held 0"]
    ids = {e["subject"]: e["id"] for e in listed}

    shown = await cli(config, "quarantine", "show", str(ids["held 0"]))
    assert shown.returncode == 0 and "unknown-sender" in shown.stdout and "Hello," in shown.stdout

    released = await cli(config, "quarantine", "release", str(ids["held 0"]), "--reason", "ok")
    assert released.returncode == 0, released.stderr
    assert "ticket #1" in released.stdout
    [message] = rows(config, "SELECT kind, ticket FROM messages WHERE subject = 'held 0'")
    assert (message["kind"], message["ticket"]) == ("client", 1)
    again = await cli(config, "quarantine", "release", str(ids["held 0"]))
    assert again.returncode == 1 and "already released" in again.stderr

    # --authorise needs an organisation owning the sender's domain.
    orphan = await cli(config, "quarantine", "release", str(ids["held 1"]), "--authorise")
    assert orphan.returncode == 1 and "no organisation has the domain acme.example" in orphan.stderr
    authorise(config, "someone@acme.example")
    ok = await cli(config, "quarantine", "release", str(ids["held 1"]), "--authorise")
    assert ok.returncode == 0, ok.stderr
    assert store_sender(config, "user1@acme.example") is not None
    await send_message(gateway, acme(sender="user1@acme.example"), sender="user1@acme.example")
    assert len(held(config)) == 1  # user1 is authorised now

    blocked = await cli(config, "quarantine", "block", str(ids["held 2"]), "--reason", "spam")
    assert blocked.returncode == 0 and "blocked user2@acme.example" in blocked.stdout
    assert held(config) == []
    error = await refused(gateway, acme(sender="user2@acme.example"), "user2@acme.example")
    assert error.code == 550
    missing = await cli(config, "quarantine", "discard", "999")
    assert missing.returncode == 1 and "no quarantine entry 999" in missing.stderr

    actions = [r["action"] for r in rows(config, "SELECT action FROM events ORDER BY id")]
    for expected in (
        "quarantine.held",
        "quarantine.released",
        "sender.added",
        "sender.blocked",
        "quarantine.discarded",
        "ticket.created",
    ):
        assert expected in actions
    [release_event] = rows(
        config, "SELECT actor, detail FROM events WHERE action = 'quarantine.released' LIMIT 1"
    )
    assert release_event["actor"].startswith("cli:")
    assert json.loads(release_event["detail"])["reason"] == "ok"


def store_sender(config: Config, address: str) -> Any:
    with closing(store.connect(config.database_path)) as conn:
        return store.find_sender(conn, address)


async def test_held_mail_expires_with_an_audit_event(config: Config, gateway: Gateway) -> None:
    await send_message(gateway, acme(), ALICE)
    [entry] = held(config)

    def expire_later(conn: Any) -> list[int]:
        return quarantine.expire(conn, days=14, now=datetime.now(UTC) + timedelta(days=15))

    assert await gateway.writer.write(expire_later) == [entry["id"]]
    assert held(config) == []
    [event] = rows(config, "SELECT actor, action FROM events WHERE action = 'quarantine.expired'")
    assert event["actor"] == "gateway"


async def test_bounce_with_unusable_from_joins_its_ticket(config: Config, gateway: Gateway) -> None:
    # Many MTAs write "MAILER-DAEMON <>" or a bare "<MAILER-DAEMON>" as the From of their
    # bounces: the report, not the From, says what the mail is about (here: our
    # acknowledgement, by its Message-ID).
    authorise(config, "alice@acme.example")
    await send_message(gateway, acme(message_id="<req@acme.example>"), ALICE)
    bounce = (
        b"From: Mail Delivery Subsystem <MAILER-DAEMON>\r\n"
        b"To: support@example.org\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n"
        b"Auto-Submitted: auto-replied\r\n"
        b"In-Reply-To: " + ack_id(config).encode() + b"\r\n"
        b"\r\n"
        b"This is the mail system. Your message could not be delivered.\r\n"
    )
    code, text = (await send_message(gateway, bounce, sender="")).reply
    assert code == 250, text
    assert held(config) == []
    kinds = [
        r["kind"]
        for r in rows(config, "SELECT kind FROM messages WHERE ticket = 1 AND direction = 'in'")
    ]
    assert kinds[0] == "client" and kinds[1] in ("bounce", "auto-reply")


# --- our own DKIM check, with a stub DNS (never the network) -------------------------


class StubDns:
    """dkimpy-shaped DNS lookup: TXT records by name, or a temporary error; records asks."""

    def __init__(self, records: dict[bytes, bytes], error: BaseException | None = None) -> None:
        self.records = records
        self.error = error
        self.asked: list[bytes] = []

    def __call__(self, name: bytes, timeout: float) -> bytes | None:
        self.asked.append(name)
        if self.error is not None:
            raise self.error
        return self.records.get(name)


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, bytes]:
    """(private key PEM, the TXT record acme.example publishes for selector s1)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def signed(message: bytes, pem: bytes, *, length: bool = False) -> bytes:
    import dkim

    header = dkim.sign(
        message,
        b"s1",
        b"acme.example",
        pem,
        include_headers=[b"from", b"to", b"subject", b"message-id"],
        length=length,
    )
    assert isinstance(header, bytes)
    return header + message


DKIM_POLICY = "[policy]\nverify_dkim = true\nrequire_authentication = true"


async def dkim_gateway(
    make_config: Any, start_gateway: Any, dns: StubDns
) -> tuple[Config, Gateway]:
    config = make_config(extra=DKIM_POLICY)
    gateway = await start_gateway(config, seed=False, dnsfunc=dns)
    authorise(config, "alice@acme.example")
    return config, gateway


async def test_dkim_aligned_pass_files_and_acknowledges(
    make_config: Any, start_gateway: Any, dkim_key: tuple[bytes, bytes]
) -> None:
    # RELIABILITY 15.
    pem, record = dkim_key
    dns = StubDns({b"s1._domainkey.acme.example.": record})
    config, gateway = await dkim_gateway(make_config, start_gateway, dns)
    await send_message(gateway, signed(acme(), pem), ALICE)
    assert ticket_numbers(config) == [1]
    assert dns.asked == [b"s1._domainkey.acme.example."]
    assert rows(config, "SELECT kind FROM outbox")[0]["kind"] == "acknowledgement"


@pytest.mark.parametrize("how", ["unsigned", "tampered", "body-length-tag"])
async def test_dkim_failure_quarantines_an_authorised_address(
    make_config: Any, start_gateway: Any, dkim_key: tuple[bytes, bytes], how: str
) -> None:
    # RELIABILITY 16 and 23: no valid aligned signature, so Alice's address proves nothing.
    pem, record = dkim_key
    dns = StubDns({b"s1._domainkey.acme.example.": record})
    config, gateway = await dkim_gateway(make_config, start_gateway, dns)
    if how == "unsigned":
        message = acme()
    elif how == "tampered":
        message = signed(acme(), pem).replace(b"the printer is on fire", b"wire the money")
    else:
        message = signed(acme(), pem, length=True) + b"Appended after signing.\r\n"
    assert how == "unsigned" or b"DKIM-Signature" in message
    await send_message(gateway, message, ALICE)
    [entry] = held(config)
    assert entry["reasons"][0] == "unauthenticated"
    assert ticket_numbers(config) == [] and rows(config, "SELECT * FROM outbox") == []


async def test_dns_temporary_error_is_a_451_never_a_pass(
    make_config: Any, start_gateway: Any, dkim_key: tuple[bytes, bytes]
) -> None:
    # RELIABILITY 20.
    from gateway.authn import DnsTemporaryError

    pem, _ = dkim_key
    dns = StubDns({}, error=DnsTemporaryError("dns-timeout"))
    config, gateway = await dkim_gateway(make_config, start_gateway, dns)
    error = await refused(gateway, signed(acme(), pem))
    assert (error.code, error.message[:5]) == (451, "4.7.0")
    assert stored_messages(config) == []
