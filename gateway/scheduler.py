"""Time-driven work of the daemon: quarantine expiry now; commitments and reminders later.

Each job is a unit for the writer, so it commits like any message does. A job that fails
is logged and tried again on the next round; it must never stop the daemon or the loop.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from .actions import quarantine
from .clock import Clock
from .config import Config
from .logs import event
from .store import Writer

# How often the jobs run. Quarantine expiry is measured in days: an hour is precise enough.
INTERVAL_SECONDS = 3600.0


async def run_jobs(config: Config, writer: Writer, clock: Clock) -> None:
    """One round of every job, as of clock.now() (a FixedClock runs them for another time)."""
    expired = await writer.write(
        partial(quarantine.expire, days=config.policy.quarantine_days, now=clock.now())
    )
    if expired:
        event("quarantine.expired", count=len(expired), ids=",".join(map(str, expired)))


async def run_scheduler(
    config: Config,
    writer: Writer,
    clock: Clock,
    interval: float = INTERVAL_SECONDS,
) -> None:
    while True:
        try:
            await run_jobs(config, writer, clock)
        except asyncio.CancelledError:
            raise
        except Exception:
            logging.getLogger("gateway").exception("event=scheduler.failed")
        await asyncio.sleep(interval)
