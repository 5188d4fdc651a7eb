"""Actions and plans (issue 10): planning reads and returns mail, only the action writes it;
a staff reply made from the CLI records the same shape of audit detail as one by mail."""

from __future__ import annotations

import sqlite3
from contextlib import closing

from gateway import store
from gateway.actions import ActionError, mail, tickets
from gateway.config import Config
from gateway.notify import Planner
from gateway.render import Templates
from gateway.store.messages import Filing, StoredMessage, insert_message
from gateway.store.tickets import create_ticket

NOW = "2030-01-02T10:00:00.000000+00:00"


def _client_message(sender: str) -> StoredMessage:
    return StoredMessage(
        queue_id="q1",
        received_at=NOW,
        mail_from=sender,
        rcpt_to=("support@example.org",),
        peer="127.0.0.1",
        helo="client",
        raw=b"Subject: help\r\n\r\nhelp\r\n",
        sha256="0" * 64,
        message_id="<c1@client.example.com>",
        from_header=sender,
        subject="help",
        date_header=None,
        malformed=None,
        defects=(),
        sender=sender,
        classification="normal",
        text="help",
    )


def _count(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_a_plan_writes_nothing_until_the_action_writes_it(config: Config) -> None:
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        planner = Planner(config, Templates(config.templates_path), store.token_secret(conn))
        record = _client_message("alice@client.example.com")
        ticket = create_ticket(
            conn, unit="support", requester=record.sender or "", subject="help", now=NOW
        )
        insert_message(conn, record, Filing(ticket, "client", "new"))  # type: ignore[arg-type]
        before = {t: _count(conn, t) for t in ("messages", "outbox", "events")}
        plan = planner.acknowledge(conn, ticket, record, NOW)
        assert plan.why_not is None and len(plan.mail) == 1
        assert {t: _count(conn, t) for t in before} == before
        assert not store.ticket_acknowledged(conn, ticket)
        [row] = mail.write(conn, plan)
        assert _count(conn, "outbox") == before["outbox"] + 1
        assert store.ticket_acknowledged(conn, ticket)
        [queued] = store.list_events(conn, limit=1)
        assert (queued["action"], queued["subject"]) == ("mail.queued", f"message:{row}")
        # RFC 3834 section 2: at most one acknowledgement a ticket, and it is said why.
        again = planner.acknowledge(conn, ticket, record, NOW)
        assert again.mail == () and again.why_not == "already-acknowledged"


def test_a_cli_reply_records_the_shape_a_mailed_reply_does(config: Config) -> None:
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        planner = Planner(config, Templates(config.templates_path), store.token_secret(conn))
        ticket = create_ticket(
            conn, unit="support", requester="alice@client.example.com", subject="x", now=NOW
        )
        staff = "dana@example.org"
        common = {"ticket": ticket, "text": "Done.", "staff": staff, "now": NOW}
        by_cli = tickets.staff_wrote(conn, planner, actor="cli:someone", **common)  # type: ignore[arg-type]
        record = _client_message(staff)
        by_mail = tickets.staff_wrote(
            conn,
            planner,
            actor=staff,
            save=lambda filing: insert_message(conn, record, filing),
            **common,  # type: ignore[arg-type]
        )
        replied = [e for e in store.list_events(conn) if e["action"] == "ticket.replied"]
        assert [list(e["detail"]) for e in replied] == [
            ["message", "from", "from_status", "to_status"]
        ] * 2
        assert {e["detail"]["message"] for e in replied} == {by_cli.message, by_mail.message}
        try:
            tickets.staff_wrote(conn, planner, actor="cli:someone", **{**common, "ticket": 999})  # type: ignore[arg-type]
        except ActionError as exc:
            assert str(exc) == "no ticket #999"
        else:
            raise AssertionError("a reply to a missing ticket must be refused")
