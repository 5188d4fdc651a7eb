"""[metrics] listen: a real daemon serves Prometheus metrics over HTTP, and after a burst
of mail (some filed, some held) the counts it serves match the database's."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ConfigError, load_config, parse_listen

from .clients import send_message
from .conftest import make_message, rows, seed_senders, wait_for, write_config
from .test_durability import wrapped_daemon

LISTENING = re.compile(r"event=metrics\.listening listen=127\.0\.0\.1:(\d+)")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_scraped_counts_match_the_database(tmp_path: Path) -> None:
    extra = '\n[metrics]\nlisten = "127.0.0.1:0"\n'
    config_path = write_config(tmp_path, extra=extra)
    config = load_config(config_path)
    seed_senders(config)
    log_path = tmp_path / "gateway.log"
    filed, held = 6, 3
    with wrapped_daemon(["env"], config_path, log_path) as (_, port, _pid):
        match = LISTENING.search(log_path.read_text())
        assert match, log_path.read_text()
        metrics_port = int(match.group(1))
        senders = [f"c{i}@client.example.com" for i in range(filed)]
        senders += [f"x{i}@stranger.example" for i in range(held)]
        await asyncio.gather(
            *(send_message(port, make_message(subject=f"m {a}", sender=a), a) for a in senders)
        )
        # Every acknowledgement delivered (to the outbox folder) before the last scrape.
        await wait_for(
            lambda: (
                not rows(config, "SELECT 1 FROM outbox WHERE status = 'queued'")
                and rows(config, "SELECT 1 FROM outbox")
            ),
            timeout=15,
        )
        samples = await asyncio.to_thread(scrape, metrics_port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    db_held = len(rows(config, "SELECT 1 FROM quarantine WHERE status = 'held'"))
    db_filed = len(
        rows(config, "SELECT 1 FROM messages WHERE direction = 'in' AND ticket IS NOT NULL")
    )
    db_sent = len(rows(config, "SELECT 1 FROM outbox WHERE status = 'sent'"))
    assert (db_filed, db_held) == (filed, held)
    assert value("gateway_messages_total", disposition="file", reason="authorised") == db_filed
    assert (
        value("gateway_messages_total", disposition="quarantine", reason="unknown-sender")
        == db_held
    )
    assert value("gateway_quarantine_held") == db_held
    assert value("gateway_deliveries_total", result="sent") == db_sent == filed
    assert value("gateway_outbox_queued") == 0
    assert value("gateway_outbox_oldest_age_seconds") == 0
    assert value("gateway_intake_seconds_count") == filed + held
    assert value("gateway_smtp_replies_total", code="250") >= filed + held
    assert value("gateway_smtp_replies_total", code="220") == filed + held
    # Each message and each delivery's marks are committed: at least one batch, and the
    # batches hold every unit.
    assert 1 <= value("gateway_store_batch_size_count") <= value("gateway_store_batch_size_sum")
    assert ("gateway_parser_worker_restarts_total", ()) in samples
    assert ("gateway_scheduler_lag_seconds", ()) in samples


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_listen_parses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text, "metrics.listen") == expected


@pytest.mark.parametrize(
    "text", ["9464", "127.0.0.1", ":9464", "::1:9464", "127.0.0.1:port", "h:70000", "[]:1"]
)
def test_bad_listen_names_the_key(tmp_path: Path, text: str) -> None:
    path = write_config(tmp_path, extra=f'\n[metrics]\nlisten = "{text}"\n')
    with pytest.raises(ConfigError, match=r"^metrics\.listen: "):
        load_config(path)
