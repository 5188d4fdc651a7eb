"""Reminders, escalations and the daily digest (issue 11, item 5), with time moved by
`gateway scheduler run --now` (the CLI, a real subprocess) or a FixedClock given to the
daemon. Tickets arrive over SMTP; their promises are written as the commitments' rows
(the setting actions are another part of the issue), through `open_promise` below.

Dates: Saturday 2026-12-05 is a weekend day, Monday 7 and Tuesday 8 December are
business days of the default hours (09:00-17:30 Europe/London, which is UTC in winter),
Friday 25 December is Christmas Day, a bank holiday the `holidays` package knows.
"""

from __future__ import annotations

import json
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway import store
from gateway.app import Gateway
from gateway.clock import FixedClock, iso
from gateway.config import Config
from gateway.scheduler import run_jobs

from .conftest import cli, make_message, rows, send_message

SATURDAY = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
STAFF = ("bob@example.org", "carol@example.org")
LEAD = "lead@example.org"
CLIENT = "alice@client.example.com"
UNITS = f"""
[[unit]]
name = "support"
staff = ["{STAFF[0]}", "{STAFF[1]}"]
lead = "{LEAD}"
"""
SCHEDULED = ("reminder", "escalation", "digest")


@pytest.fixture
def desk(make_config: Any) -> Config:
    return make_config(extra=UNITS)  # type: ignore[no-any-return]


async def start_desk(start_gateway: Any, config: Config, at: datetime = SATURDAY) -> Gateway:
    gateway: Gateway = await start_gateway(config, clock=FixedClock(at))
    return gateway


async def new_ticket(
    gateway: Gateway, config: Config, subject: str = "Printer on fire", to: str = "support@"
) -> int:
    mailbox = to + "example.org"
    code, text = (
        await send_message(gateway, make_message(subject=subject, to=mailbox), CLIENT, [mailbox])
    ).reply
    assert code == 250, text
    return int(rows(config, "SELECT max(number) AS n FROM tickets")[0]["n"])


def open_promise(
    config: Config,
    ticket: int,
    due: str,
    *,
    created: str = "2026-12-05T10:00:00+00:00",
    owner: str | None = None,
    state: str = "open",
    note: str | None = None,
) -> int:
    """A commitment row as the setting actions write it (due and times in UTC ISO). It
    replaces the promise the ticket was given when it opened (its first response), as a
    staff member's own promise does."""
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        conn.execute(
            "UPDATE commitments SET state = 'replaced', closed_at = ?"
            " WHERE ticket = ? AND state = 'open'",
            (stamp(created), ticket),
        )
        cursor = conn.execute(
            "INSERT INTO commitments (ticket, due, set_by, note, state, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (ticket, stamp(due), "bob@example.org", note, state, stamp(created)),
        )
        if state == "open":
            conn.execute(
                "UPDATE tickets SET next_update_due = ?, owner = ?, status = 'open'"
                " WHERE number = ?",
                (stamp(due), owner, ticket),
            )
        else:
            conn.execute("UPDATE tickets SET owner = ? WHERE number = ?", (owner, ticket))
        number = cursor.lastrowid
        assert number is not None
        return number


def stamp(text: str) -> str:
    return iso(datetime.fromisoformat(text))


async def run(config: Config, now: str, *options: str) -> dict[str, Any]:
    result = await cli(config, "scheduler", "run", "--now", now, "--json", *options)
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def scheduled_mail(config: Config, kind: str | None = None) -> list[tuple[str, str, int | None]]:
    """(kind, recipient, ticket) of the scheduler's mail in the outbox, in order."""
    kinds = (kind,) if kind else SCHEDULED
    marks = ",".join("?" * len(kinds))
    return [
        (r["kind"], r["rcpt_to"], r["ticket"])
        for r in rows(
            config,
            f"SELECT kind, rcpt_to, ticket FROM outbox WHERE kind IN ({marks}) ORDER BY id",
            kinds,
        )
    ]


def fired(did: dict[str, Any], *, digests: bool = False) -> list[dict[str, Any]]:
    """The actions of a pass: without the digest (a business day's pass sends one) unless
    asked for, or only the digests."""
    found: list[dict[str, Any]] = did["actions"]
    return [a for a in found if (a["action"] == "digest") == digests]


