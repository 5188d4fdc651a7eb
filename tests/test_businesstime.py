"""Business time (gateway/businesstime.py) and the [[unit]] / [commitments] configuration.

Table tests: each row is a start, a duration or WHEN, and the expected moment written as
local ISO with its offset, so a row checks both the instant and the wall-clock time staff
see. The holidays come from the `holidays` package (GB/ENG by default): 2026-12-25
Christmas Day, 2026-12-28 the Boxing Day substitute, 2027-03-26 Good Friday and
2027-03-29 Easter Monday. Europe/London changes its clocks on 2026-03-29, 2026-10-25 and
2027-03-28; America/New_York on 2026-03-08 and 2026-11-01.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.businesstime import (
    BusinessHours,
    BusinessTimeError,
    Duration,
    parse_duration,
    when,
)
from gateway.config import ConfigError, config_warnings, load_config

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = '[[mailbox]]\naddress = "support@example.org"\n'

LONDON = BusinessHours.build()
LONDON_EXTRA = BusinessHours.build(holidays=("2026-11-30",))
LONDON_NO_HOLIDAYS = BusinessHours.build(holidays_country="")
ALWAYS_OPEN = BusinessHours.build(
    days=("mon", "tue", "wed", "thu", "fri", "sat", "sun"),
    start="00:00",
    end="24:00",
    holidays_country="",
)
SUN_TO_THU = BusinessHours.build(days=("sun", "mon", "tue", "wed", "thu"), holidays_country="")
NEW_YORK = BusinessHours.build(timezone="America/New_York", holidays_country="US")
TOKYO = BusinessHours.build(timezone="Asia/Tokyo", holidays_country="JP")

UNITS = {
    "london": LONDON,
    "london+extra": LONDON_EXTRA,
    "london-no-holidays": LONDON_NO_HOLIDAYS,
    "always-open": ALWAYS_OPEN,
    "sun-to-thu": SUN_TO_THU,
    "new-york": NEW_YORK,
    "tokyo": TOKYO,
}


def at(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None
    return moment


def shown(moment: datetime, hours: BusinessHours) -> str:
    """The result as staff see it: local wall-clock time with its offset, to the minute."""
    assert moment.tzinfo is not None
    assert moment.utcoffset() == UTC.utcoffset(None), "results are stored in UTC"
    return hours.local(moment).isoformat(timespec="minutes")


# --- durations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "days", "minutes", "canonical"),
    [
        ("30m", 0, 30, "30m"),
        ("4h", 0, 240, "4h"),
        ("2d", 2, 0, "2d"),
        ("1h30m", 0, 90, "1h30m"),
        ("90m", 0, 90, "1h30m"),
        ("1d4h", 1, 240, "1d4h"),
        ("1d2h15m", 1, 135, "1d2h15m"),
        (" 2H ", 0, 120, "2h"),
    ],
)
def test_parse_duration(text: str, days: int, minutes: int, canonical: str) -> None:
    duration = parse_duration(text)
    assert duration == Duration(days=days, minutes=minutes)
    assert str(duration) == canonical


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not a duration"),
        ("h", "not a duration"),
        ("4", "not a duration"),
        ("4x", "not a duration"),
        ("2w", "not a duration"),
        ("-1h", "not a duration"),
        ("1.5h", "not a duration"),
        ("4h 30m", "not a duration"),
        ("30m1h", "not a duration"),
        ("1h1h", "not a duration"),
        ("12345h", "not a duration"),
        ("4 hours", "not a duration"),
        ("0m", "more than 0"),
        ("0d0h", "more than 0"),
    ],
)
def test_parse_duration_refuses(text: str, why: str) -> None:
    with pytest.raises(BusinessTimeError, match=why):
        parse_duration(text)


# --- adding business time ---------------------------------------------------------------

ADD_ROWS = [
    # (why, unit, start, duration, expected local time)
    ("inside one day", "london", "2026-11-24T10:00+00:00", "4h", "2026-11-24T14:00+00:00"),
    ("ends at closing", "london", "2026-11-24T13:30+00:00", "4h", "2026-11-24T17:30+00:00"),
    ("carries overnight", "london", "2026-11-24T16:00+00:00", "4h", "2026-11-25T11:30+00:00"),
    ("before opening", "london", "2026-11-24T07:00+00:00", "4h", "2026-11-24T13:00+00:00"),
    ("after closing", "london", "2026-11-24T20:00+00:00", "4h", "2026-11-25T13:00+00:00"),
    ("across a weekend", "london", "2026-11-27T16:00+00:00", "4h", "2026-11-30T11:30+00:00"),
    ("from a Saturday", "london", "2026-11-28T11:00+00:00", "4h", "2026-11-30T13:00+00:00"),
    ("business minutes", "london", "2026-11-24T17:00+00:00", "45m", "2026-11-25T09:15+00:00"),
    ("hours and minutes", "london", "2026-11-27T17:00+00:00", "1h30m", "2026-11-30T10:00+00:00"),
    ("more than a day", "london", "2026-11-24T10:00+00:00", "10h", "2026-11-25T11:30+00:00"),
    ("a day: same clock", "london", "2026-11-24T10:15+00:00", "1d", "2026-11-25T10:15+00:00"),
    ("a day over a weekend", "london", "2026-11-27T10:15+00:00", "1d", "2026-11-30T10:15+00:00"),
    ("two days", "london", "2026-11-26T15:00+00:00", "2d", "2026-11-30T15:00+00:00"),
    ("days after closing", "london", "2026-11-24T20:00+00:00", "2d", "2026-11-27T09:00+00:00"),
    ("a day at closing", "london", "2026-11-24T17:30+00:00", "1d", "2026-11-26T09:00+00:00"),
    ("days from a Saturday", "london", "2026-11-28T11:00+00:00", "1d", "2026-12-01T09:00+00:00"),
    ("days then hours", "london", "2026-11-24T16:00+00:00", "1d4h", "2026-11-26T11:30+00:00"),
    # Bank holidays from the package.
    ("Christmas", "london", "2026-12-24T16:00+00:00", "4h", "2026-12-29T11:30+00:00"),
    ("Christmas, a day", "london", "2026-12-24T10:00+00:00", "1d", "2026-12-29T10:00+00:00"),
    ("from Christmas Day", "london", "2026-12-25T10:00+00:00", "1h", "2026-12-29T10:00+00:00"),
    ("Boxing Day substitute", "london", "2026-12-28T12:00+00:00", "4h", "2026-12-29T13:00+00:00"),
    ("no holidays", "london-no-holidays", "2026-12-24T16:00+00:00", "4h", "2026-12-25T11:30+00:00"),
    ("an extra holiday", "london+extra", "2026-11-27T16:00+00:00", "4h", "2026-12-01T11:30+00:00"),
    # The clocks change on a Sunday: Monday's 09:00 is in the new offset.
    ("DST starts", "london", "2026-03-27T16:00+00:00", "4h", "2026-03-30T11:30+01:00"),
    ("DST ends", "london", "2026-10-23T16:00+01:00", "4h", "2026-10-26T11:30+00:00"),
    ("DST ends, a day", "london", "2026-10-23T10:00+01:00", "1d", "2026-10-26T10:00+00:00"),
    ("DST starts, a day", "london", "2026-03-27T10:00+00:00", "1d", "2026-03-30T10:00+01:00"),
    ("Easter and DST", "london", "2027-03-25T16:00+00:00", "4h", "2027-03-30T11:30+01:00"),
    # Open round the clock: business hours are real hours, so the short and the long
    # Sunday count 23 and 25 of them.
    ("24h, spring", "always-open", "2026-03-28T12:00+00:00", "24h", "2026-03-29T13:00+01:00"),
    ("24h, autumn", "always-open", "2026-10-24T12:00+01:00", "24h", "2026-10-25T11:00+00:00"),
    ("1d, autumn", "always-open", "2026-10-24T12:00+01:00", "1d", "2026-10-25T12:00+00:00"),
    ("other days", "sun-to-thu", "2026-11-27T10:00+00:00", "1h", "2026-11-29T10:00+00:00"),
    # Another zone, with its own holidays and clock changes.
    ("Thanksgiving", "new-york", "2026-11-25T16:00-05:00", "4h", "2026-11-27T11:30-05:00"),
    ("US DST starts", "new-york", "2026-03-06T16:00-05:00", "4h", "2026-03-09T11:30-04:00"),
    ("given in UTC", "new-york", "2026-11-24T21:00+00:00", "1h", "2026-11-24T17:00-05:00"),
    ("Tokyo holiday", "tokyo", "2026-11-20T07:00+00:00", "4h", "2026-11-24T11:30+09:00"),
]


@pytest.mark.parametrize(
    ("why", "unit", "start", "duration", "expected"),
    ADD_ROWS,
    ids=[row[0] for row in ADD_ROWS],
)
def test_add(why: str, unit: str, start: str, duration: str, expected: str) -> None:
    hours = UNITS[unit]
    assert shown(hours.add(at(start), parse_duration(duration)), hours) == expected


def test_london_has_no_dst_change_in_the_us_week() -> None:
    # The same row as "US DST starts", in London: the US change moves nothing here.
    result = LONDON.add(at("2026-03-06T16:00+00:00"), parse_duration("4h"))
    assert shown(result, LONDON) == "2026-03-09T11:30+00:00"


def test_add_refuses_a_naive_moment() -> None:
    with pytest.raises(ValueError, match="aware"):
        LONDON.add(datetime(2026, 11, 24, 10), parse_duration("1h"))


# --- open or closed ---------------------------------------------------------------------

OPEN_ROWS = [
    # (unit, moment, is open, next opening)
    ("london", "2026-11-24T10:00+00:00", True, "2026-11-24T10:00+00:00"),
    ("london", "2026-11-24T09:00+00:00", True, "2026-11-24T09:00+00:00"),
    ("london", "2026-11-24T08:59+00:00", False, "2026-11-24T09:00+00:00"),
    ("london", "2026-11-24T17:30+00:00", False, "2026-11-25T09:00+00:00"),
    ("london", "2026-11-28T10:00+00:00", False, "2026-11-30T09:00+00:00"),
    ("london", "2026-12-25T10:00+00:00", False, "2026-12-29T09:00+00:00"),
    ("london", "2026-03-29T08:00+01:00", False, "2026-03-30T09:00+01:00"),
    ("london", "2026-07-01T08:30+00:00", True, "2026-07-01T09:30+01:00"),
    ("london+extra", "2026-11-30T10:00+00:00", False, "2026-12-01T09:00+00:00"),
    ("new-york", "2026-11-24T14:30+00:00", True, "2026-11-24T09:30-05:00"),
    ("new-york", "2026-11-26T15:00+00:00", False, "2026-11-27T09:00-05:00"),
    ("tokyo", "2026-11-23T02:00+00:00", False, "2026-11-24T09:00+09:00"),
]


@pytest.mark.parametrize(("unit", "moment", "is_open", "opening"), OPEN_ROWS)
def test_is_open_and_next_open(unit: str, moment: str, is_open: bool, opening: str) -> None:
    hours = UNITS[unit]
    assert hours.is_open(at(moment)) is is_open
    assert shown(hours.next_open(at(moment)), hours) == opening


# --- WHEN: the promise grammar ----------------------------------------------------------

WED = "2026-11-25T11:00+00:00"

WHEN_ROWS = [
    # (unit, now, text, expected local time)
    ("london", WED, "2h", "2026-11-25T13:00+00:00"),
    ("london", WED, "1d", "2026-11-26T11:00+00:00"),
    ("london", WED, "tomorrow", "2026-11-26T17:30+00:00"),
    ("london", WED, " Tomorrow ", "2026-11-26T17:30+00:00"),
    ("london", WED, "friday", "2026-11-27T17:30+00:00"),
    ("london", WED, "Fri", "2026-11-27T17:30+00:00"),
    ("london", WED, "monday", "2026-11-30T17:30+00:00"),
    ("london", WED, "wednesday", "2026-12-02T17:30+00:00"),
    ("london", WED, "2026-12-01T15:00", "2026-12-01T15:00+00:00"),
    ("london", WED, "2026-12-01 15:00", "2026-12-01T15:00+00:00"),
    ("london", WED, "2026-12-01T15:00+01:00", "2026-12-01T14:00+00:00"),
    ("london", WED, "2026-12-01T15:00Z", "2026-12-01T15:00+00:00"),
    ("london", WED, "2026-12-01", "2026-12-01T17:30+00:00"),
    ("london", WED, "2026-11-25", "2026-11-25T17:30+00:00"),
    ("london", "2026-11-27T15:00+00:00", "tomorrow", "2026-11-30T17:30+00:00"),
    ("london", "2026-11-28T15:00+00:00", "tomorrow", "2026-11-30T17:30+00:00"),
    ("london", "2026-12-24T10:00+00:00", "tomorrow", "2026-12-29T17:30+00:00"),
    ("london", "2026-10-23T12:00+01:00", "tomorrow", "2026-10-26T17:30+00:00"),
    ("london", "2026-11-24T20:00+00:00", "2h", "2026-11-25T11:00+00:00"),
    ("london", "2027-06-01T10:00+01:00", "2027-06-02T15:00", "2027-06-02T15:00+01:00"),
    ("new-york", "2026-11-25T17:00+00:00", "tomorrow", "2026-11-27T17:30-05:00"),
    ("new-york", "2026-11-25T17:00+00:00", "2026-11-30T10:00", "2026-11-30T10:00-05:00"),
    ("tokyo", "2026-11-20T07:00+00:00", "tuesday", "2026-11-24T17:30+09:00"),
]


@pytest.mark.parametrize(("unit", "now", "text", "expected"), WHEN_ROWS)
def test_when(unit: str, now: str, text: str, expected: str) -> None:
    hours = UNITS[unit]
    assert shown(when(text, at(now), hours), hours) == expected


WHEN_ERRORS = [
    # (now, text, what the message says)
    (WED, "", "no time given"),
    (WED, "soon", "not a time"),
    (WED, "0h", "more than 0"),
    (WED, "saturday", "not a business day"),
    ("2027-03-24T10:00+00:00", "friday", "Good Friday"),
    (WED, "2026-12-25", "Christmas Day"),
    (WED, "2026-11-28", "not a business day"),
    ("2026-12-24T10:00+00:00", "monday", "Boxing Day"),
    (WED, "2026-11-24", "in the past"),
    (WED, "2026-11-25T10:59", "in the past"),
    (WED, "2026-13-01", "not a valid date"),
    (WED, "2027-03-28T01:30", "does not exist"),
]


@pytest.mark.parametrize(("now", "text", "why"), WHEN_ERRORS)
def test_when_refuses(now: str, text: str, why: str) -> None:
    with pytest.raises(BusinessTimeError, match=why):
        when(text, at(now), LONDON)


def test_when_error_lists_the_grammar() -> None:
    with pytest.raises(BusinessTimeError) as info:
        when("next week", at(WED), LONDON)
    for form in ("2h", "1d", "tomorrow", "friday", "2026-12-01", "2026-12-01T15:00"):
        assert form in str(info.value)


# --- configuration: [[unit]] and [commitments] ------------------------------------------


def config_from(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


def test_default_unit_for_a_mailbox_without_a_table(tmp_path: Path) -> None:
    config = config_from(tmp_path, MINIMAL)
    unit = config.unit("support")
    assert unit.name == "support"
    assert (unit.timezone, unit.start, unit.end) == ("Europe/London", "09:00", "17:30")
    assert unit.days == ("mon", "tue", "wed", "thu", "fri")
    assert (unit.holidays_country, unit.holidays_subdivision) == ("GB", "ENG")
    assert (unit.first_response, unit.update_every, unit.remind_before) == ("4h", "2d", "1h")
    assert unit.staff == () and unit.lead == ""
    assert [u.name for u in config.units] == ["support"]
    # Its hours are the defaults', bank holidays included.
    result = unit.hours.add(at("2026-12-24T16:00+00:00"), unit.first_response_duration)
    assert shown(result, unit.hours) == "2026-12-29T11:30+00:00"


def test_unit_table_commitments_and_staff(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        MINIMAL
        + '[[mailbox]]\naddress = "us@example.org"\nunit = "us-desk"\n'
        + '[commitments]\nfirst_response = "2h"\nremind_before = "30m"\n'
        + "[[unit]]\n"
        + 'name = "us-desk"\n'
        + 'staff = ["Dana@Example.ORG", "eli@example.org"]\n'
        + 'lead = "Lee@example.org"\n'
        + 'timezone = "America/New_York"\n'
        + 'days = ["Monday", "TUE", "wed", "thursday", "fri"]\n'
        + 'start = "08:00"\nend = "16:00"\n'
        + 'holidays = ["2026-12-24"]\n'
        + 'holidays_country = "US"\n'
        + 'update_every = "1d"\n'
        + "[[unit]]\n"
        + 'name = "unused"\n',
    )
    us = config.unit("us-desk")
    assert us.staff == ("dana@example.org", "eli@example.org")
    assert us.lead == "lee@example.org"
    assert us.days == ("mon", "tue", "wed", "thu", "fri")
    # Another country without a subdivision: its national holidays, not England's.
    assert (us.holidays_country, us.holidays_subdivision) == ("US", "")
    # [commitments] is the default; the unit's own key wins.
    assert (us.first_response, us.update_every, us.remind_before) == ("2h", "1d", "30m")
    support = config.unit("support")
    assert (support.first_response, support.update_every) == ("2h", "2d")
    assert [u.name for u in config.units] == ["us-desk", "unused", "support"]
    # A unit nobody configured (a ticket of a unit since removed) still has the defaults.
    assert config.unit("gone").timezone == "Europe/London"
    assert config.unit("gone").first_response == "2h"
    # The extra holiday and the unit's zone and hours.
    result = us.hours.add(at("2026-12-23T15:00-05:00"), us.first_response_duration)
    assert shown(result, us.hours) == "2026-12-28T09:00-05:00"
    # Unit staff are staff; the lead only receives escalations.
    assert config.is_staff("dana@example.org") and config.is_staff("eli@example.org")
    assert not config.is_staff("lee@example.org")
    assert not config.is_staff("client@example.com")


UNIT = '[[unit]]\nname = "support"\n'

CONFIG_ERRORS = [
    # (extra config text, key, why)
    ('unit = {name = "x"}\n', "unit", "array of tables"),
    ("[[unit]]\n", "unit[0].name", "required"),
    ('[[unit]]\nname = " "\n', "unit[0].name", "must not be empty"),
    (UNIT + UNIT, "unit[1].name", "twice"),
    (UNIT + 'lunch = "12:00"\n', "unit[0].lunch", "unknown key"),
    (UNIT + 'timezone = "Europe/Lundon"\n', "unit[0].timezone", "unknown time zone"),
    (UNIT + 'timezone = "../etc/passwd"\n', "unit[0].timezone", "unknown time zone"),
    (UNIT + 'timezone = ""\n', "unit[0].timezone", "unknown time zone"),
    (UNIT + 'days = ["mon", "funday"]\n', "unit[0].days[1]", "not a day"),
    (UNIT + 'days = ["mon", "Monday"]\n', "unit[0].days[1]", "twice"),
    (UNIT + "days = []\n", "unit[0].days", "at least one"),
    (UNIT + 'start = "9am"\n', "unit[0].start", "HH:MM"),
    (UNIT + 'start = "24:00"\n', "unit[0].start", "HH:MM"),
    (UNIT + 'end = "17:60"\n', "unit[0].end", "HH:MM"),
    (UNIT + 'start = "18:00"\n', "unit[0].end", "later than"),
    (UNIT + 'holidays = ["2026-02-30"]\n', "unit[0].holidays[0]", "not a date"),
    (UNIT + 'holidays = ["20261225"]\n', "unit[0].holidays[0]", "not a date"),
    (UNIT + 'holidays_country = "XX"\n', "unit[0].holidays_country", "not a country"),
    (UNIT + 'holidays_subdivision = "XYZ"\n', "unit[0].holidays_subdivision", "ENG"),
    (
        UNIT + 'holidays_country = "US"\nholidays_subdivision = "ENG"\n',
        "unit[0].holidays_subdivision",
        "not a subdivision of US",
    ),
    (
        UNIT + 'holidays_country = ""\nholidays_subdivision = "ENG"\n',
        "unit[0].holidays_subdivision",
        "holidays_country",
    ),
    (UNIT + 'first_response = "4 hours"\n', "unit[0].first_response", "not a duration"),
    (UNIT + 'remind_before = "0m"\n', "unit[0].remind_before", "more than 0"),
    (UNIT + 'staff = ["not an address"]\n', "unit[0].staff[0]", "not a valid address"),
    (UNIT + 'lead = "nobody"\n', "unit[0].lead", "not a valid address"),
    ('[commitments]\nupdate_every = "2w"\n', "commitments.update_every", "not a duration"),
    ('[commitments]\nreminder = "1h"\n', "commitments.reminder", "unknown key"),
    ("[commitments]\nremind_before = 60\n", "commitments.remind_before", "must be a string"),
]


@pytest.mark.parametrize(("extra", "key", "why"), CONFIG_ERRORS)
def test_config_errors_name_the_key(tmp_path: Path, extra: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(tmp_path, extra + MINIMAL)
    assert str(info.value).startswith(key), str(info.value)
    assert why in str(info.value)


def test_check_config_names_a_bad_zone(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL + UNIT + 'timezone = "Mars/Olympus"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(path), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "unit[0].timezone: unknown time zone 'Mars/Olympus'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unit_staff_alone_get_the_cannot_authenticate_warning(tmp_path: Path) -> None:
    # Unit staff are staff: listed with nothing that could authenticate their mail, every
    # mail of theirs would be held, and check-config must say so as for [staff].
    config = config_from(tmp_path, MINIMAL + UNIT + 'staff = ["dana@example.org"]\n')
    assert any("nothing can authenticate staff mail" in w for w in config_warnings(config))
    assert config_warnings(config_from(tmp_path, MINIMAL + UNIT)) == []
