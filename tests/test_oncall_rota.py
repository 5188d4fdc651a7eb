"""Issue 12 items 2 and 6 (the rota side): `gateway oncall add/list/remove/now/import`,
organisations' out-of-hours cover, and what `gateway desk` shows of urgency, upset clients
and who is on call. The CLI runs in this process on a FixedClock against a real SQLite file;
the desk test files real mail through the real server.

The clock is Saturday 5 December 2026 20:00 UTC: London is on GMT (UTC), the billing unit
works in Berlin (CET, UTC+1), so a time without an offset moves by an hour there."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway import cli as gateway_cli
from gateway.app import Gateway
from gateway.clock import FixedClock
from gateway.config import Config

from .conftest import make_message, rows, seed_senders, send_message

NOW = datetime(2026, 12, 5, 20, 0, tzinfo=UTC)
SETUP = """
[staff]
addresses = ["dana@example.org", "bob@example.org", "carol@example.org"]

[oncall]
secondary = "night@example.org"

[[unit]]
name = "support"
secondary = "sec@example.org"
holidays_country = ""

[[unit]]
name = "billing"
timezone = "Europe/Berlin"
holidays_country = ""
"""


@pytest.fixture
def config(make_config: Any) -> Config:
    cfg: Config = make_config(extra=SETUP)
    seed_senders(cfg)  # Client Ltd owns client.example.com: its people are never on call
    return cfg


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(config: Config, clock: FixedClock) -> Run:
    """The CLI in this process on the test's clock: (exit status, stdout, stderr)."""

    def runner(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = gateway_cli.main(["--config", str(config.path), *args], clock=clock)
        return code, out.getvalue(), err.getvalue()

    return runner


def ok(run: Run, *args: str) -> str:
    code, out, err = run(*args)
    assert code == 0, err
    return out


def fails(run: Run, *args: str) -> str:
    code, out, err = run(*args)
    assert code == 1, (out, err)
    assert "Traceback" not in err
    return err


def shifts(config: Config) -> list[tuple[str, str | None, str, str, str]]:
    return [
        (r["address"], r["unit"], r["starts_at"], r["ends_at"], r["source"])
        for r in rows(config, "SELECT * FROM oncall_shifts ORDER BY starts_at, address")
    ]


def events(config: Config, prefix: str) -> list[dict[str, Any]]:
    found = rows(config, "SELECT * FROM events WHERE action LIKE ? ORDER BY id", (f"{prefix}%",))
    return [{**dict(r), "detail": json.loads(r["detail"])} for r in found]


# --- item 2: the rota by hand -------------------------------------------------------------


def test_add_list_remove_with_local_times_and_events(config: Config, run: Run) -> None:
    # No offset: the unit's zone (Berlin, UTC+1); the address is normalised.
    out = ok(
        run,
        *("oncall", "add", "Bob@Example.ORG", "--unit", "billing"),
        *("--from", "2026-12-05T18:00", "--until", "2026-12-06T09:00"),
    )
    assert "bob@example.org" in out and "billing" in out
    # With an offset as given; no --unit: the whole desk.
    ok(
        run,
        *("oncall", "add", "dana@example.org"),
        *("--from", "2026-12-06T09:00+00:00", "--until", "2026-12-07T09:00+00:00"),
    )
    # A shift that has ended: listed only with --all.
    ok(
        run,
        *("oncall", "add", "carol@example.org"),
        *("--from", "2026-12-01T09:00Z", "--until", "2026-12-02T09:00Z"),
    )
    listed = json.loads(ok(run, "oncall", "list", "--json"))
    assert listed == [
        {
            "id": 1,
            "address": "bob@example.org",
            "unit": "billing",
            "from": "2026-12-05T17:00:00.000000+00:00",
            "until": "2026-12-06T08:00:00.000000+00:00",
            "source": "cli",
        },
        {
            "id": 2,
            "address": "dana@example.org",
            "unit": None,
            "from": "2026-12-06T09:00:00.000000+00:00",
            "until": "2026-12-07T09:00:00.000000+00:00",
            "source": "cli",
        },
    ]
    assert [s["id"] for s in json.loads(ok(run, "oncall", "list", "--json", "--all"))] == [3, 1, 2]
    assert [
        s["id"] for s in json.loads(ok(run, "oncall", "list", "--json", "--unit", "billing"))
    ] == [1]
    # The text table shows the unit's local time.
    text = ok(run, "oncall", "list")
    assert "2026-12-05 18:00 CET" in text and "2026-12-06 09:00 CET" in text
    assert "(desk)" in text and "carol@example.org" not in text

    assert "removed shift 1" in ok(run, "oncall", "remove", "1")
    assert "no on-call shift 1" in fails(run, "oncall", "remove", "1")
    assert [s[0] for s in shifts(config)] == ["carol@example.org", "dana@example.org"]
    added, removed = events(config, "oncall.added"), events(config, "oncall.removed")
    assert len(added) == 3 and [e["subject"] for e in removed] == ["oncall:1"]
    assert removed[0]["actor"].startswith("cli:")
    assert removed[0]["detail"]["address"] == "bob@example.org"
    assert removed[0]["detail"]["unit"] == "billing"


def test_add_refuses_bad_input_and_writes_nothing(config: Config, run: Run) -> None:
    span = ("--from", "2026-12-05T18:00", "--until", "2026-12-06T09:00")
    assert "unknown unit 'sales'" in fails(
        run, "oncall", "add", "bob@example.org", "--unit", "sales", *span
    )
    backwards = ("--from", "2026-12-06T09:00", "--until", "2026-12-05T18:00")
    assert "must be after --from" in fails(run, "oncall", "add", "bob@example.org", *backwards)
    same = ("--from", "2026-12-06T09:00", "--until", "2026-12-06T09:00")
    assert "must be after --from" in fails(run, "oncall", "add", "bob@example.org", *same)
    bad = ("--from", "tonight", "--until", "2026-12-06T09:00")
    assert "--from: not an ISO 8601" in fails(run, "oncall", "add", "bob@example.org", *bad)
    assert "invalid address" in fails(run, "oncall", "add", "not-an-address", *span)
    # A page names a client and an incident: never a client's address, nor our mailbox.
    assert "client's address" in fails(run, "oncall", "add", "alice@client.example.com", *span)
    assert "own mailboxes" in fails(run, "oncall", "add", "support@example.org", *span)
    assert shifts(config) == [] and events(config, "oncall") == []
    # Usage errors exit 2 (argparse), no traceback.
    with pytest.raises(SystemExit) as exit_:
        run("oncall", "add", "bob@example.org", "--from", "2026-12-05T18:00")
    assert exit_.value.code == 2


def test_now_is_the_units_rota_else_desk_wide_else_the_secondary(config: Config, run: Run) -> None:
    def now() -> dict[str, Any]:
        return {o["unit"]: o for o in json.loads(ok(run, "oncall", "now", "--json"))}

    # Nobody on the rota: the unit's secondary, else [oncall] secondary, and it says so.
    found = now()
    assert found["support"]["addresses"] == ["sec@example.org"]
    assert found["support"]["fallback"] is True and found["support"]["on_call"] == []
    assert found["billing"]["addresses"] == ["night@example.org"]
    text = ok(run, "oncall", "now", "--unit", "support")
    assert "sec@example.org (secondary: no one on the rota)" in text
    assert "billing" not in text

    # A desk-wide shift covers every unit; a unit's own shift comes first.
    span = ("--from", "2026-12-05T19:00Z", "--until", "2026-12-06T07:00Z")
    ok(run, "oncall", "add", "dana@example.org", *span)
    ok(run, "oncall", "add", "bob@example.org", "--unit", "support", *span)
    found = now()
    assert found["support"]["addresses"] == ["bob@example.org"]
    assert found["support"]["fallback"] is False
    assert found["support"]["on_call"][0]["until"] == "2026-12-06T07:00:00.000000+00:00"
    assert found["billing"]["addresses"] == ["dana@example.org"]
    [only] = json.loads(ok(run, "oncall", "now", "--unit", "billing", "--json"))
    assert only["unit"] == "billing" and only["secondary"] == "night@example.org"
    assert "unknown unit 'sales'" in fails(run, "oncall", "now", "--unit", "sales")


# --- item 2: the rota from a calendar -----------------------------------------------------

VTIMEZONE = """BEGIN:VTIMEZONE
TZID:Europe/London
X-LIC-LOCATION:Europe/London
BEGIN:DAYLIGHT
TZOFFSETFROM:+0000
TZOFFSETTO:+0100
TZNAME:BST
DTSTART:19700329T010000
RRULE:FREQ=YEARLY;BYMONTH=3;BYDAY=-1SU
END:DAYLIGHT
BEGIN:STANDARD
TZOFFSETFROM:+0100
TZOFFSETTO:+0000
TZNAME:GMT
DTSTART:19701025T020000
RRULE:FREQ=YEARLY;BYMONTH=10;BYDAY=-1SU
END:STANDARD
END:VTIMEZONE
"""


def calendar(*events: str) -> str:
    """An iCalendar file shaped like a Google Calendar export (CRLF, a VTIMEZONE)."""
    text = (
        "BEGIN:VCALENDAR\nPRODID:-//Google Inc//Google Calendar 70.9054//EN\nVERSION:2.0\n"
        "CALSCALE:GREGORIAN\nMETHOD:PUBLISH\nX-WR-CALNAME:Support on call\n"
        "X-WR-TIMEZONE:Europe/London\n" + VTIMEZONE + "".join(events) + "END:VCALENDAR\n"
    )
    return text.replace("\n", "\r\n")


def event(uid: str, *lines: str) -> str:
    body = "".join(f"{line}\n" for line in lines)
    return f"BEGIN:VEVENT\nUID:{uid}\nDTSTAMP:20261201T120000Z\n{body}END:VEVENT\n"


# The night of Saturday 5 December (BST is long over: London is on UTC), Bob attending.
NIGHT = event(
    "night-1@google.com",
    "DTSTART;TZID=Europe/London:20261205T180000",
    "DTEND;TZID=Europe/London:20261206T090000",
    "SUMMARY:Support on call",
    "ORGANIZER;CN=Dana:mailto:dana@example.org",
    "ATTENDEE;CUTYPE=INDIVIDUAL;ROLE=REQ-PARTICIPANT;PARTSTAT=ACCEPTED;CN=Bob;X-NUM-GUES",
    " TS=0:mailto:Bob@Example.org",
    "ATTENDEE;PARTSTAT=DECLINED;CN=Dana:mailto:dana@example.org",
)
# Sunday all day, the address in the summary only.
SUNDAY = event(
    "sunday@google.com",
    "DTSTART;VALUE=DATE:20261206",
    "DTEND;VALUE=DATE:20261207",
    "SUMMARY:On call: carol@example.org",
)
NOBODY = event(
    "standup@google.com",
    "DTSTART:20261207T093000Z",
    "DTEND:20261207T094500Z",
    "SUMMARY:Stand-up",
)
PAST = event(
    "last-week@google.com",
    "DTSTART:20261128T180000Z",
    "DTEND:20261129T090000Z",
    "SUMMARY:bob@example.org",
)
CANCELLED = event(
    "cancelled@google.com",
    "DTSTART:20261208T180000Z",
    "DTEND:20261209T090000Z",
    "STATUS:CANCELLED",
    "SUMMARY:bob@example.org",
)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return str(path)


def test_import_a_calendar_export_and_reimport_replaces(
    config: Config, run: Run, tmp_path: Path
) -> None:
    ics = write(tmp_path, "rota.ics", calendar(NIGHT, SUNDAY, NOBODY, PAST, CANCELLED))
    code, out, err = run("oncall", "import", ics, "--unit", "support")
    assert code == 0, err
    assert "2 shift(s) from 5 event(s), 0 replaced" in out
    assert "1 event(s) name no one" in err and "ended before now" in err and "cancelled" in err
    expected = [
        (
            "bob@example.org",
            "support",
            "2026-12-05T18:00:00.000000+00:00",
            "2026-12-06T09:00:00.000000+00:00",
            "ical:night-1@google.com",
        ),
        (
            "carol@example.org",
            "support",
            "2026-12-06T00:00:00.000000+00:00",
            "2026-12-07T00:00:00.000000+00:00",
            "ical:sunday@google.com",
        ),
    ]
    assert shifts(config) == expected
    [now] = json.loads(ok(run, "oncall", "now", "--unit", "support", "--json"))
    assert now["addresses"] == ["bob@example.org"]

    # The same file again: replaced, not duplicated.
    assert "2 shift(s) from 5 event(s), 2 replaced" in ok(
        run, "oncall", "import", ics, "--unit", "support"
    )
    assert shifts(config) == expected
    # The calendar moved the night an hour later: the shift follows it.
    moved = NIGHT.replace("T180000", "T190000")
    ok(run, "oncall", "import", write(tmp_path, "moved.ics", calendar(moved)), "--unit", "support")
    assert shifts(config)[0][2] == "2026-12-05T19:00:00.000000+00:00"
    assert len(shifts(config)) == 2
    # The same events for another unit (billing, Berlin): a rota of its own; the all-day
    # event runs from midnight in Berlin.
    ok(run, "oncall", "import", ics, "--unit", "billing")
    billing = [s for s in shifts(config) if s[1] == "billing"]
    assert [s[2] for s in billing] == [
        "2026-12-05T18:00:00.000000+00:00",
        "2026-12-05T23:00:00.000000+00:00",
    ]
    [imported, *_] = events(config, "oncall.imported")
    assert imported["detail"]["unit"] == "support" and imported["detail"]["added"] == 2
    assert imported["detail"]["unnamed"] == ["standup@google.com"]
    assert imported["actor"].startswith("cli:")


def test_import_only_the_addresses_asked_for(config: Config, run: Run, tmp_path: Path) -> None:
    # A team calendar: "On call: bob" names Bob by his local part when he is asked for.
    named = event(
        "bob-night@example.org",
        "DTSTART:20261205T180000",  # floating: the unit's zone
        "DURATION:PT15H",
        "SUMMARY:On call: bob",
    )
    ics = write(tmp_path, "team.ics", calendar(named, SUNDAY))
    ok(run, "oncall", "import", ics, "--address", "bob@example.org")
    assert shifts(config) == [
        (
            "bob@example.org",
            None,
            "2026-12-05T18:00:00.000000+00:00",
            "2026-12-06T09:00:00.000000+00:00",
            "ical:bob-night@example.org",
        )
    ]


@pytest.mark.parametrize(
    ("events_", "message"),
    [
        ((SUNDAY, "this is not a calendar line\n"), "not an iCalendar file"),
        (
            (
                SUNDAY,
                event(
                    "weekly@google.com",
                    "DTSTART:20261205T180000Z",
                    "DTEND:20261206T090000Z",
                    "RRULE:FREQ=WEEKLY",
                    "SUMMARY:bob@example.org",
                ),
            ),
            "event UID weekly@google.com is recurring (RRULE)",
        ),
        (
            (
                SUNDAY,
                event(
                    "mars@x",
                    "DTSTART;TZID=Mars/Olympus:20261205T180000",
                    "DTEND;TZID=Mars/Olympus:20261206T090000",
                    "SUMMARY:bob@example.org",
                ),
            ),
            "unknown time zone TZID=Mars/Olympus",
        ),
        (
            (SUNDAY, event("bad-date@x", "DTSTART:tonight", "SUMMARY:bob@example.org")),
            "event UID bad-date@x: DTSTART",
        ),
        (
            (SUNDAY, event("period@x", "DTSTART:20261205T180000Z/PT1H", "SUMMARY:bob@example.org")),
            "event UID period@x DTSTART: not a date or date-time",
        ),
        (
            (
                SUNDAY,
                "BEGIN:VEVENT\nDTSTART:20261205T180000Z\nSUMMARY:bob@example.org\nEND:VEVENT\n",
            ),
            "has no UID",
        ),
        (
            (
                SUNDAY,
                event(
                    "backwards@x",
                    "DTSTART:20261206T180000Z",
                    "DTEND:20261205T180000Z",
                    "SUMMARY:bob@example.org",
                ),
            ),
            "ends before it starts",
        ),
        (
            (
                SUNDAY,
                event(
                    "client@x",
                    "DTSTART:20261206T180000Z",
                    "DTEND:20261207T180000Z",
                    "SUMMARY:alice@client.example.com",
                ),
            ),
            "client's address",
        ),
    ],
)
def test_a_bad_file_is_refused_whole(
    config: Config, run: Run, tmp_path: Path, events_: tuple[str, ...], message: str
) -> None:
    # What was imported before stays as it was.
    ok(run, "oncall", "import", write(tmp_path, "good.ics", calendar(SUNDAY)))
    before = shifts(config)
    sunday_moved = SUNDAY.replace("20261206", "20261213").replace("20261207", "20261214")
    ics = write(tmp_path, "bad.ics", calendar(sunday_moved, *events_[1:]))
    err = fails(run, "oncall", "import", ics)
    assert message in err and "bad.ics" in err
    assert shifts(config) == before
    assert len(events(config, "oncall.imported")) == 1


def test_import_cannot_read_the_file(run: Run, tmp_path: Path) -> None:
    assert "cannot read" in fails(run, "oncall", "import", str(tmp_path / "missing.ics"))
    assert "unknown unit 'sales'" in fails(
        run, "oncall", "import", str(tmp_path / "missing.ics"), "--unit", "sales"
    )


# --- organisations' cover --------------------------------------------------------------------


def test_orgs_out_of_hours_cover(config: Config, run: Run) -> None:
    ok(run, "orgs", "add", "Acme", "--domain", "acme.example.com", "--out-of-hours")
    ok(run, "orgs", "add", "Plain", "--domain", "plain.example.com")
    listed = {o["name"]: o for o in json.loads(ok(run, "orgs", "list", "--json"))}
    assert listed["Acme"]["out_of_hours"] is True
    assert listed["Plain"]["out_of_hours"] is False
    table = ok(run, "orgs", "list").splitlines()
    assert "OUT OF HOURS" in table[0]
    assert [line.split()[-1] for line in table[1:] if line.startswith(("Acme", "Plain"))] == [
        "yes",
        "no",
    ]
    [added] = [e for e in events(config, "org.added") if e["subject"] == "org:Acme"]
    assert added["detail"]["out_of_hours"] is True

    ok(run, "orgs", "update", "Acme", "--no-out-of-hours")
    ok(run, "orgs", "update", "Plain", "--out-of-hours")
    # Another change leaves the cover as it was.
    ok(run, "orgs", "update", "Plain", "--account-manager", "am@example.org")
    listed = {o["name"]: o for o in json.loads(ok(run, "orgs", "list", "--json"))}
    assert (listed["Acme"]["out_of_hours"], listed["Plain"]["out_of_hours"]) == (False, True)
    updated = [e["detail"] for e in events(config, "org.updated")]
    assert updated[0]["out_of_hours"] == {"from": True, "to": False}
    assert updated[1]["out_of_hours"] == {"from": False, "to": True}
    assert "out_of_hours" not in updated[2]
    assert "unchanged" in ok(run, "orgs", "update", "Plain", "--out-of-hours")


# --- item 6: the desk ------------------------------------------------------------------------


async def test_desk_shows_urgent_upset_and_who_is_on_call(
    config: Config, clock: FixedClock, run: Run, start_gateway: Any
) -> None:
    gateway: Gateway = await start_gateway(config, clock=clock)
    await send_message(
        gateway,
        make_message(subject="Our site is down", body="Hello,\r\n\r\nThe site is down.\r\n"),
    )
    await send_message(gateway, make_message(subject="Invoice", body="This is unacceptable!!!\r\n"))
    await send_message(
        gateway, make_message(subject="Printer", body="Hello,\r\n\r\nPaper jam.\r\n")
    )
    ok(
        run,
        "oncall",
        "add",
        "bob@example.org",
        "--unit",
        "support",
        "--from",
        "2026-12-05T19:00Z",
        "--until",
        "2026-12-06T07:00Z",
    )
    desk = {d["unit"]: d for d in json.loads(ok(run, "desk", "--json"))}
    assert (desk["support"]["open"], desk["support"]["urgent"], desk["support"]["upset"]) == (
        3,
        1,
        1,
    )
    assert desk["support"]["on_call"] == ["bob@example.org"]
    assert desk["support"]["on_call_rota"] is True
    assert desk["billing"]["on_call"] == ["night@example.org"]
    assert desk["billing"]["on_call_rota"] is False
    assert (desk["billing"]["urgent"], desk["billing"]["upset"]) == (0, 0)
    text = ok(run, "desk")
    assert "URGENT" in text and "UPSET" in text and "ON CALL" in text
    assert "night@example.org (secondary)" in text and "bob@example.org" in text