def events(config: Config, action: str) -> list[dict[str, Any]]:
    return [
        {"subject": r["subject"], "ticket": r["ticket"], "detail": json.loads(r["detail"])}
        for r in rows(config, "SELECT * FROM events WHERE action = ? ORDER BY id", (action,))
    ]


async def test_reminder_once_before_then_escalation_once_after(
    desk: Config, start_gateway: Any
) -> None:
    gateway = await start_desk(start_gateway, desk)
    ticket = await new_ticket(gateway, desk)
    promise = open_promise(desk, ticket, "2026-12-08T14:00:00+00:00", owner=STAFF[0])

    # remind_before is 1h of business time: the reminder is due at 13:00.
    assert fired(await run(desk, "2026-12-08T12:59:00+00:00")) == []
    did = await run(desk, "2026-12-08T13:00:00+00:00")
    [reminder] = fired(did)
    assert reminder["action"] == "reminder"
    assert reminder["ticket"] == ticket
    assert reminder["to"] == [STAFF[0]]  # the owner, not the whole unit
    assert scheduled_mail(desk, "reminder") == [("reminder", STAFF[0], ticket)]
    assert [e["subject"] for e in events(desk, "commitment.reminded")] == [f"commitment:{promise}"]

    # Once: not again later, nor when the pass runs twice at the same moment.
    assert fired(await run(desk, "2026-12-08T13:00:00+00:00")) == []
    assert fired(await run(desk, "2026-12-08T13:59:59+00:00")) == []

    did = await run(desk, "2026-12-08T14:30:00+00:00")
    [escalation] = fired(did)
    assert escalation["action"] == "escalation"
    assert escalation["to"] == [LEAD, STAFF[0]]
    assert escalation["late_seconds"] == 1800
    assert scheduled_mail(desk, "escalation") == [
        ("escalation", LEAD, ticket),
        ("escalation", STAFF[0], ticket),
    ]
    [row] = rows(desk, "SELECT state, escalated_at FROM commitments WHERE id = ?", (promise,))
    assert row["state"] == "missed"
    assert row["escalated_at"] == stamp("2026-12-08T14:30:00+00:00")
    [missed] = events(desk, "commitment.missed")
    assert missed["ticket"] == ticket
    assert missed["detail"]["late_seconds"] == 1800

    # The escalation names the promise and how late it is.
    [spec] = rows(
        desk,
        "SELECT s.spec FROM mail_specs s JOIN outbox o ON o.message = s.message"
        " WHERE o.kind = 'escalation' AND o.rcpt_to = ?",
        (LEAD,),
    )
    context = json.loads(spec["spec"])["context"]
    assert context["due"] == "Tuesday 8 December 2026, 14:00 GMT"
    assert context["late"] == "30 minutes"

    for later in ("2026-12-08T15:00:00+00:00", "2026-12-09T10:00:00+00:00"):
        assert fired(await run(desk, later)) == []
    assert len(scheduled_mail(desk, "reminder")) == 1
    assert len(scheduled_mail(desk, "escalation")) == 2


async def test_the_daemon_catches_up_once_at_start_and_not_after_a_restart(
    desk: Config, start_gateway: Any
) -> None:
    gateway = await start_desk(start_gateway, desk)
    ticket = await new_ticket(gateway, desk)
    open_promise(desk, ticket, "2026-12-08T14:00:00+00:00", owner=STAFF[0])

    # The daemon was down at the due time: it escalates once when it starts (no reminder
    # after the due time: the escalation says it all). Its pass at start may still be
    # running: one more pass waits for the writer, and each job commits once either way.
    late = FixedClock(datetime(2026, 12, 8, 16, 0, tzinfo=UTC))
    restarted = Gateway(desk, clock=late)
    await restarted.start()
    try:
        await run_jobs(desk, restarted.writer, late)
        assert [k for k, _, _ in scheduled_mail(desk) if k != "digest"] == ["escalation"] * 2
    finally:
        await restarted.stop(grace=5)
    again = Gateway(desk, clock=late)
    await again.start()
    try:
        await run_jobs(desk, again.writer, late)
    finally:
        await again.stop(grace=5)
    assert [k for k, _, _ in scheduled_mail(desk) if k != "digest"] == ["escalation"] * 2
    assert len(events(desk, "commitment.missed")) == 1
    # And the digest of that Tuesday went once, to the unit's staff.
    assert scheduled_mail(desk, "digest") == [("digest", s, None) for s in STAFF]


