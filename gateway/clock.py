"""The one wall clock: every time the daemon or the CLI stores (a message's arrival, an
event, an outbox row's next attempt, a quarantine expiry) is read from a `Clock`.

One is built where the process starts (`app.Gateway`, `cli.main`) and passed down, never
read from a global, so that a test, or a scheduler run for another moment, moves time by
passing a `FixedClock`. Timeouts and rates measure elapsed time with `time.monotonic()`
instead: the wall clock may step (NTP, an admin), and a timeout must not.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def iso(moment: datetime) -> str:
    """The stored form of a moment: ISO 8601 with microseconds and the UTC offset, e.g.
    "2026-11-27T10:00:00.000000+00:00". Always the same width, so stamps sort as text
    (SQLite compares them as strings)."""
    return moment.isoformat(timespec="microseconds")


class Clock:
    """The system's wall clock, in UTC."""

    def now(self) -> datetime:
        """An aware datetime in UTC."""
        return datetime.now(UTC)

    def stamp(self) -> str:
        """now() in its stored form (see `iso`)."""
        return iso(self.now())


class FixedClock(Clock):
    """A clock that moves only when told: for tests, and for running the scheduler's jobs
    as of another moment."""

    def __init__(self, moment: datetime) -> None:
        self.moment = _aware_utc(moment)

    def now(self) -> datetime:
        return self.moment

    def set(self, moment: datetime | str) -> None:
        """Move to `moment` (a datetime, or a stamp as stored)."""
        if isinstance(moment, str):
            moment = datetime.fromisoformat(moment)
        self.moment = _aware_utc(moment)

    def advance(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)


def _aware_utc(moment: datetime) -> datetime:
    # A naive datetime would be stored without an offset and sort apart from the others.
    if moment.tzinfo is None:
        raise ValueError("a clock's time must be timezone-aware")
    return moment.astimezone(UTC)
