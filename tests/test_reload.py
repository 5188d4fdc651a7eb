"""SIGHUP reloads the configuration and templates of a running daemon, under load: no
acknowledged message is lost, the next acknowledgement uses the new template, and a broken
configuration is logged (naming the key) while the old one stays in force. The daemon runs
with JOURNAL_STREAM naming its log file, so its lines carry syslog priorities."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
import re
import shutil
import signal
from pathlib import Path

from gateway.config import load_config

from .clients import send_message
from .conftest import ROOT, make_message, rows, seed_senders, wait_for, write_config
from .test_durability import wrapped_daemon

QUEUED = re.compile(r"queued as ([0-9a-f]+)")


def ack_subjects(outbox: Path) -> list[str]:
    subjects = []
    for path in sorted(outbox.glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        subjects.append(str(msg["Subject"]))
    return subjects


async def test_sighup_under_load_reloads_templates_and_keeps_a_good_config(
    tmp_path: Path,
) -> None:
    templates = tmp_path / "tpl"
    shutil.copytree(ROOT / "templates", templates)
    extra = '\n[templates]\ndirectory = "tpl"\n'
    config_path = write_config(tmp_path, extra=extra)
    config = load_config(config_path)
    seed_senders(config)
    good_text = config_path.read_text()
    log_path = tmp_path / "gateway.log"
    log_path.write_bytes(b"")
    st = os.stat(log_path)
    wrapper = ["env", f"JOURNAL_STREAM={st.st_dev}:{st.st_ino}"]
    acknowledged: list[str] = []
    stop = asyncio.Event()

    async def sender(port: int) -> None:
        # Continuous load: a new client address each time, so that every message opens
        # a ticket and no per-recipient cap withholds its acknowledgement.
        i = 0
        while not stop.is_set():
            i += 1
            address = f"load{i}@client.example.com"
            delivery = await send_message(
                port, make_message(subject=f"load {i}", sender=address), address
            )
            match = QUEUED.search(delivery.text)
            assert match, delivery.text
            acknowledged.append(match.group(1))

    with wrapped_daemon(wrapper, config_path, log_path) as (_, port, pid):
        load = asyncio.create_task(sender(port))
        try:
            await wait_for(lambda: len(acknowledged) >= 3)
            (templates / "acknowledgement.subject.txt").write_text(
                "RELOADED {{ ticket.tag }} {{ ticket.subject }}\n"
            )
            os.kill(pid, signal.SIGHUP)
            await wait_for(lambda: "event=config.reloaded" in log_path.read_text())
            before = len(acknowledged)
            after = "after-reload"
            await send_message(port, make_message(subject=after, sender="new@client.example.com"))
            outbox = tmp_path / "var" / "outbox"
            found = await wait_for(
                lambda: [s for s in ack_subjects(outbox) if after in s], timeout=15
            )
            assert found[0].startswith("RELOADED "), found

            # A broken configuration: logged with the key, the old one kept.
            config_path.write_text(good_text + "\n[delivery]\nbogus_key = 1\n")
            os.kill(pid, signal.SIGHUP)
            await wait_for(lambda: "event=config.reload_failed" in log_path.read_text())
            await wait_for(lambda: len(acknowledged) >= before + 3)
            second = "still-reloaded"
            await send_message(
                port, make_message(subject=second, sender="newer@client.example.com")
            )
            found = await wait_for(
                lambda: [s for s in ack_subjects(outbox) if second in s], timeout=15
            )
            assert found[0].startswith("RELOADED "), found
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(load, 30)
        load.result()  # the sender never saw a refusal or a dropped session
    text = log_path.read_text()
    failed = [line for line in text.splitlines() if "event=config.reload_failed" in line]
    assert failed and "delivery.bogus_key" in failed[0], failed
    # Under journald every line carries its syslog priority (sd-daemon(3)).
    assert failed[0].startswith("<3>level=error "), failed
    ready = next(line for line in text.splitlines() if "event=gateway.ready" in line)
    assert ready.startswith("<6>level=info "), ready
    stored = {r["queue_id"] for r in rows(config, "SELECT queue_id FROM messages")}
    missing = [q for q in acknowledged if q not in stored]
    assert not missing, missing
    assert len(acknowledged) >= 6
