"""The on-call rota (issue 12): add and remove a shift, import shifts from an iCalendar
file, and say who is on call for a unit at a moment (the rota, else its secondary).

Every change runs in the caller's one transaction with its audit event (oncall.added,
oncall.removed, oncall.imported). This module never pages anyone: paging reads the rota
through `store.oncall.on_call`. A client's address never goes on the rota, because a
page names a client and an incident.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
from email_validator import EmailNotValidError, validate_email

from ..address import match_mailbox
from ..clock import iso
from ..config import MailboxConfig, UnitConfig
from ..store.events import EventAction, record_event
from ..store.oncall import (
    Shift,
    add_shift,
    find_shift,
    on_call,
    remove_shift,
    remove_shifts_from,
)
from ..store.senders import organisation_for_domain, sender_record
from .errors import ActionError

# The source of a shift added by hand; an imported event's is "ical:<UID>".
SOURCE_CLI = "cli"
ICAL_PREFIX = "ical:"


# --- arguments ---------------------------------------------------------------------------


def known_unit(units: Sequence[UnitConfig], text: str | None) -> str | None:
    """A unit the desk knows (a [[unit]] table or a mailbox's unit); None: desk-wide."""
    if text is None:
        return None
    names = [u.name for u in units]
    if text.strip() not in names:
        raise ActionError(f"unknown unit '{text}' (the desk's units: {', '.join(names)})")
    return text.strip()


def rota_address(text: str) -> str:
    """An address as staff addresses are configured: valid, lower-case, A-label domain
    (a plus tag is kept: a pager alias may have one)."""
    try:
        valid = validate_email(text.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise ActionError(f"invalid address '{text}': {exc}") from None
    return f"{valid.local_part.lower()}@{valid.ascii_domain.lower()}"


def check_may_be_paged(
    conn: sqlite3.Connection, mailboxes: Sequence[MailboxConfig], address: str
) -> None:
    """Refuse a client's address and our own mailboxes: a page must never reach a client,
    nor loop back into the desk as a new ticket."""
    if match_mailbox(address, mailboxes) is not None:
        raise ActionError(f"{address} is one of our own mailboxes, not a person to page")
    record = sender_record(conn, address)
    org = organisation_for_domain(conn, address.rpartition("@")[2])
    name = (record.organisation_name if record and record.authorised else None) or (
        org.name if org else None
    )
    if name is not None:
        raise ActionError(
            f"{address} is a client's address (organisation {name}): pages name clients "
            "and incidents and never go to a client"
        )


def parse_moment(text: str, zone: ZoneInfo, option: str) -> datetime:
    """An ISO 8601 date-time: with an offset as given, without one in `zone` (the unit's
    business-hours zone). Returned in UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ActionError(
            f"{option}: not an ISO 8601 date and time: {text!r} (e.g. 2026-12-05T18:00)"
        ) from None
    if moment.tzinfo is None:
        # fold=0: a wall time that occurs twice (clocks going back) is its first instant.
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(UTC)


# --- adding and removing by hand ---------------------------------------------------------


def shift_json(shift: Shift) -> dict[str, Any]:
    """A shift as `oncall list --json` shows it: UTC ISO times, unit null for desk-wide."""
    return {
        "id": shift.id,
        "address": shift.address,
        "unit": shift.unit,
        "from": shift.starts_at,
        "until": shift.ends_at,
        "source": shift.source,
    }


def _shift_detail(shift: Shift, reason: str | None = None) -> dict[str, Any]:
    detail = {k: v for k, v in shift_json(shift).items() if k != "id"}
    return {**detail, "reason": reason} if reason else detail


def add(
    conn: sqlite3.Connection,
    *,
    mailboxes: Sequence[MailboxConfig],
    address: str,
    unit: str | None,
    starts: datetime,
    ends: datetime,
    actor: str,
    now: str,
) -> Shift:
    """Put `address` on call for `unit` (None: the whole desk) from `starts` until `ends`."""
    if ends <= starts:
        raise ActionError(
            f"--until ({iso(ends.astimezone(UTC))}) must be after --from "
            f"({iso(starts.astimezone(UTC))})"
        )
    check_may_be_paged(conn, mailboxes, address)
    shift = add_shift(
        conn,
        address=address,
        unit=unit,
        starts_at=iso(starts.astimezone(UTC)),
        ends_at=iso(ends.astimezone(UTC)),
        source=SOURCE_CLI,
        created_by=actor,
        created_at=now,
    )
    record_event(
        conn,
        time=now,
        actor=actor,
        action=EventAction.ONCALL_ADDED,
        subject=f"oncall:{shift.id}",
        detail=_shift_detail(shift),
    )
    return shift


def remove(conn: sqlite3.Connection, *, shift_id: int, actor: str, now: str) -> Shift:
    shift = find_shift(conn, shift_id)
    if shift is None:
        raise ActionError(f"no on-call shift {shift_id} (see `gateway oncall list --all`)")
    remove_shift(conn, shift_id)
    record_event(
        conn,
        time=now,
        actor=actor,
        action=EventAction.ONCALL_REMOVED,
        subject=f"oncall:{shift.id}",
        detail=_shift_detail(shift),
    )
    return shift


# --- who is on call ----------------------------------------------------------------------


@dataclass(frozen=True)
class OnCall:
    """Who covers a unit at a moment: the rota's shifts, else the fallback secondary."""

    unit: str | None
    shifts: list[Shift]
    secondary: str | None  # the unit's `secondary`, else [oncall] secondary; None: nobody

    @property
    def from_rota(self) -> bool:
        return bool(self.shifts)

    @property
    def addresses(self) -> list[str]:
        """Who is paged first: the people on the rota, else the secondary."""
        if self.shifts:
            return list(dict.fromkeys(s.address for s in self.shifts))
        return [self.secondary] if self.secondary else []

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "on_call": [shift_json(s) for s in self.shifts],
            "secondary": self.secondary,
            # True: nobody is on the rota, so the secondary (if any) is who is paged.
            "fallback": not self.shifts,
            "addresses": self.addresses,
        }

    def describe(self) -> str:
        if self.shifts:
            return ", ".join(self.addresses)
        if self.secondary:
            return f"{self.secondary} (secondary: no one on the rota)"
        return "no one (no one on the rota and no secondary)"


def secondary_for(unit: UnitConfig | None, desk_secondary: str) -> str | None:
    """The unit's own `secondary`, else the desk's [oncall] secondary ("" = none)."""
    return (unit.secondary if unit is not None and unit.secondary else desk_secondary) or None


def who_is_on_call(
    conn: sqlite3.Connection, *, unit: str | None, secondary: str | None, at: str
) -> OnCall:
    return OnCall(unit=unit, shifts=on_call(conn, unit, at), secondary=secondary)


# --- import from an iCalendar file (RFC 5545) --------------------------------------------

# An address written in an event's SUMMARY ("On call: bob@example.org").
_ADDRESS_IN_TEXT = re.compile(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)+")


@dataclass(frozen=True)
class CalendarShift:
    uid: str
    address: str
    starts_at: str  # UTC, stored form
    ends_at: str


@dataclass
class CalendarRead:
    """What a calendar file holds for the rota, before anything is written."""

    shifts: list[CalendarShift] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)  # every event's UID, named or not
    unnamed: list[str] = field(default_factory=list)  # events naming no one (UIDs)
    past: int = 0  # events that ended before now: never on call again, not imported
    cancelled: int = 0  # STATUS:CANCELLED events


