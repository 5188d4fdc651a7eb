"""The outbox worker against a real SMTP relay on loopback (RELIABILITY.md tests 43-44).

Rows are queued with the store's own functions, delivered by `OutboxWorker.deliver_due()`
rounds with an injected clock (back-off is fast-forwarded, never slept through), and
checked by their durable effects: outbox rows, files, and what the relay received.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway import cli, store
from gateway.app import Gateway
from gateway.clock import FixedClock
from gateway.config import Config, load_config
from gateway.outbox import MAX_BACKOFF_SECONDS, OutboxWorker, eml_name, next_attempt_at
from gateway.store import Writer
from gateway.store.outbox import due_mail
from gateway.store.reader import Reader

from .conftest import DaemonProcess, rows, seed_senders, wait_for, write_config
from .relay import Relay, RelayedMessage
from .storehelpers import store_outgoing

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
RETRY_AFTER = 60
GIVE_UP_AFTER = 3600


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def ack(message_id: str, to: str = "alice@client.example.com") -> bytes:
    return (
        "From: Support <support@example.org>\r\n"
        f"To: {to}\r\n"
        "Subject: [#1] Printer on fire\r\n"
        f"Message-ID: {message_id}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "\r\n"
        "We have your request: ticket #1.\r\n"
        ".a line that starts with a dot\r\n"
    ).encode()


def queue(
    config: Config,
    *,
    message_id: str = "<t1.ack.1@support.example.org>",
    to: str = "alice@client.example.com",
    automatic: bool = True,
    created: datetime = T0,
) -> tuple[int, bytes]:
    """One committed outgoing mail to one recipient; returns (outbox row id, bytes)."""
    raw = ack(message_id, to)
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        _, [row] = store_outgoing(
            conn,
            raw=raw,
            message_id=message_id,
            ticket=None,
            kind="acknowledgement" if automatic else "staff-reply",
            automatic=automatic,
            mail_from="" if automatic else "support@example.org",
            recipients=[to],
            subject="[#1] Printer on fire",
            now=iso(created),
        )
    return row, raw


def outbox_row(config: Config, row_id: int) -> dict[str, Any]:
    with closing(store.connect(config.database_path)) as conn:
        found = store.find_outbox(conn, row_id)
    assert found is not None
    return found


def smtp_delivery(port: int, **extra: Any) -> str:
    settings: dict[str, Any] = {
        "mode": "smtp",
        "relay_host": "127.0.0.1",
        "relay_port": port,
        "timeout": 1,
        "retry_after": RETRY_AFTER,
        "give_up_after": GIVE_UP_AFTER,
        **extra,
    }
    return "\n[delivery]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())


def free_port() -> int:
    """A loopback port nothing listens on (the relay is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def start_worker() -> AsyncIterator[Callable[..., Any]]:
    """Factory: a Writer, a Reader and an OutboxWorker (not started: tests run rounds
    themselves)."""
    made: list[tuple[Writer, Reader, OutboxWorker]] = []

    async def factory(
        config: Config,
        *,
        clock: FixedClock | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> OutboxWorker:
        writer = Writer(config.database_path)
        await writer.start()
        reader = Reader(config.database_path)
        await reader.open()
        worker = OutboxWorker(
            config, writer, reader, clock=clock or FixedClock(T0), tls_context=tls_context
        )
        made.append((writer, reader, worker))
        return worker

    yield factory
    for writer, reader, worker in made:
        await worker.stop()
        await reader.close()
        await writer.close()


# --- directory mode -------------------------------------------------------------------


async def test_directory_mode_writes_the_exact_bytes_atomically(
    make_config: Callable[..., Config], start_worker: Callable[..., Any], tmp_path: Path
) -> None:
    config = make_config()  # [delivery] mode defaults to "directory", var/outbox
    worker = await start_worker(config)
    plain, plain_raw = queue(config)
    hostile, hostile_raw = queue(config, message_id="<../../x@y>", to="bob@client.example.com")

    assert await worker.deliver_due() == 2

    folder = config.outbox_path
    assert folder == tmp_path / "var" / "outbox"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        [f"{plain}-t1.ack.1_support.example.org.eml", f"{hostile}-.._.._x_y.eml"]
    )
    assert (folder / f"{plain}-t1.ack.1_support.example.org.eml").read_bytes() == plain_raw
    assert (folder / f"{hostile}-.._.._x_y.eml").read_bytes() == hostile_raw
    assert not (tmp_path / "x@y").exists() and not (tmp_path / "var" / "x@y").exists()
    for row_id in (plain, hostile):
        row = outbox_row(config, row_id)
        assert (row["status"], row["attempts"], row["last_error"]) == ("sent", 1, None)
        assert row["sent_at"] == iso(T0)
    assert await worker.deliver_due() == 0  # sent rows are never sent again


def test_eml_names_are_never_paths() -> None:
    assert eml_name(7, "<a/b\\c\x00d\r\ne f@x>") == "7-a_b_c_d__e_f_x.eml"
    assert eml_name(8, "<>") == "8-no-message-id.eml"
    assert eml_name(9, "<..@..>") == "9-.._...eml"
    assert len(eml_name(10, "<" + "a" * 5000 + "@x>")) < 120


def test_backoff_doubles_is_capped_and_stops_at_the_deadline() -> None:
    schedule = partial(next_attempt_at, created_at=T0, retry_after=300, give_up_after=86400)
    assert schedule(now=T0, attempts=1) == T0 + timedelta(seconds=300)
    assert schedule(now=T0, attempts=2) == T0 + timedelta(seconds=600)
    assert schedule(now=T0, attempts=12) == T0 + timedelta(seconds=MAX_BACKOFF_SECONDS)
    late = T0 + timedelta(hours=23)
    assert schedule(now=late, attempts=20) == T0 + timedelta(seconds=86400)
    assert schedule(now=T0 + timedelta(seconds=86400), attempts=21) is None


# --- smtp mode: delivered -------------------------------------------------------------


async def test_smtp_delivers_over_starttls_with_the_null_sender(
    make_config: Callable[..., Config], start_worker: Callable[..., Any], relay: Any
) -> None:
    r: Relay = await relay()
    config = make_config(extra=smtp_delivery(r.port))
    worker = await start_worker(config, tls_context=r.client_tls_context())
    row_id, raw = queue(config, automatic=True)

    assert await worker.deliver_due() == 1

    [got] = r.messages
    assert got == RelayedMessage(
        mail_from="<>", rcpt_tos=("alice@client.example.com",), data=raw, tls=True, login=None
    )
    assert r.mail_commands == ["<>"]
    row = outbox_row(config, row_id)
    assert (row["status"], row["attempts"], row["sent_at"]) == ("sent", 1, iso(T0))


async def test_smtp_logs_in_after_tls_and_reuses_the_connection(
    make_config: Callable[..., Config],
    start_worker: Callable[..., Any],
    relay: Any,
    tmp_path: Path,
) -> None:
    r: Relay = await relay(users={"gateway": "s3cret"})
    (tmp_path / "relay-password").write_text("s3cret\n")
    config = make_config(
        extra=smtp_delivery(r.port, username="gateway", password_file="relay-password")
    )
    worker = await start_worker(config, tls_context=r.client_tls_context())
    queued = [
        queue(config, message_id=f"<reply.{n}@support.example.org>", automatic=False)
        for n in range(6)
    ]

    assert await worker.deliver_due() == 6

    assert sorted(m.data for m in r.messages) == sorted(raw for _, raw in queued)
    assert {(m.mail_from, m.login, m.tls) for m in r.messages} == {
        ("support@example.org", "gateway", True)
    }
    # Four slots, each one connection for as many mails as it takes.
    assert 1 <= len(r._sessions) <= 4
    assert {outbox_row(config, row_id)["status"] for row_id, _ in queued} == {"sent"}


async def test_the_gateway_starts_the_worker_and_wake_sends_at_once(
    make_config: Callable[..., Config], start_gateway: Callable[..., Any], relay: Any
) -> None:
    r: Relay = await relay()
    config = make_config(extra=smtp_delivery(r.port, poll_interval=3600))
    gateway: Gateway = await start_gateway(config, relay_tls_context=r.client_tls_context())
    # Queued through the daemon's own writer, as the intake transaction does.
    await gateway.writer.write(
        partial(
            store_outgoing,
            raw=ack("<woken@support.example.org>"),
            message_id="<woken@support.example.org>",
            ticket=None,
            kind="acknowledgement",
            automatic=True,
            mail_from="",
            recipients=["alice@client.example.com"],
            subject="[#1] Printer on fire",
            now=iso(datetime.now(UTC)),
        )
    )
    gateway.outbox.wake()
    await wait_for(lambda: r.messages, timeout=10)
    await wait_for(lambda: rows(config, "SELECT 1 FROM outbox WHERE status = 'sent'"))


async def test_the_daemons_readers_use_one_read_only_aiosqlite_connection(
    make_config: Callable[..., Config],
) -> None:
    """Issue 10 item 4: the outbox worker reads through the Gateway's one read-only
    aiosqlite connection (the store's busy_timeout, query_only), not a thread of its own,
    and the connection is closed, its thread gone, once the Gateway has stopped."""
    config = make_config(extra_storage="busy_timeout_ms = 1234")
    seed_senders(config)
    threads_before = set(threading.enumerate())
    gateway = Gateway(config, clock=FixedClock(T0))
    await gateway.start()
    try:
        db = gateway.reader.db
        assert [tuple(r) for r in await db.execute_fetchall("PRAGMA busy_timeout")] == [(1234,)]
        assert [tuple(r) for r in await db.execute_fetchall("PRAGMA query_only")] == [(1,)]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await db.execute_fetchall("DELETE FROM outbox")

        row_id, raw = queue(config)  # committed by another process's connection
        gateway.outbox.wake()
        await wait_for(lambda: outbox_row(config, row_id)["status"] == "sent")
        [written] = config.outbox_path.iterdir()
        assert written.read_bytes() == raw
        # The worker's reads went through that connection: no reader thread of its own.
        own = [t.name for t in threading.enumerate() if t.name.startswith("gateway-outbox")]
        assert own == []
    finally:
        await gateway.stop(grace=5)

    with pytest.raises(ValueError):  # aiosqlite: "no active connection"
        await db.execute_fetchall("SELECT 1")

    def leftover() -> list[str]:
        # The loop's default executor (to_thread) lives as long as the loop: not ours.
        return [
            t.name
            for t in set(threading.enumerate()) - threads_before
            if t.is_alive() and not t.name.startswith("asyncio_")
        ]

    await wait_for(lambda: not leftover(), timeout=5)


async def test_due_mail_is_oldest_due_first_and_skips_the_unrecorded(
    make_config: Callable[..., Config],
) -> None:
    """The worker's one read of due rows (store.outbox.due_mail on the aiosqlite reader):
    oldest due first, never a row still due later, `exclude`d ids (outcomes the Writer
    could not record yet) skipped without shrinking the round below `limit`."""
    config = make_config()
    old, _ = queue(config, message_id="<old@support.example.org>", created=T0)
    later, _ = queue(config, message_id="<later@support.example.org>", created=T0 + timedelta(1))
    newer, _ = queue(config, message_id="<newer@support.example.org>", created=T0 + timedelta(2))
    future, _ = queue(config, message_id="<future@support.example.org>", created=T0 + timedelta(9))
    reader = Reader(config.database_path)
    await reader.open()
    try:
        now = iso(T0 + timedelta(3))
        assert [m.id for m in await due_mail(reader.db, now=now, limit=10)] == [old, later, newer]
        assert [m.id for m in await due_mail(reader.db, now=now, limit=2)] == [old, later]
        skipped = await due_mail(reader.db, now=now, limit=2, exclude=frozenset({old}))
        assert [m.id for m in skipped] == [later, newer]
        [first] = await due_mail(reader.db, now=now, limit=1)
        assert (first.message_id, first.rcpt_to, first.mail_from) == (
            "<old@support.example.org>",
            "alice@client.example.com",
            "",
        )
        assert future not in [m.id for m in await due_mail(reader.db, now=now, limit=10)]
    finally:
        await reader.close()


# --- smtp mode: temporary failures are retried, 5xx fails -------------------------------

TEMPORARY = {
    # mode: (how the relay fails, what last_error says)
    "down": "connection refused",
    "close": "421 4.3.2",
    "tempfail": "451 4.3.0",
    "hang": "timeout",
}


@pytest.mark.parametrize("failure", list(TEMPORARY))
async def test_temporary_failures_are_retried_with_backoff(
    failure: str,
    make_config: Callable[..., Config],
    start_worker: Callable[..., Any],
    relay: Any,
) -> None:
    r: Relay = await relay()
    port = free_port() if failure == "down" else r.port
    if failure != "down":
        r.mode = failure
    config = make_config(extra=smtp_delivery(port))
    clock = FixedClock(T0)
    worker = await start_worker(config, clock=clock, tls_context=r.client_tls_context())
    row_id, _ = queue(config)

    assert await worker.deliver_due() == 1
    row = outbox_row(config, row_id)
    assert (row["status"], row["attempts"]) == ("queued", 1)
    assert TEMPORARY[failure] in row["last_error"], row["last_error"]
    assert row["next_attempt_at"] == iso(T0 + timedelta(seconds=RETRY_AFTER))

    clock.advance(RETRY_AFTER - 1)
    assert await worker.deliver_due() == 0  # not due yet

    clock.advance(1)
    assert await worker.deliver_due() == 1
    row = outbox_row(config, row_id)
    assert (row["status"], row["attempts"]) == ("queued", 2)
    assert row["next_attempt_at"] == iso(clock.now() + timedelta(seconds=2 * RETRY_AFTER))
    assert r.messages == []


async def test_temporary_failures_give_up_after_give_up_after(
    make_config: Callable[..., Config], start_worker: Callable[..., Any], relay: Any
) -> None:
    r: Relay = await relay()
    r.mode = "tempfail"
    config = make_config(extra=smtp_delivery(r.port, retry_after=100, give_up_after=1000))
    clock = FixedClock(T0)
    worker = await start_worker(config, clock=clock, tls_context=r.client_tls_context())
    row_id, _ = queue(config)

    waits = []
    while outbox_row(config, row_id)["status"] == "queued":
        assert await worker.deliver_due() == 1
        row = outbox_row(config, row_id)
        if row["status"] == "queued":
            waits.append((datetime.fromisoformat(row["next_attempt_at"]) - T0).total_seconds())
            clock.set(row["next_attempt_at"])

    assert waits == [100, 300, 700, 1000]  # doubling, the last try at the deadline
    row = outbox_row(config, row_id)
    assert (row["status"], row["attempts"]) == ("failed", 5)
    assert row["last_error"].startswith("gave up after 5 attempts: 451 4.3.0")
    [failed] = rows(config, "SELECT actor, subject FROM events WHERE action = 'outbox.failed'")
    assert tuple(failed) == ("gateway", f"outbox:{row_id}")
    clock.advance(10 * 86400)
    assert await worker.deliver_due() == 0


async def test_550_fails_at_once_without_retry(
    make_config: Callable[..., Config], start_worker: Callable[..., Any], relay: Any
) -> None:
    r: Relay = await relay()
    r.mode = "refuse"
    config = make_config(extra=smtp_delivery(r.port))
    clock = FixedClock(T0)
    worker = await start_worker(config, clock=clock, tls_context=r.client_tls_context())
    row_id, _ = queue(config)

    assert await worker.deliver_due() == 1
    row = outbox_row(config, row_id)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["last_error"].startswith("550 5.1.1 <alice@client.example.com>: Recipient")
    assert "\n" not in row["last_error"]
    clock.advance(GIVE_UP_AFTER)
    r.mode = "accept"
    assert await worker.deliver_due() == 0
    assert r.messages == []


# --- smtp mode: never in plaintext, never to an unverified relay ------------------------


async def test_a_relay_without_starttls_gets_nothing(
    make_config: Callable[..., Config], start_worker: Callable[..., Any], relay: Any
) -> None:
    r: Relay = await relay(tls=False)
    config = make_config(extra=smtp_delivery(r.port))
    worker = await start_worker(config, tls_context=r.client_tls_context())
    row_id, _ = queue(config)

    assert await worker.deliver_due() == 1

    assert r.mail_commands == [] and r.messages == []
    row = outbox_row(config, row_id)
    assert (row["status"], row["last_error"]) == ("queued", "relay offers no STARTTLS")


async def test_a_relay_with_an_untrusted_certificate_gets_nothing(
    make_config: Callable[..., Config], start_worker: Callable[..., Any], relay: Any
) -> None:
    # The relay would take plaintext MAIL: a client that fell back to it would be seen.
    r: Relay = await relay(require_starttls=False)
    config = make_config(extra=smtp_delivery(r.port))
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)  # a CA that did not sign the relay's certificate
    worker = await start_worker(config, tls_context=stranger)
    row_id, _ = queue(config)

    assert await worker.deliver_due() == 1

    assert r.mail_commands == [] and r.messages == []
    row = outbox_row(config, row_id)
    assert row["status"] == "queued"
    assert "certificate verify failed" in row["last_error"], row["last_error"]