async def test_a_kept_promise_sends_nothing(desk: Config, start_gateway: Any) -> None:
    gateway = await start_desk(start_gateway, desk)
    met = await new_ticket(gateway, desk, "Met")
    open_promise(desk, met, "2026-12-08T14:00:00+00:00", owner=STAFF[0], state="met")
    answered = await new_ticket(gateway, desk, "Answered")
    open_promise(desk, answered, "2026-12-08T14:00:00+00:00", owner=STAFF[0])
    # A public update after the promise was made (the setting side closes it as met).
    with closing(store.connect(desk.database_path)) as conn, store.write_transaction(conn):
        conn.execute(
            "UPDATE tickets SET last_public_update_at = ? WHERE number = ?",
            (stamp("2026-12-07T11:00:00+00:00"), answered),
        )
    for now in ("2026-12-08T13:00:00+00:00", "2026-12-08T14:00:00+00:00"):
        assert fired(await run(desk, now)) == []
    assert [k for k, _, _ in scheduled_mail(desk) if k != "digest"] == []


async def test_digest_once_per_unit_per_business_day(desk: Config, start_gateway: Any) -> None:
    gateway = await start_desk(start_gateway, desk)
    overdue = await new_ticket(gateway, desk, "Overdue one")
    open_promise(desk, overdue, "2026-12-07T10:00:00+00:00", owner=STAFF[0])
    today = await new_ticket(gateway, desk, "Due today")
    open_promise(desk, today, "2026-12-08T15:00:00+00:00")
    fresh = await new_ticket(gateway, desk, "Brand new")

    assert (await run(desk, "2026-12-05T10:00:00+00:00"))["actions"] == []  # Saturday
    assert (await run(desk, "2026-12-06T12:00:00+00:00"))["actions"] == []  # Sunday
    # Tuesday before opening: the overdue promise escalates, and so does the brand new
    # ticket's first response (due Monday 13:00: opened on Saturday, 4 business hours from
    # Monday's opening); no digest yet.
    did = await run(desk, "2026-12-08T08:59:00+00:00")
    assert sorted((a["action"], a["ticket"]) for a in did["actions"]) == [
        ("escalation", overdue),
        ("escalation", fresh),
    ]
    did = await run(desk, "2026-12-08T09:00:00+00:00")
    assert fired(did) == []
    [digest] = fired(did, digests=True)
    assert digest["action"] == "digest"
    assert digest["unit"] == "support"
    assert digest["to"] == list(STAFF)
    assert digest["counts"] == {"overdue": 2, "due_today": 1, "new": 1, "unassigned": 2}
    assert scheduled_mail(desk, "digest") == [("digest", s, None) for s in STAFF]
    [spec] = rows(
        desk,
        "SELECT s.spec FROM mail_specs s JOIN outbox o ON o.message = s.message"
        " WHERE o.kind = 'digest' AND o.rcpt_to = ?",
        (STAFF[0],),
    )
    context = json.loads(spec["spec"])["context"]
    assert [t["number"] for t in context["overdue"]] == [overdue, fresh]
    assert [t["number"] for t in context["due_today"]] == [today]
    assert [t["number"] for t in context["new"]] == [fresh]

    assert fired(await run(desk, "2026-12-08T09:30:00+00:00"), digests=True) == []
    assert fired(await run(desk, "2026-12-08T16:00:00+00:00"), digests=True) == []
    [wednesday] = fired(await run(desk, "2026-12-09T09:05:00+00:00"), digests=True)
    assert wednesday["action"] == "digest"
    # Christmas Day is a bank holiday: no digest.
    assert (await run(desk, "2026-12-25T10:00:00+00:00"))["actions"] == []
    assert len(scheduled_mail(desk, "digest")) == 4
    assert [e["detail"]["day"] for e in events(desk, "digest.sent")] == [
        "2026-12-08",
        "2026-12-09",
    ]


