"""Prometheus metrics: the names and help texts, the database health the status command
and the scrape share, and the HTTP endpoint of `[metrics] listen`.

Counters and histograms are incremented where the thing happens (one line each, in the
pipeline, server, writer, parser pool, outbox and scheduler). They live in a private
registry, so only what is defined here is served (no process or platform collectors of
the library's global registry, and nothing another import registers there).

The gauges that come from the database (queue depth and age, quarantine size, overdue
tickets) are read at scrape time by `HealthCollector`, on a read-only connection of its
own opened for each scrape on the server's thread: indexed queries only (`health`), so a
scrape never holds the writer up, and a scrape that fails gets no database gauges rather
than an error page.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES = Counter(
    "gateway_messages",
    "Messages decided by the rules, by disposition (file, quarantine, reject, tempfail) "
    "and the deciding reason",
    ["disposition", "reason"],
    registry=REGISTRY,
)
SMTP_REPLIES = Counter(
    "gateway_smtp_replies",
    "SMTP/LMTP replies sent, by reply code",
    ["code"],
    registry=REGISTRY,
)
INTAKE_SECONDS = Histogram(
    "gateway_intake_seconds",
    "Time from the end of DATA to the decision (parse, checks and the synced commit)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
STORE_BATCH_SIZE = Histogram(
    "gateway_store_batch_size",
    "Units of work per store commit (group commit); the count is the number of commits",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
PARSER_RESTARTS = Counter(
    "gateway_parser_worker_restarts",
    "Parser worker processes replaced (killed on a limit, crashed, or died idle)",
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "gateway_deliveries",
    "Delivery attempts of outbox rows, by result (sent, retry, failed)",
    ["result"],
    registry=REGISTRY,
)
SCHEDULER_LAG = Gauge(
    "gateway_scheduler_lag_seconds",
    "How late the scheduler's last pass started against its interval",
    registry=REGISTRY,
)


def today_start(now: datetime) -> str:
    return (
        now.astimezone(UTC)
        .replace(hour=0, minute=0, second=0, microsecond=0)
        .isoformat(timespec="microseconds")
    )


def health(conn: sqlite3.Connection, now: datetime) -> dict[str, Any]:
    """What an operator watches, from the database; every query uses an index."""
    stamp = now.astimezone(UTC).isoformat(timespec="microseconds")

    def one(sql: str, *params: object) -> Any:
        return conn.execute(sql, params).fetchone()[0]

    oldest = one("SELECT MIN(created_at) FROM outbox WHERE status = 'queued'")
    overdue = {
        str(unit): int(count)
        for unit, count in conn.execute(
            "SELECT unit, COUNT(*) FROM tickets WHERE next_update_due IS NOT NULL "
            "AND next_update_due <= ? GROUP BY unit ORDER BY unit",
            (stamp,),
        )
    }
    oldest_age = None
    if oldest is not None:
        oldest_age = max(0.0, (now - datetime.fromisoformat(oldest)).total_seconds())
    return {
        "messages_today": int(
            one(
                "SELECT COUNT(*) FROM messages WHERE received_at >= ? AND direction = 'in'",
                today_start(now),
            )
        ),
        "last_message_at": one("SELECT MAX(received_at) FROM messages"),
        "quarantine_held": int(one("SELECT COUNT(*) FROM quarantine WHERE status = 'held'")),
        "outbox_waiting": int(one("SELECT COUNT(*) FROM outbox WHERE status = 'queued'")),
        "outbox_failed": int(one("SELECT COUNT(*) FROM outbox WHERE status = 'failed'")),
        "outbox_oldest_queued_at": oldest,
        "outbox_oldest_age_seconds": oldest_age,
        "overdue_by_unit": overdue,
    }


def open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection that never creates the file (mode=ro)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    conn.execute("PRAGMA query_only = 1")
    return conn


class HealthCollector(Collector):
    """The database gauges, read at scrape time."""

    def __init__(self) -> None:
        self.database: Path | None = None  # set by serve_metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self.database is None:
            return []
        try:
            conn = open_read_only(self.database)
            try:
                found = health(conn, datetime.now(UTC))
            finally:
                conn.close()
        except sqlite3.Error as exc:
            logging.getLogger("gateway").warning("event=metrics.health_failed error=%r", exc)
            return []
        return list(self._families(found))

    @staticmethod
    def _families(found: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "gateway_outbox_queued", "Outbox rows waiting to be delivered", found["outbox_waiting"]
        )
        yield GaugeMetricFamily(
            "gateway_outbox_failed", "Outbox rows given up on", found["outbox_failed"]
        )
        yield GaugeMetricFamily(
            "gateway_outbox_oldest_age_seconds",
            "Age of the oldest queued outbox row (0 when none waits)",
            found["outbox_oldest_age_seconds"] or 0.0,
        )
        yield GaugeMetricFamily(
            "gateway_quarantine_held", "Messages held in the quarantine", found["quarantine_held"]
        )
        overdue = GaugeMetricFamily(
            "gateway_tickets_overdue", "Tickets past their next update, by unit", labels=["unit"]
        )
        for unit, count in found["overdue_by_unit"].items():
            overdue.add_metric([unit], count)
        yield overdue


HEALTH = HealthCollector()
REGISTRY.register(HEALTH)


def serve_metrics(host: str, port: int, database: Path) -> tuple[WSGIServer, Thread]:
    """Start the library's threaded HTTP server on host:port (only called when
    `[metrics] listen` is set); stop it with `server.shutdown()`."""
    HEALTH.database = database
    return start_http_server(port, addr=host, registry=REGISTRY)