async def test_stop_is_bounded_and_leaves_the_mail_in_flight_queued(
    make_config: Callable[..., Config], start_worker: Callable[..., Any], relay: Any
) -> None:
    r: Relay = await relay()
    r.mode = "hang"
    config = make_config(extra=smtp_delivery(r.port, timeout=30))
    worker = await start_worker(config, tls_context=r.client_tls_context())
    row_id, _ = queue(config)
    await worker.start()
    await wait_for(lambda: r.mail_commands)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await worker.stop(grace=0.5)
    assert loop.time() - started < 5
    row = outbox_row(config, row_id)
    assert (row["status"], row["attempts"]) == ("queued", 0)


# --- RELIABILITY 44: kill -9 between the relay's 250 and marking the row sent -----------


async def test_kill_between_relay_250_and_marking_sent_gives_one_duplicate(
    tmp_path: Path, daemon: Callable[..., DaemonProcess], relay: Any
) -> None:
    r: Relay = await relay()
    ca_file = r.write_ca(tmp_path / "relay-ca.pem")
    options = {"extra": smtp_delivery(r.port, timeout=10, ca_file=str(ca_file))}
    config = load_config(write_config(tmp_path, **options))
    row_id, raw = queue(config, created=datetime.now(UTC))

    started: list[DaemonProcess] = []

    async def kill_before_answering(message: RelayedMessage) -> None:
        # The message is in; the daemon dies before it can read the 250 (or mark the row).
        await wait_for(lambda: started)
        await asyncio.to_thread(started[0].kill)

    r.on_message = kill_before_answering
    started.append(await asyncio.to_thread(daemon, **options))
    await wait_for(lambda: len(r.messages) == 1, timeout=15)
    await wait_for(lambda: started[0].proc is not None and started[0].proc.poll() is not None)
    assert outbox_row(config, row_id)["status"] == "queued"

    await asyncio.to_thread(started[0].start)
    await wait_for(lambda: outbox_row(config, row_id)["status"] == "sent", timeout=15)

    assert len(r.messages) == 2  # at most one duplicate
    first, second = r.messages
    assert first.data == second.data == raw  # the same Message-ID, the same bytes
    assert outbox_row(config, row_id)["attempts"] == 1
    assert started[0].terminate() == 0


