"""Issue 12 items 3 and 4 end to end: paging the person on call for urgent mail out of
hours, escalating an unacknowledged page, acknowledging it, the page's webhook, and what
the client is told. Real SMTP in, a real relay sink out (tests/relay.py), the scheduler
moved with `gateway scheduler run --now`.

The clock starts on Saturday 5 December 2026 at 22:00 in London (GMT, so UTC): the desk
(Mon-Fri 09:00-17:30) is closed and opens on Monday at 09:00. Sam is on the rota for the
night, Carol is the unit's secondary, Lena its lead. Client Ltd has out-of-hours cover,
Other Co has not.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import time
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway import store
from gateway.app import Gateway
from gateway.clock import FixedClock, iso
from gateway.config import Config
from gateway.tickets import make_token

from .conftest import make_message, rows, seed_senders, send_message, wait_for
from .relay import Relay
from .test_owners import outbox, run, run_json
from .test_security import passed

SATURDAY_NIGHT = datetime(2026, 12, 5, 22, 0, tzinfo=UTC)
ALICE = "alice@client.example.com"  # Client Ltd: covered out of hours
OSCAR = "oscar@other.example.net"  # Other Co: not covered
CLIENTS = {ALICE, OSCAR}
SAM, CAROL, LEAD = "sam@example.org", "carol@example.org", "lena@example.org"
ON_CALL = {SAM, CAROL, LEAD}
SITE_DOWN = "Hello,\r\n\r\nour web shop is down since 21:40, customers see a 503.\r\n"

SETUP = """
[staff]
addresses = ["dana@example.org"]
admins = ["admin@example.org"]

[policy]
trusted_authserv_ids = ["mx.example.org"]

[oncall]
ack_within = "15m"
{oncall}

[[unit]]
name = "support"
staff = ["bob@example.org", "carol@example.org", "sam@example.org"]
lead = "lena@example.org"
secondary = "carol@example.org"
holidays_country = ""

