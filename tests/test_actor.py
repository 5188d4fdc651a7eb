"""Who did it (issue 13 item 6): every CLI command records the person behind it, from
`--as`, $GATEWAY_OPERATOR, $SUDO_USER or the login name, in that order; `tickets reply
--from` takes a staff address only."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from typing import Any

import pytest

from gateway import cli
from gateway.config import Config

from .conftest import make_message, rows, run_cli, send_message, wait_for, write_config

LOGIN = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(autouse=True)
def no_operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_OPERATOR", raising=False)
    monkeypatch.delenv("SUDO_USER", raising=False)


def actors(config: Config) -> list[str]:
    return [r["actor"] for r in rows(config, "SELECT actor FROM events ORDER BY id")]


def add_org(config: Config, name: str, *extra: str) -> int:
    return cli.main(["--config", str(config.path), *extra, "orgs", "add", name])


def test_the_order_of_the_sources() -> None:
    env = {"GATEWAY_OPERATOR": "op@example.org", "SUDO_USER": "bob"}
    assert cli.operator_name("dana@example.org", env) == "dana@example.org"
    assert cli.operator_name(None, env) == "op@example.org"
    assert cli.operator_name(None, {"SUDO_USER": "bob"}) == "bob"
    assert cli.operator_name(None, {"GATEWAY_OPERATOR": "  ", "SUDO_USER": "bob"}) == "bob"
    assert cli.operator_name(None, {}) == LOGIN


def test_a_name_that_would_forge_the_trail_is_refused(config: Config) -> None:
    with pytest.raises(cli.CliError, match="GATEWAY_OPERATOR"):
        cli.operator_name(None, {"GATEWAY_OPERATOR": "eve\nactor: dana"})
    assert add_org(config, "Acme", "--as", "dana example") == 1
    assert not rows(config, "SELECT 1 FROM organisations")


def test_as_flag_is_recorded(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_OPERATOR", "op@example.org")
    assert add_org(config, "Acme", "--as", "dana@example.org") == 0
    assert actors(config)[-1] == "cli:dana@example.org"


def test_gateway_operator_is_recorded(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_OPERATOR", "op@example.org")
    monkeypatch.setenv("SUDO_USER", "bob")
    assert add_org(config, "Acme") == 0
    assert actors(config)[-1] == "cli:op@example.org"


def test_sudo_user_is_recorded(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "bob")
    assert add_org(config, "Acme") == 0
    assert actors(config)[-1] == "cli:bob"


def test_login_name_is_recorded_and_shown_by_events(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add_org(config, "Acme") == 0
    assert actors(config)[-1] == f"cli:{LOGIN}"
    capsys.readouterr()
    assert (
        cli.main(["--config", str(config.path), "--as", "dana@example.org", "orgs", "add", "B"])
        == 0
    )
    assert cli.main(["--config", str(config.path), "events", "--json"]) == 0
    shown = capsys.readouterr().out
    assert "cli:dana@example.org" in shown and f"cli:{LOGIN}" in shown


async def test_reply_from_a_non_staff_address_is_refused_and_nothing_is_sent(
    config: Config, start_gateway: Callable[..., Any]
) -> None:
    write_config(config.path.parent, extra='[staff]\naddresses = ["dana@example.org"]\n')
    gateway = await start_gateway(config)
    await send_message(gateway, make_message(subject="Help"))
    ticket = await wait_for(lambda: rows(config, "SELECT number FROM tickets"))
    number = str(ticket[0]["number"])
    before = rows(config, "SELECT COUNT(*) FROM outbox")[0][0]
    for sender in ("alice@client.example.com", "not an address"):
        refused = run_cli(config, "tickets", "reply", number, "--from", sender, stdin="hi\n")
        assert refused.returncode == 1
        assert "is not a staff address" in refused.stderr and "Traceback" not in refused.stderr
    assert rows(config, "SELECT COUNT(*) FROM outbox")[0][0] == before
    assert not rows(config, "SELECT 1 FROM events WHERE action = 'ticket.replied'")
    ok = run_cli(config, "tickets", "reply", number, "--from", "dana@example.org", stdin="hi\n")
    assert ok.returncode == 0, ok.stderr
    assert rows(config, "SELECT COUNT(*) FROM outbox")[0][0] == before + 1
