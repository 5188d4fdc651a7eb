"""sd_notify: exact datagrams on a real AF_UNIX socket, silence when there is none, and
the daemon's watchdog pings, which a stalled event loop must stop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.sdnotify import SystemdNotifier, watchdog_interval

from .conftest import wait_for, write_config
from .test_durability import wrapped_daemon


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in tmp_path, as systemd binds NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_sends_exact_datagrams(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier(path)
    assert notifier.enabled

    notifier.ready()
    notifier.ready("listening on 0.0.0.0:25")
    notifier.status("3 sessions")
    notifier.watchdog()
    notifier.stopping()
    notifier.stopping("draining 2 sessions")
    notifier.close()

    assert [receive(sock) for _ in range(6)] == [
        b"READY=1",
        b"READY=1\nSTATUS=listening on 0.0.0.0:25",
        b"STATUS=3 sessions",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"STOPPING=1\nSTATUS=draining 2 sessions",
    ]


def test_newline_in_status_cannot_inject_an_assignment(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    notifier = SystemdNotifier(path)
    notifier.status("hello\nREADY=1\r\nMAINPID=1")
    notifier.close()
    assert receive(sock) == b"STATUS=hello READY=1 MAINPID=1"


def test_reads_notify_socket_from_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = SystemdNotifier()
    notifier.ready()
    notifier.close()
    assert receive(sock) == b"READY=1"


def test_abstract_namespace_socket() -> None:
    name = f"gateway-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        notifier = SystemdNotifier("@" + name)
        notifier.ready("up")
        notifier.close()
        assert receive(sock) == b"READY=1\nSTATUS=up"
    finally:
        sock.close()


@pytest.mark.parametrize("value", [None, ""])
def test_no_socket_means_no_op(
    value: str | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    notifier.ready("x")
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()
    assert caplog.records == []


def test_missing_socket_never_raises_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier(str(tmp_path / "absent.sock"))
    assert notifier.enabled
    with caplog.at_level(logging.WARNING, logger="gateway"):
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
    notifier.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway"]
    assert len(warnings) == 1
    assert "event=sd_notify_failed" in warnings[0]


def test_full_receive_queue_does_not_block(listener: tuple[socket.socket, str]) -> None:
    # Nobody reads the listener: once its queue is full, sendto would block on a blocking
    # socket. The notifier must drop the notification instead.
    # The sends run in a daemon thread so that a regression fails the test instead of hanging it.
    _sock, path = listener
    notifier = SystemdNotifier(path)

    def flood() -> None:
        for _ in range(10_000):
            notifier.watchdog()

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(timeout=5)
    assert not sender.is_alive(), "sd_notify blocked on a full socket queue"
    notifier.close()


def test_close_is_idempotent(listener: tuple[socket.socket, str]) -> None:
    _sock, path = listener
    notifier = SystemdNotifier(path)
    notifier.close()
    notifier.watchdog()
    notifier.close()
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "garbage"}, None),
        ({"WATCHDOG_USEC": "garbage"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_watchdog_interval_defaults_to_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 15.0


# --- 53. a stalled event loop stops the watchdog pings ------------------------------------

STALL_SECONDS = 2.0
WATCHDOG_USEC = 200_000  # WatchdogSec=0.2 s: the daemon pings every 0.1 s


async def test_a_stalled_event_loop_stops_the_watchdog_pings(
    tmp_path: Path, listener: tuple[socket.socket, str]
) -> None:
    # The real daemon with sd_notify on (the socket is the test's) and the test hook that
    # blocks its event loop (SIGUSR2: time.sleep on the loop, as a runaway handler would).
    # Pings from a thread would go on through the stall, and systemd would never restart
    # a daemon whose sessions are all stuck.
    sock, path = listener
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    pings: list[float] = []  # arrival times of WATCHDOG=1
    ready = asyncio.Event()

    async def receive_all() -> None:
        while True:
            data = await loop.sock_recv(sock, 4096)
            if b"READY=1" in data.split(b"\n"):
                ready.set()
            if data == b"WATCHDOG=1":
                pings.append(time.monotonic())

    receiver = asyncio.create_task(receive_all())
    wrapper = [
        "env",
        f"NOTIFY_SOCKET={path}",
        f"WATCHDOG_USEC={WATCHDOG_USEC}",
        "GATEWAY_TEST_HOOKS=1",
        f"GATEWAY_TEST_STALL_SECONDS={STALL_SECONDS}",
    ]
    log_path = tmp_path / "gateway.log"
    try:
        with wrapped_daemon(wrapper, write_config(tmp_path), log_path) as (_, _, pid):
            await asyncio.wait_for(ready.wait(), 10)
            await wait_for(lambda: len(pings) >= 5)
            before = len(pings)
            os.kill(pid, signal.SIGUSR2)
            await wait_for(lambda: "event=test.loop_resumed" in log_path.read_text(), 30)
            await wait_for(lambda: len(pings) >= before + 5)
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    stalled = max(gaps)
    # No ping for the whole stall: a watchdog of WatchdogSec=0.2 s would have fired ten
    # times over. Before it, pings kept their pace; after it, they came back.
    assert stalled >= STALL_SECONDS * 0.9, gaps
    index = gaps.index(stalled)
    assert index >= before - 2, (index, before, gaps)
    assert max(gaps[:index]) < STALL_SECONDS / 2, gaps
    assert len(gaps) - index > 3, gaps  # pings resumed


# --- journald priorities (issue 13) ---------------------------------------------------------


def test_log_lines_carry_syslog_priority_only_on_the_journal(tmp_path: Path) -> None:
    from gateway import logs

    path = tmp_path / "out.log"
    saved = (list(logs.log.handlers), logs.log.level, logs.log.propagate)
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        journal = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.on_journal(stream, journal)
        assert not logs.on_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.on_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not logs.on_journal(stream, {})
        logs.configure("debug", stream, syslog_prefix="always")
        try:
            logs.event("t.debug", logging.DEBUG)
            logs.event("t.info")
            logs.event("outbox.retry", logging.WARNING)
            logs.event("outbox.failed", logging.ERROR)
            logs.event("gateway.database_failed", logging.CRITICAL)
            logs.configure("info", stream, syslog_prefix="never")
            logs.event("t.plain")
        finally:
            # Leave the logger as pytest's caplog expects it for the tests that follow.
            logs.log.handlers[:] = saved[0]
            logs.log.setLevel(saved[1])
            logs.log.propagate = saved[2]
    assert path.read_text().splitlines() == [
        "<7>level=debug event=t.debug",
        "<6>level=info event=t.info",
        "<4>level=warning event=outbox.retry",
        "<3>level=error event=outbox.failed",
        "<2>level=critical event=gateway.database_failed",
        "level=info event=t.plain",
    ]
