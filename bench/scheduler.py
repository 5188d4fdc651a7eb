"""One scheduler pass over a full desk: how long the reminders, escalations and digest take.

Fills a temporary database with N open tickets (default 10,000) of one unit, each with
an open commitment, due times spread evenly over the next `--spread-days` business days
from Tuesday 8 December 2026 09:00 (London), owners on every other ticket. Then times,
through the daemon's group-commit Writer (``synchronous=FULL``) as `run_jobs` runs it:

- **steady**: a pass a minute later than the last, as the daemon runs it every minute:
  the queries find the few promises that fall into the reminder window;
- **start of day**: the first pass of the business day: the unit's digest (four
  sections counted over every ticket) and whatever fell due overnight;
- **catch-up**: the daemon was down for `--down-hours` hours of business time: every
  reminder and escalation of that time at once (each one Writer unit, group-committed);

and the CLI's `scheduler run --dry-run` (one transaction, rolled back) at the catch-up
moment. Logging is off, as at ``[log] level = "warning"``. Nothing outside the temporary
directory is touched.

    .venv/bin/python bench/scheduler.py
    .venv/bin/python bench/scheduler.py --tickets 10000 --spread-days 10 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway import scheduler, store
from gateway.businesstime import parse_duration
from gateway.clock import iso
from gateway.config import load_config
from gateway.store import Writer

CONFIG = """
[smtp]
hostname = "support.example.org"

[storage]
database = "var/gateway.db"

[[mailbox]]
address = "support@example.org"
unit = "support"

[[unit]]
name = "support"
staff = ["bob@example.org", "carol@example.org"]
lead = "lead@example.org"
"""

# A Tuesday in winter (London is on UTC): the desk opens at 09:00.
OPENING = datetime(2026, 12, 8, 9, 0, tzinfo=UTC)


def fill(path: Path, tickets: int, spread_days: int) -> None:
    config = load_config(path)
    unit = config.unit("support")
    hours = unit.hours
    # Spread the due times over the business time of `spread_days` days from opening.
    open_minutes = spread_days * (17 * 60 + 30 - 9 * 60)
    created = iso(OPENING - timedelta(days=7))
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        for n in range(tickets):
            minutes = 1 + n * open_minutes // tickets
            due = iso(hours.add(OPENING, parse_duration(f"{minutes}m")))
            number = store.create_ticket(
                conn,
                unit="support",
                requester=f"client{n % 500}@client.example.com",
                subject=f"Ticket number {n}",
                now=created,
                mailbox="support@example.org",
            )
            conn.execute(
                "UPDATE tickets SET status = 'open', owner = ?, next_update_due = ?"
                " WHERE number = ?",
                ("bob@example.org" if n % 2 else None, due, number),
            )
            conn.execute(
                "INSERT INTO commitments (ticket, due, set_by, state, created_at)"
                " VALUES (?, ?, 'gateway', 'open', ?)",
                (number, due, created),
            )


async def timed_pass(config: Any, writer: Writer, now: datetime) -> tuple[float, int]:
    start = time.perf_counter()
    done = await scheduler.run_commitments(config, writer, now)
    return time.perf_counter() - start, len(done)


async def bench(tickets: int, spread_days: int, down_hours: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(CONFIG)
        (Path(tmp) / "var").mkdir()
        config = load_config(path)
        with closing(store.connect(config.database_path)):
            pass  # creates and migrates the database
        started = time.perf_counter()
        fill(path, tickets, spread_days)
        fill_seconds = time.perf_counter() - started

        writer = Writer(config.database_path)
        await writer.start()
        results: dict[str, Any] = {"tickets": tickets, "fill_s": round(fill_seconds, 2)}
        try:
            # The night before: nothing due yet (the first due time is 09:01).
            evening = OPENING - timedelta(hours=12)
            results["evening"] = await timed_pass(config, writer, evening)
            results["start_of_day"] = await timed_pass(config, writer, OPENING)
            steady = []
            for minute in range(1, 11):
                steady.append(await timed_pass(config, writer, OPENING + timedelta(minutes=minute)))
            results["steady_max"] = max(steady)
            later = OPENING + timedelta(minutes=10, hours=down_hours)
            with closing(store.connect(config.database_path)) as conn:
                start = time.perf_counter()
                dry = scheduler.run_pass(config, conn, later, dry_run=True)
                results["dry_run"] = (time.perf_counter() - start, len(dry))
            results["catch_up"] = await timed_pass(config, writer, later)
        finally:
            await writer.close()
        return {
            k: ({"seconds": round(v[0], 3), "jobs": v[1]} if isinstance(v, tuple) else v)
            for k, v in results.items()
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tickets", type=int, default=10_000)
    parser.add_argument("--spread-days", type=int, default=10, help="business days of due times")
    parser.add_argument("--down-hours", type=int, default=2, help="the catch-up's gap")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    found = asyncio.run(bench(args.tickets, args.spread_days, args.down_hours))
    if args.json:
        json.dump(found, sys.stdout, indent=2)
        print()
        return 0
    print(f"{found['tickets']} open tickets with commitments (filled in {found['fill_s']} s)")
    for name in ("evening", "start_of_day", "steady_max", "dry_run", "catch_up"):
        run = found[name]
        print(f"  {name:13} {run['seconds'] * 1000:8.1f} ms  {run['jobs']:5} jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
