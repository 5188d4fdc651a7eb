"""Issue 13 item 7: an admin CLI that does not surprise.

Reads never create the database; no traceback in bad situations (exit 1, usage errors 2);
--json on every show; domain blocks honoured by the running daemon; senders/orgs show;
lists paged and cut to the terminal only on a terminal; completion and man page.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pty
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from gateway import cli, store
from gateway.config import Config

from .conftest import Refused, make_message, send_message, write_config
from .conftest import cli as async_cli


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def leaf_commands() -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    """Every runnable command of the parser (whoever added it), with its words."""

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> Iterator[Any]:
        try:
            sub = cli._subcommands(parser)
        except LookupError:
            yield words, parser
            return
        for name, child in sub.choices.items():
            yield from walk(child, [*words, name])

    yield from walk(cli.build_parser(), [])


# Placeholder values for positionals and required options, by destination.
_VALUES = {"id": "1", "number": "1", "name": "Client Ltd", "when": "2h", "shell": "bash"}


def argv_for(words: list[str], parser: argparse.ArgumentParser, junk: Path) -> list[str]:
    argv = list(words)
    for action in parser._actions:
        if action.option_strings and not action.required:
            continue
        if action.choices:
            value = str(next(iter(action.choices)))
        elif action.dest in ("file", "path"):
            value = str(junk)
        elif action.dest in _VALUES:
            value = _VALUES[action.dest]
        elif action.nargs == "?":
            value = "bob@client.example.com"
        else:
            value = "dana@example.org"
        argv += [action.option_strings[0], value] if action.option_strings else [value]
    return argv


READS = [
    ["messages", "list"],
    ["messages", "show", "1"],
    ["tickets", "list"],
    ["tickets", "show", "1"],
    ["desk"],
    ["quarantine", "list"],
    ["quarantine", "show", "1"],
    ["orgs", "list"],
    ["orgs", "show", "Client Ltd"],
    ["senders", "list"],
    ["senders", "show", "bob@client.example.com"],
    ["senders", "export"],
    ["events"],
    ["outbox", "list"],
]


@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_a_read_never_creates_the_database(
    config: Config, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    status, _out, err = run_main(["--config", str(config.path), *command], capsys)
    assert status == 1
    assert err == (
        f"gateway: no database at {config.database_path}: has the daemon run? (storage.database)\n"
    )
    assert not config.database_path.exists()
    assert not config.database_path.parent.exists()


def test_a_write_still_creates_the_database(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _out, err = run_main(
        ["--config", str(config.path), "orgs", "add", "Acme", "--domain", "acme.example"], capsys
    )
    assert status == 0, err
    assert config.database_path.exists()
    status, out, _err = run_main(["--config", str(config.path), "orgs", "list"], capsys)
    assert status == 0 and "Acme" in out


def _situations(tmp_path: Path) -> dict[str, Callable[[], Path]]:
    def missing_config() -> Path:
        return tmp_path / "nowhere.toml"

    def bad_toml() -> Path:
        path = tmp_path / "config.toml"
        path.write_text("[storage\n")
        return path

    def fresh() -> Path:
        return write_config(tmp_path, extra_storage="busy_timeout_ms = 50")

    def not_ours() -> Path:
        path = fresh()
        (tmp_path / "var").mkdir(exist_ok=True)
        (tmp_path / "var" / "gateway.db").write_bytes(b"not a database\n" * 400)
        return path

    def a_directory() -> Path:
        path = fresh()
        (tmp_path / "var" / "gateway.db").mkdir(parents=True)
        return path

    def empty_file() -> Path:
        path = fresh()
        (tmp_path / "var").mkdir(exist_ok=True)
        (tmp_path / "var" / "gateway.db").write_bytes(b"")
        return path

    return {
        "missing-config": missing_config,
        "bad-toml": bad_toml,
        "no-database": fresh,
        "not-ours": not_ours,
        "a-directory": a_directory,
        "empty-file": empty_file,
    }


@pytest.mark.parametrize(
    "situation",
    ["missing-config", "bad-toml", "no-database", "not-ours", "a-directory", "empty-file"],
)
def test_no_command_shows_a_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    situation: str,
) -> None:
    config_path = _situations(tmp_path)[situation]()
    junk = tmp_path / "junk.csv"
    junk.write_bytes(b"\xff\xfe{not json, not csv\x00")
    ran = 0
    for words, parser in leaf_commands():
        if words == ["serve"]:
            continue  # the daemon: would run (it has its own start-up tests)
        monkeypatch.setattr("sys.stdin", io.StringIO("text\n"))
        argv = ["--config", str(config_path), *argv_for(words, parser, junk)]
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse: a usage error, exit 2
            status = int(exc.code or 0)
        out, err = capsys.readouterr()
        assert "Traceback" not in err, (argv, err)
        assert status in (0, 1, 2), (argv, status)
        if status == 1:
            assert err.startswith("gateway: ") and err.count("\n") >= 1, (argv, err)
        ran += 1
    assert ran > 30


def test_a_locked_database_is_one_line_naming_it(
    make_config: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(extra_storage="busy_timeout_ms = 50")
    store.connect(config.database_path).close()
    with closing(sqlite3.connect(config.database_path, isolation_level=None)) as holder:
        holder.execute("BEGIN EXCLUSIVE")
        for command in (["tickets", "list"], ["orgs", "add", "Acme"], ["events"]):
            status, _out, err = run_main(["--config", str(config.path), *command], capsys)
            assert status == 1, (command, err)
            assert "Traceback" not in err and "locked" in err, err
            assert err.count("\n") == 1, err
        holder.execute("ROLLBACK")


def test_usage_errors_exit_2(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--config", str(config.path), "events", "--bogus"])
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_every_show_and_check_config_take_json(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    shows = [words for words, p in leaf_commands() if words[-1] == "show"]
    assert len(shows) >= 5
    for words, parser in leaf_commands():
        if words[-1] == "show" or words == ["check-config"]:
            assert any("--json" in a.option_strings for a in parser._actions), words
    status, out, err = run_main(["--config", str(config.path), "check-config", "--json"], capsys)
    assert status == 0, err
    checked = json.loads(out)
    assert checked["paths"]["storage.database"] == str(config.database_path)
    assert set(checked["paths"]) >= {"storage.database", "templates.directory"}
    assert isinstance(checked["warnings"], list)


async def test_domain_block_refuses_mail_and_show_tells(
    config: Config, start_gateway: Callable[..., Any]
) -> None:
    gateway = await start_gateway(config)  # client.example.com granted whole (conftest)
    delivery = await send_message(gateway, make_message(sender="bob@client.example.com"))
    assert delivery.reply.code == 250

    blocked = await async_cli(config, "senders", "block", "--domain", "Client.Example.com")
    assert blocked.returncode == 0, blocked.stderr
    with pytest.raises(Refused) as refused:
        await send_message(gateway, make_message(sender="carol@client.example.com"))
    assert refused.value.code == 550

    shown = await async_cli(config, "senders", "show", "bob@client.example.com", "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["status"] == "blocked"
    assert [b["address"] for b in view["blocks"]] == ["@client.example.com"]
    assert view["blocks"][0]["organisation"] == "Client Ltd"
    assert view["last_mail"]["disposition"] == "filed"
    assert view["last_mail"]["ticket"] is not None

    unblocked = await async_cli(config, "senders", "unblock", "--domain", "client.example.com")
    assert unblocked.returncode == 0, unblocked.stderr
    assert "authorised again" in unblocked.stdout
    delivery = await send_message(gateway, make_message(sender="carol@client.example.com"))
    assert delivery.reply.code == 250
    shown = await async_cli(config, "senders", "show", "bob@client.example.com", "--json")
    view = json.loads(shown.stdout)
    assert view["status"] == "authorised" and view["blocks"] == []
    assert view["grants"][0] == {
        "address": "@client.example.com",
        "domain": True,
        "organisation": "Client Ltd",
        "name": None,
        "since": view["grants"][0]["since"],
    }

    org = await async_cli(config, "orgs", "show", "client ltd", "--json")
    assert org.returncode == 0, org.stderr
    detail = json.loads(org.stdout)
    assert detail["domains"] == ["client.example.com"]
    assert detail["out_of_hours"] is False
    assert detail["open_tickets"] == 2
    assert [s["address"] for s in detail["senders"]] == ["@client.example.com"]
    our_domain = await async_cli(config, "senders", "block", "--domain", "example.org")
    assert our_domain.returncode == 1 and "one of our own" in our_domain.stderr


# --- paging and width -------------------------------------------------------------------


def _many_orgs(config: Config) -> None:
    now = "2026-11-27T00:00:00.000000+00:00"
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        for n in range(30):
            store.add_organisation(
                conn,
                name=f"Organisation number {n:02d} with a rather long name indeed",
                domains=[f"org{n:02d}.a-long-domain-name.example"],
                unit=None,
                account_manager=None,
                now=now,
            )


def _pager(tmp_path: Path) -> tuple[str, Path]:
    seen = tmp_path / "paged.txt"
    script = tmp_path / "fake-pager"
    script.write_text(f"#!/bin/sh\ncat > '{seen}'\n")
    script.chmod(0o755)
    return str(script), seen


def test_a_long_list_on_a_terminal_is_paged_and_fits(config: Config, tmp_path: Path) -> None:
    _many_orgs(config)
    pager, seen = _pager(tmp_path)
    leader, follower = pty.openpty()
    env = {**os.environ, "PAGER": pager, "LINES": "10", "COLUMNS": "60"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--config", str(config.path), "orgs", "list"],
            stdout=follower,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 0, done.stderr
    lines = seen.read_text().splitlines()
    assert len(lines) == 31 and lines[0].startswith("NAME")
    assert max(len(line) for line in lines) <= 60
    assert "…" in lines[1]


def test_piped_and_json_output_are_never_paged_nor_cut(config: Config, tmp_path: Path) -> None:
    _many_orgs(config)
    pager, seen = _pager(tmp_path)
    env = {**os.environ, "PAGER": pager, "LINES": "10", "COLUMNS": "60"}
    base = [sys.executable, "-m", "gateway.cli", "--config", str(config.path), "orgs", "list"]
    piped = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60)
    assert piped.returncode == 0
    assert not seen.exists()
    assert max(len(line) for line in piped.stdout.splitlines()) > 60
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([*base, "--json"], stdout=follower, env=env, timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 0 and not seen.exists()


# --- completion and man page ---------------------------------------------------------------


def test_bash_completion_script_is_valid_and_knows_the_commands(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    for word in ("senders", "unblock", "check-config", "--json"):
        assert word in script
    path = tmp_path / "gateway.bash"
    path.write_text(script)
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert cli.main(["completion", "zsh"]) == 0
    assert "#compdef gateway" in capsys.readouterr().out


def test_man_page_lists_every_command_and_renders(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["manpage"]) == 0
    page = capsys.readouterr().out
    assert page.startswith(".TH GATEWAY 1 ")
    for section in ("NAME", "SYNOPSIS", "OPTIONS", "COMMANDS", "EXIT STATUS", "ENVIRONMENT"):
        assert f".SH {section}\n" in page
    for words, _parser in leaf_commands():
        assert f'.SS "gateway {" ".join(words)}"' in page.replace("\\-", "-")
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed: structure checked only")
    rendered = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z"], input=page, capture_output=True, text=True
    )
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr


def test_an_unexpected_error_is_one_line_not_a_traceback(
    config: Config, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last net: a bug in a command (here, one planted) still reaches the user as one
    line and exit 1; GATEWAY_DEBUG=1 shows the traceback for the report."""

    def broken(config: Config, args: argparse.Namespace) -> int:
        raise KeyError("planted")

    monkeypatch.setattr(cli, "cmd_desk", broken)
    monkeypatch.delenv("GATEWAY_DEBUG", raising=False)
    status, _out, err = run_main(["--config", str(config.path), "desk"], capsys)
    assert status == 1
    assert err.startswith("gateway: internal error: KeyError: 'planted'") and err.count("\n") == 1

    def denied(config: Config, args: argparse.Namespace) -> int:
        raise PermissionError(13, "Permission denied", "/x/y")

    monkeypatch.setattr(cli, "cmd_desk", denied)
    status, _out, err = run_main(["--config", str(config.path), "desk"], capsys)
    assert (status, err) == (1, "gateway: /x/y: Permission denied\n")


def test_lists_take_limit_and_offset(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    _many_orgs(config)
    for words, parser in leaf_commands():
        if words[-1] == "list" or words == ["events"]:
            options = {o for a in parser._actions for o in a.option_strings}
            assert {"--limit", "--offset"} <= options, words
    base = ["--config", str(config.path), "orgs", "list"]
    status, out, _err = run_main([*base, "--json", "--offset", "28"], capsys)
    assert status == 0
    assert [o["name"][:15] for o in json.loads(out)] == ["Organisation nu"] * 2 and json.loads(out)[
        0
    ]["name"].startswith("Organisation number 28")
    status, out, _err = run_main([*base, "--offset", "5", "--limit", "2"], capsys)
    lines = out.splitlines()
    assert len(lines) == 3 and "number 05" in lines[1] and "number 06" in lines[2]
    status, out, _err = run_main([*base, "--offset", "40"], capsys)
    assert status == 0 and out.splitlines() == [out.splitlines()[0]]  # the header alone
    status, out, _err = run_main(
        ["--config", str(config.path), "events", "--json", "--offset", "1", "--limit", "1"], capsys
    )
    assert status == 0 and len(json.loads(out)) <= 1