# --- the CLI ----------------------------------------------------------------------------


def run_cli(config: Config, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["--config", str(config.path), *args])
    out, err = capsys.readouterr()
    return code, out + err


async def test_cli_outbox_list_and_retry(
    make_config: Callable[..., Config],
    start_worker: Callable[..., Any],
    relay: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    r: Relay = await relay()
    r.mode = "refuse"
    config = make_config(extra=smtp_delivery(r.port))
    clock = FixedClock(T0)
    worker = await start_worker(config, clock=clock, tls_context=r.client_tls_context())
    failed, _ = queue(config, message_id="<a@support.example.org>")
    await worker.deliver_due()
    r.mode = "accept"
    sent, _ = queue(config, message_id="<b@support.example.org>")
    await worker.deliver_due()
    waiting, _ = queue(config, message_id="<c@support.example.org>", created=T0 + timedelta(3650))

    code, out = run_cli(config, capsys, "outbox", "list", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [o["id"] for o in listed] == [waiting, sent, failed]
    assert set(listed[0]) == {
        "id",
        "ticket",
        "to",
        "subject",
        "kind",
        "status",
        "attempts",
        "last_error",
        "created_at",
        "message_id",
        "next_attempt_at",
        "sent_at",
    }
    assert [(o["status"], o["attempts"]) for o in listed] == [
        ("queued", 0),
        ("sent", 1),
        ("failed", 1),
    ]
    assert listed[2]["to"] == "alice@client.example.com"
    assert listed[2]["last_error"].startswith("550 5.1.1")
    code, out = run_cli(config, capsys, "outbox", "list", "--status", "failed", "--json")
    assert [o["id"] for o in json.loads(out)] == [failed]
    code, out = run_cli(config, capsys, "outbox", "list")
    assert code == 0 and "550 5.1.1" in out and "ERROR" in out

    code, out = run_cli(config, capsys, "outbox", "retry", str(failed), "--reason", "fixed")
    assert code == 0, out
    row = outbox_row(config, failed)
    assert (row["status"], row["attempts"]) == ("queued", 1)
    assert row["next_attempt_at"] <= iso(datetime.now(UTC))
    [retried] = rows(config, "SELECT actor, detail FROM events WHERE action = 'outbox.retried'")
    assert retried["actor"].startswith("cli:")
    assert json.loads(retried["detail"])["reason"] == "fixed"

    clock.set(datetime.now(UTC))
    await worker.deliver_due()
    assert outbox_row(config, failed)["status"] == "sent"
    assert [m.rcpt_tos for m in r.messages] == [("alice@client.example.com",)] * 2

    code, out = run_cli(config, capsys, "outbox", "retry", str(sent))
    assert code == 1 and f"outbox row {sent} was already sent" in out
    code, out = run_cli(config, capsys, "outbox", "retry", "999")
    assert code == 1 and "no outbox row 999" in out
