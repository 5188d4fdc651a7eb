"""A real Postfix in front of the gateway (issue 13 item 2), over LMTP and over SMTP.

Postfix is started privately on loopback (tests/postfix.py) with the recipes of README
"Behind Postfix", and relays to a real `gateway serve` process. Mail goes in with smtplib
to Postfix, as any client would send it; what Postfix did is read from its maillog and its
queue (`postqueue -j`), what the gateway stored from its database. Without Postfix (or
root) the module skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import asyncio
import os
import re
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from gateway.config import Config, load_config

from . import postfix as pf
from .conftest import DaemonProcess, make_message, rows, seed_senders, wait_for, write_config

ROOT = Path(__file__).resolve().parent.parent
PER_IP_CAP = 3  # the gateway's smtp.max_connections_per_ip here, and Postfix's concurrency
MAILS = 50
FORGED = "Authentication-Results: mx.example.org; dmarc=pass header.from=client.example.com"


def lacking(reason: str) -> NoReturn:
    """Skip for want of Postfix or root, except in CI (CI=true), where it must run."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


class Desk:
    """The gateway daemon with a private Postfix in front of it."""

    def __init__(self, gateway: DaemonProcess, config: Config, postfix: pf.Postfix) -> None:
        self.gateway = gateway
        self.config = config
        self.postfix = postfix


def front_settings(transport: str, port: int) -> tuple[dict[str, str], dict[str, str]]:
    """main.cf settings and lookup tables: the README's recipes for `transport`."""
    recipe = pf.LMTP_RECIPE if transport == "lmtp" else pf.SMTP_RECIPE
    table = pf.LMTP_TRANSPORT_TABLE if transport == "lmtp" else pf.SMTP_TRANSPORT_TABLE
    settings = {
        key: value.replace("{cap}", str(PER_IP_CAP))
        for key, value in {**recipe, **pf.RECIPIENT_RECIPE, **pf.STRIP_RECIPE}.items()
    }
    tables = {
        "transport": table.replace("{port}", str(port)),
        "relay_recipients": "support@example.org OK\nbilling@example.org OK\n",
        "header_checks": pf.STRIP_TABLE,
    }
    return settings, tables


@pytest.fixture(scope="module", params=["lmtp", "smtp"])
def desk(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Desk]:
    reason = pf.unavailable()
    if reason:
        lacking(reason)
    transport = request.param
    folder = tmp_path_factory.mktemp(f"postfix-{transport}")
    path = write_config(
        folder,
        protocol=transport,
        max_connections_per_ip=PER_IP_CAP,
        extra='\n[policy]\ntrusted_authserv_ids = ["mx.example.org"]\n',
    )
    config = load_config(path)
    seed_senders(config)
    gateway = DaemonProcess(path, folder / "gateway.log")
    front: pf.Postfix | None = None
    try:
        gateway.start()
        settings, tables = front_settings(transport, gateway.port)
        front = pf.Postfix(settings, tables).start()
        yield Desk(gateway, config, front)
    finally:
        if front is not None:
            front.stop()
        gateway.stop()


