"""Issue 14, item 4: `gateway tickets search` over real SMTP intake, and the backfill that
indexes a database made before the search index existed while intake goes on."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from contextlib import closing, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from gateway import cli as gateway_cli
from gateway import store
from gateway.app import Gateway
from gateway.config import Config
from gateway.store import migrations

from .conftest import make_message, rows, send_message, wait_for


def run(config: Config, *args: str) -> tuple[int, str, str]:
    """The CLI in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = gateway_cli.main(["--config", str(config.path), *args])
    return code, out.getvalue(), err.getvalue()


def search(config: Config, *args: str) -> list[dict[str, Any]]:
    code, out, err = run(config, "tickets", "search", *args, "--json")
    assert code == 0, err
    hits: list[dict[str, Any]] = json.loads(out)
    return hits


def numbers(hits: list[dict[str, Any]]) -> list[int]:
    return [h["number"] for h in hits]


MAIL = [
    # (sender, subject, body): one ticket each, in this order (#1 .. #5).
    ("alice@client.example.com", "Printer on fire", "The printer in room 4 is on fire."),
    ("bob@client.example.com", "Invoice question", "Our invoice lists the printer twice."),
    ("carol@other.example.net", "VPN down", "The VPN refuses every login since Monday."),
    ("dave@other.example.net", "Printing is slow", "Printouts take ten minutes each."),
    ("erin@client.example.com", "Password reset", "Please reset the password of erin."),
]


@pytest.fixture
async def desk(config: Config, start_gateway: Any) -> Config:
    """Five tickets filed through SMTP, then one reply on #1 (which also mentions fire)."""
    gateway: Gateway = await start_gateway(config)
    for sender, subject, body in MAIL:
        await send_message(gateway, make_message(subject=subject, sender=sender, body=body))
    tag = "[#1]"  # the default ticket tag threads the reply into #1
    await send_message(
        gateway,
        make_message(
            subject=f"Re: {tag} Printer on fire",
            body="Update: the fire brigade came, the printer is gone.",
        ),
    )
    await wait_for(lambda: len(rows(config, "SELECT 1 FROM messages WHERE ticket = 1")) >= 2)
    return config


async def test_words_phrase_prefix_and_boolean_queries(desk: Config) -> None:
    assert sorted(numbers(search(desk, "printer"))) == [1, 2]
    # A phrase matches the words in that order only.
    assert numbers(search(desk, '"fire brigade"')) == [1]
    assert numbers(search(desk, '"brigade fire"')) == []
    # Prefix: print* finds printer, printing, printouts.
    assert sorted(numbers(search(desk, "print*"))) == [1, 2, 4]
    assert numbers(search(desk, "printer NOT invoice")) == [1]
    assert sorted(numbers(search(desk, "vpn OR password"))) == [3, 5]
    assert numbers(search(desk, "(vpn OR password) AND erin")) == [5]
    # The sender is searchable (name and address of From).
    assert numbers(search(desk, "carol")) == [3]
    # Diacritics folded: "Prïnter" finds printer.
    assert sorted(numbers(search(desk, "Prïnter"))) == [1, 2]


async def test_filters_by_organisation_and_status(desk: Config) -> None:
    assert sorted(numbers(search(desk, "print*", "--org", "Client Ltd"))) == [1, 2]
    assert numbers(search(desk, "print*", "--org", "other co")) == [4]
    code, _, err = run(desk, "tickets", "status", "2", "closed")
    assert code == 0, err
    assert numbers(search(desk, "printer", "--status", "closed")) == [2]
    assert numbers(search(desk, "printer", "--status", "new")) == [1]
    code, _, err = run(desk, "tickets", "search", "printer", "--org", "Nobody Inc")
    assert code == 1 and "no organisation 'Nobody Inc'" in err


async def test_ranked_one_hit_per_ticket_with_snippet(desk: Config) -> None:
    hits = search(desk, "printer")
    # Ticket 1 has "printer" in its subject (weighted) and in two messages: first, once.
    assert numbers(hits) == [1, 2]
    assert [h["rank"] for h in hits] == [1, 2]
    assert hits[0]["score"] > hits[1]["score"] > 0
    assert set(hits[0]) == {
        "number",
        "subject",
        "status",
        "organisation",
        "rank",
        "score",
        "snippet",
        "message",
        "message_id",
    }
    assert hits[1]["subject"] == "Invoice question"
    assert hits[1]["organisation"] == "Client Ltd"
    assert hits[1]["status"] == "new"
    assert "[printer]" in hits[1]["snippet"]
    assert hits[1]["message_id"].endswith("@client.example.com>")
    # --limit counts tickets, not messages.
    assert numbers(search(desk, "printer", "--limit", "1")) == [1]
    code, out, _ = run(desk, "tickets", "search", "vpn")
    assert code == 0
    assert out.splitlines()[0] == "#3 [new, Other Co] VPN down"
    assert out.splitlines()[1] == "   [VPN] down"  # the snippet is of the best column


