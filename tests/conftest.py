"""Shared fixtures: a config in a tmp dir, the real gateway on an ephemeral port, clients
(tests/clients.py: the one SMTP/LMTP client and the one "send a message" helper).

The gateway under test is built by `gateway.app.Gateway`, the same factory the daemon
uses; nothing is mocked. Helpers wait for conditions with a deadline, never with sleeps.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from gateway import store
from gateway.app import Gateway
from gateway.config import Config, load_config

from .clients import (
    HELO_NAME,
    LmtpClient,
    RawClient,
    Refused,
    Reply,
    dot_stuffed,
    send_message,
)

__all__ = [
    "HELO_NAME",
    "LmtpClient",
    "RawClient",
    "Refused",
    "Reply",
    "dot_stuffed",
    "send_message",
]

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

BASE_CONFIG = """
[smtp]
host = "127.0.0.1"
port = {port}
hostname = "support.example.org"
protocol = "{protocol}"
max_message_size = {max_message_size}
max_recipients = {max_recipients}
max_connections = {max_connections}
max_connections_per_ip = {max_connections_per_ip}
timeout = {timeout}
{extra_smtp}

[storage]
database = "var/gateway.db"
{extra_storage}

[parser]
workers = 1
{extra_parser}

[[mailbox]]
address = "support@example.org"
unit = "support"

[[mailbox]]
address = "billing@example.org"
unit = "billing"
{extra}
"""


def write_config(directory: Path, **options: Any) -> Path:
    values: dict[str, Any] = {
        "port": 0,
        "protocol": "smtp",
        "max_message_size": 1_048_576,
        "max_recipients": 100,
        "max_connections": 100,
        "max_connections_per_ip": 10,
        "timeout": 30,
        "extra_smtp": "",
        "extra_storage": "",
        "extra_parser": "",
        "extra": "",
    }
    unknown = set(options) - set(values)
    assert not unknown, f"unknown config option(s) in test: {unknown}"
    values.update(options)
    path = directory / "config.toml"
    path.write_text(BASE_CONFIG.format(**values))
    return path


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    def factory(**options: Any) -> Config:
        return load_config(write_config(tmp_path, **options))

    return factory


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config()


# Organisations every test database starts with unless a test asks for an empty sender
# list: most tests are about something other than who may write.
CLIENT_DOMAINS = {"Client Ltd": "client.example.com", "Other Co": "other.example.net"}


def seed_senders(config: Config) -> None:
    """Authorise every address at the client domains (an explicit domain grant each)."""
    now = "2026-11-27T00:00:00.000000+00:00"
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        for name, domain in CLIENT_DOMAINS.items():
            if store.find_organisation(conn, name) is not None:
                continue
            org = store.add_organisation(
                conn, name=name, domains=[domain], unit=None, account_manager=None, now=now
            )
            store.upsert_sender(conn, address=f"@{domain}", organisation=org, name=None, now=now)


@pytest.fixture
async def start_gateway() -> AsyncIterator[Callable[..., Any]]:
    """Factory: start a Gateway for a config; every one started is stopped at the end.

    With seed=True (the default) the client domains are authorised first.
    """
    started: list[Gateway] = []

    async def factory(config: Config, *, seed: bool = True, **options: Any) -> Gateway:
        if seed:
            seed_senders(config)
        gateway = Gateway(config, **options)
        await gateway.start()
        started.append(gateway)
        return gateway

    yield factory
    for gateway in started:
        await gateway.stop(grace=5)


@pytest.fixture
async def gateway(config: Config, start_gateway: Callable[[Config], Any]) -> Gateway:
    gw: Gateway = await start_gateway(config)
    return gw


def rows(config: Config, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    with closing(store.connect(config.database_path)) as conn:
        return list(conn.execute(sql, params))


def stored_messages(config: Config, direction: str | None = "in") -> list[dict[str, Any]]:
    """Stored messages, newest first: received ones unless told otherwise (the gateway
    also stores every mail it sends)."""
    with closing(store.connect(config.database_path)) as conn:
        found = store.list_messages(conn)
    return [m for m in found if direction is None or m["direction"] == direction]


def make_message(
    subject: str = "Printer on fire",
    sender: str = "alice@client.example.com",
    to: str = "support@example.org",
    body: str = "Hello,\r\n\r\nthe printer is on fire.\r\n",
    message_id: str | None = None,
    headers: str = "",
) -> bytes:
    mid = message_id or f"<{time.monotonic_ns()}.{os.getpid()}@client.example.com>"
    text = (
        f"From: Alice Example <{sender}>\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: {mid}\r\n"
        "Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"{headers}"
        "\r\n"
        f"{body}"
    )
    return text.encode()


@pytest.fixture
async def raw_client() -> AsyncIterator[Callable[..., Any]]:
    """Factory: a RawClient (an LmtpClient with lmtp=True) on a port, from loopback address
    `source` if given, every reply shown to `on_reply`; all are closed at the end."""
    clients: list[RawClient] = []

    async def factory(
        port: int,
        source: str | None = None,
        *,
        lmtp: bool = False,
        on_reply: Callable[[str], None] | None = None,
    ) -> RawClient:
        kind = LmtpClient if lmtp else RawClient
        client = await kind.connect(port, source=source, on_reply=on_reply)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


def run_cli(config: Config, *args: str, stdin: str | None = "") -> subprocess.CompletedProcess[str]:
    """`gateway --config <config> ARGS...` in a subprocess, as an admin runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(config.path), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def cli(
    config: Config, *args: str, stdin: str | None = ""
) -> subprocess.CompletedProcess[str]:
    """run_cli without blocking the event loop (a gateway may be serving in the test)."""
    return await asyncio.to_thread(run_cli, config, *args, stdin=stdin)


async def wait_for(
    condition: Callable[[], Any], timeout: float = 10, interval: float = 0.02
) -> Any:
    """Poll `condition` until it returns something truthy, or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


class DaemonProcess:
    """`gateway --config X serve` as a real subprocess, for kill -9 and signal tests."""

    READY = re.compile(r"event=gateway\.ready .*listen=[^ ]*:(\d+)")

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 20) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # The child gets its own copy of the descriptor; ours is closed at once, so no
        # kill() finishing in another thread can close the handle of a restarted daemon.
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "--config", str(self.config_path), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
            match = self.READY.search(text)
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{text}")
            time.sleep(0.02)  # polling a log file from a sync fixture; bounded by deadline
        raise AssertionError("gateway did not become ready:\n" + self.log_text())

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def factory(**options: Any) -> DaemonProcess:
        config_path = write_config(tmp_path, **options)
        seed_senders(load_config(config_path))
        process = DaemonProcess(config_path, tmp_path / "gateway.log")
        process.start()
        started.append(process)
        return process

    yield factory
    for process in started:
        process.stop()


@pytest.fixture
async def relay() -> AsyncIterator[Callable[..., Any]]:
    """Factory: start a Relay (tests/relay.py) on loopback; all are closed at the end."""
    from .relay import Relay

    started: list[Relay] = []

    async def factory(**options: Any) -> Relay:
        started.append(Relay(**options))
        return await started[-1].start()

    yield factory
    for r in started:
        await r.close()