[delivery]
mode = "smtp"
relay_host = "127.0.0.1"
relay_port = {port}
starttls = false
timeout = 1
retry_after = 60
give_up_after = 3600
poll_interval = 0.05
"""


def add_shift(config: Config, address: str, start: datetime, end: datetime) -> None:
    """A rota entry for the unit (the rota CLI is another branch's: plain SQL here)."""
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        conn.execute(
            "INSERT INTO oncall_shifts (address, unit, starts_at, ends_at, source, created_by,"
            " created_at) VALUES (?, 'support', ?, ?, 'cli', 'test', ?)",
            (address, iso(start), iso(end), iso(start)),
        )


def cover(config: Config, organisation: str) -> None:
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        conn.execute("UPDATE organisations SET out_of_hours = 1 WHERE name = ?", (organisation,))


class Desk:
    def __init__(self, config: Config, gateway: Gateway, relay: Relay, clock: FixedClock):
        self.config, self.gateway, self.relay, self.clock = config, gateway, relay, clock

    def relayed(self) -> list[tuple[str, email.message.EmailMessage]]:
        found = []
        for m in self.relay.messages:
            parsed = email.message_from_bytes(m.data, policy=email.policy.default)
            assert isinstance(parsed, email.message.EmailMessage)
            found.extend((rcpt, parsed) for rcpt in m.rcpt_tos)
        return found

    def pages_relayed(self) -> list[str]:
        return [to for to, m in self.relayed() if str(m["Subject"]).startswith("PAGE")]

    def pages(self) -> list[tuple[int, str, str | None]]:
        return [
            (r["step"], r["address"], r["acknowledged_by"])
            for r in rows(self.config, "SELECT * FROM pages ORDER BY ticket, step")
        ]

    def at(self, minutes: int) -> list[dict[str, Any]]:
        """Move the clock to `minutes` past 22:00 and run one scheduler pass then: the
        page actions it took."""
        moment = SATURDAY_NIGHT + timedelta(minutes=minutes)
        set_clock(self.clock, moment)
        did = run_json(self.config, self.clock, "scheduler", "run", "--now", iso(moment))
        self.gateway.outbox.wake()
        return [a for a in did["actions"] if a["action"] == "page"]


async def start_desk(
    make_config: Any, start_gateway: Any, relay: Any, oncall: str = "", rota: bool = True
) -> Desk:
    sink: Relay = await relay(tls=False)
    config: Config = make_config(extra=SETUP.format(port=sink.port, oncall=oncall))
    seed_senders(config)
    cover(config, "Client Ltd")
    if rota:
        add_shift(
            config, SAM, SATURDAY_NIGHT - timedelta(hours=4), SATURDAY_NIGHT + timedelta(hours=11)
        )
    clock = FixedClock(SATURDAY_NIGHT)
    gateway: Gateway = await start_gateway(config, clock=clock)
    return Desk(config, gateway, sink, clock)


def set_clock(clock: FixedClock, moment: datetime) -> None:
    clock.advance((moment - clock.now()).total_seconds())


@pytest.fixture
async def desk(make_config: Any, start_gateway: Any, relay: Any) -> Desk:
    return await start_desk(make_config, start_gateway, relay)


async def page_reply(desk: Desk, sender: str, body: str) -> None:
    """`sender` answers the page they got (authenticated staff mail, threaded by the
    page's Message-ID, to the Reply-To it carries)."""
    [page] = [m for m in outbox(desk.config, "page") if m["to"] == sender]
    token = make_token(desk.gateway.pipeline.token_secret, 1)
    headers = passed("example.org") + f"In-Reply-To: {page['message_id']}\r\n"
    await send_message(
        desk.gateway,
        make_message(subject="Re: PAGE", sender=sender, headers=headers, body=body),
        sender=sender,
        recipients=(f"support+{token}@example.org",),
    )


def assert_nothing_reaches_a_client(desk: Desk) -> None:
    """No page, staff notice or on-call address ever goes to a client: every mail the
    relay got and every outbox row."""
    for to, message in desk.relayed():
        if to in CLIENTS:
            assert "PAGE" not in str(message["Subject"])
            assert message["Auto-Submitted"] == "auto-replied"  # the acknowledgement only
            text = message.as_string()
            assert not any(a in text for a in ON_CALL), text
    for row in rows(desk.config, "SELECT kind, rcpt_to FROM outbox"):
        if row["rcpt_to"] in CLIENTS:
            assert row["kind"] in ("acknowledgement", "staff-reply", "status-change"), row
        if row["kind"] in ("page", "page-webhook"):
            assert row["rcpt_to"] not in CLIENTS


def ack_context(desk: Desk, to: str) -> dict[str, Any]:
    [ack] = [m for m in outbox(desk.config, "acknowledgement") if m["to"] == to]
    context: dict[str, Any] = ack["spec"]["context"]
    return context


# --- the Saturday night ---------------------------------------------------------------------


async def test_site_down_pages_the_rota_then_the_secondary_then_stops_at_the_reply(
    desk: Desk,
) -> None:
    await send_message(desk.gateway, make_message(subject="Site down", body=SITE_DOWN))

    # At once: one page, to the person on the rota; the client hears someone is alerted.
    assert desk.pages() == [(0, SAM, None)]
    await wait_for(lambda: desk.pages_relayed() == [SAM] and ack_seen(desk, ALICE))
    context = ack_context(desk, ALICE)
    assert context["what_next"] == "on-call" and context["next_open"] == "Monday 09:00"
    [ack] = [m for to, m in desk.relayed() if to == ALICE]
    assert "on-call engineer has been alerted" in ack.get_body(("plain",)).get_content()
    [page] = [m for to, m in desk.relayed() if to == SAM and "PAGE" in str(m["Subject"])]
    text = page.get_body(("plain",)).get_content()
    assert "Client Ltd" in text and "subject:site-down" in text and "oncall ack 1" in text
    assert page["Auto-Submitted"] == "auto-generated"
    assert page["Message-ID"].endswith("@" + desk.config.smtp.hostname + ">")

    # Within ack_within nothing more; after it, the secondary, once.
    assert desk.at(10) == []
    [escalated] = desk.at(16)
    assert (escalated["step"], escalated["to"]) == (1, [CAROL])
    assert desk.at(17) == []
    await wait_for(lambda: desk.pages_relayed() == [SAM, CAROL])

    # Carol answers the page: acknowledged, filed as a note, never sent to the client.
    await page_reply(desk, CAROL, "On it, looking at the load balancer now.")
    assert [p[2] for p in desk.pages()] == [CAROL, CAROL]
    assert desk.at(40) == [] and desk.at(120) == []  # no lead, ever
    assert [r["action"] for r in oncall_events(desk)] == [
        "oncall.paged",
        "oncall.escalated",
        "oncall.acknowledged",
    ]
    [note] = rows(desk.config, "SELECT kind FROM messages WHERE sender = ?", (CAROL,))
    assert note["kind"] == "note"
    await desk.gateway.outbox.deliver_due()
    assert desk.pages_relayed() == [SAM, CAROL]
    assert_nothing_reaches_a_client(desk)


def ack_seen(desk: Desk, to: str) -> bool:
    return any(t == to for t, _ in desk.relayed())


def oncall_events(desk: Desk) -> list[Any]:
    return rows(
        desk.config,
        "SELECT action, actor, detail FROM events WHERE action LIKE 'oncall.%' ORDER BY id",
    )


async def test_without_cover_nobody_is_paged_and_the_client_hears_when_the_desk_opens(
    desk: Desk,
) -> None:
    await send_message(
        desk.gateway, make_message(subject="Site down", sender=OSCAR, body=SITE_DOWN)
    )
    await wait_for(lambda: ack_seen(desk, OSCAR))
    assert rows(desk.config, "SELECT priority FROM tickets")[0]["priority"] == "urgent"
    assert desk.pages() == [] and desk.at(30) == []
    context = ack_context(desk, OSCAR)
    assert (context["what_next"], context["next_open"]) == ("desk-opens", "Monday 09:00")
    [ack] = [m for to, m in desk.relayed() if to == OSCAR]
    assert "it opens Monday 09:00" in ack.get_body(("plain",)).get_content()
    assert desk.pages_relayed() == []
    assert_nothing_reaches_a_client(desk)


async def test_unacknowledged_pages_reach_the_lead_once(desk: Desk) -> None:
    await send_message(desk.gateway, make_message(subject="Site down", body=SITE_DOWN))
    assert [a["to"] for a in desk.at(15)] == [[CAROL]]
    assert desk.at(29) == []
    assert [a["to"] for a in desk.at(30)] == [[LEAD]]
    assert desk.at(60) == [] and desk.at(600) == []
    assert desk.pages() == [(0, SAM, None), (1, CAROL, None), (2, LEAD, None)]
    await wait_for(lambda: sorted(desk.pages_relayed()) == sorted([SAM, CAROL, LEAD]))
    assert_nothing_reaches_a_client(desk)


async def test_take_and_the_cli_acknowledge(desk: Desk) -> None:
    await send_message(desk.gateway, make_message(subject="Site down", body=SITE_DOWN))
    # #take by mail (authenticated, to the ticket's reply token) acknowledges.
    token = make_token(desk.gateway.pipeline.token_secret, 1)
    await send_message(
        desk.gateway,
        make_message(
            subject="Re: [#1] Site down",
            sender=SAM,
            headers=passed("example.org"),
            body="#take\r\n",
        ),
        sender=SAM,
        recipients=(f"support+{token}@example.org",),
    )
    assert desk.pages() == [(0, SAM, SAM)]
    assert desk.at(20) == []
    # A second urgent ticket, acknowledged from a shell.
    await send_message(
        desk.gateway, make_message(subject="Hacked", body="Our home page was defaced.\r\n")
    )
    code, out = run(desk.config, desk.clock, "oncall", "ack", "2")
    assert code == 0 and "acknowledged" in out
    [event] = [e for e in oncall_events(desk) if e["action"] == "oncall.acknowledged"][1:]
    assert event["actor"].startswith("cli:") and json.loads(event["detail"])["how"] == "cli"
    code, out = run(desk.config, desk.clock, "oncall", "ack", "2")
    assert code == 0 and "no page waiting" in out
    assert run(desk.config, desk.clock, "oncall", "ack", "99")[0] == 1
    assert desk.at(40) == []


async def test_nobody_on_the_rota_pages_the_secondary_then_the_lead(
    make_config: Any, start_gateway: Any, relay: Any
) -> None:
    desk = await start_desk(make_config, start_gateway, relay, rota=False)
    await send_message(desk.gateway, make_message(subject="Site down", body=SITE_DOWN))
    assert desk.pages() == [(0, CAROL, None)]
    # Step 1 would page Carol again: skipped (audited), the lead is next.
    assert [(a["step"], a["to"]) for a in desk.at(15)] == [(2, [LEAD])]
    assert desk.pages() == [(0, CAROL, None), (1, "", None), (2, LEAD, None)]
    withheld = rows(desk.config, "SELECT detail FROM events WHERE action = 'mail.withheld'")
    assert any('"kind": "page"' in r["detail"] for r in withheld)


async def test_in_business_hours_urgent_mail_pages_nobody(
    make_config: Any, start_gateway: Any, relay: Any
) -> None:
    desk = await start_desk(make_config, start_gateway, relay)
    set_clock(desk.clock, datetime(2026, 12, 7, 10, 0, tzinfo=UTC))  # Monday 10:00
    add_shift(desk.config, SAM, desk.clock.now(), desk.clock.now() + timedelta(hours=8))
    await send_message(desk.gateway, make_message(subject="Site down", body=SITE_DOWN))
    assert desk.pages() == []
    context = ack_context(desk, ALICE)
    # Urgent: answered within urgent_first_response (30 minutes of the clock).
    assert (context["what_next"], context["respond_by"]) == ("first-response", "Monday 10:30")


# --- the webhook -----------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on loopback (asyncio streams): "refuse" answers 503, "hang"
    reads the request and never answers, "accept" answers 204 and keeps the body."""

    def __init__(self) -> None:
        self.mode = "refuse"
        self.accepted: list[bytes] = []
        self.requests = 0
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> Receiver:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
            self.requests += 1
            if self.mode == "hang":
                await self.release.wait()
                return
            if self.mode == "refuse":
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            else:
                self.accepted.append(body)
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.close()


def webhook_row(desk: Desk) -> dict[str, Any]:
    [row] = rows(desk.config, "SELECT * FROM outbox WHERE kind = 'page-webhook'")
    return dict(row)


async def test_webhook_refused_then_hanging_then_accepted_is_delivered_once(
    make_config: Any, start_gateway: Any, relay: Any, receiver: Receiver
) -> None:
    desk = await start_desk(make_config, start_gateway, relay, oncall=f'webhook = "{receiver.url}"')
    await send_message(desk.gateway, make_message(subject="Site down", body=SITE_DOWN))
    # Refused (503): retried later; the page mail itself went meanwhile.
    await wait_for(lambda: webhook_row(desk)["attempts"] == 1)
    assert "503" in webhook_row(desk)["last_error"]
    await wait_for(lambda: desk.pages_relayed() == [SAM])

    # Hangs beyond [delivery] timeout (1 s): the attempt times out; intake goes on.
    receiver.mode = "hang"
    desk.clock.advance(60)
    desk.gateway.outbox.wake()
    await wait_for(lambda: receiver.requests == 2)
    started = time.monotonic()
    await send_message(
        desk.gateway, make_message(subject="Invoice", sender=OSCAR, body="Hello, the invoice.\r\n")
    )
    assert time.monotonic() - started < 1.0
    assert len(rows(desk.config, "SELECT number FROM tickets")) == 2
    await wait_for(lambda: webhook_row(desk)["attempts"] == 2, timeout=5)
    assert "time" in webhook_row(desk)["last_error"]
    await wait_for(lambda: ack_seen(desk, OSCAR), timeout=5)

    # Accepted: sent, exactly once.
    receiver.mode = "accept"
    desk.clock.advance(120)
    desk.gateway.outbox.wake()
    await wait_for(lambda: webhook_row(desk)["status"] == "sent")
    desk.clock.advance(86400)
    await desk.gateway.outbox.deliver_due()
    assert webhook_row(desk)["attempts"] == 3
    [body] = receiver.accepted
    document = json.loads(body)
    assert document == {
        "ticket": 1,
        "organisation": "Client Ltd",
        "subject": "Site down",
        "reasons": ["subject:site-down", "text:site-down"],
        "step": 0,
        "address": SAM,
        "ack_due": "2026-12-05T22:15:00.000000+00:00",
    }
    assert_nothing_reaches_a_client(desk)


async def test_check_config_warns_of_on_call_addresses_that_are_not_staff(
    make_config: Any, start_gateway: Any, relay: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    desk = await start_desk(
        make_config, start_gateway, relay, oncall='secondary = "pager@example.net"'
    )
    now = datetime.now(UTC)
    add_shift(desk.config, "night@example.net", now, now + timedelta(hours=8))
    capsys.readouterr()
    assert run(desk.config, desk.clock, "check-config")[0] == 0
    warnings = capsys.readouterr().err
    assert "oncall.secondary pager@example.net is not a staff address" in warnings
    assert "on-call address night@example.net" in warnings
    assert SAM not in warnings and CAROL not in warnings


async def test_an_unproven_reply_to_a_page_acknowledges_nothing(desk: Desk) -> None:
    await send_message(desk.gateway, make_message(subject="Site down", body=SITE_DOWN))
    [page] = outbox(desk.config, "page")
    token = make_token(desk.gateway.pipeline.token_secret, 1)
    # Sam's address in From, but no authentication: held, like any unproven staff mail.
    await send_message(
        desk.gateway,
        make_message(
            subject="Re: PAGE",
            sender=SAM,
            headers=f"In-Reply-To: {page['message_id']}\r\n",
            body="ack",
        ),
        sender=SAM,
        recipients=(f"support+{token}@example.org",),
    )
    assert rows(desk.config, "SELECT COUNT(*) AS n FROM quarantine")[0]["n"] == 1
    assert desk.pages() == [(0, SAM, None)]
    assert [a["to"] for a in desk.at(15)] == [[CAROL]]
