"""Issue 12 items 5 and 6 for upset clients, over real SMTP and the CLI: intake asks the
rule table (gateway/upset.py) about a client's mail, marks the ticket upset, and tells the
organisation's account manager and the owner once per ticket per day; staff calm it; the
desk shows it. Monday 30 November 2026 10:00 in London (GMT, so UTC), a 09:00-17:30 desk,
first response due 4 business hours after a ticket opens."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.clock import FixedClock
from gateway.config import Config, ConfigError, load_config
from gateway.tickets import make_token
from gateway.upset import DEFAULT_THRESHOLD

from .conftest import make_message, rows, send_message, write_config
from .test_owners import SETUP, actions, outbox, run, run_json, staff_mail, ticket_row

MONDAY = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
CLIENT = "alice@client.example.com"
MANAGER = "sam@example.org"
NOTICE = "account-manager-notice"


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(MONDAY)


def make(make_config: Any, extra: str = "") -> Config:
    cfg: Config = make_config(extra=SETUP + extra)
    return cfg


async def start(
    make_config: Any, start_gateway: Any, clock: FixedClock, extra: str = ""
) -> tuple[Config, Gateway]:
    config = make(make_config, extra)
    gateway: Gateway = await start_gateway(config, clock=clock)
    code, _ = run(config, clock, "orgs", "update", "Client Ltd", "--account-manager", MANAGER)
    assert code == 0
    return config, gateway


async def client_mail(gateway: Gateway, body: str, subject: str = "Printer") -> None:
    """The client writes; the second and later mails thread by the subject tag."""
    await send_message(gateway, make_message(subject=subject, body=body))


CALM = "Hello,\r\n\r\nthe printer on floor 2 does not print.\r\n"


def notices(config: Config) -> list[dict[str, Any]]:
    return outbox(config, NOTICE)


def assert_never_to_a_client(config: Config) -> None:
    for mail in notices(config):
        assert mail["to"] != CLIENT, mail
        assert not mail["to"].endswith("@client.example.com"), mail


# --- config ------------------------------------------------------------------------------


def test_upset_config_defaults_and_validation(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    assert config.upset.phrases == ()
    assert config.upset.threshold == DEFAULT_THRESHOLD
    with pytest.raises(ConfigError, match=r"upset\.threshold"):
        load_config(write_config(tmp_path, extra="[upset]\nthreshold = 0\n"))
    with pytest.raises(ConfigError, match=r"upset\.phrases"):
        load_config(write_config(tmp_path, extra='[upset]\nphrases = "rubbish"\n'))
    with pytest.raises(ConfigError, match=r"upset\.phrases"):
        load_config(write_config(tmp_path, extra='[upset]\nphrases = ["  "]\n'))


# --- item 5: intake marks the ticket and tells the account manager and the owner --------


async def test_complaint_on_a_ticket_marks_it_upset_and_tells_manager_and_owner(
    make_config: Any, start_gateway: Any, clock: FixedClock
) -> None:
    config, gateway = await start(make_config, start_gateway, clock)
    await client_mail(gateway, CALM)
    assert ticket_row(config)["upset"] == 0
    assert run(config, clock, "tickets", "assign", "1", "bob@example.org")[0] == 0
    assert notices(config) == []

    clock.advance(60)
    await client_mail(
        gateway,
        "This is unacceptable. The printer is STILL broken.\r\n\r\n"
        "> Earlier: we are disappointed (quoted, never counts)\r\n",
        subject="Re: [#1] Printer",
    )
    row = ticket_row(config)
    assert row["upset"] == 1
    reasons = json.loads(row["upset_reasons"])
    assert any("unacceptable" in r for r in reasons)
    assert not any("disappointed" in r for r in reasons)
    assert "ticket.upset" in actions(config)
    sent = notices(config)
    assert sorted(m["to"] for m in sent) == ["bob@example.org", MANAGER]
    context = sent[0]["spec"]["context"]
    assert "This is unacceptable." in context["text"]
    assert context["ticket"]["number"] == 1
    assert context["organisation"] == "Client Ltd"
    assert context["commitments"] and context["commitments"][0]["state"] == "open"
    assert row["upset_notified_on"] == "2026-11-30"
    assert_never_to_a_client(config)

    # Another upset mail the same day: its reasons are kept, nobody is told twice.
    clock.advance(60)
    await client_mail(gateway, "I want to cancel the contract.\r\n", subject="Re: [#1] Printer")
    reasons = json.loads(ticket_row(config)["upset_reasons"])
    assert any("cancel the contract" in r for r in reasons)
    assert any("unacceptable" in r for r in reasons)
    assert len(notices(config)) == 2
    assert actions(config).count("ticket.upset") == 2

    # The next day, a new upset mail tells them again.
    clock.set(datetime(2026, 12, 1, 10, 0, tzinfo=UTC))
    await client_mail(gateway, "Frankly ridiculous.\r\n", subject="Re: [#1] Printer")
    assert len(notices(config)) == 4
    assert ticket_row(config)["upset_notified_on"] == "2026-12-01"
    assert_never_to_a_client(config)


async def test_a_new_upset_ticket_tells_the_manager_without_an_owner(
    make_config: Any, start_gateway: Any, clock: FixedClock
) -> None:
    config, gateway = await start(make_config, start_gateway, clock)
    await client_mail(gateway, "We are very disappointed with the service.\r\n")
    assert ticket_row(config)["upset"] == 1
    assert [m["to"] for m in notices(config)] == [MANAGER]
    assert_never_to_a_client(config)


async def test_chasing_an_overdue_ticket_is_upset_and_a_thank_you_is_not(
    make_config: Any, start_gateway: Any, clock: FixedClock
) -> None:
    config, gateway = await start(make_config, start_gateway, clock)
    await client_mail(gateway, CALM)
    # The first response is due at 14:00; at 15:00 the client writes again, politely:
    # chasing (2) and overdue (2) make 4, over the default threshold of 3.
    clock.set(datetime(2026, 11, 30, 15, 0, tzinfo=UTC))
    await client_mail(gateway, "Any news on this?\r\n", subject="Re: [#1] Printer")
    row = ticket_row(config)
    assert row["upset"] == 1
    reasons = json.loads(row["upset_reasons"])
    assert any(r.startswith("chasing") for r in reasons)
    assert any(r.startswith("overdue") for r in reasons)

    # Calm it; staff answer; the client's next mail is neither chasing nor overdue.
    assert run(config, clock, "tickets", "calm", "1")[0] == 0
    await staff_mail(gateway, "bob@example.org", "#next 2d\nWe are on it.\n")
    assert ticket_row(config)["last_public_update_at"] is not None
    clock.advance(60)
    await client_mail(gateway, "Thanks!\r\n", subject="Re: [#1] Printer")
    assert ticket_row(config)["upset"] == 0


async def test_a_single_mild_signal_is_not_upset(
    make_config: Any, start_gateway: Any, clock: FixedClock
) -> None:
    config, gateway = await start(make_config, start_gateway, clock)
    await client_mail(gateway, "Could you escalate this to the network team?\r\n")
    assert ticket_row(config)["upset"] == 0
    assert notices(config) == []
    assert "ticket.upset" not in actions(config)


async def test_phrases_and_threshold_come_from_the_config(
    make_config: Any, start_gateway: Any, clock: FixedClock
) -> None:
    config, gateway = await start(
        make_config, start_gateway, clock, '\n[upset]\nphrases = ["rubbish"]\nthreshold = 5\n'
    )
    await client_mail(gateway, "This is unacceptable.\r\n")  # 3 < 5
    assert ticket_row(config)["upset"] == 0
    await client_mail(gateway, "Utter rubbish, and unacceptable.\r\n", subject="Re: [#1] x")
    row = ticket_row(config)
    assert row["upset"] == 1
    assert any("rubbish" in r for r in json.loads(row["upset_reasons"]))


# --- items 5 and 6: calm, and what the desk shows ----------------------------------------


async def test_calm_clears_it_and_the_desk_shows_it(
    make_config: Any, start_gateway: Any, clock: FixedClock
) -> None:
    config, gateway = await start(make_config, start_gateway, clock)
    await client_mail(gateway, CALM, subject="Calm one")
    await client_mail(gateway, "This is unacceptable!!!\r\n", subject="Angry one")
    listed = run_json(config, clock, "tickets", "list")
    by_number = {t["number"]: t for t in listed}
    assert by_number[1]["upset"] is False and by_number[1]["upset_reasons"] == []
    assert by_number[2]["upset"] is True and by_number[2]["upset_reasons"]
    assert [t["number"] for t in run_json(config, clock, "tickets", "list", "--upset")] == [2]
    shown = run_json(config, clock, "tickets", "show", "2")
    assert shown["upset"] is True and shown["upset_reasons"] == by_number[2]["upset_reasons"]

    code, out = run(config, clock, "tickets", "calm", "2")
    assert code == 0 and "#2" in out
    assert run_json(config, clock, "tickets", "list", "--upset") == []
    shown = run_json(config, clock, "tickets", "show", "2")
    assert shown["upset"] is False and shown["upset_reasons"] == []
    assert "ticket.calmed" in actions(config)
    [event] = rows(config, "SELECT actor, ticket, detail FROM events WHERE action='ticket.calmed'")
    assert event["ticket"] == 2
    assert json.loads(event["detail"])["reasons"]
    # Calming a ticket that is not upset, or one that does not exist, says so.
    code, out = run(config, clock, "tickets", "calm", "1")
    assert code == 0 and "not upset" in out
    assert run(config, clock, "tickets", "calm", "99")[0] != 0


async def test_auto_replies_quotes_and_signatures_never_count(
    make_config: Any, start_gateway: Any, clock: FixedClock
) -> None:
    config, gateway = await start(make_config, start_gateway, clock)
    await client_mail(
        gateway,
        "Hello,\r\n\r\nthe printer does not print.\r\n\r\n"
        "> You wrote: this is unacceptable and we are disappointed.\r\n\r\n"
        "-- \r\nAlice, Complaints and Escalations Officer\r\nUnacceptable Ltd\r\n",
    )
    # An out-of-office on the ticket (automatic: nobody wrote it), shouting and complaining;
    # to the ticket's reply token, the only way automatic mail joins a ticket.
    token = make_token(gateway.pipeline.token_secret, 1)
    await send_message(
        gateway,
        make_message(
            subject="Re: [#1] Printer",
            body="I AM OUT OF THE OFFICE UNTIL MONDAY!!! Unacceptable, disappointed.\r\n",
            headers="Auto-Submitted: auto-replied\r\n",
        ),
        recipients=(f"support+{token}@example.org",),
    )
    assert len(rows(config, "SELECT id FROM messages WHERE ticket = 1 AND direction = 'in'")) == 2
    row = ticket_row(config)
    assert row["upset"] == 0 and json.loads(row["upset_reasons"]) == []
    assert notices(config) == []
    assert "ticket.upset" not in actions(config)


async def test_an_account_manager_who_is_the_client_is_never_told(
    make_config: Any, start_gateway: Any, clock: FixedClock
) -> None:
    config, gateway = await start(make_config, start_gateway, clock)
    # An admin's slip: the organisation's account manager is the client herself.
    assert run(config, clock, "orgs", "update", "Client Ltd", "--account-manager", CLIENT)[0] == 0
    await client_mail(gateway, "This is unacceptable.\r\n")
    assert ticket_row(config)["upset"] == 1
    assert notices(config) == []
    [withheld] = rows(config, "SELECT detail FROM events WHERE action = 'mail.withheld'")
    assert "no-recipient" in withheld["detail"]
    assert all(m["to"] != CLIENT for m in outbox(config) if m["kind"] != "acknowledgement")
