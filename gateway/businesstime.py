"""Business time: a unit's opening hours, business durations and the WHEN of a promise.

Pure arithmetic on aware datetimes (zoneinfo for the zones and their clock changes, the
`holidays` package for public holidays): no I/O, no clock of its own, no stage imports.
Every result is an aware datetime in UTC, the form the store keeps; `BusinessHours.local`
gives the wall-clock time to show.

Opening hours are a half-open interval of local wall-clock time on each business day,
[start, end): a desk open 09:00-17:30 is open at 09:00 and closed at 17:30. A day is a
business day when its weekday is one of the unit's days and it is neither a public holiday
of the unit's country (and subdivision) nor one of its extra holidays. The intervals are
built from the local calendar date and then turned into instants, so a clock change on a
weekend moves Monday's 09:00 to the new offset and nothing is off by an hour.

Durations (`parse_duration`): one to three parts, in this order, each at most once, each a
number of one to four digits, no spaces: `Nd` business days, `Nh` business hours, `Nm`
business minutes, e.g. `30m`, `4h`, `2d`, `1h30m`, `1d4h`. Case is ignored; the whole must
be more than zero.

- Hours and minutes are counted only while the desk is open, carried over closed time:
  4h from Friday 16:00 on a 09:00-17:30 desk is Monday 11:30. They are real elapsed time,
  so on a desk open round the clock the short spring Sunday has 23 of them.
- Days keep the clock: n days is the same local clock time on the n-th next business day,
  counted from `next_open(at)` when `at` is outside hours (Friday 10:15 + 1d is Monday
  10:15; Tuesday 20:00 + 1d is Thursday 09:00).
- A duration with days and hours adds the days first, then the hours.

WHEN (`when`), the time a promise falls due, is one of (case and surrounding spaces
ignored):

- a duration as above, added to now;
- `tomorrow`: the end of the next business day after today;
- a weekday (`friday` or `fri`): the end of the next such day after today, which must be a
  business day (a promise on a day the desk is closed is refused, not moved);
- an ISO date-time, `2026-12-01T15:00` or `2026-12-01 15:00`, in the unit's zone, or with
  an explicit offset (`+01:00`, `Z`); it must be in the future, and a local time skipped by
  the clocks going forward is refused (one repeated when they go back is the first);
- an ISO date, `2026-12-01`: the end of that business day.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays as holidays_package

DEFAULT_TIMEZONE = "Europe/London"
DEFAULT_DAYS = ("mon", "tue", "wed", "thu", "fri")
DEFAULT_START = "09:00"
DEFAULT_END = "17:30"
DEFAULT_HOLIDAYS_COUNTRY = "GB"
# England's bank holidays; Scotland, Wales and Northern Ireland have others.
DEFAULT_HOLIDAYS_SUBDIVISION = "ENG"

# The day names accepted in `days` and in WHEN: the English name or its first three
# letters, any case. Index = date.weekday().
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

_DURATION = re.compile(r"(?:(\d{1,4})d)?(?:(\d{1,4})h)?(?:(\d{1,4})m)?", re.IGNORECASE)
_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

# However the days and holidays are set, a unit has a business day within this many
# days; beyond it (a holiday list covering years) the search gives up with an error
# rather than loop.
_MAX_CLOSED_DAYS = 3660

_WHEN_FORMS = (
    "a duration (2h, 30m, 1d, 1h30m), tomorrow, a weekday (friday), "
    "an ISO date (2026-12-01) or an ISO date-time (2026-12-01T15:00, in the unit's zone "
    "unless it has an offset)"
)


class BusinessTimeError(ValueError):
    """A duration, WHEN, or unit setting that cannot be used; the message says why."""


@dataclass(frozen=True)
class Duration:
    """A business duration: whole business days, then business minutes."""

    days: int = 0
    minutes: int = 0

    def __str__(self) -> str:
        hours, minutes = divmod(self.minutes, 60)
        parts = [(self.days, "d"), (hours, "h"), (minutes, "m")]
        return "".join(f"{n}{unit}" for n, unit in parts if n) or "0m"


def parse_duration(text: str) -> Duration:
    """`30m`, `4h`, `2d`, `1h30m`, `1d4h` (see the module's docstring)."""
    cleaned = text.strip()
    match = _DURATION.fullmatch(cleaned)
    if not cleaned or match is None:
        raise BusinessTimeError(
            f"{text!r} is not a duration (a number and d, h or m, in that order: "
            "30m, 4h, 2d, 1h30m)"
        )
    days, hours, minutes = (int(part) if part else 0 for part in match.groups())
    duration = Duration(days=days, minutes=hours * 60 + minutes)
    if not duration.days and not duration.minutes:
        raise BusinessTimeError(f"{text!r}: a duration must be more than 0")
    return duration


def parse_timezone(name: str) -> ZoneInfo:
    """An IANA zone name, e.g. `Europe/London`."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        # ValueError: an empty or path-like key ("../etc/passwd"), which zoneinfo refuses.
        raise BusinessTimeError(
            f"unknown time zone {name!r} (an IANA name such as Europe/London)"
        ) from None


def parse_day(name: str) -> int:
    """A day name ("mon", "Monday") -> date.weekday() (Monday is 0)."""
    key = name.strip().lower()
    if key in DAY_NAMES:
        return DAY_NAMES.index(key)
    if key in _FULL_DAY_NAMES:
        return _FULL_DAY_NAMES.index(key)
    raise BusinessTimeError(f"{name!r} is not a day (mon..sun or monday..sunday)")


def parse_clock(text: str, *, allow_midnight_end: bool = False) -> int:
    """`HH:MM` (24-hour) -> minutes after midnight; `24:00` only as a closing time."""
    if allow_midnight_end and text == "24:00":
        return 24 * 60
    match = _CLOCK.fullmatch(text)
    if match is None:
        end = " (or 24:00 for midnight)" if allow_midnight_end else ""
        raise BusinessTimeError(f"{text!r} is not a time of day: HH:MM, 00:00 to 23:59{end}")
    return int(match[1]) * 60 + int(match[2])


def parse_date(text: str) -> date:
    """A date written YYYY-MM-DD, and only so."""
    try:
        if not _ISO_DATE.fullmatch(text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise BusinessTimeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def default_subdivision(country: str) -> str:
    """The subdivision a unit gets when it names none: England's for GB, else none (the
    country's national holidays)."""
    return DEFAULT_HOLIDAYS_SUBDIVISION if country == DEFAULT_HOLIDAYS_COUNTRY else ""


def check_holidays_country(country: str) -> str:
    """A country the `holidays` package knows (ISO 3166-1 alpha-2, any case) -> its code;
    "" (no public holidays) stays ""."""
    code = country.upper()
    if code and code not in holidays_package.list_supported_countries():
        raise BusinessTimeError(
            f"{country!r} is not a country the holidays package knows "
            '(an ISO 3166-1 alpha-2 code such as GB, US, JP; "" for none)'
        )
    return code


def check_holidays_subdivision(country: str, subdivision: str) -> str:
    """A subdivision code of `country` (any case) -> the package's spelling; "" (the
    national holidays) stays ""."""
    if not subdivision:
        return ""
    code = check_holidays_country(country)
    if not code:
        raise BusinessTimeError(
            'a holidays subdivision needs a holidays_country (or set both to "")'
        )
    spellings = {s.upper(): s for s in holidays_package.list_supported_countries()[code]}
    if subdivision.upper() not in spellings:
        known = ", ".join(sorted(spellings)) or "none"
        raise BusinessTimeError(
            f"{subdivision!r} is not a subdivision of {code} (one of: {known}; "
            '"" for the national holidays)'
        )
    return spellings[subdivision.upper()]


def public_holidays(country: str, subdivision: str) -> holidays_package.HolidayBase | None:
    """The `holidays` package's table for a country and subdivision (e.g. GB, ENG); None
    for country "". Its years are filled in as they are asked for."""
    subdiv = check_holidays_subdivision(country, subdivision)
    code = check_holidays_country(country)
    if not code:
        return None
    return holidays_package.country_holidays(code, subdiv=subdiv or None)


class BusinessHours:
    """A unit's opening hours, business days and holidays, in its zone."""

    def __init__(
        self,
        zone: ZoneInfo,
        weekdays: Iterable[int],
        start: int,
        end: int,
        extra_holidays: Iterable[date] = (),
        public: holidays_package.HolidayBase | None = None,
    ) -> None:
        self.zone = zone
        self.weekdays = frozenset(weekdays)
        self.start = start
        self.end = end
        self.extra_holidays = frozenset(extra_holidays)
        self.public = public
        if not self.weekdays:
            raise BusinessTimeError("at least one business day is needed")
        if not 0 <= start < end <= 24 * 60:
            raise BusinessTimeError("the desk must close later than it opens, on the same day")

    @classmethod
    def build(
        cls,
        *,
        timezone: str = DEFAULT_TIMEZONE,
        days: Iterable[str] = DEFAULT_DAYS,
        start: str = DEFAULT_START,
        end: str = DEFAULT_END,
        holidays: Iterable[str] = (),
        holidays_country: str = DEFAULT_HOLIDAYS_COUNTRY,
        holidays_subdivision: str | None = None,
    ) -> BusinessHours:
        """From a unit's settings as written in the config (the defaults are the config's);
        no subdivision means `default_subdivision(holidays_country)`."""
        if holidays_subdivision is None:
            holidays_subdivision = default_subdivision(holidays_country)
        return cls(
            zone=parse_timezone(timezone),
            weekdays=[parse_day(d) for d in days],
            start=parse_clock(start),
            end=parse_clock(end, allow_midnight_end=True),
            extra_holidays=[parse_date(d) for d in holidays],
            public=public_holidays(holidays_country, holidays_subdivision),
        )

    # --- days ---------------------------------------------------------------------------

    def holiday_name(self, day: date) -> str | None:
        """Why `day` is a holiday ("Christmas Day", "extra holiday"), or None."""
        if day in self.extra_holidays:
            return "extra holiday"
        if self.public is not None:
            name = self.public.get(day)
            if name:
                return str(name)
        return None

    def is_business_day(self, day: date) -> bool:
        return day.weekday() in self.weekdays and self.holiday_name(day) is None

    def opening_hours(self, day: date) -> tuple[datetime, datetime] | None:
        """When the desk opens and closes on `day` (its local date), in UTC; None when it
        is closed all day."""
        if not self.is_business_day(day):
            return None
        return self._instant(day, self.start), self._instant(day, self.end)

    def _instant(self, day: date, minutes: int) -> datetime:
        # Local wall-clock time -> UTC, built from the wall fields so that the zone's
        # offset on that date applies. A time skipped by a clock change (fold=0) lands
        # just after the gap; a repeated one is its first occurrence.
        days, rest = divmod(minutes, 24 * 60)
        wall = datetime.combine(
            day + timedelta(days=days), time(rest // 60, rest % 60), tzinfo=self.zone
        )
        return wall.astimezone(UTC)

    def business_day_after(self, day: date) -> date:
        """The first business day after `day`."""
        return next(self._business_days(day + timedelta(days=1)))

    def _business_days(self, first: date) -> Iterator[date]:
        """Business days from `first` on (itself included when it is one)."""
        day = first
        closed = 0
        while True:
            if self.is_business_day(day):
                closed = 0
                yield day
            else:
                closed += 1
                if closed > _MAX_CLOSED_DAYS:
                    raise BusinessTimeError(
                        f"no business day in the {_MAX_CLOSED_DAYS} days after {first}"
                    )
            day += timedelta(days=1)

    def _intervals(self, at: datetime) -> Iterator[tuple[datetime, datetime]]:
        """The opening intervals (UTC) that end after `at`, in order."""
        for day in self._business_days(self._local_date(at)):
            opens, closes = self._instant(day, self.start), self._instant(day, self.end)
            if closes > at:
                yield opens, closes

    # --- moments ------------------------------------------------------------------------

    def local(self, moment: datetime) -> datetime:
        """`moment` in the unit's zone, to show."""
        return _aware(moment).astimezone(self.zone)

    def _local_date(self, moment: datetime) -> date:
        return moment.astimezone(self.zone).date()

    def is_open(self, at: datetime) -> bool:
        at = _aware(at)
        hours = self.opening_hours(self._local_date(at))
        return hours is not None and hours[0] <= at < hours[1]

    def next_open(self, at: datetime) -> datetime:
        """`at` (in UTC) when the desk is open then, else the next moment it opens."""
        at = _aware(at)
        opens, _ = next(self._intervals(at))
        return max(opens, at)

    def end_of_day(self, day: date) -> datetime:
        """The closing time of business day `day`, in UTC."""
        hours = self.opening_hours(day)
        if hours is None:
            raise BusinessTimeError(f"{day} is not a business day")
        return hours[1]

    def add(self, at: datetime, duration: Duration) -> datetime:
        """`at` plus a business duration (see the module's docstring), in UTC."""
        at = _aware(at)
        moment = at
        if duration.days:
            start = self.local(self.next_open(at))
            day = start.date()
            for _ in range(duration.days):
                day = self.business_day_after(day)
            minutes = start.hour * 60 + start.minute
            moment = self._instant(day, minutes) + timedelta(
                seconds=start.second, microseconds=start.microsecond
            )
        if duration.minutes:
            moment = self._add_open_time(moment, timedelta(minutes=duration.minutes))
        return moment

    def _add_open_time(self, at: datetime, remaining: timedelta) -> datetime:
        for opens, closes in self._intervals(at):
            begin = max(opens, at)
            if remaining <= closes - begin:
                return begin + remaining
            remaining -= closes - begin
        raise AssertionError("unreachable: _intervals never ends")  # pragma: no cover


def when(text: str, now: datetime, hours: BusinessHours) -> datetime:
    """The moment a promise written as WHEN falls due (see the module's docstring), in
    UTC; a BusinessTimeError saying why when it cannot be one."""
    now = _aware(now)
    word = text.strip().lower()
    if not word:
        raise BusinessTimeError(f"no time given: write {_WHEN_FORMS}")
    today = hours.local(now).date()
    if word == "tomorrow":
        return hours.end_of_day(hours.business_day_after(today))
    weekday = _weekday(word)
    if weekday is not None:
        ahead = (weekday - today.weekday() - 1) % 7 + 1
        return _end_of(today + timedelta(days=ahead), hours, text)
    if word[:1].isdigit() and word[-1:] in ("d", "h", "m"):
        return hours.add(now, parse_duration(word))
    if _ISO_DATE.fullmatch(word):
        try:
            day = date.fromisoformat(word)
        except ValueError:
            raise BusinessTimeError(f"{text.strip()!r} is not a valid date") from None
        due = _end_of(day, hours, text)
    elif _ISO_DATE.match(word):
        due = _date_time(text.strip(), hours)
    else:
        raise BusinessTimeError(f"{text.strip()!r} is not a time: write {_WHEN_FORMS}")
    if due <= now:
        shown = hours.local(due).isoformat(timespec="minutes")
        raise BusinessTimeError(f"{text.strip()!r} ({shown}) is in the past")
    return due


def _weekday(word: str) -> int | None:
    try:
        return parse_day(word)
    except BusinessTimeError:
        return None


def _end_of(day: date, hours: BusinessHours, text: str) -> datetime:
    """The end of business day `day`, or an error naming why the desk is closed then."""
    if not hours.is_business_day(day):
        holiday = hours.holiday_name(day)
        why = f"a holiday ({holiday})" if holiday else "not a business day"
        raise BusinessTimeError(
            f"{text.strip()!r}: {day:%A} {day.isoformat()} is {why}; name a business day"
        )
    return hours.end_of_day(day)


def _date_time(text: str, hours: BusinessHours) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BusinessTimeError(f"{text!r} is not a valid date and time") from None
    if moment.tzinfo is not None:
        return moment.astimezone(UTC)
    local = moment.replace(tzinfo=hours.zone)
    # A wall-clock time the clocks skip (spring forward) does not survive the round trip
    # through UTC: refuse it rather than guess which side was meant.
    if local.astimezone(UTC).astimezone(hours.zone).replace(tzinfo=None) != moment:
        raise BusinessTimeError(
            f"{text!r} does not exist in {hours.zone.key} (the clocks go forward then)"
        )
    return local.astimezone(UTC)


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("business time needs a timezone-aware datetime")
    return moment.astimezone(UTC)
