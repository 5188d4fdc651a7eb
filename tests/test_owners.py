"""Issue 11, items 2, 3, 4 and 6 over real SMTP and the CLI: owners, staff notices,
commitments, and the desk. The daemon and the CLI share one FixedClock, so due times are
exact: Monday 30 November 2026 10:00 in London (GMT, so UTC), a 09:00-17:30 desk."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway import cli as gateway_cli
from gateway.app import Gateway
from gateway.clock import FixedClock
from gateway.config import Config
from gateway.tickets import make_token

from .conftest import make_message, rows, send_message
from .test_security import passed

STAFF_NOTICES = ("staff-new-ticket", "staff-client-reply")
MONDAY = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
SETUP = """
[staff]
addresses = ["dana@example.org"]
admins = ["admin@example.org"]

[policy]
trusted_authserv_ids = ["mx.example.org"]

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
    return FixedClock(MONDAY)


@pytest.fixture
async def gateway(config: Config, clock: FixedClock, start_gateway: Any) -> Gateway:
    gw: Gateway = await start_gateway(config, clock=clock)
    return gw


def run(config: Config, clock: FixedClock, *args: str) -> tuple[int, str]:
    """The CLI in this process, on the test's clock: (exit status, stdout)."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = gateway_cli.main(["--config", str(config.path), *args], clock=clock)
    return code, out.getvalue()


def run_json(config: Config, clock: FixedClock, *args: str) -> Any:
    code, out = run(config, clock, *args, "--json")
    assert code == 0
    return json.loads(out)


def outbox(config: Config, kind: str | None = None) -> list[dict[str, Any]]:
    """Queued mail, oldest first, with its spec (what the delivery worker will build)."""
    found = rows(
        config,
        """
        SELECT o.kind, o.rcpt_to, o.message_id, s.spec FROM outbox o
        JOIN mail_specs s ON s.message = o.message ORDER BY o.id
        """,
    )
    mail = [
        {
            "kind": r["kind"],
            "to": r["rcpt_to"],
            "message_id": r["message_id"],
            "spec": json.loads(r["spec"]),
        }
        for r in found
    ]
    return [m for m in mail if kind is None or m["kind"] == kind]


def ticket_row(config: Config, number: int = 1) -> dict[str, Any]:
    [row] = rows(config, "SELECT * FROM tickets WHERE number = ?", (number,))
    return dict(row)


def actions(config: Config) -> list[str]:
    return [r["action"] for r in rows(config, "SELECT action FROM events ORDER BY id")]


async def open_ticket(
    gateway: Gateway, body: str = "Hello,\r\n\r\nthe printer is on fire.\r\n"
) -> None:
    await send_message(gateway, make_message(subject="Printer", body=body))


async def staff_mail(
    gateway: Gateway, sender: str, body: str, *, ticket: int = 1, in_reply_to: str = ""
) -> None:
    """Authenticated staff mail to the ticket's reply token (what answering a notice is)."""
    headers = passed("example.org") + (f"In-Reply-To: {in_reply_to}\r\n" if in_reply_to else "")
    token = make_token(gateway.pipeline.token_secret, ticket)
    await send_message(
        gateway,
        make_message(subject="Re: [#1] Printer", sender=sender, headers=headers, body=body),
        sender=sender,
        recipients=(f"support+{token}@example.org",),
    )


def assert_notices_to_staff_only(config: Config) -> None:
    for mail in outbox(config):
        if mail["kind"] in STAFF_NOTICES:
            assert config.is_staff(mail["to"]), mail
            assert mail["to"] != "alice@client.example.com"


# --- item 3: staff are told --------------------------------------------------------------


