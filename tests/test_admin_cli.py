"""The admin CLI: organisations, senders and the audit trail, run as the real `gateway`.

Every test runs the console script in a subprocess against a config and database in a tmp
dir, and checks the durable effect (what `--json` lists, rows, events), not messages alone.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import sqlite3
import subprocess
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from gateway import cli, store
from gateway.config import Config, load_config
from gateway.lookalike import skeleton

from .conftest import rows, run_cli, write_config

ACTOR = f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
NOW = "2030-01-01T00:00:00.000000+00:00"
EVENT_KEYS = {"id", "time", "actor", "action", "subject", "ticket", "detail"}


class Gateway:
    """`gateway --config <tmp config> ...` in a subprocess."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config, *args, stdin=stdin)

    def ok(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, (args, result.stderr)
        return result

    def fails(self, *args: str, stdin: str | None = None) -> str:
        """The error message of a command that must exit 1 (and not crash)."""
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result.stderr

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.json("events")
        return events


# Set-up and read-back that are not what a test is about go straight to the store: each
# subprocess costs a third of a second.


def seed_org(config: Config, name: str, *domains: str) -> None:
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        store.add_organisation(
            conn, name=name, domains=domains, unit=None, account_manager=None, now=NOW
        )


def seed_sender(config: Config, address: str, org: str, name: str | None = None) -> None:
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        found = store.find_organisation(conn, org)
        assert found is not None
        store.upsert_sender(conn, address=address, organisation=found.id, name=name, now=NOW)


def senders(config: Config) -> list[tuple[str, str | None, str | None, bool]]:
    with closing(store.connect(config.database_path)) as conn:
        return [(s.address, s.organisation, s.name, s.blocked) for s in store.list_senders(conn)]


@pytest.fixture
def gateway(config: Config) -> Gateway:
    return Gateway(config)


@pytest.fixture
def acme(gateway: Gateway) -> Gateway:
    """A database with the organisation Acme (domain acme.example.com) in it."""
    seed_org(gateway.config, "Acme", "acme.example.com")
    return gateway


def test_orgs_add_and_list_follow_the_contract(gateway: Gateway) -> None:
    gateway.ok(
        "orgs",
        "add",
        "Acme",
        "--domain",
        "ACME.example.com",
        "--domain",
        "bücher.example.com",
        "--unit",
        "billing",
        "--account-manager",
        "Manager@Example.org",
    )
    seed_org(gateway.config, "Globex")
    seed_sender(gateway.config, "alice@acme.example.com", "Acme")
    orgs = gateway.json("orgs", "list")
    assert orgs == [
        {
            "name": "Acme",
            "domains": ["acme.example.com", "xn--bcher-kva.example.com"],
            "unit": "billing",
            "account_manager": "manager@example.org",
            "senders": 1,
            "created_at": orgs[0]["created_at"],
            "out_of_hours": False,
        },
        {
            "name": "Globex",
            "domains": [],
            "unit": None,
            "account_manager": None,
            "senders": 0,
            "created_at": NOW,
            "out_of_hours": False,
        },
    ]
    table = gateway.ok("orgs", "list").stdout.splitlines()
    assert table[0].split() == [
        *("NAME", "DOMAINS", "UNIT", "ACCOUNT", "MANAGER", "SENDERS", "OUT", "OF", "HOURS")
    ]
    assert table[1].split() == [
        "Acme",
        "acme.example.com",
        "xn--bcher-kva.example.com",
        "billing",
        "manager@example.org",
        "1",
        "no",
    ]

    # Names are unique in any case; a domain belongs to one organisation; units and
    # addresses are checked.
    assert "organisation 'Acme' exists" in gateway.fails("orgs", "add", "ACME")
    taken = gateway.fails("orgs", "add", "Initech", "--domain", "acme.example.com")
    assert "domain 'acme.example.com' belongs to organisation 'Acme'" in taken
    assert "unknown unit 'sales'" in gateway.fails("orgs", "add", "Initech", "--unit", "sales")
    bad = gateway.fails("orgs", "add", "Initech", "--account-manager", "nobody")
    assert "invalid address 'nobody': An email address must have an @-sign." in bad
    assert "our own" in gateway.fails("orgs", "add", "Initech", "--domain", "example.org")
    with closing(store.connect(gateway.config.database_path)) as conn:
        assert [o.name for o in store.list_organisations(conn)] == ["Acme", "Globex"]


def test_senders_add_and_list_follow_the_contract(acme: Gateway) -> None:
    added = acme.ok(
        "senders", "add", "Alice@ACME.Example.com", "--org", "acme", "--name", "Alice Smith"
    )
    assert "authorised alice@acme.example.com for Acme" in added.stdout
    acme.ok("senders", "add", "bob@bücher.example.com", "--org", "Acme")
    seed_org(acme.config, "Globex")
    seed_sender(acme.config, "carol@globex.example.com", "Globex")
    assert acme.json("senders", "list", "--org", "ACME") == [
        {
            "address": "alice@acme.example.com",
            "organisation": "Acme",
            "name": "Alice Smith",
            "blocked": False,
            "domain": False,
        },
        {
            "address": "bob@xn--bcher-kva.example.com",
            "organisation": "Acme",
            "name": None,
            "blocked": False,
            "domain": False,
        },
    ]
    stored = rows(acme.config, "SELECT address, skeleton FROM senders ORDER BY address")
    assert [(r["address"], r["skeleton"]) for r in stored] == [
        (a, skeleton(a))
        for a in (
            "alice@acme.example.com",
            "bob@xn--bcher-kva.example.com",
            "carol@globex.example.com",
        )
    ]

    # Adding an existing address moves it, keeping its name unless a new one is given.
    moved = acme.ok("senders", "add", "alice@acme.example.com", "--org", "Globex")
    assert "updated alice@acme.example.com for Globex" in moved.stdout
    table = acme.ok("senders", "list").stdout.splitlines()
    assert table[0].split() == ["ADDRESS", "ORGANISATION", "NAME", "STATUS"]
    assert [line.split()[:2] for line in table[1:]] == [
        ["bob@xn--bcher-kva.example.com", "Acme"],
        ["alice@acme.example.com", "Globex"],
        ["carol@globex.example.com", "Globex"],
    ]
    assert "Alice Smith" in table[2]


def test_bad_input_is_refused_with_the_reason(acme: Gateway) -> None:
    invalid = acme.fails("senders", "add", "alice smith@acme.example.com", "--org", "Acme")
    assert (
        "gateway: invalid address 'alice smith@acme.example.com': The email address contains "
        "invalid characters before the @-sign: SPACE." in invalid
    )
    special = acme.fails("senders", "add", "alice@acme.test", "--org", "Acme")
    assert "special-use or reserved name" in special
    assert "no organisation 'Initech'" in acme.fails(
        "senders", "add", "alice@acme.example.com", "--org", "Initech"
    )
    assert "no organisation 'Initech'" in acme.fails("senders", "list", "--org", "Initech")
    assert "ADDRESS or --domain" in acme.fails("senders", "add", "--org", "Acme")
    assert "own mailboxes" in acme.fails("senders", "add", "support@example.org", "--org", "Acme")
    assert senders(acme.config) == []


def test_a_whole_domain_is_authorised_only_when_asked_for(acme: Gateway) -> None:
    # The organisation's own domain identifies it but authorises nobody.
    with closing(store.connect(acme.config.database_path)) as conn:
        assert store.sender_record(conn, "bob@acme.example.com") is None
    # "@domain" as an address is not a way to ask; a domain not the organisation's is refused.
    acme.fails("senders", "add", "@acme.example.com", "--org", "Acme")
    foreign = acme.fails("senders", "add", "--domain", "gmail.com", "--org", "Acme")
    assert "'gmail.com' is not one of Acme's domains" in foreign

    granted = acme.ok("senders", "add", "--domain", "ACME.example.com", "--org", "Acme")
    assert "warning: every address at acme.example.com is now authorised" in granted.stderr
    assert acme.json("senders", "list") == [
        {
            "address": "@acme.example.com",
            "organisation": "Acme",
            "name": None,
            "blocked": False,
            "domain": True,
        }
    ]
    # The next message sees it: the daemon reads the same committed rows.
    with closing(store.connect(acme.config.database_path)) as conn:
        record = store.sender_record(conn, "bob@acme.example.com")
        assert record is not None and record.authorised

    # A domain with a grant cannot be dropped from the organisation under it.
    assert "senders remove --domain" in acme.fails(
        "orgs", "update", "Acme", "--remove-domain", "acme.example.com"
    )
    acme.ok("senders", "remove", "@acme.example.com")  # as `senders list` shows it
    assert senders(acme.config) == []


def test_remove_and_block(acme: Gateway) -> None:
    seed_sender(acme.config, "alice@acme.example.com", "Acme", "Alice")
    assert "no sender 'carol@acme.example.com'" in acme.fails(
        "senders", "remove", "carol@acme.example.com"
    )

    # Blocking keeps the organisation; a blocked address cannot be re-authorised by `add`.
    acme.ok("senders", "block", "Alice@acme.example.com")
    acme.ok("senders", "block", "mallory@evil.example.com")
    assert [
        (s["address"], s["organisation"], s["name"], s["blocked"])
        for s in acme.json("senders", "list")
    ] == [
        ("alice@acme.example.com", "Acme", "Alice", True),
        ("mallory@evil.example.com", None, None, True),
    ]
    refused = acme.fails("senders", "add", "alice@acme.example.com", "--org", "Acme")
    assert "alice@acme.example.com is blocked" in refused and "senders remove" in refused
    with closing(store.connect(acme.config.database_path)) as conn:
        record = store.sender_record(conn, "alice@acme.example.com")
        assert record is not None and record.blocked and not record.authorised
        [org] = store.list_organisations(conn)
        assert org.senders == 0

    # Removing the row lifts the block.
    acme.ok("senders", "remove", "alice@acme.example.com")
    assert senders(acme.config) == [("mallory@evil.example.com", None, None, True)]


def test_orgs_update_and_remove(acme: Gateway) -> None:
    seed_sender(acme.config, "alice@acme.example.com", "Acme")
    seed_sender(acme.config, "mallory@acme.example.com", "Acme")
    acme.ok("senders", "block", "mallory@acme.example.com")
    acme.ok(
        "orgs",
        "update",
        "acme",
        "--add-domain",
        "acme.example.net",
        "--unit",
        "billing",
        "--account-manager",
        "am@example.org",
    )
    with closing(store.connect(acme.config.database_path)) as conn:
        org = store.find_organisation(conn, "Acme")
    assert org is not None
    assert (org.domains, org.unit, org.account_manager) == (
        ("acme.example.com", "acme.example.net"),
        "billing",
        "am@example.org",
    )
    assert "nothing to change" in acme.fails("orgs", "update", "Acme")

    # Removing an organisation removes its authorised senders but never lifts a block.
    removed = acme.ok("orgs", "remove", "Acme")
    assert "1 authorised sender" in removed.stdout
    assert senders(acme.config) == [("mallory@acme.example.com", None, None, True)]
    assert "no organisation 'Acme'" in acme.fails("orgs", "remove", "Acme")


def test_import_is_all_or_nothing_and_names_the_bad_lines(acme: Gateway, tmp_path: Path) -> None:
    seed_sender(acme.config, "zoe@acme.example.com", "Acme", "Zoe")
    before = senders(acme.config)
    bad = tmp_path / "senders.csv"
    bad.write_text(
        "address,org,name\n"  # 1
        "alice@acme.example.com,Acme,Alice\n"  # 2
        'bob@acme.example.com,acme,"Bob, the\n'  # 3
        'builder"\n'  # 4 (the same record)
        "carol@acme.example.com,Initech,Carol\n"  # 5: no such organisation
        "\n"  # 6
        "alice@ACME.example.com,Acme,\n"  # 7: already on line 2
        "dave at acme.example.com,Acme,Dave\n"  # 8: invalid
        "zoe@acme.example.com,Acme,Zoe Updated\n"  # 9
    )
    error = acme.fails("senders", "import", str(bad))
    assert f"{bad}:5: no organisation 'Initech'" in error
    assert f"{bad}:7: alice@acme.example.com is already on line 2" in error
    assert f"{bad}:8: invalid address 'dave at acme.example.com'" in error
    assert "nothing imported (3 bad row(s))" in error
    assert senders(acme.config) == before

    # A single bad row on line 4 is enough to import nothing.
    four = tmp_path / "four.csv"
    four.write_text(
        "address,org,name\nann@acme.example.com,Acme,Ann\nben@acme.example.com,Acme,\n"
        "x@,Acme,X\neve@acme.example.com,Acme,Eve\n"
    )
    assert f"{four}:4: invalid address 'x@'" in acme.fails("senders", "import", str(four))
    assert senders(acme.config) == before

    header = tmp_path / "header.csv"
    header.write_text("email,org,name\nann@acme.example.com,Acme,Ann\n")
    assert f"{header}:1: the header must be exactly address,org,name" in acme.fails(
        "senders", "import", str(header)
    )

    # The first file, fixed: all of it goes in, in one go.
    good = tmp_path / "good.csv"
    good.write_text(
        bad.read_text()
        .replace("Initech", "Acme")
        .replace("alice@ACME.example.com,Acme,\n", "")
        .replace("dave at ", "dave@")
    )
    imported = acme.ok("senders", "import", str(good))
    assert "4 added, 1 updated, 0 unchanged" in imported.stdout
    assert senders(acme.config) == [
        ("alice@acme.example.com", "Acme", "Alice", False),
        ("bob@acme.example.com", "Acme", "Bob, the builder", False),
        ("carol@acme.example.com", "Acme", "Carol", False),
        ("dave@acme.example.com", "Acme", "Dave", False),
        ("zoe@acme.example.com", "Acme", "Zoe Updated", False),
    ]


def test_export_import_round_trip(acme: Gateway, tmp_path: Path) -> None:
    seed_org(acme.config, "Globex", "globex.example.com")
    seed_sender(acme.config, "alice@acme.example.com", "Acme", 'Al "Ice", Jr')
    seed_sender(acme.config, "ünï@xn--bcher-kva.example.com", "Globex", "Ünï")
    seed_sender(acme.config, "@globex.example.com", "Globex")
    acme.ok("senders", "block", "mallory@evil.example.com")
    exported = acme.ok("senders", "export")
    assert exported.stdout.splitlines() == [
        "address,org,name",
        'alice@acme.example.com,Acme,"Al ""Ice"", Jr"',
        "@globex.example.com,Globex,",
        "ünï@xn--bcher-kva.example.com,Globex,Ünï",
    ]
    assert "1 blocked address(es) not exported" in exported.stderr

    # Into the same database: nothing changes.
    again = acme.ok("senders", "import", "-", stdin=exported.stdout)
    assert "0 added, 0 updated, 3 unchanged" in again.stdout
    assert "warning" not in again.stderr
    assert [r["action"] for r in rows(acme.config, "SELECT action FROM events")] == [
        "sender.blocked"
    ]

    # Into a fresh one with the same organisations: the same senders, the same export.
    (tmp_path / "other").mkdir()
    other = Gateway(load_config(write_config(tmp_path / "other")))
    seed_org(other.config, "Acme", "acme.example.com")
    seed_org(other.config, "Globex", "globex.example.com")
    path = tmp_path / "senders.csv"
    path.write_text(exported.stdout)
    loaded = other.ok("senders", "import", str(path))
    assert "3 added, 0 updated, 0 unchanged" in loaded.stdout
    assert "every address at globex.example.com is now authorised" in loaded.stderr
    assert other.ok("senders", "export").stdout == exported.stdout


def test_every_change_leaves_an_event_with_who_what_and_why(
    gateway: Gateway, tmp_path: Path
) -> None:
    why = ("--reason", "contract #42")
    gateway.ok("orgs", "add", "Acme", "--domain", "acme.example.com")
    gateway.ok("orgs", "update", "Acme", "--unit", "billing", *why)
    gateway.ok("senders", "add", "alice@acme.example.com", "--org", "Acme", *why)
    gateway.ok("senders", "add", "alice@acme.example.com", "--org", "Acme", "--name", "Alice", *why)
    gateway.ok("senders", "block", "mallory@evil.example.com", *why)
    gateway.ok("senders", "remove", "mallory@evil.example.com", *why)
    csv_file = tmp_path / "s.csv"
    csv_file.write_text("address,org,name\nbob@acme.example.com,Acme,Bob\n")
    gateway.ok("senders", "import", str(csv_file), *why)
    # Refused commands and no-ops change nothing and record nothing.
    gateway.fails("senders", "add", "carol@acme.example.com", "--org", "Nope", *why)
    gateway.ok("senders", "add", "alice@acme.example.com", "--org", "Acme", *why)

    events = gateway.events()
    assert all(set(e) == EVENT_KEYS for e in events)
    assert [(e["action"], e["subject"]) for e in events] == [
        ("senders.imported", "senders"),
        ("sender.added", "sender:bob@acme.example.com"),
        ("sender.removed", "sender:mallory@evil.example.com"),
        ("sender.blocked", "sender:mallory@evil.example.com"),
        ("sender.updated", "sender:alice@acme.example.com"),
        ("sender.added", "sender:alice@acme.example.com"),
        ("org.updated", "org:Acme"),
        ("org.added", "org:Acme"),
    ]
    assert {e["actor"] for e in events} == {ACTOR}
    assert all(e["time"].endswith("+00:00") and e["ticket"] is None for e in events)
    assert [e["detail"].get("reason") for e in events] == ["contract #42"] * 7 + [None]
    assert events[0]["detail"] == {
        "file": str(csv_file),
        "added": 1,
        "updated": 0,
        "unchanged": 0,
        "reason": "contract #42",
    }
    assert events[1]["detail"]["line"] == 2
    assert events[4]["detail"]["name"] == {"from": None, "to": "Alice"}
    assert events[6]["detail"]["unit"] == {"from": None, "to": "billing"}
    assert events[7]["detail"] == {
        "domains": ["acme.example.com"],
        "unit": None,
        "account_manager": None,
        "out_of_hours": False,
    }

    # --ticket filters (these changes concern no ticket); the table is newest first.
    with (
        closing(store.connect(gateway.config.database_path)) as conn,
        store.write_transaction(conn),
    ):
        store.record_event(
            conn,
            time=NOW,
            actor="alice@acme.example.com",
            action="ticket.created",
            subject="ticket:1",
            ticket=1,
        )
    [ticket_event] = gateway.json("events", "--ticket", "#1")
    assert (ticket_event["action"], ticket_event["ticket"]) == ("ticket.created", 1)
    table = gateway.ok("events", "--limit", "2").stdout.splitlines()
    assert table[0].split() == ["TIME", "(UTC)", "ACTOR", "ACTION", "SUBJECT", "DETAIL"]
    assert len(table) == 3
    assert "ticket.created" in table[1] and "senders.imported" in table[2]
    assert ACTOR in table[2] and 'reason="contract #42"' in table[2]


def test_a_locked_database_is_a_clear_error(make_config: Callable[..., Config]) -> None:
    config = make_config(extra_storage="busy_timeout_ms = 200")
    seed_org(config, "Acme")
    # Another writer (the daemon's, say) holds the write lock for longer than busy_timeout.
    holder = sqlite3.connect(config.database_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        error = Gateway(config).fails("senders", "add", "alice@example.com", "--org", "Acme")
        assert "locked by another process" in error and "nothing was changed" in error
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert senders(config) == []
    assert rows(config, "SELECT * FROM events") == []


# --- numbers beyond SQLite's INTEGER -----------------------------------------------------

# Every command that takes a number, with the number as `{}`.
NUMBERED_COMMANDS = [
    ("messages", "list", "--limit", "{}"),
    ("messages", "show", "{}"),
    ("tickets", "show", "{}"),
    ("tickets", "reply", "{}", "--from", "dana@example.org"),
    ("tickets", "status", "{}", "open"),
    ("quarantine", "show", "{}"),
    ("quarantine", "release", "{}"),
    ("quarantine", "discard", "{}"),
    ("quarantine", "block", "{}"),
    ("events", "--ticket", "{}"),
    ("events", "--limit", "{}"),
    ("outbox", "list", "--limit", "{}"),
    ("outbox", "retry", "{}"),
]
TICKET_NUMBERED = {
    ("tickets", "show"),
    ("tickets", "reply"),
    ("tickets", "status"),
    ("events", "--ticket"),
}
LARGEST = 2**63 - 1  # SQLite's largest INTEGER


def run_main(
    config: Config, args: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """`gateway.cli.main` in this process (the same parser and handlers, without the third
    of a second a subprocess costs): (exit status, stderr)."""
    try:
        status = cli.main(["--config", str(config.path), *args])
    except SystemExit as exc:  # argparse's usage errors
        status = int(exc.code or 0)
    return status, capsys.readouterr().err


TOO_LARGE = [
    pytest.param(command, number, id=f"{' '.join(command[:2])}-{number[:21]}")
    for command in NUMBERED_COMMANDS
    # 2**63; ticket numbers may be written #N; past int()'s 4300 digits.
    for number in (str(LARGEST + 1), f"#{LARGEST + 1}", "9" * 40, "9" * 5000)
    if not number.startswith("#") or command[:2] in TICKET_NUMBERED
]


@pytest.mark.parametrize(("command", "number"), TOO_LARGE)
def test_a_number_too_large_is_a_usage_error(
    config: Config, capsys: pytest.CaptureFixture[str], command: tuple[str, ...], number: str
) -> None:
    args = [part.format(number) for part in command]
    status, error = run_main(config, args, capsys)
    assert status == 2, (args, error)
    assert "at most 9223372036854775807" in error, error
    assert "Traceback" not in error


@pytest.mark.parametrize("command", NUMBERED_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_the_largest_number_is_answered_not_crashed(
    config: Config,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("The reply text.\n"))  # tickets reply
    config_staff = load_config(
        write_config(config.path.parent, extra='[staff]\naddresses = ["dana@example.org"]\n')
    )
    store.connect(config_staff.database_path).close()  # a read never creates it (issue 13)
    args = [part.format(LARGEST) for part in command]
    status, error = run_main(config_staff, args, capsys)
    assert "Traceback" not in error
    if args[-2] in ("--limit", "--ticket"):  # a filter: nothing matches, nothing to list
        assert status == 0, (args, error)
    else:
        assert status == 1, (args, error)
        assert "no " in error and str(LARGEST) in error, error


def test_a_number_too_large_from_the_console_script(gateway: Gateway) -> None:
    result = gateway.run("tickets", "show", str(LARGEST + 1))
    assert result.returncode == 2
    assert "at most 9223372036854775807" in result.stderr
    assert "Traceback" not in result.stderr
