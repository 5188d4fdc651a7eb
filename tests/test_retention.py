"""Retention (issue 13 item 5): old mail's content purged with the clock moved, rows and
events kept; the quarantine's expiry purges what it expires; orphan blobs removed."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

from gateway import retention, scheduler
from gateway.clock import FixedClock
from gateway.config import Config

from .conftest import rows, run_cli, send_message

T0 = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
RETAIN = "retain_messages_days = 30\nretain_batch = 2"


def with_attachment(subject: str, sender: str, payload: bytes) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = "support@example.org"
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '.')}@test>"
    message.set_content("Hello, see the log attached.\n")
    message.add_attachment(
        payload, maintype="application", subtype="octet-stream", filename="x.log"
    )
    return message


def inbound(config: Config) -> dict[str, Any]:
    return {
        r["subject"]: dict(r)
        for r in rows(
            config,
            "SELECT m.id, m.subject, m.purged_at, m.text, m.ticket, "
            "(SELECT COUNT(*) FROM message_raw r WHERE r.message = m.id) AS raw, "
            "(SELECT COUNT(*) FROM attachments a WHERE a.message = m.id) AS attachments "
            "FROM messages m WHERE direction = 'in'",
        )
    }


async def test_old_mail_is_purged_in_batches_and_its_rows_and_events_stay(
    make_config: Callable[..., Config], start_gateway: Callable[..., Any]
) -> None:
    config = make_config(extra_storage=RETAIN)
    clock = FixedClock(T0)
    gateway = await start_gateway(config, clock=clock)
    sender = "alice@client.example.com"
    for n in range(5):  # more than one batch (retain_batch = 2)
        await send_message(gateway, with_attachment(f"old {n}", sender, b"same bytes" * 50))
    clock.set(T0 + timedelta(days=29))
    await send_message(gateway, with_attachment("recent", sender, b"same bytes" * 50))
    assert rows(config, "SELECT COUNT(*) FROM blobs")[0][0] == 1  # content-addressed

    clock.set(T0 + timedelta(days=31))
    await scheduler.run_jobs(config, gateway.writer, clock)

    found = inbound(config)
    for n in range(5):
        old = found[f"old {n}"]
        assert old["raw"] == 0 and old["attachments"] == 0 and old["text"] is None
        assert old["purged_at"].startswith("2026-12-03")
        assert old["ticket"] is not None  # how it was filed stays
    recent = found["recent"]
    assert recent["raw"] == 1 and recent["attachments"] == 1 and recent["purged_at"] is None
    # The blob is shared with the recent message: it stays.
    assert rows(config, "SELECT COUNT(*) FROM blobs")[0][0] == 1
    purges = rows(config, "SELECT actor, detail FROM events WHERE action = 'messages.purged'")
    assert len(purges) >= 3  # five messages (and their acknowledgements) two a batch
    assert {p["actor"] for p in purges} == {"gateway"}
    assert sum(json.loads(p["detail"])["messages"] for p in purges) >= 5
    # Every event about the old mail is still there.
    assert rows(config, "SELECT COUNT(*) FROM events WHERE action = 'ticket.created'")[0][0] == 6

    shown = run_cli(config, "tickets", "show", str(found["old 0"]["ticket"]))
    assert shown.returncode == 0, shown.stderr
    assert "purged on 2026-12-03" in shown.stdout
    raw = run_cli(config, "messages", "show", str(found["old 0"]["id"]), "--raw")
    assert raw.returncode == 1 and "purged on 2026-12-03" in raw.stderr

    # Later the recent one goes too, and with it the last reference to the blob.
    clock.set(T0 + timedelta(days=60))
    await scheduler.run_jobs(config, gateway.writer, clock)
    assert inbound(config)["recent"]["raw"] == 0
    assert rows(config, "SELECT COUNT(*) FROM blobs")[0][0] == 0


async def test_zero_keeps_everything(config: Config, start_gateway: Callable[..., Any]) -> None:
    clock = FixedClock(T0)
    gateway = await start_gateway(config, clock=clock)
    await send_message(gateway, with_attachment("kept", "alice@client.example.com", b"k" * 99))
    clock.set(T0 + timedelta(days=3650))
    await scheduler.run_jobs(config, gateway.writer, clock)
    kept = inbound(config)["kept"]
    assert kept["raw"] == 1 and kept["attachments"] == 1 and kept["purged_at"] is None
    assert rows(config, "SELECT COUNT(*) FROM blobs")[0][0] == 1


async def test_quarantine_expiry_purges_the_held_mail_and_its_orphan_blob(
    config: Config, start_gateway: Callable[..., Any]
) -> None:
    clock = FixedClock(T0)
    gateway = await start_gateway(config, clock=clock)
    held = with_attachment("held", "mallory@unknown.example", b"suspicious" * 30)
    await send_message(gateway, held, sender="mallory@unknown.example")
    entry = rows(config, "SELECT id FROM quarantine")[0]["id"]
    shown = run_cli(config, "quarantine", "show", str(entry))
    assert "purged on" not in shown.stdout and shown.returncode == 0

    clock.set(T0 + timedelta(days=config.policy.quarantine_days + 1))
    await scheduler.run_jobs(config, gateway.writer, clock)

    message = inbound(config)["held"]
    assert message["raw"] == 0 and message["attachments"] == 0 and message["purged_at"]
    assert rows(config, "SELECT status FROM quarantine")[0]["status"] == "expired"
    assert rows(config, "SELECT COUNT(*) FROM blobs")[0][0] == 0  # orphan removed
    assert rows(config, "SELECT COUNT(*) FROM events WHERE action = 'quarantine.expired'")
    shown = run_cli(config, "quarantine", "show", str(entry))
    assert shown.returncode == 0, shown.stderr
    assert "(expired)" in shown.stdout and "purged on 2026-11-" in shown.stdout


def test_retention_days_must_not_be_negative(make_config: Callable[..., Config]) -> None:
    import pytest

    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=r"storage\.retain_messages_days"):
        make_config(extra_storage="retain_messages_days = -1")
    with pytest.raises(ConfigError, match=r"storage\.retain_batch"):
        make_config(extra_storage="retain_batch = 0")


def test_the_sweep_removes_a_blob_no_attachment_refers_to(config: Config) -> None:
    from contextlib import closing

    from gateway import store

    with closing(store.connect(config.database_path)) as conn:
        with store.write_transaction(conn):
            conn.execute("INSERT INTO blobs (sha256, size, data) VALUES ('ab', 2, X'0102')")
        first = retention.purge_all(config, conn, T0)
        assert (first.messages, first.blobs) == (0, 1)
        assert not list(conn.execute("SELECT 1 FROM blobs"))
        again = retention.purge_all(config, conn, T0)
        assert (again.messages, again.blobs) == (0, 0)
        events = list(conn.execute("SELECT detail FROM events WHERE action = 'messages.purged'"))
        assert [json.loads(e["detail"])["blobs"] for e in events] == [1]