def _as_utc(value: object, zone: ZoneInfo, tzid: str | None, what: str) -> datetime:
    if not isinstance(value, date):
        # A PERIOD (start/end) or a time alone is no span of the rota.
        raise ActionError(f"{what}: not a date or date-time")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            if tzid:
                # icalendar leaves a time naive when it knows neither the TZID nor a
                # VTIMEZONE for it: guessing the zone would move the shift by hours.
                raise ActionError(f"{what}: unknown time zone TZID={tzid}")
            # A "floating" time (RFC 5545 3.3.5, form #1): local to whoever reads it,
            # here the unit's zone.
            value = value.replace(tzinfo=zone)
        return value.astimezone(UTC)
    # An all-day event (VALUE=DATE): from local midnight in the unit's zone.
    return datetime.combine(value, time(0), zone).astimezone(UTC)


def _names(event: icalendar.Component, wanted: Sequence[str]) -> list[str]:
    """The addresses an event names: its attendees (mailto:, not those who declined),
    then addresses in its SUMMARY. With `wanted`, only those, and a SUMMARY also names
    one by its local part as a word ("On call: bob")."""
    found: list[str] = []
    attendees = event.get("ATTENDEE")
    if attendees is None:
        attendees = []
    elif not isinstance(attendees, list):
        attendees = [attendees]
    for attendee in attendees:
        value = str(attendee)
        if not value.lower().startswith("mailto:"):
            continue
        if str(attendee.params.get("PARTSTAT", "")).upper() == "DECLINED":
            continue
        try:
            found.append(rota_address(value[len("mailto:") :]))
        except ActionError:
            continue  # a room or a list with a malformed address names no one to page
    summary = str(event.get("SUMMARY", ""))
    for candidate in _ADDRESS_IN_TEXT.findall(summary):
        try:
            found.append(rota_address(candidate))
        except ActionError:
            continue
    if wanted:
        words = {w.strip(".") for w in re.findall(r"[\w.+-]+", summary.lower())}
        found = [a for a in found if a in wanted]
        found += [a for a in wanted if a.partition("@")[0] in words]
    return list(dict.fromkeys(found))