def send(port: int, messages: list[bytes], recipient: str = "support@example.org") -> None:
    """Hand `messages` to Postfix with smtplib on one connection; each must get its 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for message in messages:
            refused = client.sendmail("alice@client.example.com", [recipient], message)
            assert not refused, refused


def delivered(desk: Desk) -> list[str]:
    return [qid for qid, _, status in desk.postfix.statuses() if status == "sent"]


def stored_ids(desk: Desk) -> set[str]:
    found = rows(desk.config, "SELECT message_id FROM messages WHERE direction = 'in'")
    return {row["message_id"] for row in found}


def stored_raw(desk: Desk, message_id: str) -> bytes:
    found = rows(
        desk.config,
        "SELECT r.raw FROM messages m JOIN message_raw r ON r.message = m.id"
        " WHERE m.message_id = ?",
        (message_id,),
    )
    assert len(found) == 1, f"{message_id} stored {len(found)} times"
    return bytes(found[0]["raw"])


async def test_fifty_mails_through_postfix_none_lost(desk: Desk) -> None:
    """48 plain mails, one with a forged Authentication-Results for the authserv-id the
    gateway trusts, and one sent while the gateway's per-IP cap is taken: every one is
    stored, the forged field is gone, Postfix's queue is empty."""
    tag = f"{desk.config.smtp.protocol}.{os.getpid()}"
    ids = [f"<pf{i}.{tag}@client.example.com>" for i in range(MAILS)]
    plain = [make_message(subject=f"Relayed {i}", message_id=ids[i]) for i in range(48)]
    forged = make_message(subject="Forged", message_id=ids[48], headers=FORGED + "\r\n")
    await asyncio.to_thread(send, desk.postfix.port, [*plain, forged])
    await wait_for(lambda: len(delivered(desk)) >= 49, timeout=20)
    # The concurrency recipe: Postfix never opened more than the cap, so nothing deferred.
    assert [s for s in desk.postfix.statuses() if s[2] != "sent"] == []

    # Every slot of 127.0.0.1 taken: Postfix's connection gets 421 and defers the mail.
    # Postfix keeps delivered-to connections open a while (its connection cache), so the
    # holders take the slots as those close.
    holders: list[socket.socket] = []

    def hold_all() -> bool:
        conn = socket.create_connection(("127.0.0.1", desk.gateway.port))
        if conn.recv(512).startswith(b"220"):
            holders.append(conn)
        else:
            conn.close()
        return len(holders) == PER_IP_CAP

    try:
        await wait_for(hold_all, timeout=15, interval=0.1)
        over = make_message(subject="Over the cap", message_id=ids[49])
        await asyncio.to_thread(send, desk.postfix.port, [over])
        await wait_for(
            lambda: any(status == "deferred" for _, _, status in desk.postfix.statuses()),
            timeout=20,
        )
        assert "Too many connections from your address" in desk.postfix.log_text()
        assert len(desk.postfix.queue()) == 1
    finally:
        for holder in holders:
            holder.close()

    def admitted() -> bool:
        # The gateway has seen the holders go once a new connection is greeted with 220.
        with socket.create_connection(("127.0.0.1", desk.gateway.port)) as probe:
            return probe.recv(512).startswith(b"220")

    await wait_for(admitted, timeout=10)
    await asyncio.to_thread(desk.postfix.flush)
    await wait_for(lambda: len(delivered(desk)) >= MAILS, timeout=20)

    assert set(ids) <= stored_ids(desk), set(ids) - stored_ids(desk)
    assert desk.postfix.queue() == []
    raw = stored_raw(desk, ids[48])
    assert b"Subject: Forged" in raw
    assert b"dmarc=pass" not in raw
    assert b"Authentication-Results" not in raw
    # It came through Postfix: its Received line is on every stored message.
    assert b"by mx.example.org (Postfix)" in stored_raw(desk, ids[0])


async def test_unknown_address_refused_by_postfix_at_rcpt(desk: Desk) -> None:
    """Recipient validation at the front: only the desk's mailboxes pass RCPT; a reply
    token's support+...@ address passes as support@ does (recipient_delimiter)."""

    def attempt(recipient: str) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", desk.postfix.port, timeout=30) as client:
            client.ehlo()
            client.mail("alice@client.example.com")
            return client.rcpt(recipient)

    code, text = await asyncio.to_thread(attempt, "nobody@example.org")
    assert code == 550, text
    assert b"5.1.1" in text and b"User unknown in relay recipient table" in text
    code, text = await asyncio.to_thread(attempt, "support+t12-abc@example.org")
    assert code == 250, text
    code, text = await asyncio.to_thread(attempt, "billing@example.org")
    assert code == 250, text


README_SECTION = re.compile(r"^## Behind Postfix\n(.*?)(?=^## )", re.S | re.M)


def test_readme_recipes_are_the_tested_ones() -> None:
    """Every `postconf -e` setting and table line the README's "Behind Postfix" gives is
    one these tests configure (placeholders filled as the README fills them)."""
    found = README_SECTION.search((ROOT / "README.md").read_text())
    assert found, 'README has no "## Behind Postfix" section'
    section = found.group(1)
    # Settings are the lines of its ```conf blocks; table lines are quoted in other blocks.
    blocks = re.findall(r"^```conf\n(.*?)^```", section, re.S | re.M)
    documented = [
        tuple(line.split(" = ", 1)) for block in blocks for line in block.splitlines() if line
    ]
    assert documented, "no settings found in the section"
    fill = {"{dir}": "/etc/postfix", "{cap}": "10", "{port}": "2525"}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    tested = {
        key: filled(value)
        for recipe in (pf.LMTP_RECIPE, pf.SMTP_RECIPE, pf.RECIPIENT_RECIPE, pf.STRIP_RECIPE)
        for key, value in recipe.items()
    }
    for key, value in documented:
        assert tested.get(key) == value, f"README sets {key} = {value}, tests: {tested.get(key)}"
    assert set(tested) <= {key for key, _ in documented}, "a tested recipe is not in README"
    for table in (pf.LMTP_TRANSPORT_TABLE, pf.SMTP_TRANSPORT_TABLE, pf.STRIP_TABLE):
        assert filled(table).strip() in section, f"README lacks the table line {table!r}"
