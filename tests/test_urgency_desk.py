"""Issue 12 items 1, 4 and 6 (priority) over real SMTP and the CLI: the urgency rule table
wired into the desk. Client mail that opens or joins a ticket is assessed
(gateway/urgency.py); a hit makes the ticket urgent, keeps the reasons and, for a first
response, promises it within the unit's `urgent_first_response` in wall-clock time.

The clock is Saturday 5 December 2026 22:00 in London (GMT, so UTC): the desk is closed,
so a business-time promise would fall on Monday, a wall-clock one at 22:30."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.clock import FixedClock
from gateway.config import Config, ConfigError, load_config

from .conftest import make_message, rows, send_message, write_config
from .test_owners import (
    actions,
    outbox,
    run,
    run_json,
    scheduler_pass,
    staff_mail,
    ticket_row,
)

SATURDAY_NIGHT = datetime(2026, 12, 5, 22, 0, tzinfo=UTC)
SETUP = """
[staff]
addresses = ["dana@example.org"]
admins = ["admin@example.org"]

[policy]
trusted_authserv_ids = ["mx.example.org"]

[urgency]
phrases = ["payment failing"]

[[unit]]
name = "support"
staff = ["bob@example.org", "carol@example.org"]
lead = "lead@example.org"
holidays_country = ""
"""


@pytest.fixture
def config(make_config: Any) -> Config:
    cfg: Config = make_config(extra=SETUP)
    return cfg


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(SATURDAY_NIGHT)


@pytest.fixture
async def gateway(config: Config, clock: FixedClock, start_gateway: Any) -> Gateway:
    gw: Gateway = await start_gateway(config, clock=clock)
    return gw


async def client_mail(gateway: Gateway, subject: str, body: str, headers: str = "") -> None:
    await send_message(gateway, make_message(subject=subject, body=body, headers=headers))


async def client_reply(config: Config, gateway: Gateway, body: str, headers: str = "") -> None:
    ack = outbox(config, "acknowledgement")[0]["message_id"]
    await send_message(
        gateway,
        make_message(
            subject="Re: [#1] Printer", body=body, headers=f"In-Reply-To: {ack}\r\n{headers}"
        ),
    )


def urgent_events(config: Config) -> list[str]:
    return [a for a in actions(config) if a == "ticket.urgent"]


def reasons(config: Config, number: int = 1) -> list[str]:
    [row] = rows(config, "SELECT urgency_reasons FROM tickets WHERE number = ?", (number,))
    found: list[str] = json.loads(row["urgency_reasons"])
    return found


# --- item 1: client mail is assessed -------------------------------------------------------


async def test_site_down_opens_an_urgent_ticket_due_in_wall_clock_minutes(
    config: Config, gateway: Gateway
) -> None:
    await client_mail(gateway, "Site down", "Hello,\r\n\r\nour shop is down since 21:40.\r\n")
    ticket = ticket_row(config)
    assert ticket["priority"] == "urgent"
    assert reasons(config) == ["subject:site-down", "text:site-down"]
    assert urgent_events(config) == ["ticket.urgent"]
    # 30 minutes of the clock on a Saturday night, not 4 business hours from Monday 09:00.
    assert ticket["next_update_due"] == "2026-12-05T22:30:00.000000+00:00"
    [event] = rows(config, "SELECT actor, detail FROM events WHERE action = 'ticket.urgent'")
    assert '"subject:site-down"' in event["detail"]


async def test_routine_mail_stays_normal_with_a_business_time_promise(
    config: Config, gateway: Gateway
) -> None:
    await client_mail(gateway, "Invoice", "Hello,\r\n\r\nplease send the invoice again.\r\n")
    ticket = ticket_row(config)
    assert ticket["priority"] == "normal"
    assert reasons(config) == []
    assert urgent_events(config) == []
    assert ticket["next_update_due"] == "2026-12-07T13:00:00.000000+00:00"  # Monday 09:00 + 4h


async def test_importance_header_and_admin_phrase_are_reasons(
    config: Config, gateway: Gateway
) -> None:
    await client_mail(
        gateway,
        "Checkout",
        "Hello,\r\n\r\nthe payment failing for every customer.\r\n",
        headers="Importance: high\r\n",
    )
    assert ticket_row(config)["priority"] == "urgent"
    assert reasons(config) == ["header:importance-high", "text:payment-failing"]


async def test_quoted_history_and_signature_never_make_mail_urgent(
    config: Config, gateway: Gateway
) -> None:
    body = (
        "Thanks, all fine now.\r\n\r\n-- \r\nAlice, urgent matters: call us\r\n\r\n"
        "On Fri, Bob wrote:\r\n> Our site is down, urgent!\r\n"
    )
    await client_mail(gateway, "Thanks", body)
    assert ticket_row(config)["priority"] == "normal"
    assert urgent_events(config) == []


async def test_a_client_reply_makes_a_ticket_urgent_once_and_moves_its_promise(
    config: Config, gateway: Gateway, clock: FixedClock
) -> None:
    await client_mail(gateway, "Printer", "Hello,\r\n\r\nthe printer needs toner.\r\n")
    assert ticket_row(config)["priority"] == "normal"
    await client_reply(config, gateway, "Now the whole website is down.\r\n")
    ticket = ticket_row(config)
    assert ticket["priority"] == "urgent"
    assert reasons(config) == ["text:site-down"]
    # The first-response promise (Monday 13:00) comes forward to the urgent one.
    assert ticket["next_update_due"] == "2026-12-05T22:30:00.000000+00:00"
    await client_reply(config, gateway, "This is an emergency.\r\n")
    assert reasons(config) == ["text:site-down", "text:emergency"]
    assert urgent_events(config) == ["ticket.urgent"]  # once, when it became urgent


async def test_auto_replies_never_make_a_ticket_urgent(config: Config, gateway: Gateway) -> None:
    await client_mail(gateway, "Printer", "Hello,\r\n\r\nthe printer needs toner.\r\n")
    ack = outbox(config, "acknowledgement")[0]["message_id"]
    await send_message(
        gateway,
        make_message(
            subject="Out of office: site down",
            body="Our site is down, I am away.\r\n",
            headers=f"Auto-Submitted: auto-replied\r\nImportance: high\r\nIn-Reply-To: {ack}\r\n",
        ),
    )
    assert (
        len(
            rows(
                config,
                "SELECT id, ticket FROM messages WHERE kind = 'auto-reply' AND direction = 'in'",
            )
        )
        == 1
    )
    assert ticket_row(config)["priority"] == "normal"
    assert urgent_events(config) == []


# --- item 2: staff set it --------------------------------------------------------------------


async def test_staff_set_priority_with_the_cli(
    config: Config, gateway: Gateway, clock: FixedClock
) -> None:
    await client_mail(gateway, "Printer", "Hello,\r\n\r\nthe printer needs toner.\r\n")
    code, out = run(config, clock, "tickets", "priority", "1", "urgent")
    assert code == 0, out
    ticket = ticket_row(config)
    assert ticket["priority"] == "urgent"
    assert urgent_events(config) == ["ticket.urgent"]
    assert reasons(config) == ["staff"]
    # Its promise (Monday 13:00) comes forward to urgent_first_response of the clock.
    assert ticket["next_update_due"] == "2026-12-05T22:30:00.000000+00:00"
    code, out = run(config, clock, "tickets", "priority", "1", "urgent")
    assert code == 0 and "already" in out
    assert urgent_events(config) == ["ticket.urgent"]
    code, out = run(config, clock, "tickets", "priority", "1", "normal")
    assert code == 0, out
    assert ticket_row(config)["priority"] == "normal"
    assert actions(config)[-1] == "ticket.priority"
    assert run(config, clock, "tickets", "priority", "9", "urgent")[0] != 0


async def test_urgent_in_staff_mail_is_a_command_stripped_from_the_clients_copy(
    config: Config, gateway: Gateway
) -> None:
    await client_mail(gateway, "Printer", "Hello,\r\n\r\nthe printer needs toner.\r\n")
    await staff_mail(gateway, "bob@example.org", "#urgent\r\nWe are on it.\r\n")
    assert ticket_row(config)["priority"] == "urgent"
    assert urgent_events(config) == ["ticket.urgent"]
    [reply] = outbox(config, "staff-reply")
    assert "#urgent" not in str(reply["spec"])
    assert "We are on it." in str(reply["spec"])


async def test_urgent_from_a_client_is_plain_text(config: Config, gateway: Gateway) -> None:
    await client_mail(gateway, "Printer", "Hello,\r\n\r\nthe printer needs toner.\r\n")
    await client_reply(config, gateway, "#urgent\r\nplease\r\n")
    texts = [r["text"] for r in rows(config, "SELECT text FROM messages WHERE direction = 'in'")]
    assert any("#urgent" in (t or "") for t in texts)  # kept as the client wrote it


# --- item 3: seeing it -------------------------------------------------------------------------


async def test_list_and_show_json_carry_priority_and_reasons(
    config: Config, gateway: Gateway, clock: FixedClock
) -> None:
    await client_mail(gateway, "Site down", "Hello,\r\n\r\nhelp.\r\n")
    await client_mail(gateway, "Invoice", "Hello,\r\n\r\nplease send the invoice.\r\n")
    listed = run_json(config, clock, "tickets", "list")
    assert {t["number"]: (t["priority"], t["urgency_reasons"]) for t in listed} == {
        1: ("urgent", ["subject:site-down"]),
        2: ("normal", []),
    }
    assert [t["number"] for t in run_json(config, clock, "tickets", "list", "--urgent")] == [1]
    shown = run_json(config, clock, "tickets", "show", "1")
    assert shown["priority"] == "urgent"
    assert shown["urgency_reasons"] == ["subject:site-down"]
    lines = {
        line.split()[0]: line for line in run(config, clock, "tickets", "list")[1].splitlines()
    }
    assert "new URGENT" in lines["#1"] and "URGENT" not in lines["#2"]
    assert "URGENT: subject:site-down" in run(config, clock, "tickets", "show", "1")[1]


# --- config ------------------------------------------------------------------------------------


def test_config_keys_are_validated_naming_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, extra='[urgency]\nphrases = "site down"\n')
    with pytest.raises(ConfigError, match=r"urgency\.phrases"):
        load_config(path)
    unit = '[[unit]]\nname = "support"\nurgent_first_response = "soon"\n'
    path = write_config(tmp_path, extra=unit)
    with pytest.raises(ConfigError, match=r"unit\[0\]\.urgent_first_response"):
        load_config(path)
    path = write_config(tmp_path, extra='[commitments]\nurgent_first_response = "1 hour"\n')
    with pytest.raises(ConfigError, match=r"commitments\.urgent_first_response"):
        load_config(path)
    path = write_config(tmp_path, extra='[commitments]\nurgent_first_response = "1h"\n')
    config = load_config(path)
    assert config.unit("support").urgent_first_response == "1h"
    assert load_config(write_config(tmp_path)).urgency.phrases == ()


async def test_an_urgent_promise_falls_due_that_night_for_the_scheduler(
    config: Config, gateway: Gateway, clock: FixedClock
) -> None:
    await client_mail(gateway, "Site down", "Hello,\r\n\r\nour shop is down.\r\n")
    await client_mail(gateway, "Invoice", "Hello,\r\n\r\nplease send the invoice.\r\n")
    assert scheduler_pass(config, clock, "2026-12-05T22:20:00+00:00") == []
    # Past 22:30 with no answer: the urgent ticket is escalated that night, the other not.
    assert scheduler_pass(config, clock, "2026-12-05T22:31:00+00:00") == [("escalation", 1)]
    clock.set(datetime(2026, 12, 5, 22, 31, tzinfo=UTC))
    overdue = run_json(config, clock, "tickets", "list", "--overdue")
    assert [t["number"] for t in overdue] == [1]
