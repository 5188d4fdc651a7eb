"""One clock: every stamp the daemon and the CLI store comes from the Clock they were given,
so a test (or a scheduler run for another moment) moves time by passing a FixedClock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway import cli
from gateway.app import Gateway
from gateway.clock import Clock, FixedClock, iso
from gateway.config import Config
from gateway.scheduler import run_jobs

from .conftest import make_message, rows, send_message, wait_for

# Far from today, so that a stamp taken from the system clock could not pass for it.
T0 = datetime(2031, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
STAMP = "2031-03-04T05:06:07.890123+00:00"


def test_stamps_have_one_form() -> None:
    assert iso(T0) == STAMP
    assert FixedClock(T0).stamp() == STAMP
    # Whole seconds keep their microseconds, so stamps stay one width and sort as text.
    assert iso(T0.replace(microsecond=0)) == "2031-03-04T05:06:07.000000+00:00"
    now = Clock().now()
    assert now.tzinfo is UTC


def test_fixed_clock_moves_only_when_told() -> None:
    clock = FixedClock(T0)
    assert clock.now() == clock.now() == T0
    clock.advance(90)
    assert clock.now() == T0 + timedelta(seconds=90)
    clock.set(STAMP)
    assert clock.now() == T0
    with pytest.raises(ValueError):
        FixedClock(datetime(2031, 3, 4))  # naive: would be stored without an offset


async def test_intake_stamps_every_row_with_the_gateway_clock(
    config: Config, start_gateway: Any
) -> None:
    clock = FixedClock(T0)
    gateway: Gateway = await start_gateway(config, clock=clock)
    assert gateway.clock is clock
    code, text = (await send_message(gateway, make_message())).reply
    assert code == 250, text
    [message] = rows(config, "SELECT received_at FROM messages WHERE direction = 'in'")
    assert message["received_at"] == STAMP
    assert {r["time"] for r in rows(config, "SELECT time FROM events")} == {STAMP}
    # The acknowledgement is planned and sent as of the same clock.
    sent = await wait_for(lambda: rows(config, "SELECT * FROM outbox WHERE status = 'sent'"))
    assert sent[0]["created_at"] == STAMP
    assert sent[0]["sent_at"] == STAMP


async def test_scheduler_expires_held_mail_as_of_its_clock(
    config: Config, start_gateway: Any
) -> None:
    clock = FixedClock(T0)
    gateway: Gateway = await start_gateway(config, clock=clock)
    mallory = "mallory@unknown.example.net"
    code, text = (await send_message(gateway, make_message(sender=mallory), mallory)).reply
    assert code == 250, text
    held = "SELECT status FROM quarantine"
    assert [r["status"] for r in rows(config, held)] == ["held"]

    # One second short of the quarantine period: nothing expires.
    clock.advance(config.policy.quarantine_days * 86400 - 1)
    await run_jobs(config, gateway.writer, clock)
    assert [r["status"] for r in rows(config, held)] == ["held"]

    clock.advance(2)
    await run_jobs(config, gateway.writer, clock)
    assert [r["status"] for r in rows(config, held)] == ["expired"]
    [expired] = rows(config, "SELECT time FROM events WHERE action = 'quarantine.expired'")
    assert expired["time"] == clock.stamp()


def test_cli_stamps_with_the_clock_it_is_given(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FixedClock(T0)
    argv = ["--config", str(config.path), "senders", "block", "eve@client.example.com"]
    assert cli.main(argv, clock=clock) == 0
    capsys.readouterr()
    [event] = rows(config, "SELECT time FROM events WHERE action = 'sender.blocked'")
    assert event["time"] == STAMP
    [sender] = rows(config, "SELECT * FROM senders WHERE address = 'eve@client.example.com'")
    assert STAMP in dict(sender).values()