@pytest.mark.parametrize("query", ['"unclosed', "printer AND", "nosuchcolumn: x", "(a OR"])
async def test_malformed_query_is_a_clear_error(desk: Config, query: str) -> None:
    code, out, err = run(desk, "tickets", "search", query)
    assert code == 1
    assert out == ""
    assert err.startswith("gateway: not a valid search query: ")
    assert "Traceback" not in err


async def test_no_match_and_empty_query(desk: Config) -> None:
    code, out, _ = run(desk, "tickets", "search", "zebra")
    assert (code, out) == (0, "no tickets match\n")
    code, _, err = run(desk, "tickets", "search", "  ")
    assert code == 1 and "empty" in err


def _downgrade_to_unindexed(path: Path) -> None:
    """Make the database what a gateway before the search index left: its schema version
    one lower and no search table (as if migration 11 had never run)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("DROP TABLE message_search")
        conn.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION - 1}")


async def test_backfill_indexes_an_old_database_while_intake_goes_on(
    make_config: Any, start_gateway: Any
) -> None:
    # Batches of 2 message ids, every 50 ms: a few ticks for this database.
    config: Config = make_config(
        extra_storage="search_backfill_batch = 2\nsearch_backfill_interval = 0.05"
    )
    gateway: Gateway = await start_gateway(config)
    for n in range(8):
        await send_message(gateway, make_message(subject=f"Old ticket {n} about kettles"))
    await gateway.stop(grace=5)
    _downgrade_to_unindexed(config.database_path)
    assert migrations.MIGRATIONS[-1].count("message_search") >= 1  # ours is the last one

    # Opened again, the migration creates the table and records what is to be indexed;
    # nothing old is found yet, and search says so.
    with closing(store.connect(config.database_path)) as conn:
        pending = dict(conn.execute("SELECT key, value FROM meta WHERE key LIKE 'search_%'"))
    assert int(pending["search_backfill_end"]) >= 8
    code, out, err = run(config, "tickets", "search", "kettles", "--json")
    assert code == 0 and json.loads(out) == []
    assert "index incomplete: 0%" in err

    gateway = await start_gateway(config, seed=False)
    # Intake goes on during the backfill, and new mail is searchable at once.
    new_mail = [
        asyncio.create_task(
            send_message(gateway, make_message(subject=f"New ticket {n} about teapots"))
        )
        for n in range(4)
    ]
    await asyncio.gather(*new_mail)
    assert len(search(config, "teapots")) == 4

    def backfilled() -> bool:
        return not rows(config, "SELECT 1 FROM meta WHERE key LIKE 'search_backfill%'")

    await wait_for(backfilled, timeout=20)
    assert len(search(config, "kettles")) == 8
    code, _, err = run(config, "tickets", "search", "kettles")
    assert code == 0 and "incomplete" not in err
    # Each message indexed once: the index's row count is the searchable messages'.
    [row] = rows(config, "SELECT COUNT(*) FROM message_search_docsize")
    [filed] = rows(
        config,
        "SELECT COUNT(*) FROM messages WHERE direction = 'in' AND ticket IS NOT NULL "
        "AND duplicate_of IS NULL",
    )
    assert row[0] == filed[0] == 12


async def test_held_mail_is_searchable_once_released(config: Config, start_gateway: Any) -> None:
    gateway: Gateway = await start_gateway(config)
    await send_message(
        gateway,
        make_message(subject="Stranger asks about gizmos", sender="zed@unknown.example"),
        sender="zed@unknown.example",
    )
    [held] = rows(config, "SELECT id FROM quarantine WHERE status = 'held'")
    assert search(config, "gizmos") == []
    # In a thread: the command runs its own event loop to parse the held message.
    code, _, err = await asyncio.to_thread(run, config, "quarantine", "release", str(held["id"]))
    assert code == 0, err
    assert [h["subject"] for h in search(config, "gizmos")] == ["Stranger asks about gizmos"]