async def test_scheduled_mail_goes_to_staff_only(desk: Config, start_gateway: Any) -> None:
    gateway = await start_desk(start_gateway, desk)
    # An owner that is not staff (a client's address written in by mistake): the unit's
    # staff are reminded instead, and the escalation goes to the lead only.
    odd = await new_ticket(gateway, desk, "Odd owner")
    open_promise(desk, odd, "2026-12-08T14:00:00+00:00", owner=CLIENT)
    # The billing unit has no table: no staff, no lead; nobody to tell, and it is audited.
    billing = await new_ticket(gateway, desk, "Invoice", to="billing@")
    open_promise(desk, billing, "2026-12-08T14:00:00+00:00")

    did = await run(desk, "2026-12-08T13:00:00+00:00")
    reminders = {a["ticket"]: a["to"] for a in did["actions"] if a["action"] == "reminder"}
    assert reminders == {odd: list(STAFF), billing: []}
    did = await run(desk, "2026-12-08T14:00:00+00:00")
    escalations = {a["ticket"]: a["to"] for a in did["actions"] if a["action"] == "escalation"}
    assert escalations == {odd: [LEAD], billing: []}
    await run(desk, "2026-12-09T09:00:00+00:00")

    sent = scheduled_mail(desk)
    assert sent and {to for _, to, _ in sent} <= {*STAFF, LEAD}
    assert all(desk.is_staff(to) or to == LEAD for _, to, _ in sent)
    withheld = [e["detail"] for e in events(desk, "mail.withheld")]
    assert {(w["kind"], w["why"]) for w in withheld} >= {
        ("reminder", "no-staff"),
        ("escalation", "no-staff"),
    }
    # The missed promise of the unit nobody works is still marked, and only once.
    [row] = rows(
        desk, "SELECT state FROM commitments WHERE ticket = ? AND state != 'replaced'", (billing,)
    )
    assert row["state"] == "missed"


async def test_dry_run_writes_nothing(desk: Config, start_gateway: Any) -> None:
    gateway = await start_desk(start_gateway, desk)
    ticket = await new_ticket(gateway, desk)
    open_promise(desk, ticket, "2026-12-08T14:00:00+00:00", owner=STAFF[0])
    outbox = "SELECT count(*) AS n FROM outbox"
    before = rows(desk, outbox)[0]["n"]
    did = await run(desk, "2026-12-08T15:00:00+00:00", "--dry-run")
    assert did["dry_run"] is True
    assert [a["action"] for a in did["actions"]] == ["escalation", "digest"]
    assert rows(desk, outbox)[0]["n"] == before
    [row] = rows(
        desk, "SELECT state, reminded_at, escalated_at FROM commitments WHERE state != 'replaced'"
    )
    assert tuple(row) == ("open", None, None)

    # The text form, for admins.
    result = await cli(desk, "scheduler", "run", "--now", "2026-12-08T15:00:00+00:00", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would send escalation" in result.stdout
    assert f"#{ticket}" in result.stdout
    # --now needs an offset: a bare local time is ambiguous.
    bad = await cli(desk, "scheduler", "run", "--now", "2026-12-08T15:00")
    assert bad.returncode == 2
    assert "--now" in bad.stderr


def test_the_scheduler_queries_range_over_the_open_by_due_index(desk: Config) -> None:
    """A pass every minute over a full desk must not scan every commitment ever made."""
    from gateway.store import commitments

    seen: list[str] = []
    with closing(store.connect(desk.database_path)) as conn:
        conn.set_trace_callback(seen.append)
        now, later = stamp("2026-12-08T13:00:00+00:00"), stamp("2026-12-08T14:00:00+00:00")
        commitments.due_for_reminder(conn, now=now, horizon=later, units=["support"])
        commitments.due_for_reminder(conn, now=now, horizon=later, other_than=["support"])
        commitments.due_for_escalation(conn, now=now)
        conn.set_trace_callback(None)
        for sql in seen:
            plan = " ".join(str(row["detail"]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
            assert "USING INDEX commitments_open_by_due (due>? AND due<?)" in plan or (
                "USING INDEX commitments_open_by_due (due<?)" in plan
            ), plan
