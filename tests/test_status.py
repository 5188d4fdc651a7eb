"""`gateway status`: a real daemon's status file and the database, read-only. Up and
healthy exits 0; an outbox row older than metrics.stuck_after, or a stopped daemon, exits
1. The daemon's sd_notify STATUS= carries the same one-line summary."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
from pathlib import Path

from gateway.config import load_config

from .clients import send_message
from .conftest import cli, make_message, seed_senders, wait_for, write_config
from .test_durability import wrapped_daemon

# Mail goes to a relay port nobody listens on: the acknowledgement stays queued (retried),
# which is what "stuck" means.
EXTRA = """
[metrics]
status_interval = 1
stuck_after = 1

[delivery]
mode = "smtp"
relay_host = "127.0.0.1"
relay_port = 1
starttls = false
retry_after = 3600
"""


def status_json(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    data: dict[str, object] = json.loads(result.stdout)
    return data


async def test_status_up_stuck_and_down(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, extra=EXTRA)
    config = load_config(config_path)
    seed_senders(config)
    log_path = tmp_path / "gateway.log"
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    statuses: list[str] = []

    async def receive_all() -> None:
        while True:
            data = (await loop.sock_recv(sock, 4096)).decode()
            statuses.extend(x for x in data.split("\n") if x.startswith("STATUS="))

    receiver = asyncio.create_task(receive_all())
    wrapper = ["env", f"NOTIFY_SOCKET={notify_path}"]
    try:
        with wrapped_daemon(wrapper, config_path, log_path) as (_, port, pid):
            await wait_for(lambda: config.status_path.exists())
            up = await cli(config, "status", "--json")
            assert up.returncode == 0, up.stderr
            data = status_json(up)
            daemon = data["daemon"]
            assert isinstance(daemon, dict)
            assert daemon["running"] is True and daemon["pid"] == pid
            assert data["messages_today"] == 0 and data["outbox_stuck"] is False

            await send_message(port, make_message(), "alice@client.example.com")
            await send_message(
                port, make_message(sender="x@stranger.example"), "x@stranger.example"
            )

            async def stuck() -> subprocess.CompletedProcess[str] | None:
                result = await cli(config, "status", "--json")
                return result if result.returncode == 1 else None

            deadline = loop.time() + 15
            result = None
            while result is None:
                assert loop.time() < deadline, "status never reported the stuck outbox"
                result = await stuck()
            data = status_json(result)
            assert data["outbox_stuck"] is True and data["outbox_waiting"] == 1
            assert data["messages_today"] == 2 and data["quarantine_held"] == 1
            assert isinstance(data["daemon"], dict) and data["daemon"]["running"] is True
            text = await cli(config, "status")
            assert text.returncode == 1
            assert "outbox stuck" in text.stderr and "metrics.stuck_after" in text.stderr
            assert "quarantine:" in text.stdout and "1 held" in text.stdout
            # systemctl status's line: refreshed every status_interval.
            await wait_for(lambda: any("2 messages today, 1 held" in s for s in statuses))
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        sock.close()
    down = await cli(config, "status")
    assert down.returncode == 1
    assert "daemon down" in down.stderr and "not running" in down.stderr
    assert "DOWN" in down.stdout


async def test_status_never_creates_a_database(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    result = await cli(config, "status")
    assert result.returncode == 1
    assert "no database" in result.stderr and "Traceback" not in result.stderr
    assert not config.database_path.exists()
