"""`gateway backup` and `gateway restore` (issue 13 item 5): a backup taken while mail
streams in restores to a sound database holding every message acknowledged before the
backup began, and a daemon starts on it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Config, load_config

from .conftest import cli, make_message, rows, run_cli, send_message, wait_for, write_config


async def test_backup_during_intake_restores_every_acknowledged_message(
    tmp_path: Path, config: Config, start_gateway: Callable[..., Any]
) -> None:
    gateway = await start_gateway(config)
    acked: list[str] = []
    stop = asyncio.Event()

    async def sender() -> None:
        n = 0
        while not stop.is_set():
            mid = f"<stream.{n}@client.example.com>"
            await send_message(gateway, make_message(subject=f"stream {n}", message_id=mid))
            acked.append(mid)  # after the 250: the transaction is committed
            n += 1

    task = asyncio.create_task(sender())
    try:
        await wait_for(lambda: len(acked) >= 15, timeout=30)
        before = list(acked)  # acknowledged before the backup began
        made = await cli(config, "backup", str(tmp_path / "bk"))
        assert made.returncode == 0, made.stderr
        during = len(acked) - len(before)
        await wait_for(lambda: len(acked) >= len(before) + during + 5, timeout=30)
    finally:
        stop.set()
        await task

    manifest = json.loads((tmp_path / "bk" / "manifest.json").read_text())
    assert manifest["integrity"] == "ok" and manifest["messages"] >= len(before)
    # The daemon still holds its database: restoring over it is refused, nothing changed.
    refused = await cli(config, "restore", str(tmp_path / "bk"))
    assert refused.returncode == 1 and "in use" in refused.stderr, refused.stderr

    (tmp_path / "fresh").mkdir()
    fresh = load_config(write_config(tmp_path / "fresh"))
    restored = run_cli(fresh, "--as", "dana@example.org", "restore", str(tmp_path / "bk"))
    assert restored.returncode == 0, restored.stderr
    await start_gateway(fresh, seed=False)
    assert [r[0] for r in rows(fresh, "PRAGMA integrity_check")] == ["ok"]
    present = {r["message_id"] for r in rows(fresh, "SELECT message_id FROM messages")}
    assert set(before) <= present
    assert len(acked) > len(present & set(acked))  # mail after the backup is not in it
    event = rows(fresh, "SELECT actor FROM events WHERE action = 'database.restored'")
    assert [e["actor"] for e in event] == ["cli:dana@example.org"]


def test_backup_refuses_a_folder_with_files(tmp_path: Path, config: Config) -> None:
    run_cli(config, "orgs", "add", "Acme")  # creates the database
    target = tmp_path / "used"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    refused = run_cli(config, "backup", str(target))
    assert refused.returncode == 1 and "not an empty folder" in refused.stderr
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_restore_over_a_stopped_database_keeps_the_old_one_aside(
    tmp_path: Path, config: Config
) -> None:
    assert run_cli(config, "orgs", "add", "Acme").returncode == 0
    assert run_cli(config, "backup", str(tmp_path / "bk")).returncode == 0
    assert run_cli(config, "orgs", "add", "Later").returncode == 0
    done = run_cli(config, "restore", str(tmp_path / "bk"))
    assert done.returncode == 0, done.stderr
    names = {r["name"] for r in rows(config, "SELECT name FROM organisations")}
    assert names == {"Acme"}
    aside = list(config.database_path.parent.glob("gateway.db.before-restore-*"))
    assert aside and "kept as" in done.stdout


def test_restore_refuses_a_damaged_backup(tmp_path: Path, config: Config) -> None:
    assert run_cli(config, "orgs", "add", "Acme").returncode == 0
    assert run_cli(config, "backup", str(tmp_path / "bk")).returncode == 0
    copy = tmp_path / "bk" / "gateway.db"
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    refused = run_cli(config, "restore", str(tmp_path / "bk"))
    assert refused.returncode == 1 and "sha256" in refused.stderr
    assert {r["name"] for r in rows(config, "SELECT name FROM organisations")} == {"Acme"}