def read_calendar(
    data: bytes, *, zone: ZoneInfo, wanted: Sequence[str], now: datetime
) -> CalendarRead:
    """The shifts an iCalendar file gives: one per event and address it names. Raises
    ActionError naming the event (its UID) on anything it cannot read: a bad file is
    refused whole."""
    try:
        calendar = icalendar.Calendar.from_ical(data)
    except (ValueError, IndexError, KeyError) as exc:
        raise ActionError(f"not an iCalendar file: {str(exc)[:200]}") from None
    if not isinstance(calendar, icalendar.Calendar) or calendar.name != "VCALENDAR":
        raise ActionError("not an iCalendar file: no VCALENDAR")
    read = CalendarRead()
    for event in calendar.walk("VEVENT"):
        try:
            _read_event(event, read, zone=zone, wanted=wanted, now=now)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # What icalendar's lenient parser lets through and then cannot decode.
            uid = str(event.get("UID", "")).strip() or "(none)"
            raise ActionError(f"event UID {uid}: cannot read it: {str(exc)[:200]}") from None
    return read


def _read_event(
    event: icalendar.Component,
    read: CalendarRead,
    *,
    zone: ZoneInfo,
    wanted: Sequence[str],
    now: datetime,
) -> None:
    """One VEVENT into `read` (see read_calendar)."""
    uid = str(event.get("UID", "")).strip()
    summary = str(event.get("SUMMARY", ""))[:60]
    if not uid:
        raise ActionError(
            f"an event has no UID (SUMMARY {summary!r}): a re-import could not replace it"
        )
    what = f"event UID {uid}"
    if uid in read.uids:
        raise ActionError(f"{what} appears twice")
    read.uids.append(uid)
    if event.errors:
        prop, problem = event.errors[0]
        raise ActionError(f"{what}: {prop}: {problem}")
    # Recurring events are not expanded (every limit would need a horizon): refused
    # whole rather than imported as their first occurrence only.
    for prop in ("RRULE", "RDATE", "RECURRENCE-ID"):
        if prop in event:
            raise ActionError(
                f"{what} is recurring ({prop}): recurring events are not imported; "
                "export the calendar with its occurrences expanded, or add them "
                "with `gateway oncall add`"
            )
    if str(event.get("STATUS", "")).upper() == "CANCELLED":
        read.cancelled += 1
        return
    if "DTSTART" not in event:
        raise ActionError(f"{what} has no DTSTART")
    start_value = event.decoded("DTSTART")
    start_tzid = event["DTSTART"].params.get("TZID")
    starts = _as_utc(start_value, zone, start_tzid, f"{what} DTSTART")
    if "DTEND" in event:
        ends = _as_utc(
            event.decoded("DTEND"), zone, event["DTEND"].params.get("TZID"), f"{what} DTEND"
        )
    elif "DURATION" in event:
        duration = event.decoded("DURATION")
        if not isinstance(duration, timedelta):
            raise ActionError(f"{what}: DURATION is not a duration")
        ends = starts + duration
    elif not isinstance(start_value, datetime):
        ends = _as_utc(start_value + timedelta(days=1), zone, None, what)  # one day
    else:
        ends = starts  # RFC 5545 3.6.1: a moment, not a span
    if ends <= starts:
        raise ActionError(f"{what} ends before it starts (or has no length)")
    names = _names(event, wanted)
    if not names:
        read.unnamed.append(uid)
        return
    if ends <= now:
        read.past += 1
        return
    for address in names:
        read.shifts.append(CalendarShift(uid, address, iso(starts), iso(ends)))


@dataclass(frozen=True)
class Imported:
    added: int
    replaced: int  # shifts an earlier import of the same events had made


def import_shifts(
    conn: sqlite3.Connection,
    *,
    mailboxes: Sequence[MailboxConfig],
    read: CalendarRead,
    file: str,
    unit: str | None,
    actor: str,
    now: str,
) -> Imported:
    """Write a calendar's shifts for `unit` in the caller's transaction: first remove what
    an earlier import of the same events (same UIDs, same unit) made, so a re-import
    replaces rather than duplicates."""
    for address in dict.fromkeys(s.address for s in read.shifts):
        check_may_be_paged(conn, mailboxes, address)
    replaced = sum(remove_shifts_from(conn, ICAL_PREFIX + uid, unit) for uid in read.uids)
    for shift in read.shifts:
        add_shift(
            conn,
            address=shift.address,
            unit=unit,
            starts_at=shift.starts_at,
            ends_at=shift.ends_at,
            source=ICAL_PREFIX + shift.uid,
            created_by=actor,
            created_at=now,
        )
    record_event(
        conn,
        time=now,
        actor=actor,
        action=EventAction.ONCALL_IMPORTED,
        subject=f"oncall:{file}",
        detail={
            "file": file,
            "unit": unit,
            "events": len(read.uids),
            "added": len(read.shifts),
            "replaced": replaced,
            "unnamed": read.unnamed,
            "past": read.past,
            "cancelled": read.cancelled,
        },
    )
    return Imported(added=len(read.shifts), replaced=replaced)