async def test_new_ticket_notifies_the_units_staff_with_a_reply_token(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    notices = outbox(config, "staff-new-ticket")
    assert sorted(m["to"] for m in notices) == ["bob@example.org", "carol@example.org"]
    spec = notices[0]["spec"]
    token = make_token(gateway.pipeline.token_secret, 1)
    assert spec["reply_to"] == f"support+{token}@example.org"
    context = spec["context"]
    assert "the printer is on fire" in context["text"]
    assert context["client"] == "alice@client.example.com"
    assert context["organisation"] == "Client Ltd"
    # 4 business hours after Monday 10:00, shown in the unit's zone.
    assert context["due"] == "Mon 30 Nov 2026 14:00 GMT"
    assert ticket_row(config)["next_update_due"] == "2026-11-30T14:00:00.000000+00:00"
    # The client still gets their acknowledgement, and never a notice.
    assert [m["to"] for m in outbox(config, "acknowledgement")] == ["alice@client.example.com"]
    assert_notices_to_staff_only(config)


async def test_client_reply_notifies_the_owner_only(
    config: Config, gateway: Gateway, clock: FixedClock
) -> None:
    await open_ticket(gateway)
    assert run(config, clock, "tickets", "assign", "1", "carol@example.org")[0] == 0
    await send_message(
        gateway,
        make_message(
            subject="Re: [#1] Printer",
            body="It is still burning.\r\n",
            headers=f"In-Reply-To: {outbox(config, 'acknowledgement')[0]['message_id']}\r\n",
        ),
    )
    [notice] = outbox(config, "staff-client-reply")
    assert notice["to"] == "carol@example.org"
    assert "still burning" in notice["spec"]["context"]["text"]
    assert_notices_to_staff_only(config)


async def test_staff_are_never_told_of_their_own_mail(config: Config, gateway: Gateway) -> None:
    # Bob's authenticated mail that threads nowhere opens a ticket of its own: Carol is
    # told, Bob is not.
    await send_message(
        gateway,
        make_message(
            subject="Server room", sender="bob@example.org", headers=passed("example.org")
        ),
        sender="bob@example.org",
    )
    assert [m["to"] for m in outbox(config, "staff-new-ticket")] == ["carol@example.org"]


async def test_no_notice_for_auto_replies(config: Config, gateway: Gateway) -> None:
    await open_ticket(gateway)

    def earned() -> list[dict[str, Any]]:
        # Everything but the unit's digest, which the daemon's first scheduler pass sends
        # on its own time (Monday 10:00 is in business hours): it is no answer to any mail.
        return [m for m in outbox(config) if m["kind"] != "digest"]

    before = len(earned())
    ack = outbox(config, "acknowledgement")[0]["message_id"]
    await send_message(
        gateway,
        make_message(
            subject="Out of office",
            headers=f"Auto-Submitted: auto-replied\r\nIn-Reply-To: {ack}\r\n",
        ),
    )
    assert len(earned()) == before


# --- items 2 and 4 by mail: answering a notice, #next, #take -------------------------------


async def test_staff_answer_to_the_notice_with_next_tomorrow(
    config: Config, gateway: Gateway
) -> None:
    await open_ticket(gateway)
    notice = outbox(config, "staff-new-ticket")[0]
    await staff_mail(
        gateway,
        "bob@example.org",
        "#next tomorrow\r\nPlease switch it off at the wall.\r\n\r\nBob\r\n",
        in_reply_to=notice["message_id"],
    )
    [reply] = outbox(config, "staff-reply")
    assert reply["to"] == "alice@client.example.com"
    body = reply["spec"]["context"]["body"]
    assert "Please switch it off at the wall." in body
    assert "#next" not in body and "tomorrow" not in body
    # A reply to the client must not cite the staff notice.
    assert notice["message_id"] not in reply["spec"]["references"]
    row = ticket_row(config)
    # The promise keeps the ticket waiting on us: the end of Tuesday's business day.
    assert row["status"] == "open"
    assert row["next_update_due"] == "2026-12-01T17:30:00.000000+00:00"
    assert row["owner"] == "bob@example.org"  # the first staff member to reply publicly
    assert row["last_public_update_at"] is not None
    states = rows(config, "SELECT state, set_by FROM commitments ORDER BY id")
    assert [(r["state"], r["set_by"]) for r in states] == [
        ("met", "gateway"),
        ("open", "bob@example.org"),
    ]
    assert {"ticket.assigned", "commitment.met", "commitment.set"} <= set(actions(config))


async def test_public_update_without_promise_waits_on_the_client(
    config: Config, gateway: Gateway, clock: FixedClock
) -> None:
    await open_ticket(gateway)
    await staff_mail(gateway, "bob@example.org", "Please restart it.\r\n")
    row = ticket_row(config)
    assert row["status"] == "pending" and row["next_update_due"] is None
    # The client answers: open again, due first_response from then.
    clock.set(datetime(2026, 11, 30, 16, 0, tzinfo=UTC))
    await send_message(
        gateway,
        make_message(
            subject="Re: [#1] Printer",
            body="Done, no change.\r\n",
            headers=f"In-Reply-To: {outbox(config, 'staff-reply')[0]['message_id']}\r\n",
        ),
    )
    row = ticket_row(config)
    assert row["status"] == "open"
    # 1.5 business hours on Monday, 2.5 on Tuesday from 09:00.
    assert row["next_update_due"] == "2026-12-01T11:30:00.000000+00:00"
    # Bob owns it now: only he is told.
    assert [m["to"] for m in outbox(config, "staff-client-reply")] == ["bob@example.org"]


async def test_take_by_staff_mail(config: Config, gateway: Gateway) -> None:
    await open_ticket(gateway)
    await staff_mail(gateway, "carol@example.org", "#take\r\n")
    assert ticket_row(config)["owner"] == "carol@example.org"
    assert outbox(config, "staff-reply") == []  # nothing else in it: a note, not a reply
    assert ticket_row(config)["status"] == "new"


async def test_take_and_next_from_a_client_are_plain_text(config: Config, gateway: Gateway) -> None:
    await open_ticket(gateway)
    due = ticket_row(config)["next_update_due"]
    ack = outbox(config, "acknowledgement")[0]["message_id"]
    await send_message(
        gateway,
        make_message(
            subject="Re: [#1] Printer",
            body="#take\r\n#next 1h\r\nplease hurry\r\n",
            headers=f"In-Reply-To: {ack}\r\n",
        ),
    )
    row = ticket_row(config)
    assert row["owner"] is None
    assert row["next_update_due"] == due
    assert len(rows(config, "SELECT * FROM commitments")) == 1
    # The staff read exactly what the client wrote.
    [notice, *_] = outbox(config, "staff-client-reply")
    assert "#take" in notice["spec"]["context"]["text"]
    assert "#next 1h" in notice["spec"]["context"]["text"]
    assert_notices_to_staff_only(config)


# --- items 2, 4 and 6 at the CLI ----------------------------------------------------------


async def test_assign_commit_list_show_and_desk(
    config: Config, gateway: Gateway, clock: FixedClock
) -> None:
    await open_ticket(gateway)
    await send_message(gateway, make_message(subject="Second", sender="zed@other.example.net"))
    assert run(config, clock, "tickets", "assign", "1", "alice@client.example.com")[0] == 1
    assert run(config, clock, "tickets", "assign", "1", "bob@example.org")[0] == 0
    assert ticket_row(config)["owner"] == "bob@example.org"

    mine = run_json(config, clock, "tickets", "list", "--owner", "bob@example.org")
    assert [t["number"] for t in mine] == [1]
    assert [t["number"] for t in run_json(config, clock, "tickets", "list", "--unassigned")] == [2]
    by_org = run_json(config, clock, "tickets", "list", "--organisation", "other co")
    assert [t["number"] for t in by_org] == [2]

    code, _ = run(config, clock, "tickets", "commit", "2", "1h", "--note", "call back")
    assert code == 0
    soon = run_json(config, clock, "tickets", "list", "--due-before", "5h")
    assert [t["number"] for t in soon] == [2, 1]  # sorted by due time: 11:00, then 14:00
    assert soon[0]["next_update_due"] == "2026-11-30T11:00:00.000000+00:00"
    assert soon[0]["overdue"] is False and soon[0]["unit"] == "support"
    assert run_json(config, clock, "tickets", "list", "--overdue") == []
    assert len(run_json(config, clock, "tickets", "list", "--limit", "1")) == 1

    shown = run_json(config, clock, "tickets", "show", "2")
    assert [(c["set_by"], c["note"], c["state"]) for c in shown["commitments"]] == [
        ("gateway", None, "replaced"),
        (shown["commitments"][1]["set_by"], "call back", "open"),
    ]
    assert shown["owner"] is None and shown["last_public_update_at"] is None

    # Past the promise: overdue until a public update.
    clock.set(datetime(2026, 11, 30, 12, 0, tzinfo=UTC))
    assert [t["number"] for t in run_json(config, clock, "tickets", "list", "--overdue")] == [2]
    [desk] = run_json(config, clock, "desk", "--unit", "support")
    assert [d["unit"] for d in run_json(config, clock, "desk")] == ["support", "billing"]
    # Issue 12 adds urgent, upset and on-call keys (tests/test_oncall_rota.py).
    assert {
        k: desk[k] for k in desk if k not in ("urgent", "upset", "on_call", "on_call_rota")
    } == {
        "unit": "support",
        "open": 2,
        "unassigned": 1,
        "overdue": 1,
        "due_today": 1,
        "waiting_on_client": 0,
    }
    assert run(config, clock, "tickets", "commit", "2", "not-a-time")[0] == 1
    assert run(config, clock, "tickets", "assign", "1", "--none")[0] == 0
    assert ticket_row(config)["owner"] is None
    assert "ticket.assigned" in actions(config)
    assert_notices_to_staff_only(config)


async def test_cli_reply_with_next(
    config: Config, gateway: Gateway, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await open_ticket(gateway)
    monkeypatch.setattr("sys.stdin", io.StringIO("We are on it.\n"))
    code, out = run(
        config, clock, "tickets", "reply", "1", "--from", "bob@example.org", "--next", "2h"
    )
    assert code == 0, out
    row = ticket_row(config)
    assert row["status"] == "open"
    assert row["next_update_due"] == "2026-11-30T12:00:00.000000+00:00"
    assert row["owner"] == "bob@example.org"
    monkeypatch.setattr("sys.stdin", io.StringIO("Done.\n"))
    code, _ = run(
        config,
        clock,
        "tickets",
        "reply",
        "1",
        "--from",
        "bob@example.org",
        "--status",
        "solved",
        "--next",
        "2h",
    )
    assert code == 1  # a promise and a solved ticket contradict each other
    monkeypatch.setattr("sys.stdin", io.StringIO("Done.\n"))
    assert run(config, clock, "tickets", "status", "1", "solved")[0] == 0
    assert ticket_row(config)["next_update_due"] is None
    assert run(config, clock, "tickets", "commit", "1", "2h")[0] == 1  # solved: no promise


# --- the whole cycle (issue 11's end-to-end check) -----------------------------------------


def scheduler_pass(config: Config, clock: FixedClock, now: str) -> list[tuple[str, int | None]]:
    """One `gateway scheduler run --now` pass: (action, ticket) of each reminder and
    escalation it sent (digests left out: a business day's first pass sends one)."""
    did = run_json(config, clock, "scheduler", "run", "--now", now)
    return [(a["action"], a.get("ticket")) for a in did["actions"] if a["action"] != "digest"]


def scheduled(config: Config) -> list[tuple[str, str, int]]:
    return [
        (r["kind"], r["rcpt_to"], r["ticket"])
        for r in rows(
            config,
            "SELECT kind, rcpt_to, ticket FROM outbox WHERE kind IN ('reminder', 'escalation')"
            " ORDER BY id",
        )
    ]


async def test_the_desk_cycle_notice_promise_reminder_escalation(
    config: Config, gateway: Gateway, clock: FixedClock, start_gateway: Any
) -> None:
    # Monday 10:00: Alice writes; the unit's staff are told.
    await open_ticket(gateway)
    notices = outbox(config, "staff-new-ticket")
    assert sorted(m["to"] for m in notices) == ["bob@example.org", "carol@example.org"]
    # Bob answers the notice by mail and promises an update by the end of tomorrow.
    await staff_mail(
        gateway,
        "bob@example.org",
        "#next tomorrow\r\nWe are on it: the engineer visits tomorrow.\r\n",
        in_reply_to=notices[0]["message_id"],
    )
    [reply] = outbox(config, "staff-reply")
    assert reply["to"] == "alice@client.example.com"
    assert "#next" not in reply["spec"]["context"]["body"]
    assert ticket_row(config)["next_update_due"] == "2026-12-01T17:30:00.000000+00:00"

    # Ticket 2 at the same time: its first response is due at 14:00, and Bob's public
    # update at 11:00 keeps that promise (he promises Friday): nothing must fire for it.
    await send_message(gateway, make_message(subject="VPN drops", body="It drops.\r\n"))
    clock.set(datetime(2026, 11, 30, 11, 0, tzinfo=UTC))
    await staff_mail(gateway, "bob@example.org", "#next friday\r\nLooking.\r\n", ticket=2)
    assert ticket_row(config, 2)["next_update_due"] == "2026-12-04T17:30:00.000000+00:00"
    assert scheduler_pass(config, clock, "2026-11-30T13:30:00+00:00") == []
    assert scheduler_pass(config, clock, "2026-11-30T14:30:00+00:00") == []

    # Tuesday: before the reminder window nothing; in it one reminder to the owner, once.
    assert scheduler_pass(config, clock, "2026-12-01T16:00:00+00:00") == []
    assert scheduler_pass(config, clock, "2026-12-01T16:45:00+00:00") == [("reminder", 1)]
    assert scheduler_pass(config, clock, "2026-12-01T17:00:00+00:00") == []
    assert scheduled(config) == [("reminder", "bob@example.org", 1)]
    # Past the due time with no public update: one escalation, to the lead and the owner.
    assert scheduler_pass(config, clock, "2026-12-01T18:00:00+00:00") == [("escalation", 1)]
    assert scheduler_pass(config, clock, "2026-12-01T18:30:00+00:00") == []
    escalations = [s for s in scheduled(config) if s[0] == "escalation"]
    assert sorted(to for _, to, _ in escalations) == ["bob@example.org", "lead@example.org"]
    clock.set(datetime(2026, 12, 1, 18, 30, tzinfo=UTC))
    assert run_json(config, clock, "tickets", "show", "1")["overdue"] is True

    # A restart catches up once at start: nothing is sent again.
    sent = len(scheduled(config))
    await gateway.stop(grace=5)
    clock.set(datetime(2026, 12, 1, 19, 0, tzinfo=UTC))
    again: Gateway = await start_gateway(config, clock=clock, seed=False)
    assert again.port
    assert scheduler_pass(config, clock, "2026-12-01T19:05:00+00:00") == []
    assert len(scheduled(config)) == sent
    # Nothing of this reached a client.
    for mail in outbox(config):
        if mail["kind"] in (*STAFF_NOTICES, "reminder", "escalation", "digest"):
            assert config.is_staff(mail["to"]) or mail["to"] == "lead@example.org", mail
    assert {"commitment.reminded", "commitment.missed", "commitment.met"} <= set(actions(config))
